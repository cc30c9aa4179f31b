"""Tests of the batch-1 speed work: fused ONNX export (fewer nodes) and the strided student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedsqueeze.models import build_model
from fedsqueeze.server.compact import CompactConfig, build_student, quantize_student
from fedsqueeze.server.compact.fast import strided_student
from fedsqueeze.server.export import flatten_ops
from fedsqueeze.server.onnx_fuse import fold_input_normalisation, merge_factored

onnx = pytest.importorskip("onnx", reason="the onnx extra (onnx, onnxruntime) is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxruntime) is not installed")

from fedsqueeze.server.onnx_export import OnnxRuntimeModel, export_onnx  # noqa: E402

MEAN, STD = 0.1307, 0.3081


def _raw(n: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(0)).float()


def _normalised(raw: torch.Tensor) -> torch.Tensor:
    return (raw / 255 - MEAN) / STD


def _node_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_merge_factored_is_exact_and_keeps_activations_apart() -> None:
    torch.manual_seed(0)
    teacher = build_model("lenet5").eval()
    student = build_student(teacher, CompactConfig(conv_rank=None, linear_rank=8, prune_ratio=0.5))
    ops = flatten_ops(student)
    merged = merge_factored(ops)
    kinds = [op["op"] for op in merged]
    # fc1 (200 -> 60, rank 8) would grow by 9,920 weights merged and stays a pair; fc2 (60 -> 42) is merged
    assert kinds.count("linear") == 4 and [op["op"] for op in ops].count("linear") == 5
    x = torch.randn(4, 60)
    pair = [op for op in ops if op["op"] == "linear"][2:4]  # fc2.reduce, fc2.expand
    expected = (x @ pair[0]["weight"].T) @ pair[1]["weight"].T + pair[1]["bias"]
    one = [op for op in merged if op["op"] == "linear"][2]
    torch.testing.assert_close(x @ one["weight"].T + one["bias"], expected, atol=1e-4, rtol=1e-4)


def test_folding_the_normalisation_is_exact_with_and_without_padding() -> None:
    raw = _raw(4)
    for model, how in ((build_model("lenet5").eval(), "shift"), (strided_student(1, 28, 10), "folded")):
        ops = flatten_ops(model)
        folded, found, shift = fold_input_normalisation(ops, [MEAN], [STD])
        assert found == how
        first, original = folded[0], ops[0]
        x = raw - shift[0] if how == "shift" else raw
        expected = torch.nn.functional.conv2d(
            _normalised(raw), original["weight"], original["bias"], 1, original["padding"]
        )
        got = torch.nn.functional.conv2d(x, first["weight"], first["bias"], 1, first["padding"])
        stride = original["stride"]
        expected = expected[..., :: stride[0], :: stride[1]] if stride != [1, 1] else expected
        got = got[..., :: stride[0], :: stride[1]] if stride != [1, 1] else got
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_quantised_layers_are_neither_merged_nor_folded() -> None:
    student = build_student(build_model("lenet5").eval(), CompactConfig(conv_rank=None, linear_rank=8))
    quant = quantize_student(student, _normalised(_raw(16)), weight_bits=4)
    ops = flatten_ops(quant)
    assert len(merge_factored(ops)) == len(ops)
    assert fold_input_normalisation(ops, [MEAN], [STD])[1] == "none"


@pytest.mark.parametrize("bits", [8, 32])
def test_fused_onnx_has_fewer_nodes_and_the_same_outputs(tmp_path: Path, bits: int) -> None:
    raw = _raw()
    for name, model in (("lenet", build_model("lenet5").eval()), ("strided", strided_student(1, 28, 10))):
        plain = export_onnx(model, tmp_path, bits=bits, input_shape=(1, 28, 28), mean=MEAN, std=STD, name=name)
        fused = export_onnx(
            model, tmp_path, bits=bits, input_shape=(1, 28, 28), mean=MEAN, std=STD, name=f"{name}_f", fuse=True
        )
        assert len(_node_types(fused.onnx_path)) < len(_node_types(plain.onnx_path))
        reference = OnnxRuntimeModel(plain.onnx_path)(raw)
        out = OnnxRuntimeModel(fused.onnx_path)(raw)
        torch.testing.assert_close(out, reference, atol=2e-3 * float(reference.abs().max()), rtol=0)
        if name == "strided":
            assert not {"Div", "Sub", "Mul"} & set(_node_types(fused.onnx_path))  # normalisation fully folded


def test_integer_kernels_and_load_time_dequantisation_agree(tmp_path: Path) -> None:
    student = build_student(build_model("lenet5").eval(), CompactConfig(conv_rank=None, linear_rank=8))
    raw = _raw()
    quant = quantize_student(student, _normalised(raw), weight_bits=4)
    info = export_onnx(quant, tmp_path, bits=8, input_shape=(1, 28, 28), mean=MEAN, std=STD, name="q")
    integer = OnnxRuntimeModel(info.onnx_path, integer_kernels=True)(raw)
    folded = OnnxRuntimeModel(info.onnx_path)(raw)
    # weight-only packed file: the same weight grids on float activations (no activation rounding)
    packed_info = export_onnx(quant, tmp_path, input_shape=(1, 28, 28), mean=MEAN, std=STD, name="p", packed=True)
    packed = OnnxRuntimeModel(packed_info.onnx_path)(raw)
    with torch.no_grad():
        expected = quant(_normalised(raw))
    step = float(quant.fc3.output_quant.step.detach())
    for out in (integer, folded, packed):
        assert float((out - expected).abs().max()) <= 2 * step + 1e-6  # at most a rounding step or two apart
        assert float((out.argmax(1) == expected.argmax(1)).float().mean()) >= 0.9
    assert packed_info.onnx_bytes < 0.6 * info.onnx_bytes  # 4-bit weights two to a byte, not in int8


def test_strided_student_shapes_and_arguments() -> None:
    model = strided_student(1, 28, 10, widths=(4, 6))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert model.fc.in_features == 6 * 4 * 4
    assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear]
    torch.testing.assert_close(strided_student(1, 28, 10).conv1.weight, strided_student(1, 28, 10).conv1.weight)
    with pytest.raises(ValueError, match="at least"):
        strided_student(1, 10, 10)
