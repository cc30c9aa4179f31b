"""Compact students built from a teacher CNN by structured pruning and low-rank factoring.

Modules, in the order a student is built:

- :mod:`~fedsqueeze.compact_arch.layers`: the factored layers and ``count_parameters``;
- :mod:`~fedsqueeze.compact_arch.chain`: reading a teacher as a chain of layers (``to_chain``);
- :mod:`~fedsqueeze.compact_arch.prune`: structured pruning of that chain (``prune_chain``);
- :mod:`~fedsqueeze.compact_arch.build`: ``CompactConfig`` and ``build_student``;
- :mod:`~fedsqueeze.server.compact.lsq`: learned-step-size quantisation (``quantize_student``);
- :mod:`~fedsqueeze.server.compact.sensitivity`: per-layer pruning ratios by measured sensitivity
  and iterative prune -> fine-tune (``sensitivity_ratios``, ``iterative_prune``).
"""

from fedsqueeze.compact_arch.build import CompactConfig, Rank, build_student, describe, resolve_rank
from fedsqueeze.compact_arch.chain import to_chain
from fedsqueeze.compact_arch.layers import (
    FACTORED_LAYERS,
    LowRankConv2d,
    LowRankLinear,
    Tucker2Conv2d,
    count_parameters,
)
from fedsqueeze.compact_arch.prune import prune_chain
from fedsqueeze.server.compact.lsq import QUANT_LAYERS, LsqQuantizer, QuantConv2d, QuantLinear, quantize_student
from fedsqueeze.server.compact.sensitivity import (
    PruneStep,
    iterative_prune,
    layer_sensitivity,
    pruned_copy,
    sensitivity_ratios,
    uniform_ratios,
)

__all__ = [
    "FACTORED_LAYERS",
    "CompactConfig",
    "LowRankConv2d",
    "LowRankLinear",
    "LsqQuantizer",
    "PruneStep",
    "QUANT_LAYERS",
    "QuantConv2d",
    "QuantLinear",
    "Rank",
    "Tucker2Conv2d",
    "build_student",
    "count_parameters",
    "describe",
    "iterative_prune",
    "layer_sensitivity",
    "prune_chain",
    "pruned_copy",
    "quantize_student",
    "resolve_rank",
    "sensitivity_ratios",
    "to_chain",
    "uniform_ratios",
]
