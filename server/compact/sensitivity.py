"""Sensitivity-based structured pruning: per-layer ratios chosen by the measured loss of pruning each layer.

Uniform pruning removes the same fraction of every layer's filters; but layers differ in how much
they can lose. Here each prunable layer is pruned alone at each ratio of a grid (its lowest-norm
filters or units, as :func:`~fedsqueeze.compact_arch.prune_chain` does) and the distillation
loss against the teacher's logits on proxy images is measured. A greedy search then raises, one
grid step at a time, the ratio of the layer whose step costs the least loss per parameter
removed, until the model is at or below a target size. :func:`iterative_prune` repeats
measure -> prune -> distillation fine-tuning in several steps down to the target.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from fedsqueeze.compact_arch.chain import to_chain
from fedsqueeze.compact_arch.layers import FACTORED_LAYERS, count_parameters
from fedsqueeze.compact_arch.prune import prune_chain

__all__ = [
    "DEFAULT_GRID",
    "PruneStep",
    "cumulative_ratios",
    "iterative_prune",
    "layer_sensitivity",
    "prunable_layers",
    "pruned_copy",
    "sensitivity_ratios",
    "uniform_ratios",
]

#: Pruning ratios tried per layer.
DEFAULT_GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)

_EVAL_BATCH = 256
Norm = Literal["l1", "l2"]


def prunable_layers(model: nn.Module) -> list[str]:
    """Chain names of the dense conv/linear layers whose outputs can be pruned (all but the last weight layer)."""
    weighted = [(n, m) for n, m in to_chain(model) if isinstance(m, (nn.Conv2d, nn.Linear, *FACTORED_LAYERS))]
    pairs = zip(weighted, weighted[1:], strict=False)
    return [
        n for (n, m), (_, nxt) in pairs if not isinstance(m, FACTORED_LAYERS) and not isinstance(nxt, FACTORED_LAYERS)
    ]


def pruned_copy(model: nn.Module, ratios: Mapping[str, float], norm: Norm = "l1") -> nn.Sequential:
    """A copy of ``model`` as an ``nn.Sequential`` with each named layer's lowest-norm outputs removed.

    Parameters
    ----------
    model : torch.nn.Module
        A model :func:`~fedsqueeze.server.compact.to_chain` reads; not modified.
    ratios : Mapping of str to float
        Layer name -> fraction of its filters (conv) or units (linear) to remove, in [0, 1).
    norm : {"l1", "l2"}
        Norm ranking the filters within a layer (default: "l1").

    Returns
    -------
    torch.nn.Sequential
        In eval mode; layer names are the chain's with '.' -> '_'.
    """
    chain = [(name, copy.deepcopy(layer)) for name, layer in to_chain(model)]
    prune_chain(chain, 0.0, 0.0, norm, layer_ratios=ratios)
    return nn.Sequential(OrderedDict((n.replace(".", "_"), m) for n, m in chain)).eval()


@torch.inference_mode()
def _kl_to(model: nn.Module, x: torch.Tensor, target_log_p: torch.Tensor) -> float:
    """Mean KL(target || model) over ``x`` (target as log-probabilities)."""
    total = 0.0
    for begin in range(0, len(x), _EVAL_BATCH):
        log_p = torch.log_softmax(model(x[begin : begin + _EVAL_BATCH]).float(), 1)
        t = target_log_p[begin : begin + _EVAL_BATCH]
        total += float((t.exp() * (t - log_p)).sum())
    return total / len(x)


def layer_sensitivity(
    model: nn.Module,
    teacher: nn.Module,
    proxy_x: torch.Tensor,
    grid: Sequence[float] = DEFAULT_GRID,
    norm: Norm = "l1",
) -> dict[str, dict[float, float]]:
    """The loss of pruning each layer alone at each ratio: KL(teacher || pruned model) on ``proxy_x``.

    Parameters
    ----------
    model : torch.nn.Module
        The model to prune (the teacher itself, or a student); not modified.
    teacher : torch.nn.Module
        Whose soft predictions define the loss.
    proxy_x : torch.Tensor
        Unlabeled proxy images (a few hundred to a few thousand).
    grid : sequence of float
        Ratios in (0, 1) to try (default: :data:`DEFAULT_GRID`).
    norm : {"l1", "l2"}
        Norm ranking filters within a layer (default: "l1").

    Returns
    -------
    dict of str to dict of float to float
        Layer -> ratio -> mean KL divergence in nats; ratio 0.0 holds the unpruned model's loss.
    """
    if not grid or any(not 0.0 < r < 1.0 for r in grid):
        raise ValueError(f"grid ratios must lie in (0, 1), got {list(grid)}")
    with torch.inference_mode():
        target = torch.log_softmax(teacher.eval()(proxy_x).float(), 1)
    base = _kl_to(model.eval(), proxy_x, target)
    table: dict[str, dict[float, float]] = {}
    for name in prunable_layers(model):
        table[name] = {0.0: base}
        for ratio in sorted(grid):
            table[name][ratio] = _kl_to(pruned_copy(model, {name: ratio}, norm), proxy_x, target)
    return table


def sensitivity_ratios(
    model: nn.Module,
    sensitivity: Mapping[str, Mapping[float, float]],
    target_params: int,
    norm: Norm = "l1",
    size: Callable[[nn.Module], int] = count_parameters,
) -> dict[str, float]:
    """Per-layer ratios bringing ``model`` to at most ``target_params``, cheapest measured loss first.

    Greedy: starting from no pruning, repeatedly take the one-grid-step raise of one layer's ratio
    with the least loss increase (from ``sensitivity``, each layer's loss taken as independent of
    the others) per parameter removed, until the pruned model has at most ``target_params``
    parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The model to prune; not modified.
    sensitivity : Mapping of str to Mapping of float to float
        From :func:`layer_sensitivity`.
    target_params : int
        Parameter budget.
    norm : {"l1", "l2"}
        Norm ranking filters within a layer (default: "l1").
    size : callable
        The size a pruned model is budgeted by, e.g. the parameters of the student factored from
        it (default: :func:`~fedsqueeze.server.compact.count_parameters`).

    Returns
    -------
    dict of str to float
        Layer -> chosen ratio (layers left unpruned included, at 0.0).

    Raises
    ------
    ValueError
        If even the largest ratios of the grid leave more than ``target_params`` parameters.
    """
    ratios = {name: 0.0 for name in sensitivity}
    params = size(model)
    while params > target_params:
        best: tuple[float, str, float, int] | None = None
        for name, row in sensitivity.items():
            steps = [r for r in sorted(row) if r > ratios[name]]
            if not steps:
                continue
            trial = {**ratios, name: steps[0]}
            removed = params - size(pruned_copy(model, trial, norm))
            cost = max(row[steps[0]] - row[ratios[name]], 0.0) / max(removed, 1)
            if removed > 0 and (best is None or cost < best[0]):
                best = (cost, name, steps[0], params - removed)
        if best is None:
            raise ValueError(f"the grid cannot bring {size(model)} parameters down to {target_params}")
        _, name, ratio, params = best
        ratios[name] = ratio
    return _fill_budget(model, sensitivity, ratios, target_params, norm, size)


def _fill_budget(
    model: nn.Module,
    sensitivity: Mapping[str, Mapping[float, float]],
    ratios: dict[str, float],
    target_params: int,
    norm: Norm,
    size: Callable[[nn.Module], int],
) -> dict[str, float]:
    """Lower ratios one grid step at a time, largest loss saving first, while the model stays within budget.

    The greedy descent overshoots by up to one layer-step; giving the spare parameters back to
    the layers that lose most for them makes the comparison with uniform pruning one at equal size.
    """
    while True:
        best: tuple[float, str, float] | None = None
        for name, row in sensitivity.items():
            lower = [r for r in sorted(row) if r < ratios[name]]
            if not lower:
                continue
            trial = {**ratios, name: lower[-1]}
            if size(pruned_copy(model, trial, norm)) > target_params:
                continue
            saving = row[ratios[name]] - row[lower[-1]]
            if best is None or saving > best[0]:
                best = (saving, name, lower[-1])
        if best is None:
            return ratios
        ratios[best[1]] = best[2]


@dataclass
class PruneStep:
    """One step of :func:`iterative_prune`: the ratios applied to the model of the step before and the result."""

    ratios: dict[str, float]
    params: int
    loss_after_fine_tuning: list[float] = field(default_factory=list)


def iterative_prune(
    model: nn.Module,
    teacher: nn.Module,
    proxy_x: torch.Tensor,
    target_params: int,
    fine_tune: Callable[[nn.Module], list[float]],
    steps: int = 3,
    method: Literal["sensitivity", "l1", "l2"] = "sensitivity",
    sensitivity_samples: int = 1000,
    grid: Sequence[float] = DEFAULT_GRID,
    size: Callable[[nn.Module], int] = count_parameters,
) -> tuple[nn.Sequential, list[PruneStep]]:
    """Prune ``model`` to at most ``target_params`` in ``steps`` rounds of prune -> distillation fine-tuning.

    Step k aims at the size ``start - (start - target) * k / steps``. With ``method="sensitivity"``
    each step measures :func:`layer_sensitivity` on ``proxy_x[:sensitivity_samples]`` and takes
    :func:`sensitivity_ratios`; with ``"l1"``/``"l2"`` every prunable layer gets the same ratio
    (the smallest grid-free uniform ratio reaching the step's size, found by bisection).

    Parameters
    ----------
    model : torch.nn.Module
        Dense starting model (e.g. the teacher, or an unpruned student); not modified.
    teacher : torch.nn.Module
        Teacher of the sensitivity loss.
    proxy_x : torch.Tensor
        Unlabeled proxy images.
    target_params : int
        Final parameter budget.
    fine_tune : callable
        Trains the pruned model in place after each step (e.g. a ``distill`` call); returns its losses.
    steps : int
        Number of prune -> fine-tune rounds, >= 1 (default: 3).
    method : {"sensitivity", "l1", "l2"}
        How the per-layer ratios are chosen (default: "sensitivity").
    sensitivity_samples : int
        Proxy images used to measure sensitivity (default: 1000).
    grid : sequence of float
        Ratios tried per layer and step (default: :data:`DEFAULT_GRID`).
    size : callable
        The size ``target_params`` budgets, for the sensitivity method (see
        :func:`sensitivity_ratios`; default: the parameter count).

    Returns
    -------
    student : torch.nn.Sequential
        The pruned, fine-tuned model.
    history : list of PruneStep
        The ratios chosen at each step, relative to the model of the step before.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method not in ("sensitivity", "l1", "l2"):
        raise ValueError(f"method must be 'sensitivity', 'l1' or 'l2', got {method!r}")
    current = pruned_copy(model, {})
    start = size(current) if method == "sensitivity" else count_parameters(current)
    if target_params >= start:
        raise ValueError(f"target_params {target_params} is not below the model's {start} parameters")
    history: list[PruneStep] = []
    for step in range(1, steps + 1):
        goal = math.ceil(start - (start - target_params) * step / steps)
        if method == "sensitivity":
            table = layer_sensitivity(current, teacher, proxy_x[:sensitivity_samples], grid, "l1")
            ratios = sensitivity_ratios(current, table, goal, "l1", size)
        else:
            ratios = uniform_ratios(current, goal, method)
        current = pruned_copy(current, ratios, "l1" if method == "sensitivity" else method)
        losses = fine_tune(current)
        history.append(
            PruneStep(ratios, size(current) if method == "sensitivity" else count_parameters(current), losses)
        )
    return current, history


def uniform_ratios(model: nn.Module, target_params: int, norm: Norm = "l1") -> dict[str, float]:
    """The same ratio for every prunable layer, the smallest (to 1/256) leaving at most ``target_params``."""
    names = prunable_layers(model)
    lo, hi = 0.0, 255 / 256
    if count_parameters(pruned_copy(model, dict.fromkeys(names, hi), norm)) > target_params:
        raise ValueError(f"uniform pruning cannot reach {target_params} parameters")
    while hi - lo > 1 / 256:
        mid = (lo + hi) / 2
        if count_parameters(pruned_copy(model, dict.fromkeys(names, mid), norm)) <= target_params:
            hi = mid
        else:
            lo = mid
    return dict.fromkeys(names, hi)


def cumulative_ratios(original: nn.Module, pruned: nn.Module) -> dict[str, float]:
    """Fraction of each layer's outputs removed between ``original`` and ``pruned`` (layers matched by chain order)."""

    def widths(model: nn.Module) -> list[tuple[str, int]]:
        dense = [(n, m) for n, m in to_chain(model) if isinstance(m, (nn.Conv2d, nn.Linear))]
        return [(n.replace(".", "_"), int(m.weight.shape[0])) for n, m in dense]

    before, after = widths(original), widths(pruned)
    if len(before) != len(after):
        raise ValueError("the two models do not have the same chain of dense conv/linear layers")
    return {name: 1.0 - a / b for (name, b), (_, a) in zip(before, after, strict=True)}
