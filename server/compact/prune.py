"""Moved to :mod:`fedsqueeze.compact_arch.prune` (clients build the student too); re-exported here for old imports."""

from fedsqueeze.compact_arch.prune import prune_chain

__all__ = ["prune_chain"]
