"""Tests of the packed ONNX export: weight-only low-bit weights stored at their bit width, folded at load."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedsqueeze.data import Dataset
from fedsqueeze.predict import predict
from fedsqueeze.server.compact import quantize_student
from fedsqueeze.server.compact.fast import strided_student
from fedsqueeze.server.compact.lsq import QUANT_LAYERS
from fedsqueeze.server.export import raw_pixels
from fedsqueeze.training import train

onnx = pytest.importorskip("onnx", reason="the onnx extra (onnx, onnxruntime) is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxruntime) is not installed")

from fedsqueeze.server.onnx_export import OnnxExportInfo, OnnxRuntimeModel, export_onnx  # noqa: E402

MEAN, STD = 0.1307, 0.3081
MIXED_BITS = {"conv1": 8, "conv2": 4, "fc": 2}
#: Bits per stored weight of each grid width: 2 -> 2, 3 and 4 -> 4, 5..8 -> 8
CONTAINER_BITS = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}


@pytest.fixture(scope="module")
def trained(mnist: Dataset) -> nn.Module:
    """A strided student trained for one epoch on 3,000 MNIST images (a few seconds)."""
    model = strided_student(1, 28, 10).train()
    train(model, mnist.x_train[:3000], mnist.y_train[:3000], epochs=1, lr=0.02, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def held_out(mnist: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1,000 test images as raw pixels (the files' input), as the model's normalised input, and their labels."""
    x = mnist.x_test[:1000]
    return raw_pixels(x, MEAN, STD).float(), x, mnist.y_test[:1000]


def _export(model: nn.Module, out: Path, name: str, *, packed: bool, bits: int = 8) -> OnnxExportInfo:
    """A fused MNIST-shaped file (int8 containers and Q/DQ pairs, or packed)."""
    return export_onnx(model, out, bits=bits, input_shape=(1, 28, 28), mean=MEAN, std=STD, name=name, fuse=True,
                       packed=packed)  # fmt: skip


def _weight_only(quant: nn.Module) -> nn.Module:
    """The LSQ student with its activation quantisers bypassed: the function a packed file computes."""
    model = copy.deepcopy(quant)
    for layer in model.modules():
        if isinstance(layer, QUANT_LAYERS):
            layer.input_quant = nn.Identity()
            layer.output_quant = None
    return model.eval()


def _optimised_ops(path: Path, out: Path) -> list[str]:
    """Node types after onnxruntime's load-time optimisation under its default options."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(out)).graph.node]


def test_packed_file_shrinks_as_the_bits_drop(
    trained: nn.Module, held_out: tuple[torch.Tensor, ...], tmp_path: Path
) -> None:
    _, x, _ = held_out
    sizes, old_sizes = {}, {}
    for label, bits in (("8", 8), ("4", 4), ("842", MIXED_BITS), ("2", 2)):
        quant = quantize_student(trained, x[:256], weight_bits=bits)
        sizes[label] = _export(quant, tmp_path, f"p{label}", packed=True).onnx_bytes
        old_sizes[label] = _export(quant, tmp_path, f"q{label}", packed=False).onnx_bytes
    assert sizes["8"] > sizes["4"] > sizes["842"] > sizes["2"]
    assert all(sizes[k] < old_sizes[k] for k in sizes)
    # the int8-container files do not shrink with the bits; the packed 4-bit one is about half of them
    assert old_sizes["8"] == old_sizes["4"] == old_sizes["2"] and sizes["4"] < 0.55 * old_sizes["4"]
    # a float student packed: int8 per channel as before, fewer bytes of graph (short names, no Q/DQ)
    int8_file = _export(trained, tmp_path, "i8", packed=False).onnx_bytes
    assert _export(trained, tmp_path, "p8", packed=True).onnx_bytes < int8_file


def test_packed_weights_are_stored_at_their_bit_width(
    trained: nn.Module, held_out: tuple[torch.Tensor, ...], tmp_path: Path
) -> None:
    _, x, _ = held_out
    bits = {"conv1": 3, "conv2": 6, "fc": 2}
    quant = quantize_student(trained, x[:256], weight_bits=bits)
    graph = onnx.load(str(_export(quant, tmp_path, "p", packed=True).onnx_path)).graph
    assert not {"QuantizeLinear", "DequantizeLinear", "Identity"} & {n.op_type for n in graph.node}
    integer = [t for t in graph.initializer if t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)]
    stored = sorted(int(np.prod(t.dims)) for t in integer if int(np.prod(t.dims)) > 16)  # not the shift/mod scalars
    counts = {name: getattr(trained, name).weight.numel() for name in bits}
    expected = sorted(-(-counts[name] * CONTAINER_BITS[b] // 8) for name, b in bits.items())
    assert stored == expected
    assert max(len(n.output[0]) for n in graph.node if n.output[0] != "logits") <= 2  # short names
    assert not any(n.name or n.doc_string for n in graph.node)


def test_packed_graph_folds_to_the_float_graph_at_load(
    trained: nn.Module, held_out: tuple[torch.Tensor, ...], tmp_path: Path
) -> None:
    _, x, _ = held_out
    quant = quantize_student(trained, x[:256], weight_bits=MIXED_BITS)
    packed = _export(quant, tmp_path, "p", packed=True).onnx_path
    float_file = _export(trained, tmp_path, "f32", packed=False, bits=32).onnx_path
    unpacking = {"BitShift", "Mod", "Cast", "Sub", "Reshape", "Mul"}
    assert unpacking <= {n.op_type for n in onnx.load(str(packed)).graph.node}
    folded = _optimised_ops(packed, tmp_path / "opt_p.onnx")
    assert folded == _optimised_ops(float_file, tmp_path / "opt_f.onnx")
    assert not unpacking & set(folded)


@pytest.mark.parametrize("bits", [4, "mixed", 2])
def test_packed_predictions_equal_the_students(
    trained: nn.Module, held_out: tuple[torch.Tensor, ...], tmp_path: Path, bits: int | str
) -> None:
    raw, x, y = held_out
    quant = quantize_student(trained, x[:256], weight_bits=MIXED_BITS if bits == "mixed" else bits)
    logits = OnnxRuntimeModel(_export(quant, tmp_path, "p", packed=True).onnx_path)(raw)
    with torch.no_grad():
        weight_only, student = _weight_only(quant)(x), quant(x)
    scale = float(weight_only.abs().max())
    torch.testing.assert_close(logits, weight_only, atol=1e-4 * scale, rtol=0)
    assert torch.equal(logits.argmax(1), weight_only.argmax(1))
    # Against the full LSQ student (8-bit activations too): only rounding of activations differs
    assert float((logits.argmax(1) == student.argmax(1)).float().mean()) >= 0.99
    accuracy, student_accuracy = (float((out.argmax(1) == y).float().mean()) for out in (logits, student))
    assert abs(accuracy - student_accuracy) <= 0.005


@pytest.mark.parametrize("fuse", [False, True])
def test_packed_rgb_padded_odd_sized_layers_match_the_weight_only_student(tmp_path: Path, fuse: bool) -> None:
    # 3 input channels with their own normalisation (folded into (out, in) scales), zero padding
    # (the fold keeps a shift node), 135 conv1 weights (a padded last byte), 3-bit weights in 4-bit slots
    torch.manual_seed(0)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    layers = OrderedDict(
        conv1=nn.Conv2d(3, 5, 3, padding=1), relu1=nn.ReLU(), conv2=nn.Conv2d(5, 6, 3, stride=2), relu2=nn.ReLU(),
        flatten=nn.Flatten(), fc=nn.Linear(6 * 5 * 5, 7),
    )  # fmt: skip
    model = nn.Sequential(layers).eval()
    raw = torch.randint(0, 256, (64, 3, 12, 12), generator=torch.Generator().manual_seed(1)).float()
    x = (raw / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    quant = quantize_student(model, x, weight_bits={"conv1": 2, "conv2": 3, "fc": 5})
    info = export_onnx(quant, tmp_path, input_shape=(3, 12, 12), mean=mean, std=std, name="rgb", fuse=fuse,
                       packed=True)  # fmt: skip
    types = {n.op_type for n in onnx.load(str(info.onnx_path)).graph.node}
    assert "Slice" in types and ("Div" not in types) == fuse
    logits = OnnxRuntimeModel(info.onnx_path)(raw)
    with torch.no_grad():
        expected = _weight_only(quant)(x)
    torch.testing.assert_close(logits, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


def test_packed_file_runs_without_fedsqueeze_or_torch_and_in_predict(
    trained: nn.Module, held_out: tuple[torch.Tensor, ...], tmp_path: Path
) -> None:
    raw, x, _ = held_out
    path = _export(quantize_student(trained, x[:256], weight_bits=MIXED_BITS), tmp_path, "p", packed=True).onnx_path
    np.save(tmp_path / "x.npy", raw[:50].numpy())
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("fedsqueeze", "torch"):
                    raise ModuleNotFoundError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        import numpy as np, onnxruntime
        session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        np.save(sys.argv[3], session.run(None, {"pixels": np.load(sys.argv[2])})[0])
        assert not [m for m in sys.modules if m.split(".")[0] in ("fedsqueeze", "torch")]
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    command = [sys.executable, "-I", "-c", script, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    logits = torch.from_numpy(np.load(tmp_path / "y.npy"))
    torch.testing.assert_close(logits, OnnxRuntimeModel(path)(raw[:50]))
    images = raw[:300, 0].numpy().astype(np.uint8)  # more than one of predict's batches
    np.testing.assert_array_equal(predict(path, images), OnnxRuntimeModel(path)(raw[:300]).argmax(1).numpy())


def test_packed_export_keeps_the_argument_checks(trained: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        export_onnx(trained, tmp_path, bits=4, input_shape=(1, 28, 28), mean=MEAN, std=STD, packed=True)
