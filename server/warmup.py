"""Sparsity warm-up (Lin et al., Deep Gradient Compression, 2018): the uplink keeps more in the first rounds.

Early updates are large and change direction fast; a sparsifier that keeps 1 % of them from the
first round leaves most of the early signal in the error-feedback residual for many rounds. With
``warmup_rounds`` W > 0, round r in 1..W keeps the fraction ``ratio ** (r / (W + 1))`` instead of
``ratio`` (exponentially less each round), and round W + 1 on uses the configured codec. Only the
stages with a ``ratio`` parameter (``topk``, ``randomk``) are warmed; a pipeline without one, or
one whose sparsity a ``budget`` stage allocates, is the configured codec in every round.
"""

from __future__ import annotations

import dataclasses

from fedsqueeze.codecs import Codec

__all__ = ["WARMED_STAGES", "warmup_ratio", "warmup_codec"]

#: Stages whose ``ratio`` (fraction of entries kept) the warm-up raises.
WARMED_STAGES = frozenset({"topk", "randomk"})
#: Significant digits of a warmed ratio: the spec travels in every blob header, so it stays short.
_DIGITS = 3


def warmup_ratio(ratio: float, server_round: int, warmup_rounds: int) -> float:
    """The fraction a sparsifier configured to keep ``ratio`` keeps in ``server_round`` (counted from 1).

    ``ratio ** (server_round / (warmup_rounds + 1))`` for rounds 1..``warmup_rounds``, rounded to
    three significant digits and never below ``ratio``; ``ratio`` itself from round
    ``warmup_rounds + 1`` on, and in every round when ``warmup_rounds`` is 0.

    Raises
    ------
    ValueError
        If ``ratio`` is not in (0, 1] or ``warmup_rounds`` is negative.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"a sparsifier's ratio must be in (0, 1], got {ratio!r}")
    if warmup_rounds < 0:
        raise ValueError(f"warm-up rounds must be >= 0 (0: off), got {warmup_rounds!r}")
    if server_round > warmup_rounds or server_round < 1:
        return ratio
    warmed = float(f"{ratio ** (server_round / (warmup_rounds + 1)):.{_DIGITS}g}")
    return min(1.0, max(ratio, warmed))


def warmup_codec(codec: Codec, server_round: int, warmup_rounds: int) -> Codec:
    """``codec`` with each warmed stage's ratio set by :func:`warmup_ratio` for ``server_round``.

    Returns ``codec`` itself when nothing changes (no warm-up, a round past it, no warmed stage,
    or a ``budget`` stage in the pipeline). The result shares the codec's seed, not its state.
    """
    if warmup_rounds == 0 or server_round > warmup_rounds or any(s.name == "budget" for s in codec.stages):
        return codec
    stages = [
        dataclasses.replace(s, ratio=warmup_ratio(s.ratio, server_round, warmup_rounds))  # type: ignore[call-arg,attr-defined]
        if s.name in WARMED_STAGES
        else s
        for s in codec.stages
    ]
    if tuple(stages) == codec.stages:
        return codec
    return Codec(stages, seed=codec.seed)
