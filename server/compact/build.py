"""Moved to :mod:`fedsqueeze.compact_arch.build` (clients build the student too); re-exported here for old imports."""

from fedsqueeze.compact_arch.build import CompactConfig, Rank, build_student, describe, resolve_rank

__all__ = ["CompactConfig", "Rank", "build_student", "describe", "resolve_rank"]
