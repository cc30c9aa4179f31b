"""Compact students that client and server both build: factored layers, pruning, and the architecture string.

Shared by the server (which derives a student from its global model) and the nodes (which build
the same, empty, student from its architecture string when the server switches the federated
model to it, see ``broadcast-compact``). Modules:

- :mod:`~fedsqueeze.compact_arch.layers`: the factored layers and ``count_parameters``;
- :mod:`~fedsqueeze.compact_arch.chain`: reading a teacher as a chain of layers (``to_chain``);
- :mod:`~fedsqueeze.compact_arch.prune`: structured pruning of that chain (``prune_chain``);
- :mod:`~fedsqueeze.compact_arch.build`: ``CompactConfig`` and ``build_student``;
- :mod:`~fedsqueeze.compact_arch.arch`: ``StudentArch`` and ``parse_arch``.
"""

from fedsqueeze.compact_arch.arch import ARCH_MAX_CHARS, MAX_RANK, StudentArch, parse_arch
from fedsqueeze.compact_arch.build import CompactConfig, build_student
from fedsqueeze.compact_arch.layers import LowRankConv2d, LowRankLinear, Tucker2Conv2d, count_parameters

__all__ = [
    "ARCH_MAX_CHARS",
    "MAX_RANK",
    "CompactConfig",
    "LowRankConv2d",
    "LowRankLinear",
    "StudentArch",
    "Tucker2Conv2d",
    "build_student",
    "count_parameters",
    "parse_arch",
]
