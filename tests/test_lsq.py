"""Tests of learned-step-size quantisation (LSQ): the fake quantiser, quantised students and packed export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fedsqueeze.data import Dataset
from fedsqueeze.models import build_model
from fedsqueeze.server.compact import CompactConfig, build_student
from fedsqueeze.server.compact.lsq import LsqQuantizer, QuantConv2d, QuantLinear, quantize_student, weight_bits_of
from fedsqueeze.server.distill import distill, distillation_loss
from fedsqueeze.server.export import export_compact, load_exported, load_safetensors, pack_bits, unpack_bits
from fedsqueeze.training import evaluate, train

MEAN, STD = 0.1307, 0.3081


def _raw_and_normalised(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    raw = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed)).float()
    return raw, (raw / 255 - MEAN) / STD


def _random_student() -> nn.Module:
    torch.manual_seed(0)
    teacher = build_model("lenet5").eval()
    return build_student(teacher, CompactConfig(conv_rank=None, linear_rank=12, prune_ratio=0.5))


def test_quantiser_rounds_to_its_grid_and_clips() -> None:
    quant = LsqQuantizer(4, signed=True)
    with torch.no_grad():
        quant.step.fill_(0.5)
    x = torch.tensor([-10.0, -0.74, -0.2, 0.3, 1.26, 10.0])
    assert quant(x).tolist() == [-4.0, -0.5, 0.0, 0.5, 1.5, 3.5]  # grid -8..7 times 0.5
    assert quant.integers(x).tolist() == [-8, -1, 0, 1, 3, 7]
    unsigned = LsqQuantizer(2, signed=False)
    assert (unsigned.lo, unsigned.hi) == (0, 3)


def test_quantiser_step_gets_the_lsq_gradient() -> None:
    quant = LsqQuantizer(8, signed=True)
    with torch.no_grad():
        quant.step.fill_(0.1)
    x = torch.tensor([[0.26, 100.0]])  # one sample of two values: one inside the grid, one clipped at 127
    quant(x).sum().backward()
    assert quant.step.grad is not None
    # d/ds of round(x/s)*s is round(x/s) - x/s inside the grid, hi when clipped; scaled by 1/sqrt(n * hi)
    expected = ((3 - 2.6) + 127) / (2 * 127) ** 0.5
    assert float(quant.step.grad) == pytest.approx(expected, rel=1e-4)


def test_initial_step_minimises_the_error_over_its_grid() -> None:
    weight = torch.randn(6, 200, generator=torch.Generator().manual_seed(0))
    quant = LsqQuantizer(2, signed=True, channels=6)
    quant.initialise(weight)
    with torch.no_grad():
        err = (quant(weight) - weight).pow(2).sum(1)
    max_abs = weight.abs().amax(1) / 1  # the max-abs step of a 2-bit grid -2..1
    naive = ((weight / max_abs[:, None]).round().clamp(-2, 1) * max_abs[:, None] - weight).pow(2).sum(1)
    assert torch.all(err < naive)  # on Gaussian weights clipping the tails pays at 2 bits


def test_quantize_student_wraps_every_weight_layer_with_the_requested_bits() -> None:
    student = _random_student()
    _, x = _raw_and_normalised(32)
    quant = quantize_student(student, x, weight_bits={"conv2": 4, "fc1": 2, "fc2.reduce": 4}, default_bits=8)
    bits = weight_bits_of(quant)
    # fc1 and fc2 are factored (rank 12): a top-level name sets both parts, a dotted name one
    expected = {"conv1": 8, "conv2": 4, "fc1.reduce": 2, "fc1.expand": 2, "fc2.reduce": 4, "fc2.expand": 8, "fc3": 8}
    assert bits == expected
    assert isinstance(quant.conv1, QuantConv2d) and isinstance(quant.fc3, QuantLinear)
    assert quant.conv1.input_quant.signed and not quant.conv2.input_quant.signed  # after a ReLU: unsigned
    assert quant.fc2.expand.input_quant.signed  # inside a factored layer, no ReLU: signed
    assert quant.fc3.output_quant is not None and quant.conv1.output_quant is None
    assert all(not isinstance(m, (QuantConv2d, QuantLinear)) for m in student.modules())  # original untouched
    with torch.no_grad():
        float_out, quant_out = student(x), quant(x)
    assert not torch.equal(float_out, quant_out)
    assert float((float_out - quant_out).abs().max()) < 0.5 * float(float_out.abs().max()) + 1e-3


def test_quantize_student_rejects_unknown_layers_and_bits() -> None:
    student = _random_student()
    _, x = _raw_and_normalised(8)
    with pytest.raises(ValueError, match="unknown layers"):
        quantize_student(student, x, weight_bits={"fc9": 4})
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_student(student, x, weight_bits=1)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_bits_round_trips(bits: int) -> None:
    values = torch.randint(0, 2**bits, (37,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-37 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 37).long(), values)
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(torch.tensor([2**bits]), bits)


def test_file_size_shrinks_as_bits_are_set_and_files_match_the_model(tmp_path: Path) -> None:
    student = _random_student()
    raw, x = _raw_and_normalised(64)
    sizes = {}
    for bits in (8, 4, 2):
        quant = quantize_student(student, x, weight_bits=bits)
        info = export_compact(quant, tmp_path, bits=8, example_input=raw[:1], mean=MEAN, std=STD, name=f"w{bits}")
        sizes[bits] = (info.torchscript_bytes, info.safetensors_bytes)
        with torch.no_grad():
            expected = quant(x)
            torch.testing.assert_close(load_exported(info.torchscript_path)(raw), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(load_safetensors(info.safetensors_path)(raw), expected, atol=1e-5, rtol=1e-5)
        tensors = load_file(str(info.safetensors_path))
        conv2 = quant.conv2.weight.numel()  # layer 1 of the file
        assert tensors["1.weight"].numel() == conv2 * bits // 8  # packed: a 4-bit layer is half an 8-bit one
    assert sizes[8][0] > sizes[4][0] > sizes[2][0]
    assert sizes[8][1] > sizes[4][1] > sizes[2][1]


@pytest.fixture(scope="module")
def teacher_and_student(mnist: Dataset) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    teacher = build_model("lenet5")
    train(teacher, mnist.x_train[:4000], mnist.y_train[:4000], epochs=2, lr=0.01, seed=0)
    teacher.eval()
    student = build_student(teacher, CompactConfig(conv_rank=None, linear_rank=12, prune_ratio=0.5))
    proxy = mnist.x_train[50_000:51_500]
    distill(student, teacher, proxy, epochs=3, seed=0)
    return teacher, student, proxy


def test_lsq_fine_tuning_beats_post_training_quantisation_at_4_bits(
    mnist: Dataset, teacher_and_student: tuple[nn.Module, nn.Module, torch.Tensor]
) -> None:
    teacher, student, proxy = teacher_and_student
    x_test, y_test = mnist.x_test[:2000], mnist.y_test[:2000]
    ptq = quantize_student(student, proxy[:256], weight_bits=4)  # calibrated steps, no training
    lsq = quantize_student(student, proxy[:256], weight_bits=4)
    steps_before = lsq.conv2.weight_quant.step.detach().clone()
    distill(lsq, teacher, proxy, epochs=2, lr=0.001, seed=0)
    assert not torch.equal(lsq.conv2.weight_quant.step.detach(), steps_before)  # the steps were learned
    # The fine-tuning objective (agreement with the teacher) and test accuracy both improve over PTQ
    with torch.no_grad():
        target = teacher(x_test)
        ptq_kl = float(distillation_loss(ptq(x_test), target, 1.0))
        lsq_kl = float(distillation_loss(lsq(x_test), target, 1.0))
    _, ptq_acc = evaluate(ptq, x_test, y_test)
    _, lsq_acc = evaluate(lsq, x_test, y_test)
    assert lsq_kl < ptq_kl
    assert lsq_acc > ptq_acc
