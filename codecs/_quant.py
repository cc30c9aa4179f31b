"""Quantization stages: uniform ``quantize`` (1-8 bits, stochastic), ``ternary`` (STC) and ``sign``."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ._bits import pack_bits, unpack_bits, unpack_float32, varint_bytes
from ._errors import CodecError
from ._stage import (
    ArrayNode,
    DecodeCost,
    EncodeContext,
    Encoded,
    Stage,
    as_numpy,
    check_param,
    expect,
    expect_part,
    expect_parts,
    is_int,
    is_number,
    register_stage,
)
from ._wire import DTYPE_CODES, LITTLE_ENDIAN, Reader, raw_node_head

FLOAT32_MAX = np.float32(np.finfo(np.float32).max)
"""Cap of 1 / step: a subnormal step's inverse overflows, and 0 * inf would make a NaN code of the
group's minimum; capped, every code stays in range (the error is at most the subnormal range)."""
UINT8_CODE = DTYPE_CODES[torch.uint8]
FLOAT32_CODE = DTYPE_CODES[torch.float32]

CHUNK = 65_536
OUTLIER_BLOCKS = 1
"""Quantize header kind: one range per block, block size as a varint (see ``outlier_block``)."""


def _groups(x: torch.Tensor, granularity: str | int) -> torch.Tensor:
    """View ``x`` as (groups, size) for per-tensor, per-channel (dim 0) or per-block scales.

    Blocks pad the last group by repeating the tensor's last element, which leaves its
    min and max unchanged.
    """
    flat = x.reshape(-1)
    if granularity == "tensor" or (granularity == "channel" and x.dim() < 2):
        return flat.reshape(1, -1)
    if granularity == "channel":
        return flat.reshape(x.shape[0], -1)
    block = int(granularity)
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.reshape(-1, block)


def _codes(
    groups: torch.Tensor, lo: torch.Tensor, inv: torch.Tensor, levels: int, gen: torch.Generator | None
) -> torch.Tensor:
    """uint8 codes clamp(round((x - lo) * inv)) (or floor(... + u) with ``gen``), in pieces of ~CHUNK values.

    Working piece by piece keeps temporaries small: a fresh 40 MB temporary costs more to page
    in than the arithmetic on it.
    """
    g, size = groups.shape
    codes = torch.empty((g, size), dtype=torch.uint8)
    if g == 1:
        pieces = [(slice(0, 1), slice(c, c + CHUNK)) for c in range(0, size, CHUNK)]
    else:
        rows = max(1, CHUNK // size)
        pieces = [(slice(r, r + rows), slice(None)) for r in range(0, g, rows)]
    for rows_, cols in pieces:
        t = (groups[rows_, cols] - lo[rows_, None]).mul_(inv[rows_, None])
        if gen is not None:
            t.add_(torch.rand(t.shape, generator=gen)).floor_()
        else:
            t.round_()
        codes[rows_, cols] = t.clamp_(0, levels)
    return codes


def _batch_codes(values: np.ndarray, layout: _BatchLayout, bits: int) -> tuple[np.ndarray, ...]:
    """(lo, step, uint8 codes, decoded values) of the consecutive groups of ``layout``.

    The same IEEE float32 operations, in the same order, as :meth:`Quantize.encode` and decoding.
    """
    lo = np.minimum.reduceat(values, layout.starts)
    lo += np.float32(0.0)  # -0.0 -> +0.0, as in encode
    hi = np.maximum.reduceat(values, layout.starts)
    hi += np.float32(0.0)
    levels = (1 << bits) - 1
    step = (np.subtract(hi, lo, dtype=np.float64) / levels).astype(np.float32)  # hi - lo may overflow float32
    inv = np.zeros_like(step)
    np.divide(np.float32(1.0), step, out=inv, where=step > 0)
    np.minimum(inv, FLOAT32_MAX, out=inv)  # a subnormal step's inverse overflows: capped, as in _step
    lo_each = np.repeat(lo, layout.sizes)
    scaled = values - lo_each
    scaled *= np.repeat(inv, layout.sizes)
    codes = np.clip(np.rint(scaled, out=scaled), 0, levels, out=scaled)
    # what decode returns, for error feedback: the same float32 multiply, then add, as _dequantize's
    decoded = codes * np.repeat(step, layout.sizes)
    decoded += lo_each
    return lo, step, codes.astype(np.uint8), decoded


def _pack_segments(codes: np.ndarray, layout: _BatchLayout, bits: int) -> np.ndarray:
    """:func:`pack_bits` of each tensor's codes in ``codes``, in one call.

    Each tensor's codes are padded with zero codes to a whole byte, as packing it alone pads its end.
    """
    if layout.aligned is None:
        return pack_bits(codes, bits)
    aligned = np.zeros(layout.aligned_size, np.uint8)
    aligned[layout.aligned] = codes
    return pack_bits(aligned, bits)


def _group_sizes(shape: tuple[int, ...], granularity: str | int) -> list[int]:
    """How many values each group of :func:`_groups` holds, without its padding."""
    n, g = math.prod(shape), _num_groups(shape, granularity)
    if g <= 1:
        return [n]
    size = int(granularity) if isinstance(granularity, int) else n // g
    return [size] * (g - 1) + [n - size * (g - 1)]


def _num_groups(shape: tuple[int, ...], granularity: str | int) -> int:
    n = math.prod(shape)
    if granularity == "tensor" or (granularity == "channel" and len(shape) < 2):
        return 1
    if granularity == "channel":
        return shape[0]
    return -(-n // int(granularity))


@dataclass(frozen=True)
class _BatchPlan:
    """What quantize's batch needs to know of one tensor shape: its values, its group sizes, the node header,
    and what precedes each part on the wire (the packed codes', then the minima's and the steps')."""

    numel: int
    sizes: tuple[int, ...]
    meta: bytes
    codes_head: bytes
    groups_head: bytes


@functools.lru_cache(maxsize=4096)
def _batch_plan(stage: Quantize, shape: tuple[int, ...]) -> _BatchPlan:
    numel = math.prod(shape)
    granularity = stage._granularity(numel)
    meta = b"" if granularity == stage.granularity else bytes((OUTLIER_BLOCKS,)) + varint_bytes(int(granularity))
    sizes = tuple(_group_sizes(shape, granularity))
    codes_head = raw_node_head(UINT8_CODE, (-(-numel * stage.bits // 8),))
    return _BatchPlan(numel, sizes, meta, codes_head, raw_node_head(FLOAT32_CODE, (len(sizes),)))


@dataclass(frozen=True)
class _BatchLayout:
    """What quantize's batch derives from the shapes alone, for one list of shapes (the same each round: cached).

    ``starts`` and ``sizes``: where each group begins in the concatenated values and how many it holds;
    ``aligned``: where each code goes when every tensor's codes start on a byte (None when they do).
    """

    plans: tuple[_BatchPlan, ...]
    starts: np.ndarray
    sizes: np.ndarray
    counts: tuple[int, ...]
    groups: tuple[int, ...]
    byte_counts: tuple[int, ...]
    aligned: np.ndarray | None
    aligned_size: int


@functools.lru_cache(maxsize=256)
def _batch_layout(stage: Quantize, shapes: tuple[tuple[int, ...], ...]) -> _BatchLayout:
    plans = tuple(_batch_plan(stage, shape) for shape in shapes)
    sizes = [size for plan in plans for size in plan.sizes]
    counts = tuple(plan.numel for plan in plans)
    per = 8 // stage.bits
    padded = [-(-n // per) * per for n in counts]
    aligned = None
    if padded != list(counts):  # each code moves right by the padding of the tensors before it
        shift = np.repeat(np.cumsum([0, *padded[:-1]]) - np.cumsum([0, *counts[:-1]]), counts)
        aligned = np.arange(sum(counts)) + shift
    layout = _BatchLayout(
        plans,
        np.fromiter(itertools.accumulate(sizes[:-1], initial=0), np.int64, len(sizes)),
        np.array(sizes),
        counts,
        tuple(len(plan.sizes) for plan in plans),
        tuple(n // per for n in padded),
        aligned,
        sum(padded),
    )
    for array in (layout.starts, layout.sizes, layout.aligned):
        if array is not None:
            array.flags.writeable = False  # shared by every batch of these shapes
    return layout


def _wires(layout: _BatchLayout, packed: np.ndarray, lo: np.ndarray, step: np.ndarray) -> list[bytes] | None:
    """Each tensor's three parts as raw nodes on the wire, or None when the encoder must check them.

    Built from the arrays of the whole batch, a slice each, instead of a tensor per part: the
    encoder's walk costs ~2 us per part. The codes are in range; the minima and steps are checked
    finite here by one float64 sum each (which cannot overflow; NaN and inf reach it).
    """
    if not (LITTLE_ENDIAN and math.isfinite(float(lo.sum(dtype=np.float64)) + float(step.sum(dtype=np.float64)))):
        return None
    wires, at, group = [], 0, 0
    for plan, count in zip(layout.plans, layout.byte_counts, strict=True):
        end, group_end = at + count, group + len(plan.sizes)
        codes_part, lo_part, step_part = packed[at:end].data, lo[group:group_end].data, step[group:group_end].data
        wires.append(b"".join((plan.codes_head, codes_part, plan.groups_head, lo_part, plan.groups_head, step_part)))
        at, group = end, group_end
    return wires


@register_stage
@dataclass(frozen=True)
class Quantize(Stage):
    """Uniform min-max quantization to 2**bits levels per group, with real bit packing.

    Math: per group g with range [lo, hi], step = (hi - lo) / (2**bits - 1),
    q = round((x - lo) / step) and y = lo + q * step, so |x - y| <= step / 2. With
    ``stochastic=true``, q = floor((x - lo) / step + u), u ~ U[0, 1): E[y] = x exactly
    (unbiased, as in QSGD) at up to twice the worst-case error. Cost: ``bits`` per value plus
    two float32 (lo, step) per group; two passes to encode, one to decode. Pays: 8 bits is
    4x at ~0.4 % relative error; 4 bits 8x; per-channel or per-block scales cut the error where
    rows differ in range, at 64 bits per group.

    Parameters
    ----------
    bits : int
        1, 2, 4 or 8 (default: 8).
    stochastic : bool
        Unbiased stochastic rounding instead of round-to-nearest (default: false).
    granularity : str | int
        ``"tensor"``, ``"channel"`` (one range per slice of dim 0) or a block size >= 8
        (default: "tensor").
    outlier_block : int
        With ``bits <= 4`` and ``granularity="tensor"``, tensors of more than this many values
        get one range per block of this many values instead of one for the whole tensor, so
        that an outlier widens the step of its block only (the node's header says so). 0 keeps
        one range per tensor, the behaviour before this parameter existed (default: 256;
        chosen by measurement, see BENCHMARKS.md).
    """

    name: ClassVar[str] = "quantize"
    bits: int = 8
    stochastic: bool = False
    granularity: str | int = "tensor"
    outlier_block: int = 256

    def __post_init__(self) -> None:
        check_param(self.bits in (1, 2, 4, 8) and is_int(self.bits), self.name, "bits", "one of 1, 2, 4, 8", self.bits)
        check_param(isinstance(self.stochastic, bool), self.name, "stochastic", "true or false", self.stochastic)
        g = self.granularity
        check_param(
            g in ("tensor", "channel") or (isinstance(g, int) and not isinstance(g, bool) and 8 <= g <= 2**24),
            self.name,
            "granularity",
            '"tensor", "channel" or a block size in 8..2**24',
            g,
        )
        b = self.outlier_block
        ok = is_int(b) and (b == 0 or 8 <= b <= 2**24)
        check_param(ok, self.name, "outlier_block", "0 or a block size in 8..2**24", b)

    @property
    def draws_random(self) -> bool:
        return self.stochastic

    def _granularity(self, numel: int) -> str | int:
        """The granularity used on a tensor of ``numel`` values (blocks for small widths, see outlier_block)."""
        if self.outlier_block and self.bits <= 4 and self.granularity == "tensor" and numel > self.outlier_block:
            return self.outlier_block
        return self.granularity

    def _meta_granularity(self, meta: bytes, numel: int) -> str | int:
        """The granularity a node's header declares: empty for the spec's, else 0x01 and a block size."""
        if not meta:
            return self.granularity
        r = Reader(meta, "quantize header")
        expect(r.u8("header kind") == OUTLIER_BLOCKS, self.name, f"unknown header {meta[:1]!r}; expected 0x01")
        block = r.varint("block size", 2**24)
        r.expect_end()
        # the encoder writes blocks only for tensors larger than one block: the padding stays < numel
        expect(8 <= block < numel, self.name, f"block size must be in 8..{numel - 1} for {numel} values, found {block}")
        return block

    def budget_code(self) -> int:
        return self.bits  # the width is what a budget sets per tensor; decoding needs it

    def with_budget_code(self, code: int) -> Stage:
        expect(code in (1, 2, 4, 8), self.name, f"budget code (bit width) must be 1, 2, 4 or 8, found {code}")
        return dataclasses.replace(self, bits=code)

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        granularity = self._granularity(x.numel())
        meta = b"" if granularity == self.granularity else bytes((OUTLIER_BLOCKS,)) + varint_bytes(int(granularity))
        groups = _groups(x, granularity)
        if groups.shape[0] == 1:
            lo, hi = (v.reshape(1) for v in groups.aminmax())  # ~6x faster than aminmax(dim=1)
        else:
            lo, hi = groups.aminmax(dim=1)
        lo, hi = lo + 0.0, hi + 0.0  # -0.0 -> +0.0: which zero a min returns depends on the kernel
        step, inv = self._step(lo, hi)
        codes = _codes(groups, lo, inv, levels=(1 << self.bits) - 1, gen=ctx.generator() if self.stochastic else None)
        packed = torch.from_numpy(pack_bits(as_numpy(codes.reshape(-1)[: x.numel()]), self.bits))
        return Encoded([packed, lo.contiguous(), step.contiguous()], meta)

    def _step(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, 1 / step or 0) of each group, float32."""
        levels = (1 << self.bits) - 1
        step = ((hi.double() - lo.double()) / levels).to(torch.float32)  # hi - lo may overflow float32
        return step, torch.where(step > 0, (1.0 / step).clamp_max(float(FLOAT32_MAX)), torch.zeros_like(step))

    def encode_batch(self, xs: Sequence[torch.Tensor], ctxs: Sequence[EncodeContext]) -> list[Encoded | None]:
        """Tensors of at most CHUNK values in one pass over their concatenation.

        One min and one max per group (segmented reductions over every tensor's ranges: the
        whole tensor, its channels or its blocks), one rounding pass with each group's own
        range; bit-identical to :meth:`encode`. Stochastic rounding and large tensors take
        :meth:`encode`.
        """
        out: list[Encoded | None] = [None] * len(xs)
        fused = [i for i, x in enumerate(xs) if not self.stochastic and x.numel() <= CHUNK]
        for i, x in enumerate(xs):
            if self.stochastic or x.numel() > CHUNK:
                out[i] = self.encode(x, ctxs[i])
        if not fused:
            return out
        # in numpy: a torch call costs several times a numpy call, and the arrays here are small;
        # every operation is the same IEEE float32 operation as in encode (no fused multiply-add)
        layout = _batch_layout(self, tuple(tuple(xs[i].shape) for i in fused))
        values = np.concatenate([as_numpy(xs[i]) for i in fused], axis=None)  # axis=None: flattened
        # every value outside float32's range (a group wider than it, an inf from an earlier stage)
        # overflows as in torch's encode, and the blob is refused for its inf step or values when it
        # is checked; numpy would also warn, an exception where warnings are errors
        with np.errstate(over="ignore", invalid="ignore"):
            lo, step, codes, decoded = _batch_codes(values, layout, self.bits)
        packed = _pack_segments(codes, layout, self.bits)
        # one split per array (views, one call each) instead of a slice per tensor and part
        split = torch.split_with_sizes
        lo_t, step_t = split(torch.from_numpy(lo), layout.groups), split(torch.from_numpy(step), layout.groups)
        packed_t = split(torch.from_numpy(packed), layout.byte_counts)
        decoded_t = split(torch.from_numpy(decoded), layout.counts)
        wires = _wires(layout, packed, lo, step)
        for j, (i, plan) in enumerate(zip(fused, layout.plans, strict=True)):
            wire = None if wires is None else wires[j]
            out[i] = Encoded([packed_t[j], lo_t[j], step_t[j]], plan.meta, decoded_t[j], wire)
        return out

    def decode_cost(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> DecodeCost:
        n = math.prod(shape)
        # unpacked codes (n bytes), float32 values, and a padded copy when the last block is short
        return DecodeCost(scratch_bytes=10 * n, work=4 * n)

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        expect_parts(self.name, parts, 3)
        packed, lo, step = parts
        n = math.prod(shape)
        granularity = self._meta_granularity(meta, n)
        g = _num_groups(shape, granularity)
        if g < 1:  # formatted only when raised: this runs for every quantized node
            expect(False, self.name, f"a tensor of shape {shape} has no elements to quantize")
        expect_part(self.name, packed, "the packed codes", dtype=torch.uint8)
        expect_part(self.name, lo, "the group minima", dtype=torch.float32, shape=(g,))
        expect_part(self.name, step, "the group steps", dtype=torch.float32, shape=(g,))
        values = _values(as_numpy(packed).ravel(), as_numpy(lo), as_numpy(step), self.bits, granularity, n)
        return torch.from_numpy(values).reshape(shape)

    def array_node(self, meta: bytes, shape: tuple[int, ...]) -> ArrayNode | None:
        return _array_node(self, meta, shape)


@functools.lru_cache(maxsize=1024)
def _array_node(stage: Quantize, meta: bytes, shape: tuple[int, ...]) -> ArrayNode | None:
    """Quantize's fast-path layout: packed uint8 codes, then g float32 minima and g steps."""
    n = math.prod(shape)
    try:
        granularity = stage._meta_granularity(meta, n)
    except CodecError:
        return None  # the general path raises, with the blob's context
    g = _num_groups(shape, granularity)
    if g < 1:
        return None
    layout = ((UINT8_CODE, -(-n * stage.bits // 8)), (FLOAT32_CODE, g), (FLOAT32_CODE, g))
    cost = stage.decode_cost([], meta, shape)

    def decode(arrays: list[np.ndarray]) -> np.ndarray:
        packed, lo, step = arrays
        return _values(packed, lo, step, stage.bits, granularity, n)

    return ArrayNode(layout, cost, decode)


def _values(
    packed: np.ndarray, lo: np.ndarray, step: np.ndarray, bits: int, granularity: int | str, n: int
) -> np.ndarray:
    """The n float32 values of packed codes, dequantized with each group's lo and step (a new array)."""
    values = unpack_float32(packed, bits, n)
    # a hostile range can overflow float32: the result is inf, as with torch, and receivers
    # check finiteness; numpy would also warn (an exception where warnings are errors)
    with np.errstate(over="ignore", invalid="ignore"):
        _dequantize(values, lo, step, granularity, n)
    return values


def _dequantize(values: np.ndarray, lo: np.ndarray, step: np.ndarray, granularity: int | str, n: int) -> None:
    """``values = lo + step * codes`` per group, in place: the same float32 multiply, then add, as torch's."""
    g = lo.size
    if g == 1:
        values *= step[0]
        values += lo[0]
        return
    # blocks hold `granularity` values (the last one may hold fewer); channels split n evenly
    size = granularity if isinstance(granularity, int) else n // g
    whole = n // size
    body = values[: whole * size].reshape(whole, size)
    body *= step[:whole, None]
    body += lo[:whole, None]
    if whole < g:  # the short last block
        values[whole * size :] *= step[-1]
        values[whole * size :] += lo[-1]


@register_stage
@dataclass(frozen=True)
class Ternary(Stage):
    """Ternarize to {-mu, 0, +mu} as in Sparse Ternary Compression (Sattler et al. 2019).

    Math: keep S = {i : |x_i| > delta * mean|x|}, mu = mean_{i in S} |x_i|,
    y_i = mu * sign(x_i) for i in S, else 0. With ``delta=0`` (after ``topk``) every kept value
    becomes +-mu: STC. ``delta=0.7`` is the Ternary Weight Networks rule for dense tensors.
    Cost: 2 bits per value, or 1 bit when nothing is zero (the usual case after top-k), plus
    one float32. Pays: after top-k with error feedback: ~10x fewer value bits than float32.

    Parameters
    ----------
    delta : float
        Threshold as a fraction of mean |x|, in [0, 10] (default: 0.0).
    """

    name: ClassVar[str] = "ternary"
    delta: float = 0.0

    def __post_init__(self) -> None:
        ok = is_number(self.delta) and 0 <= self.delta <= 10
        check_param(ok, self.name, "delta", "a number in [0, 10]", self.delta)

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        flat = x.reshape(-1)
        mag = flat.abs()
        # means in float64: a float32 sum of large magnitudes overflows and would zero every value
        keep = mag > self.delta * float(mag.double().mean())
        mu = mag[keep].double().mean() if bool(keep.any()) else mag.new_zeros((), dtype=torch.float64)
        mu_part = mu.reshape(1).to(torch.float32)
        if bool(keep.all()):
            signs = as_numpy(flat >= 0).astype(np.uint8)
            return Encoded([torch.from_numpy(pack_bits(signs, 1)), mu_part], b"\x01")
        codes = np.zeros(flat.numel(), np.uint8)
        k = as_numpy(keep)
        codes[k] = np.where(as_numpy(flat)[k] >= 0, 1, 2)
        return Encoded([torch.from_numpy(pack_bits(codes, 2)), mu_part], b"\x00")

    def decode_cost(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> DecodeCost:
        n = math.prod(shape)
        # unpacked codes, two masks and two float32 temporaries besides the output
        return DecodeCost(scratch_bytes=16 * n, work=4 * n)

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        expect_parts(self.name, parts, 2)
        expect(meta in (b"\x00", b"\x01"), self.name, f"header must be 0 (2-bit codes) or 1 (signs), found {meta!r}")
        packed, mu = parts
        expect_part(self.name, packed, "the packed codes", dtype=torch.uint8)
        expect_part(self.name, mu, "mu", dtype=torch.float32, shape=(1,))
        n = math.prod(shape)
        if meta == b"\x01":
            signs = torch.from_numpy(unpack_bits(as_numpy(packed).ravel(), 1, n)).to(torch.float32)
            return signs.mul_(2).sub_(1).mul_(mu).reshape(shape)
        codes = torch.from_numpy(unpack_bits(as_numpy(packed).ravel(), 2, n))
        expect(bool((codes <= 2).all()), self.name, "2-bit code 3 is not a ternary value")
        out = (codes == 1).to(torch.float32) - (codes == 2).to(torch.float32)
        return out.mul_(mu).reshape(shape)


@register_stage
@dataclass(frozen=True)
class Sign(Stage):
    """Scaled sign, as in EF-signSGD (Karimireddy et al. 2019).

    Math: y = (||x||_1 / n) * sign(x) (sign(0) = +1). Biased; use it with error feedback,
    which makes it converge like SGD. Cost: 1 bit per value plus one float32. Pays: 32x
    on its own, more with sparsification before it.
    """

    name: ClassVar[str] = "sign"

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        flat = x.reshape(-1)
        scale = flat.abs().double().mean().reshape(1).to(torch.float32)  # a float32 sum could overflow
        bits = as_numpy(flat >= 0).astype(np.uint8)
        return Encoded([torch.from_numpy(pack_bits(bits, 1)), scale])

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        expect_parts(self.name, parts, 2)
        packed, scale = parts
        expect_part(self.name, packed, "the packed signs", dtype=torch.uint8)
        expect_part(self.name, scale, "the scale", dtype=torch.float32, shape=(1,))
        n = math.prod(shape)
        signs = torch.from_numpy(unpack_bits(as_numpy(packed).ravel(), 1, n)).to(torch.float32)
        return signs.mul_(2).sub_(1).mul_(scale).reshape(shape)
