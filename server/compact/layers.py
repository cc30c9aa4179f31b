"""Moved to :mod:`fedsqueeze.compact_arch.layers` (clients build the student too); re-exported here for old imports."""

from fedsqueeze.compact_arch.layers import (
    FACTORED_LAYERS,
    LowRankConv2d,
    LowRankLinear,
    Tucker2Conv2d,
    count_parameters,
)

__all__ = ["FACTORED_LAYERS", "LowRankConv2d", "LowRankLinear", "Tucker2Conv2d", "count_parameters"]
