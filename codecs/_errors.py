"""The exception raised for malformed, truncated or hostile codec input."""

from __future__ import annotations


class CodecError(ValueError):
    """A blob could not be decoded: it is malformed, truncated, hostile or over a limit.

    Subclasses :class:`ValueError` so that callers that already guard against bad values
    catch it; ``decode`` raises nothing else for bad input.
    """
