"""Tests of server-side distillation: loss, teacher averaging, proxy split and the training effect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsqueeze.server.compact import CompactConfig, build_student
from fedsqueeze.server.distill import DistillConfig, distill, distillation_loss, proxy_split, teacher_logits
from fedsqueeze.server.hints import FeatureHints, default_hint_layers

CLASSES = 4


def _blob_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 noisy images whose class is the quadrant holding a bright 3x3 blob."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 8, 8, generator=g)
    jitter = torch.randint(0, 2, (n, 2), generator=g)
    for i in range(n):
        r = 4 * int(y[i] // 2) + int(jitter[i, 0])
        c = 4 * int(y[i] % 2) + int(jitter[i, 1])
        x[i, 0, r : r + 3, c : c + 3] += 2.0
    return x, y


def _teacher() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, CLASSES),
    )  # fmt: skip


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def trained_teacher() -> nn.Module:
    x, y = _blob_images(600, seed=1)
    teacher = _teacher()
    opt = torch.optim.Adam(teacher.parameters(), lr=0.01)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        opt.step()
    return teacher.eval()


def test_distillation_beats_the_same_student_before_distillation(trained_teacher: nn.Module) -> None:
    x_test, y_test = _blob_images(400, seed=3)
    proxy_x, _ = _blob_images(500, seed=2)  # labels discarded: the proxy set is unlabeled
    assert _accuracy(trained_teacher, x_test, y_test) > 0.95

    student = build_student(trained_teacher, CompactConfig(prune_ratio=0.5, linear_rank=2, keep_dense=()))
    torch.manual_seed(5)
    for module in student.modules():  # start from scratch so that distillation has work to do
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    before = _accuracy(student, x_test, y_test)
    result = distill(student, trained_teacher, proxy_x, temperature=3.0, epochs=10, lr=0.01, batch_size=32, seed=0)
    after = _accuracy(student, x_test, y_test)

    assert before < 0.5  # about chance (0.25) for an untrained student
    assert after > 0.9 and after > before + 0.4
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.num_teachers == 1 and result.num_samples == 500


def test_distillation_is_deterministic(trained_teacher: nn.Module) -> None:
    proxy_x, _ = _blob_images(128, seed=2)
    outputs = []
    for _ in range(2):
        student = build_student(trained_teacher, CompactConfig(linear_rank=2))
        distill(student, trained_teacher, proxy_x, epochs=2, batch_size=32, seed=7)
        outputs.append(student(proxy_x[:8]).detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_distillation_loss_is_scaled_kl() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    temperature = 4.0
    p_t = F.softmax(t / temperature, 1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / temperature, 1))).sum(1).mean() * temperature**2
    torch.testing.assert_close(distillation_loss(s, t, temperature), manual)
    assert float(distillation_loss(t, t, temperature)) == pytest.approx(0.0, abs=1e-5)
    assert float(distillation_loss(t + 3.0, t, temperature)) == pytest.approx(0.0, abs=1e-5)  # shift-invariant


def test_teacher_logits_is_the_weighted_mean() -> None:
    torch.manual_seed(0)
    teachers = [nn.Linear(3, 4), nn.Linear(3, 4)]
    x = torch.randn(300, 3)  # more than one batch of 128
    with torch.no_grad():
        a, b = teachers[0](x), teachers[1](x)
    torch.testing.assert_close(teacher_logits(teachers, x), (a + b) / 2)
    torch.testing.assert_close(teacher_logits(teachers, x, [3.0, 1.0]), 0.75 * a + 0.25 * b)
    with pytest.raises(ValueError, match="teacher weights"):
        teacher_logits(teachers, x, [1.0])
    with pytest.raises(ValueError, match="at least one teacher"):
        teacher_logits([], x)


def test_ensemble_of_teachers_is_used(trained_teacher: nn.Module) -> None:
    proxy_x, _ = _blob_images(64, seed=2)
    other = _teacher().eval()
    student = build_student(trained_teacher, CompactConfig(linear_rank=2))
    result = distill(student, [trained_teacher, other], proxy_x, epochs=1, weights=[0.8, 0.2])
    assert result.num_teachers == 2 and len(result.losses) == 1


def test_proxy_split_is_a_disjoint_cover() -> None:
    proxy, rest = proxy_split(100, 30, seed=1)
    assert len(proxy) == 30 and len(rest) == 70
    assert sorted(torch.cat([proxy, rest]).tolist()) == list(range(100))
    assert torch.equal(proxy, proxy_split(100, 30, seed=1)[0])
    assert not torch.equal(proxy, proxy_split(100, 30, seed=2)[0])
    with pytest.raises(ValueError, match="proxy_size"):
        proxy_split(100, 100)


def test_bad_arguments_are_rejected(trained_teacher: nn.Module) -> None:
    student = build_student(trained_teacher, CompactConfig())
    with pytest.raises(ValueError, match="temperature"):
        distill(student, trained_teacher, torch.zeros(4, 1, 8, 8), temperature=0.0)
    with pytest.raises(ValueError, match="proxy_x"):
        distill(student, trained_teacher, torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="epochs"):
        DistillConfig(epochs=0)
    assert DistillConfig().kwargs()["temperature"] == 3.0


# ----------------------------------------------------------------------------- activation matching


def _scratch_student(teacher: nn.Module) -> nn.Module:
    """A pruned, factored student of ``teacher`` with re-initialised weights (about chance accuracy)."""
    student = build_student(teacher, CompactConfig(prune_ratio=0.5, linear_rank=2, keep_dense=()))
    torch.manual_seed(5)
    for module in student.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    return student


def test_hint_layers_and_adapters_follow_the_widths(trained_teacher: nn.Module) -> None:
    student = build_student(trained_teacher, CompactConfig(prune_ratio=0.5, linear_rank=2))
    assert default_hint_layers(trained_teacher) == ["1"] == default_hint_layers(student)  # the ReLU after the conv
    proxy_x, _ = _blob_images(40, seed=2)
    hints = FeatureHints(student, trained_teacher, ["1", "5", "6"], proxy_x)
    conv = hints.adapters["1"]  # 4 kept filters -> the teacher's 8
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels, conv.kernel_size) == (4, 8, (1, 1))
    linear = hints.adapters["5"]  # 16 kept hidden units -> 32
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (16, 32)
    assert isinstance(hints.adapters["6"], nn.Identity)  # the classes are never pruned
    with torch.no_grad():
        expected = trained_teacher[:2](proxy_x)
    torch.testing.assert_close(hints.targets["1"], expected)


def test_activation_matching_alone_trains_the_student(trained_teacher: nn.Module) -> None:
    """Hints without soft labels: the features after the conv block (through a 1x1 adapter) and the logits."""
    x_test, y_test = _blob_images(400, seed=3)
    proxy_x, _ = _blob_images(500, seed=2)
    student = _scratch_student(trained_teacher)
    before = _accuracy(student, x_test, y_test)
    result = distill(
        student, trained_teacher, proxy_x, epochs=10, lr=0.01, batch_size=32, soft_weight=0.0, hint_weight=1.0,
        hint_layers=["1", "6"],
    )  # fmt: skip
    after = _accuracy(student, x_test, y_test)
    assert before < 0.5 and after > 0.75 and after > before + 0.4
    assert result.losses[0] <= 1.0 and result.losses[-1] < 0.5 * result.losses[0]  # relative errors
    assert [type(m) for m in student.modules()] == [type(m) for m in _scratch_student(trained_teacher).modules()]


def test_activation_matching_with_soft_labels_trains_the_student(trained_teacher: nn.Module) -> None:
    x_test, y_test = _blob_images(400, seed=3)
    proxy_x, _ = _blob_images(500, seed=2)
    student = _scratch_student(trained_teacher)
    before = _accuracy(student, x_test, y_test)
    config = DistillConfig(epochs=10, lr=0.01, batch_size=32, hint_weight=1.0)  # default hint layer, soft labels on
    distill(student, trained_teacher, proxy_x, **config.kwargs())  # type: ignore[arg-type]
    after = _accuracy(student, x_test, y_test)
    assert before < 0.5 and after > 0.9 and after > before + 0.4

    # Deterministic with hints too (seeded regressors)
    outputs = []
    for _ in range(2):
        again = _scratch_student(trained_teacher)
        distill(again, trained_teacher, proxy_x[:64], epochs=1, batch_size=32, hint_weight=0.5, seed=3)
        outputs.append(again(proxy_x[:8]).detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_bad_hint_arguments_are_rejected(trained_teacher: nn.Module) -> None:
    student = build_student(trained_teacher, CompactConfig(prune_ratio=0.5))
    proxy_x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match="both 0: nothing to train"):
        distill(student, trained_teacher, proxy_x, soft_weight=0.0)
    with pytest.raises(ValueError, match="hint_weight must be a finite number >= 0"):
        DistillConfig(hint_weight=-1.0)
    with pytest.raises(ValueError, match="given but hint_weight is 0"):
        distill(student, trained_teacher, proxy_x, hint_layers=["1"])
    with pytest.raises(ValueError, match=r"hint layers \['fc'\] are not layers of the student"):
        distill(student, trained_teacher, proxy_x, hint_weight=1.0, hint_layers=["fc"])
    narrow = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, CLASSES))
    with pytest.raises(ValueError, match=r"student features \(4, 6, 6\) cannot be mapped onto teacher features"):
        distill(narrow, trained_teacher, proxy_x, hint_weight=1.0, hint_layers=["1"])


def test_distill_bench_smoke(mnist_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsqueeze.simulation.distill_bench import main

    args = ["--data-dir", str(mnist_path), "--out", str(tmp_path), "--teacher-epochs", "1", "--train-limit", "3000",
            "--proxy-size", "1000", "--distill-epochs", "1", "--latency-runs", "50"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "compact.json").read_text())
    files = report["files"]
    assert files["student_int8"]["torchscript_bytes"] == (tmp_path / "student_int8.pt").stat().st_size
    assert report["size_ratio_fp32_over_int8"] == pytest.approx(
        files["teacher_fp32"]["torchscript_bytes"] / files["student_int8"]["torchscript_bytes"]
    )
    assert report["student"]["params"] < report["teacher"]["params"] / 5
    assert report["teacher"]["test_accuracy"] > 0.5  # 3000 images, one epoch: well above chance (0.1)
    assert "student_int8" in capsys.readouterr().out
    for entry in (
        *files.values(),
        {k[len("eager_") :]: v for k, v in report["teacher"].items() if k.startswith("eager_")},
    ):
        assert entry["latency_us_batch1_1thread"] > 0 and entry["latency_us_batch1_1thread_no_onednn"] > 0
