"""Op-list rewrites that make a small CNN faster at batch 1: fewer graph nodes, the same function.

At batch 1 a small CNN's latency in a graph runtime is dominated by a fixed cost per node, not by
its multiply-adds, so removing nodes is what makes it faster:

- :func:`merge_factored` multiplies a factored pair (k x k conv then 1 x 1 conv, or two linears,
  with nothing between them) back into one dense layer where that adds few multiply-adds;
- :func:`fold_input_normalisation` folds ``(pixels / 255 - mean) / std`` into the first conv's
  weights and bias (exactly: with zero padding the pixels are first shifted by ``255 * mean``,
  one node instead of three).

Both work on :func:`~fedsqueeze.server.export.flatten_ops` lists of float layers; layers from LSQ
training (``"quant"``) are left as they are, since their integer grids would not survive. Weight-only
LSQ layers (a ``"grid"`` of integer codes and per-channel scales, from the packed ONNX export) are
never merged, but the normalisation folds into the first one's scales: its codes stay as they are.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["MERGE_MAC_ALLOWANCE", "fold_input_normalisation", "merge_factored"]

#: Extra multiply-adds per image a merge may add: about what one node's fixed cost buys at batch 1.
MERGE_MAC_ALLOWANCE = 4096


def _is_pointwise(op: dict[str, Any]) -> bool:
    return (
        op["op"] == "conv2d" and list(op["weight"].shape[2:]) == [1, 1] and op["stride"] == [1, 1]
        and op["padding"] == [0, 0] and op["groups"] == 1
    )  # fmt: skip


def _merged(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any] | None:
    """One op computing ``second(first(x))``, or None if the pair cannot be merged."""
    if any(op.get(key) is not None for op in (first, second) for key in ("quant", "grid")):
        return None  # a merged weight would leave the layers' integer grids
    w1, w2 = first["weight"], second["weight"]
    b1 = first["bias"] if first["bias"] is not None else torch.zeros(w1.shape[0])
    b2 = second["bias"] if second["bias"] is not None else torch.zeros(w2.shape[0])
    if first["op"] == second["op"] == "linear":
        return {**second, "weight": w2 @ w1, "bias": w2 @ b1 + b2}
    if first["op"] == "conv2d" and _is_pointwise(second) and first["groups"] == 1:
        mix = w2[:, :, 0, 0]
        weight = (mix @ w1.reshape(w1.shape[0], -1)).reshape(w2.shape[0], *w1.shape[1:])
        return {**first, "weight": weight, "bias": mix @ b1 + b2, "quant": None}
    return None


def _extra_weights(first: dict[str, Any], second: dict[str, Any], merged: dict[str, Any]) -> int:
    """Weights the merge adds (negative if it saves some)."""
    return int(merged["weight"].numel() - first["weight"].numel() - second["weight"].numel())


def merge_factored(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge directly consecutive weight ops into one where that adds at most :data:`MERGE_MAC_ALLOWANCE` weights.

    For a linear pair the added weights are the added multiply-adds per image; for a conv pair
    they are per output position (the op list does not know the map size), which favours
    keeping large conv pairs factored.

    Parameters
    ----------
    ops : list of dict
        From :func:`~fedsqueeze.server.export.flatten_ops` (not modified).

    Returns
    -------
    list of dict
        The new op list.
    """
    out: list[dict[str, Any]] = []
    for op in ops:
        prev = out[-1] if out else None
        if prev is not None and prev["op"] in ("conv2d", "linear") and op["op"] in ("conv2d", "linear"):
            merged = _merged(prev, op)
            if merged is not None and _extra_weights(prev, op, merged) <= MERGE_MAC_ALLOWANCE:
                out[-1] = merged
                continue
        out.append(dict(op))
    return out


def fold_input_normalisation(
    ops: list[dict[str, Any]], mean: list[float], std: list[float]
) -> tuple[list[dict[str, Any]], str, list[float]]:
    """Fold ``(pixels / 255 - mean) / std`` into the first layer if it is a float conv.

    With ``x = (p - 255 m) / (255 s)`` per input channel, ``conv(x) = conv'(p - 255 m)`` with
    weights divided by ``255 s`` of their input channel. Without padding the shift goes into the
    bias as well (``conv'(p) - sum(W' * 255 m)``); with zero padding it cannot (padded positions
    would hold ``-255 m``), so the graph subtracts ``255 m`` from the pixels first.

    Parameters
    ----------
    ops : list of dict
        From :func:`~fedsqueeze.server.export.flatten_ops` (not modified).
    mean, std : list of float
        One value per input channel.

    Returns
    -------
    ops : list of dict
        With the first conv rescaled (or the input list, unfolded); a ``"grid"`` conv gets its
        scales rescaled, shape ``(out, in, 1, 1)``, and keeps its codes.
    how : {"folded", "shift", "none"}
        Fully folded; folded but the graph must subtract ``shift`` from the pixels first; or not
        folded (the first layer is not a float conv): the graph normalises as usual.
    shift : list of float
        ``255 * mean`` per channel.
    """
    shift = 255.0 * torch.tensor(mean, dtype=torch.float32)
    if not ops or ops[0]["op"] != "conv2d" or ops[0].get("quant") is not None:
        return ops, "none", shift.tolist()
    first = dict(ops[0])
    inv = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))
    weight = first["weight"] * inv.view(1, -1, 1, 1)
    first["weight"] = weight
    grid = first.get("grid")
    if grid is not None:  # scales per (output, input) channel; one per output channel if the input has one
        first["grid"] = {**grid, "scale": grid["scale"] * inv.view(1, -1, 1, 1)}
    bias = first["bias"] if first["bias"] is not None else torch.zeros(weight.shape[0])
    if any(first["padding"]):
        first["bias"] = bias
        return [first, *ops[1:]], "shift", shift.tolist()
    first["bias"] = bias - (weight * shift.view(1, -1, 1, 1)).sum((1, 2, 3))
    return [first, *ops[1:]], "folded", shift.tolist()
