"""Rate allocation: the ``budget`` stage sets the later stages' parameters tensor by tensor to hit a byte budget.

The rule (Lagrangian rate allocation, the discrete form of reverse water-filling): every float
tensor gets a menu of operating points (estimated bytes, estimated squared error): dropped
(zero), dense float32, and for each tunable later stage a grid of settings, e.g. top-k with
k from 1 to n and each quantizer bit width, or a low rank r with the energy of the singular
values past r as its error. For a price ``lam`` each tensor takes the point that minimizes
``error + lam * bytes``; ``lam`` is bisected until the estimated bytes meet the target, and
the leftover bytes widen the top-k of the tensor that gains most (or, without top-k, move
tensors to larger menu points). Minimizing the summed squared error minimizes the update's
relative L2 error. The estimate ignores zstd and the exact index coding, so the update is
then encoded for real and the target is corrected by the measured bytes (without top-k the
menus are first rescaled to what each encoded tensor took), then every top-k size and rank
is scaled by a common factor, for at most ``passes`` encodes. A payload still outside the
tolerance then gets plans that change one tensor's choice at a time, ranks and widths off the
menus' least-error points included (where every rank sits at ``powersgd``'s own, scaling
changes nothing): at most 6 more encodes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ._errors import CodecError
from ._stage import (
    EncodeContext,
    Encoded,
    EncodeFurther,
    Stage,
    check_param,
    expect,
    expect_part,
    is_int,
    is_number,
    register_stage,
)

if TYPE_CHECKING:
    from ._pipeline import Codec
    from ._quant import Quantize
    from ._wire import Writer

TOLERANCE = 0.01
"""Stop correcting once the payload is within this fraction of the target (the contract is 3 %)."""
K_GRID = 48
"""Top-k sizes (geometric, 1..n) on each tensor's menu."""
RANK_GRID = 128
"""Most ranks on a matrix's menu: every rank up to this, else this many on a geometric grid."""
NODE_BYTES = 12
"""Estimated framing bytes of one stage node (tag, shape, header, part count)."""
BITS_CHOICES = (2, 4, 8)
"""Quantizer widths the budget may give a tensor (1 bit min-max wastes the sign)."""


class BudgetMissWarning(UserWarning):
    """A ``budget`` blob missed its byte target by more than the stated tolerance (issued once per codec)."""


@register_stage
@dataclass(frozen=True)
class Budget(Stage):
    """Spend ``bpp`` bits per parameter on the whole update, allocated across tensors.

    Math: choose per tensor i a setting s_i of the later stages (top-k size, low rank, quantizer
    width, dense or dropped) minimizing sum_i D_i(s_i) subject to sum_i R_i(s_i) <= B, where
    D_i is the squared error, R_i the bytes and B = bpp * n / 8 (Lagrangian allocation over
    each tensor's menu, then measured correction; see the module docstring). Cost: one sort of
    each tensor's magnitudes (and a singular value decomposition per matrix when ``svd`` or
    ``powersgd`` follows) plus up to ``passes`` encodes (6 more where those miss). Pays: the same bytes as uniform
    settings at lower error, as small tensors go dense and large ones sparse. The blob stays
    self-describing: each tensor's node records the settings (one byte per later tensor stage).

    Parameters
    ----------
    bpp : float
        Bits per parameter for the whole payload, after every later stage (zstd included), in
        (0, 64] (default: 1.0). The blob is ``bpp * n / 8`` bytes plus the header, within
        3 %, unless that is less than the smallest blob the pipeline can make (every tensor
        dropped: names and shapes only) or more than the largest (dense). With ``svd`` or
        ``powersgd`` instead of ``topk`` the steps are whole ranks and widths: within 3 % for
        targets of 2 kB or more, within 10 % below (measured on LeNet-5, the McMahan CNN and a
        synthetic update at 0.01-2 bpp). ``powersgd``'s ranks stop at its own ``rank`` (its
        warm start); a target beyond what its ranks reach is met by other widths and ranks of
        single tensors, else gets the closest plan.
    passes : int
        Most encodes spent on correcting the estimate, 1..16 (default: 6).
    """

    name: ClassVar[str] = "budget"
    allocates: ClassVar[bool] = True
    bpp: float = 1.0
    passes: int = 6

    def __post_init__(self) -> None:
        check_param(is_number(self.bpp) and 0 < self.bpp <= 64, self.name, "bpp", "a number in (0, 64]", self.bpp)
        ok = is_int(self.passes) and 1 <= self.passes <= 16
        check_param(ok, self.name, "passes", "an integer in 1..16", self.passes)

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        return None  # never reached: the codec calls encode_update for an allocating first stage

    def encode_update(self, codec: Codec, records: list[tuple[str, torch.Tensor]]) -> bytes:
        from ._allocate import encode_with_budget

        return encode_with_budget(self, codec, records)

    def stages_for_parts(self, meta: bytes, stages: Sequence[Stage | None], index: int) -> Sequence[Stage | None]:
        if not meta:
            return stages  # a dropped tensor: no parts (checked by decode)
        later = len(stages) - index - 1
        expect(len(meta) == later, self.name, f"header holds {len(meta)} settings, expected {later} (one per stage)")
        out: list[Stage | None] = list(stages[: index + 1])
        for code, stage in zip(meta, stages[index + 1 :], strict=True):
            if stage is None:
                raise CodecError(f"stage {self.name!r}: a later stage is already skipped")
            out.append(None if code == 0 else stage.with_budget_code(code))
        return out

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        if not parts:
            expect(not meta, self.name, "a dropped tensor (no parts) must have an empty header")
            return torch.zeros(shape, dtype=torch.float32)
        expect(len(parts) == 1 and bool(meta), self.name, f"expected one part and settings, found {len(parts)}")
        expect_part(self.name, parts[0], "the values", dtype=torch.float32, shape=shape)
        return parts[0]


@dataclass(frozen=True)
class Choice:
    """One point on a tensor's menu: how to encode it, and its estimated bytes and squared error.

    ``kind`` is ``zero`` (dropped), ``raw`` (dense, own dtype), ``topk`` (``size`` = k),
    ``dense`` (quantized, no sparsification), ``lowrank`` (``size`` = rank) or ``spec`` (the
    later stages as the spec gives them). ``bits`` is the quantizer width, 0 for none;
    ``value_bits`` the estimated bits of one kept value after entropy coding.
    """

    kind: str
    size: int = 0
    bits: int = 0
    est_bytes: float = 0.0
    est_error: float = 0.0
    value_bits: float = 32.0


def budget_settings(choice: Choice, later: Sequence[Stage], n: int) -> list[Stage | None]:
    """The later stages as ``choice`` sets them for one tensor (``None``: skipped)."""
    from ._lowrank import SVD, PowerSGD
    from ._quant import Quantize
    from ._sparse import TopK

    out: list[Stage | None] = []
    for stage in later:
        if choice.kind == "spec":
            out.append(stage)
        elif isinstance(stage, TopK):
            out.append(TopK(ratio=choice.size / n) if choice.kind == "topk" else None)
        elif isinstance(stage, (SVD, PowerSGD)):
            out.append(dataclasses.replace(stage, rank=choice.size) if choice.kind == "lowrank" else None)
        elif isinstance(stage, Quantize):
            out.append(dataclasses.replace(stage, bits=choice.bits) if choice.bits else None)
        else:
            out.append(stage)
    return out


def settings_meta(settings: Sequence[Stage | None]) -> bytes:
    """The budget node's header: one byte per later stage, 0 for skipped, else its budget code."""
    return bytes(0 if s is None else s.budget_code() for s in settings)


def encode_choice(codec: Codec, budget: Budget, name: str, t: torch.Tensor, x: torch.Tensor, choice: Choice) -> Writer:
    """The node of one float tensor under ``choice``."""
    if choice.kind == "raw":
        return codec.raw_node(t)
    shape = tuple(x.shape)
    if choice.kind == "zero":
        return codec.stage_node(0, Encoded([], b""), shape, name)
    settings = budget_settings(choice, codec.tensor_stages[1:], x.numel())
    stages: list[Stage | None] = [budget, *settings]
    return codec.stage_node(0, Encoded([EncodeFurther(x)], settings_meta(settings)), shape, name, stages)


def values_per_byte_estimate(n: int, k: int) -> float:
    """Estimated index bytes per kept entry: varint gaps of about n / k, or a bitmap."""
    gap = n / max(k, 1)
    varint = 1.0 if gap < 128 else 2.0 if gap < 16384 else 3.0
    return min(varint, n / 8 / max(k, 1))


@functools.lru_cache(maxsize=256)
def k_grid(n: int) -> np.ndarray:
    """Geometric top-k sizes 1..n-1 (at most K_GRID distinct; cached, so read-only)."""
    if n <= 1:
        grid = np.zeros(0, np.int64)
    else:
        grid = np.unique(np.round(np.geomspace(1, n - 1, K_GRID)).astype(np.int64))
        grid = grid[grid < n]
    grid.flags.writeable = False
    return grid


def quant_relative_error(bits: int) -> float:
    """Mean squared error of min-max quantization per unit of range squared: step**2 / 12."""
    return 1.0 / (12.0 * ((1 << bits) - 1) ** 2)


@functools.lru_cache(maxsize=64)
def width_stage(stage: Quantize, bits: int) -> Quantize:
    """``stage`` at width ``bits`` (cached: the planner asks for the same few widths per tensor)."""
    return dataclasses.replace(stage, bits=bits)


def group_bytes(stage: Stage | None, bits: int, count: int, shape: tuple[int, ...]) -> float:
    """Bytes of a quantizer's per-group ranges (lo, step) over ``count`` values at width ``bits``."""
    from ._quant import Quantize

    if not isinstance(stage, Quantize) or not bits:
        return 0.0
    g = width_stage(stage, bits)._granularity(count)
    if g == "tensor":
        return 8.0
    if g == "channel":
        return 8.0 * (shape[0] if len(shape) >= 2 and count == math.prod(shape) else 1)
    return 8.0 * math.ceil(count / int(g))


def group_bytes_many(stage: Stage | None, bits: int, counts: np.ndarray) -> np.ndarray:
    """:func:`group_bytes` of a 1-D run of each size in ``counts`` (the top-k values), at once.

    Mirrors ``Quantize._granularity``: a block size, or one range ("tensor", and "channel" of a
    1-D run), with outlier blocks for runs longer than ``outlier_block`` at up to 4 bits.
    """
    from ._quant import Quantize

    if not isinstance(stage, Quantize) or not bits:
        return np.zeros(counts.shape)
    g = stage.granularity
    base = 8.0 * np.ceil(counts / g) if isinstance(g, int) else np.full(counts.shape, 8.0)
    block = stage.outlier_block
    if block and bits <= 4 and g == "tensor":
        return np.where(counts > block, 8.0 * np.ceil(counts / block), base)
    return base
