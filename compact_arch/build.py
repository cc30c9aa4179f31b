"""Building a compact student from a teacher: :class:`CompactConfig` and :func:`build_student`."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from fedsqueeze.compact_arch.chain import to_chain
from fedsqueeze.compact_arch.layers import LowRankConv2d, LowRankLinear, Tucker2Conv2d, count_parameters
from fedsqueeze.compact_arch.prune import prune_chain

__all__ = ["CompactConfig", "Rank", "build_student", "describe", "resolve_rank"]

#: A rank setting: an int >= 1, a fraction in (0, 1] of the full rank, or None (keep the layer dense).
Rank = int | float | None


def resolve_rank(rank: Rank, max_rank: int) -> int | None:
    """Turn a rank setting into a rank: a float in (0, 1] is a fraction of ``max_rank``.

    Parameters
    ----------
    rank : int, float or None
        An int >= 1 (capped at ``max_rank``), a fraction in (0, 1], or None (no factoring).
    max_rank : int
        Full rank of the layer.

    Returns
    -------
    int or None
    """
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rank must be an int, a float fraction or None, got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"a fractional rank must be in (0, 1], got {rank}")
        return max(1, int(round(rank * max_rank)))
    if rank < 1:
        raise ValueError(f"an integer rank must be >= 1, got {rank}")
    return min(rank, max_rank)


@dataclass
class CompactConfig:
    """How :func:`build_student` shrinks a teacher.

    Parameters
    ----------
    conv_rank : int, float or None
        Rank of factored convolutions: an int, a fraction of the full rank, or None to keep
        convolutions dense (default: 0.5). For Tucker-2 it applies to both channel modes.
    linear_rank : int, float or None
        Rank of factored linear layers, as ``conv_rank`` (default: 0.25).
    layer_ranks : dict of str to int or float
        Per-layer rank overriding the two above, keyed by the teacher's layer name (default: {}).
    conv_init : {"svd", "tucker2"}
        Factoring of convolutions: k x k to ``rank`` then 1 x 1 ("svd"), or 1 x 1, k x k core,
        1 x 1 ("tucker2") (default: "svd").
    prune_ratio : float
        Fraction of conv filters removed by norm, in [0, 1) (default: 0.0).
    linear_prune_ratio : float or None
        Fraction of linear hidden units removed; None uses ``prune_ratio`` (default: None).
    norm : {"l1", "l2"}
        Filter norm used to rank filters and units for pruning (default: "l1").
    bits : int
        Weight bits of the exported model: 8 (int8 + per-channel scale) or 32 (default: 8).
    keep_dense : tuple of str
        Layers never factored: teacher layer names or the aliases "first_conv" and
        "last_linear" (default: ("first_conv", "last_linear")). Any layer whose factored form
        would not have fewer parameters stays dense too.
    no_prune : tuple of str
        Layers whose outputs are never pruned, same naming (default: ()).
    """

    conv_rank: Rank = 0.5
    linear_rank: Rank = 0.25
    layer_ranks: dict[str, int | float] = field(default_factory=dict)
    conv_init: Literal["svd", "tucker2"] = "svd"
    prune_ratio: float = 0.0
    linear_prune_ratio: float | None = None
    norm: Literal["l1", "l2"] = "l1"
    bits: int = 8
    keep_dense: tuple[str, ...] = ("first_conv", "last_linear")
    no_prune: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.conv_init not in ("svd", "tucker2"):
            raise ValueError(f"conv_init must be 'svd' or 'tucker2', got {self.conv_init!r}")
        if self.norm not in ("l1", "l2"):
            raise ValueError(f"norm must be 'l1' or 'l2', got {self.norm!r}")
        if self.bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {self.bits}")
        for ratio in (self.prune_ratio, self.linear_prune_ratio):
            if ratio is not None and not 0.0 <= ratio < 1.0:
                raise ValueError(f"prune ratios must be in [0, 1), got {ratio}")
        for rank in (self.conv_rank, self.linear_rank, *self.layer_ranks.values()):
            resolve_rank(rank, 1)  # type and range check only


def _resolve_aliases(names: Sequence[str], chain: list[tuple[str, nn.Module]]) -> set[str]:
    convs = [n for n, m in chain if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in chain if isinstance(m, nn.Linear)]
    aliases = {"first_conv": convs[:1], "last_linear": linears[-1:]}
    known = {n for n, _ in chain}
    resolved: set[str] = set()
    for name in names:
        if name in aliases:
            resolved.update(aliases[name])
        elif name in known:
            resolved.add(name)
        else:
            raise ValueError(
                f"unknown layer {name!r} in config; layers are {sorted(known)} and aliases {sorted(aliases)}"
            )
    return resolved


def _factor(name: str, layer: nn.Module, config: CompactConfig) -> nn.Module:
    """Return the factored form of ``layer`` if it has fewer parameters, else ``layer``."""
    dense = count_parameters(layer)
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        rank_setting = config.layer_ranks.get(name, config.conv_rank)
        out_ch, in_ch, kh, kw = layer.weight.shape
        if config.conv_init == "tucker2":
            in_rank, out_rank = resolve_rank(rank_setting, in_ch), resolve_rank(rank_setting, out_ch)
            if in_rank is None or out_rank is None:
                return layer
            candidate: nn.Module = Tucker2Conv2d.from_dense(layer, in_rank, out_rank)
        else:
            rank = resolve_rank(rank_setting, min(out_ch, in_ch * kh * kw))
            if rank is None:
                return layer
            candidate = LowRankConv2d.from_dense(layer, rank)
    elif isinstance(layer, nn.Linear):
        rank = resolve_rank(
            config.layer_ranks.get(name, config.linear_rank), min(layer.in_features, layer.out_features)
        )
        if rank is None:
            return layer
        candidate = LowRankLinear.from_dense(layer, rank)
    else:
        return layer
    return candidate if count_parameters(candidate) < dense else layer


def build_student(teacher: nn.Module, config: CompactConfig | None = None) -> nn.Sequential:
    """Build a structurally smaller copy of ``teacher``: prune filters, then factor layers.

    The teacher is read with :func:`to_chain` (an ``nn.Sequential`` or any module whose
    ``forward`` is a single chain of conv/pool/activation/flatten/linear steps). Conv filters
    and linear hidden units with the smallest norms are removed from the tensor shapes
    (``prune_ratio``), then each remaining conv/linear not listed in ``keep_dense`` is replaced by
    its truncated-SVD (or Tucker-2) factorisation when that has fewer parameters. The teacher is
    not modified.

    Parameters
    ----------
    teacher : torch.nn.Module
        Trained model.
    config : CompactConfig or None
        Compression settings (default: None, i.e. ``CompactConfig()``).

    Returns
    -------
    torch.nn.Sequential
        The student, in eval mode, with layer names derived from the teacher's ('.' -> '_').
    """
    config = config or CompactConfig()
    chain = [(name, copy.deepcopy(layer)) for name, layer in to_chain(teacher)]
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for _, m in chain):
        raise ValueError("teacher has no Conv2d or Linear layer to compress")
    linear_ratio = config.prune_ratio if config.linear_prune_ratio is None else config.linear_prune_ratio
    prune_chain(chain, config.prune_ratio, linear_ratio, config.norm, _resolve_aliases(config.no_prune, chain))
    keep_dense = _resolve_aliases(config.keep_dense, chain)
    for name in config.layer_ranks:
        _resolve_aliases([name], chain)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, layer in chain:
        new = layer if name in keep_dense else _factor(name, layer, config)
        layers[name.replace(".", "_")] = new
    student = nn.Sequential(layers)
    return student.eval()


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """Summarise each conv/linear layer of a chain: name, kind, shapes and parameter count."""
    rows = []
    for name, layer in to_chain(model):
        params = count_parameters(layer)
        if params:
            shapes = [tuple(p.shape) for p in layer.parameters() if p.dim() > 1]
            rows.append({"name": name, "kind": type(layer).__name__, "weights": shapes, "params": params})
    return rows
