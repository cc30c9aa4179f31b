"""Structured pruning of a layer chain: remove the lowest-norm conv filters and linear hidden units."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal, cast

import torch
from torch import nn

from fedsqueeze.compact_arch.layers import FACTORED_LAYERS, LowRankConv2d, Tucker2Conv2d

__all__ = ["prune_chain"]


def _importance(weight: torch.Tensor, norm: str) -> torch.Tensor:
    rows = weight.detach().reshape(weight.shape[0], -1)
    return rows.abs().sum(1) if norm == "l1" else rows.pow(2).sum(1).sqrt()


def _keep_indices(weight: torch.Tensor, ratio: float, norm: str) -> torch.Tensor:
    count = weight.shape[0]
    keep = max(1, count - int(round(count * ratio)))
    top = torch.topk(_importance(weight, norm), keep).indices
    return torch.sort(top).values


def _slice_out(layer: nn.Conv2d | nn.Linear, idx: torch.Tensor) -> None:
    with torch.no_grad():
        bias = layer.bias
        layer.weight = nn.Parameter(layer.weight[idx].clone())
        if bias is not None:
            layer.bias = nn.Parameter(bias[idx].clone())
    if isinstance(layer, nn.Conv2d):
        layer.out_channels = len(idx)
    else:
        layer.out_features = len(idx)


def _slice_batchnorm(bn: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor) -> None:
    with torch.no_grad():
        if bn.affine:
            bn.weight = nn.Parameter(bn.weight[idx].clone())
            bn.bias = nn.Parameter(bn.bias[idx].clone())
        mean, var = bn.running_mean, bn.running_var
        if mean is not None and var is not None:
            bn.running_mean = mean[idx].clone()
            bn.running_var = var[idx].clone()
    bn.num_features = len(idx)


def _slice_in(layer: nn.Conv2d | nn.Linear, idx: torch.Tensor, old_channels: int) -> None:
    """Keep input channels ``idx``; for a linear after a flatten, keep each channel's block of columns."""
    with torch.no_grad():
        if isinstance(layer, nn.Conv2d):
            layer.weight = nn.Parameter(layer.weight[:, idx].clone())
            layer.in_channels = len(idx)
            return
        if layer.in_features % old_channels:
            raise ValueError(f"linear with {layer.in_features} inputs cannot follow {old_channels} channels")
        block = layer.in_features // old_channels
        cols = (idx[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
        layer.weight = nn.Parameter(layer.weight[:, cols].clone())
        layer.in_features = len(cols)


def prune_chain(
    chain: list[tuple[str, nn.Module]],
    conv_ratio: float,
    linear_ratio: float,
    norm: Literal["l1", "l2"] = "l1",
    skip: Collection[str] = (),
    layer_ratios: Mapping[str, float] | None = None,
) -> None:
    """Remove the lowest-norm conv filters and linear hidden units of ``chain`` in place.

    A pruned layer loses output rows; batch norms up to the next conv/linear lose the same
    channels and the next conv/linear loses the matching input channels (a linear after a
    flatten loses each removed channel's block of spatial columns). The last weight layer keeps
    its outputs (the classes).

    Parameters
    ----------
    chain : list of (str, torch.nn.Module)
        Layers as returned by :func:`to_chain` (modified in place; copy first).
    conv_ratio, linear_ratio : float
        Fraction in [0, 1) of conv filters and of linear hidden units to remove.
    norm : {"l1", "l2"}
        Norm of a filter's weights used as its importance (default: "l1").
    skip : collection of str
        Names of layers whose outputs are never pruned (default: ()).
    layer_ratios : Mapping of str to float or None
        Per-layer fractions in [0, 1) overriding ``conv_ratio``/``linear_ratio`` for the layers
        they name (e.g. chosen by :func:`~fedsqueeze.server.compact.sensitivity.sensitivity_ratios`)
        (default: None).
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    layer_ratios = dict(layer_ratios or {})
    checks = [(conv_ratio, "conv prune ratio"), (linear_ratio, "linear prune ratio")]
    checks += [(r, f"prune ratio of layer {n!r}") for n, r in layer_ratios.items()]
    for ratio, what in checks:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"{what} must be in [0, 1), got {ratio}")
    unknown = sorted(set(layer_ratios) - {n for n, _ in chain})
    if unknown:
        raise ValueError(f"layer_ratios names unknown layers {unknown}; layers are {[n for n, _ in chain]}")
    weighted = [i for i, (_, m) in enumerate(chain) if isinstance(m, (nn.Conv2d, nn.Linear, *FACTORED_LAYERS))]
    for pos, nxt in zip(weighted, weighted[1:], strict=False):
        name, layer = chain[pos]
        ratio = conv_ratio if isinstance(layer, (nn.Conv2d, LowRankConv2d, Tucker2Conv2d)) else linear_ratio
        ratio = layer_ratios.get(name, ratio)
        if ratio == 0.0 or name in skip:
            continue
        factored = [n for n, m in (chain[pos], chain[nxt]) if isinstance(m, FACTORED_LAYERS)]
        if factored:
            raise ValueError(
                f"cannot prune around factored layer(s) {factored}: prune the dense model before factoring"
            )
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError(f"cannot prune grouped convolution {name}")
        dense = cast(nn.Conv2d | nn.Linear, layer)  # weighted layers, factored ones refused above
        old = dense.weight.shape[0]
        idx = _keep_indices(dense.weight, ratio, norm)
        _slice_out(dense, idx)
        for _, between in chain[pos + 1 : nxt]:
            if isinstance(between, nn.modules.batchnorm._BatchNorm):
                _slice_batchnorm(between, idx)
        _slice_in(cast(nn.Conv2d | nn.Linear, chain[nxt][1]), idx, old)
