"""Moved to :mod:`fedsqueeze.compact_arch.chain` (clients build the student too); re-exported here for old imports."""

from fedsqueeze.compact_arch.chain import to_chain

__all__ = ["to_chain"]
