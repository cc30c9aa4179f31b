"""Updates far larger than the round's others: a diverged or hostile node's reply, dropped before aggregation.

Every check in :mod:`fedsqueeze.server.replies` passes a finite reply, but a finite update can
still be ruinous: in S2 (McMahan CNN, seed 2, the default codecs) one node's local training
diverged in round 2 (train loss 2.3e6) and its update, norm 4.8e7 where the other nine were
5-15, took the average with it: loss 1e20 from then on, and every later reply NaN. Averaging
gives one node's update a weight of about 1/n, so no update more than a few times the others'
should survive it. The rule is a median rule, not a fixed norm: update sizes change over a run
and between models, and the median of the round's updates is not moved by one outlier.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch

__all__ = ["MIN_REPLIES", "update_norm", "outliers"]

MIN_REPLIES = 3
"""Fewer replies than this give no typical size to compare with: nothing is dropped."""


def update_norm(weights: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of ``weights - reference`` over the floating-point tensors (in float64)."""
    total = 0.0
    for name, w in weights.items():
        if w.is_floating_point():
            total += float((w.double() - reference[name].double()).pow(2).sum())
    return total**0.5


def outliers(norms: Sequence[float], max_ratio: float) -> list[str | None]:
    """For each update norm: why it is an outlier (over ``max_ratio`` x the median norm), or None.

    ``max_ratio`` <= 0 turns the rule off, as does a round of fewer than MIN_REPLIES updates or
    a median of zero (nothing changed: no scale to compare with).
    """
    if max_ratio <= 0 or len(norms) < MIN_REPLIES:
        return [None] * len(norms)
    median = statistics.median(norms)
    if median <= 0:
        return [None] * len(norms)
    return [
        None
        if norm <= max_ratio * median
        else f"its update's norm {norm:.3g} is {norm / median:.3g}x the round's median {median:.3g} "
        f"(at most {max_ratio:g}x is aggregated): a diverged or hostile update"
        for norm in norms
    ]
