"""Tests of sensitivity-based and iterative structured pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsqueeze.data import Dataset
from fedsqueeze.models import build_model
from fedsqueeze.server.compact import count_parameters
from fedsqueeze.server.compact.sensitivity import (
    cumulative_ratios,
    iterative_prune,
    layer_sensitivity,
    prunable_layers,
    pruned_copy,
    sensitivity_ratios,
    uniform_ratios,
)
from fedsqueeze.server.distill import distill, distillation_loss
from fedsqueeze.training import evaluate, train


@pytest.fixture(scope="module")
def teacher(mnist: Dataset) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("lenet5")
    train(model, mnist.x_train[:4000], mnist.y_train[:4000], epochs=2, lr=0.01, seed=0)
    return model.eval()


def _kl(model: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(distillation_loss(model(x), teacher(x), 1.0))


def test_per_layer_ratios_prune_only_the_named_layers() -> None:
    torch.manual_seed(0)
    model = build_model("lenet5").eval()
    pruned = pruned_copy(model, {"conv2": 0.5, "fc1": 0.25})
    assert pruned.conv1.out_channels == 6 and pruned.conv2.out_channels == 8
    assert pruned.fc1.in_features == 8 * 5 * 5 and pruned.fc1.out_features == 90
    assert pruned.fc2.in_features == 90 and pruned.fc2.out_features == 84
    assert prunable_layers(model) == ["conv1", "conv2", "fc1", "fc2"]
    assert cumulative_ratios(model, pruned) == {"conv1": 0.0, "conv2": 0.5, "fc1": 0.25, "fc2": 0.0, "fc3": 0.0}
    with pytest.raises(ValueError, match="unknown layers"):
        pruned_copy(model, {"fc7": 0.5})
    with pytest.raises(ValueError, match="must be in"):
        pruned_copy(model, {"fc1": 1.0})


def test_sensitivity_table_starts_at_the_unpruned_loss_and_grows(teacher: nn.Module, mnist: Dataset) -> None:
    proxy = mnist.x_train[50_000:50_500]
    table = layer_sensitivity(teacher, teacher, proxy, grid=(0.25, 0.875))
    assert set(table) == {"conv1", "conv2", "fc1", "fc2"}
    for row in table.values():
        assert row[0.0] == pytest.approx(0.0, abs=1e-6)  # the teacher against itself
        assert row[0.875] > row[0.25] >= 0.0
    with pytest.raises(ValueError, match="grid ratios"):
        layer_sensitivity(teacher, teacher, proxy, grid=(0.0,))


def test_sensitivity_ratios_meet_the_budget_or_say_why(teacher: nn.Module) -> None:
    table = {"conv1": {0.0: 0.0, 0.5: 0.1}, "fc1": {0.0: 0.0, 0.5: 0.2, 0.75: 0.3}}
    ratios = sensitivity_ratios(teacher, table, 40_000)
    assert count_parameters(pruned_copy(teacher, ratios)) <= 40_000
    assert ratios["fc1"] > 0  # fc1 holds most parameters: the cheapest loss per parameter
    with pytest.raises(ValueError, match="cannot bring"):
        sensitivity_ratios(teacher, table, 1_000)


def test_sensitivity_pruning_is_no_worse_than_l1_at_equal_size(teacher: nn.Module, mnist: Dataset) -> None:
    proxy = mnist.x_train[50_000:51_000]
    x_test, y_test = mnist.x_test[:2000], mnist.y_test[:2000]
    l1 = pruned_copy(teacher, uniform_ratios(teacher, 16_000))
    budget = count_parameters(l1)
    ratios = sensitivity_ratios(teacher, layer_sensitivity(teacher, teacher, proxy), budget)
    sensitive = pruned_copy(teacher, ratios)
    assert count_parameters(sensitive) <= budget
    assert len(set(ratios.values())) > 1  # not uniform: the layers differ in sensitivity
    # Measured on held-out test images, not the proxy images the ratios were chosen on
    assert _kl(sensitive, teacher, x_test) <= _kl(l1, teacher, x_test)
    assert evaluate(sensitive, x_test, y_test)[1] >= evaluate(l1, x_test, y_test)[1]


@pytest.mark.parametrize("method", ["sensitivity", "l1"])
def test_iterative_pruning_reaches_the_target_and_reports_its_ratios(
    teacher: nn.Module, mnist: Dataset, method: str
) -> None:
    proxy = mnist.x_train[50_000:51_000]
    calls: list[int] = []

    def fine_tune(model: nn.Module) -> list[float]:
        calls.append(count_parameters(model))
        return distill(model, teacher, proxy, epochs=1, seed=len(calls)).losses

    student, history = iterative_prune(
        teacher,
        teacher,
        proxy,
        12_000,
        fine_tune,
        steps=2,
        method=method,
        sensitivity_samples=300,  # type: ignore[arg-type]
    )
    assert count_parameters(student) <= 12_000
    assert len(history) == 2 and calls == [h.params for h in history]
    assert history[0].params > history[1].params
    assert all(0.0 <= r < 1.0 for h in history for r in h.ratios.values())
    assert count_parameters(teacher) == 61_706  # not modified
    _, accuracy = evaluate(student, mnist.x_test[:1000], mnist.y_test[:1000])
    assert accuracy > 0.7
