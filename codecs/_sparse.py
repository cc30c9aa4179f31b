"""Sparsification stages: ``topk``, ``randomk`` and ``threshold``, with compact index coding."""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ._bits import varint_bytes, varint_decode, varint_encode, varint_sizes
from ._errors import CodecError
from ._stage import (
    DecodeCost,
    EncodeContext,
    Encoded,
    EncodeFurther,
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
from ._wire import Reader

INDEX_DELTA_VARINT = 0
INDEX_BITMAP = 1


def encode_indices(idx: np.ndarray, n: int) -> tuple[int, np.ndarray]:
    """Sorted unique indices -> (mode, bytes): delta + varint gaps or a bitmap, whichever is smaller."""
    gaps = np.diff(idx, prepend=-1) - 1  # >= 0 for sorted unique indices
    varints = varint_encode(gaps)
    if varints.size <= (n + 7) // 8:
        return INDEX_DELTA_VARINT, varints
    mask = np.zeros(n, np.uint8)
    mask[idx] = 1
    return INDEX_BITMAP, np.packbits(mask, bitorder="little")


def decode_indices(stage: str, mode: int, data: np.ndarray, k: int, n: int) -> np.ndarray:
    if mode == INDEX_DELTA_VARINT:
        gaps = varint_decode(data, k).astype(np.int64)
        expect(bool((gaps < n).all()), stage, "index gap past the end of the tensor")
        idx = np.cumsum(gaps + 1) - 1
        if k and idx[-1] >= n:  # the message is formatted only when raised
            expect(False, stage, f"index {idx[-1]} out of range for {n} elements")
        return idx
    if mode == INDEX_BITMAP:
        expect(data.size == (n + 7) // 8, stage, f"bitmap of {data.size} bytes, expected {(n + 7) // 8}")
        idx = np.flatnonzero(np.unpackbits(data, count=n, bitorder="little"))
        expect(idx.size == k, stage, f"bitmap marks {idx.size} entries, the header says {k}")
        return idx
    raise CodecError(f"stage {stage!r}: unknown index coding {mode}; expected 0 (delta varint) or 1 (bitmap)")


def scatter(values: torch.Tensor, idx: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros(math.prod(shape), dtype=torch.float32)
    out[torch.from_numpy(idx)] = values
    return out.reshape(shape)


@functools.lru_cache(maxsize=1024)
def _index_header(stage: str, meta: bytes) -> tuple[int, int]:
    """(index coding, k) of a sparse node's header (cached: decoding reads it twice per node).

    Only well-formed headers (at most 11 bytes) are cached: a malformed one raises.
    """
    r = Reader(meta, f"{stage} header")
    mode, k = r.u8("index coding"), r.varint("k")
    r.expect_end()
    return mode, k


@dataclass(frozen=True)
class _IndexedSparse(Stage):
    """Keeps the values at some indices; the indices travel as delta varints or a bitmap."""

    def select(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        flat = x.reshape(-1)
        idx = self.select(flat).sort().values
        mode, index_bytes = encode_indices(as_numpy(idx), flat.numel())
        meta = bytes((mode,)) + varint_bytes(idx.numel())
        return Encoded([EncodeFurther(flat[idx]), torch.from_numpy(index_bytes)], meta)

    def _header(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> tuple[int, int]:
        """(index coding, k) from the header, checked against ``shape``."""
        expect_parts(self.name, parts, 2)
        mode, k = _index_header(self.name, meta)
        n = math.prod(shape)
        if k > n:  # the message is formatted only when raised: this runs twice per node
            expect(False, self.name, f"k={k} is more than the {n} elements of the tensor")
        return mode, k

    def decode_cost(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> DecodeCost:
        mode, k = self._header(parts, meta, shape)
        n = math.prod(shape)
        # float32 output and a bitmap unpacked to bytes; the varint decoder peaks at ~50 bytes
        # per index (measured with tracemalloc), a bitmap needs one int64 per index
        per_index = 64 if mode == INDEX_DELTA_VARINT else 16
        return DecodeCost(scratch_bytes=5 * n + per_index * k, work=2 * n + 32 * k)

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        mode, k = self._header(parts, meta, shape)
        n = math.prod(shape)
        values, index_bytes = parts
        expect_part(self.name, values, "the values", dtype=torch.float32, numel=k)
        expect_part(self.name, index_bytes, "the index bytes", dtype=torch.uint8)
        idx = decode_indices(self.name, mode, as_numpy(index_bytes).ravel(), k, n)
        return scatter(values.reshape(-1), idx, shape)


def _check_ratio(stage: str, ratio: float) -> None:
    check_param(is_number(ratio) and 0 < ratio <= 1, stage, "ratio", "a number in (0, 1]", ratio)


@register_stage
@dataclass(frozen=True)
class TopK(_IndexedSparse):
    """Keep the k = max(1, round(ratio * n)) entries of largest magnitude; zero the rest.

    Math: y_i = x_i if |x_i| is among the k largest, else 0; ||x - y||^2 is the energy of the
    dropped entries, the least any k-sparse y can leave. Cost: one top-k selection (O(n)),
    then k values plus the indices (delta + varint, ~1-2 bytes each at 1 %, or a bitmap of n/8
    bytes, whichever is smaller). Pays: with error feedback at ratios 0.1-1 %, 50-300x
    before quantizing the values.

    With ``dense_below`` N > 0, a tensor of fewer than N entries (biases, a first convolution) is
    not sparsified: the stage passes it on whole to the next stage (e.g. quantized dense), which
    costs little and sends no indices. The blob then holds that tensor as the next stage's node,
    so decoding needs nothing new.

    Parameters
    ----------
    ratio : float
        Fraction of entries kept, in (0, 1] (default: 0.01).
    dense_below : int
        Tensors with fewer entries than this pass through unsparsified, >= 0 (default: 0, none).
    """

    name: ClassVar[str] = "topk"
    ratio: float = 0.01
    dense_below: int = 0

    def __post_init__(self) -> None:
        _check_ratio(self.name, self.ratio)
        check_param(
            is_int(self.dense_below) and self.dense_below >= 0,
            self.name,
            "dense_below",
            "an integer >= 0",
            self.dense_below,
        )

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        if x.numel() < self.dense_below:
            return None  # small: the next stage takes it whole
        return super().encode(x, ctx)

    def select(self, flat: torch.Tensor) -> torch.Tensor:
        k = max(1, round(self.ratio * flat.numel()))
        return torch.from_numpy(topk_indices(np.abs(as_numpy(flat)), k))

    def encode_batch(self, xs: Sequence[torch.Tensor], ctxs: Sequence[EncodeContext]) -> list[Encoded | None]:
        """All tensors of up to FUSE_MAX values in one pass: one magnitude buffer, one gather of
        the kept values, one varint coding of every index gap; bit-identical to :meth:`encode`."""
        out: list[Encoded | None] = [None] * len(xs)  # None: declined, below dense_below
        kept = [i for i, x in enumerate(xs) if x.numel() >= self.dense_below]
        small = [i for i in kept if xs[i].numel() <= FUSE_MAX]
        for i in sorted(set(kept) - set(small)):
            out[i] = self.encode(xs[i], ctxs[i])
        if not small:
            return out
        flat = torch.cat([xs[i].reshape(-1) for i in small]).numpy()
        mag = np.abs(flat)
        sizes = [xs[i].numel() for i in small]
        starts = np.cumsum([0] + sizes[:-1])
        bounds = zip(starts.tolist(), sizes, strict=True)
        chosen = [topk_indices(mag[s : s + n], max(1, round(self.ratio * n))) for s, n in bounds]
        counts = [idx.size for idx in chosen]
        everywhere = np.concatenate([idx + s for idx, s in zip(chosen, starts.tolist(), strict=True)])
        values = torch.from_numpy(flat[everywhere])
        index_bytes = _fused_index_bytes(chosen, sizes, everywhere, starts)
        at = 0
        for i, k, coded in zip(small, counts, index_bytes, strict=True):
            meta = bytes((coded[0],)) + varint_bytes(k)
            out[i] = Encoded([EncodeFurther(values[at : at + k]), torch.from_numpy(coded[1])], meta)
            at += k
        return out


FUSE_MAX = 65_536
"""Tensors up to this many values are batched by ``topk``'s fused encoder; larger ones gain nothing."""


def _fused_index_bytes(
    chosen: list[np.ndarray], sizes: list[int], everywhere: np.ndarray, starts: np.ndarray
) -> list[tuple[int, np.ndarray]]:
    """:func:`encode_indices` of every (indices, n) pair, with one varint coding of all the gaps.

    ``everywhere`` holds the indices of all tensors, each shifted by its ``starts`` (each
    tensor keeps at least one entry): the gaps are those of the concatenation, except at the
    first index of each tensor, which counts from the tensor's start.
    """
    counts = np.array([idx.size for idx in chosen])
    gap_ends = np.cumsum(counts)
    gaps = np.empty_like(everywhere)
    gaps[1:] = everywhere[1:] - everywhere[:-1] - 1
    firsts = gap_ends - counts
    gaps[firsts] = everywhere[firsts] - starts
    nbytes = varint_sizes(gaps)
    varints = varint_encode(gaps, nbytes)
    byte_ends = np.cumsum(nbytes)[gap_ends - 1].tolist() if gaps.size else [0] * len(chosen)
    out = []
    start = 0
    for idx, n, end in zip(chosen, sizes, byte_ends, strict=True):
        if end - start <= (n + 7) // 8:
            out.append((INDEX_DELTA_VARINT, varints[start:end]))
        else:
            out.append(encode_indices(idx, n))  # the bitmap, as the per-tensor coder writes it
        start = end
    return out


SAMPLE = 65_536


def topk_indices(mag: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k largest entries of ``mag`` (1-D, >= 0); among equal values the lower indices win.

    The tie rule makes the choice a function of the values alone, whichever way it is
    computed (per tensor or over a concatenation), so fused and per-tensor encodes agree bit
    for bit. The k-th largest value comes from a partial sort; for large tensors from the
    candidates above a threshold estimated from a random sample (an exact top-k of the whole
    tensor costs ~60 ns per element on one core): all entries of the answer are among them. If
    the estimate was too high (fewer than k candidates, rare) the whole tensor is searched;
    the result is exact either way.
    """
    n = mag.size
    if k >= n:
        return np.arange(n)
    candidates = _candidates(mag, k) if n > 4 * SAMPLE and k <= n // 8 else None
    pool = mag if candidates is None else mag[candidates]
    kth = np.partition(pool, pool.size - k)[pool.size - k]
    idx = np.flatnonzero(pool >= kth)
    if idx.size > k:  # ties at the k-th value: keep those above it, then the first tied ones
        keep = pool > kth
        keep[np.flatnonzero(pool == kth)[: k - int(np.count_nonzero(keep))]] = True
        idx = np.flatnonzero(keep)
    return idx if candidates is None else candidates[idx]


def _candidates(mag: np.ndarray, k: int) -> np.ndarray | None:
    """Sorted indices of the entries at or above an estimate of the k-th largest, or None if fewer than k."""
    n = mag.size
    gen = torch.Generator().manual_seed(n ^ k)
    sample = torch.from_numpy(mag)[torch.randint(n, (SAMPLE,), generator=gen)]
    # aim for ~1.5 k candidates plus a margin of 4 standard deviations of the sample estimate
    fraction = k / n
    margin = 4 * (fraction * (1 - fraction) / SAMPLE) ** 0.5
    q = max(0.0, 1 - 1.5 * fraction - margin)
    threshold = float(torch.quantile(sample, q))
    candidates = np.flatnonzero(mag >= np.float32(threshold))
    return candidates if candidates.size >= k else None


@register_stage
@dataclass(frozen=True)
class Threshold(_IndexedSparse):
    """Keep the entries with |x_i| >= value; zero the rest.

    Math: y_i = x_i [|x_i| >= value]; error per dropped entry below ``value``. Cost: one pass,
    k values plus indices as in ``topk``; k varies from round to round. Pays: where a fixed
    magnitude cut-off is known (e.g. gradient-dropping), at no selection cost.

    Parameters
    ----------
    value : float
        Magnitude threshold, >= 0 (default: 0.001).
    """

    name: ClassVar[str] = "threshold"
    value: float = 1e-3

    def __post_init__(self) -> None:
        check_param(is_number(self.value) and self.value >= 0, self.name, "value", "a number >= 0", self.value)

    def select(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(flat.abs() >= self.value).reshape(-1)


@register_stage
@dataclass(frozen=True)
class RandomK(Stage):
    """Keep k = max(1, round(ratio * n)) entries chosen uniformly at random; zero the rest.

    Math: y_i = x_i for i in a random k-subset S; E[y] = (k/n) x (unscaled, meant for error
    feedback, which sends the rest later). The indices are not sent: the header carries the
    64-bit seed and the receiver draws the same subset (numpy PCG64, ``choice`` without
    replacement, sorted). Cost: k values + 8 bytes. Pays: cheaper than top-k in index bytes,
    but converges slower per byte without error feedback.

    Parameters
    ----------
    ratio : float
        Fraction of entries kept, in (0, 1] (default: 0.01).
    seed : int | None
        Base seed; ``None`` uses fresh entropy for every encode (default: None).
    """

    name: ClassVar[str] = "randomk"
    ratio: float = 0.01
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_ratio(self.name, self.ratio)
        check_param(
            self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63),
            self.name,
            "seed",
            "an integer in [0, 2**63)",
            self.seed,
        )

    @staticmethod
    def indices(seed: int, n: int, k: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(seed))
        return np.sort(rng.choice(n, size=k, replace=False))

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        flat = x.reshape(-1)
        n = flat.numel()
        k = max(1, round(self.ratio * n))
        seed = ctx.seed if self.seed is None else ctx.derive_seed(self.seed)
        idx = torch.from_numpy(self.indices(seed, n, k))
        return Encoded([EncodeFurther(flat[idx])], struct.pack("<Q", seed) + varint_bytes(k))

    def _header(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> tuple[int, int]:
        """(seed, k) from the header, checked against ``shape``."""
        expect_parts(self.name, parts, 1)
        r = Reader(meta, "randomk header")
        seed = struct.unpack("<Q", r.take(8, "seed"))[0]
        k = r.varint("k")
        r.expect_end()
        n = math.prod(shape)
        expect(k <= n, self.name, f"k={k} is more than the {n} elements of the tensor")
        return seed, k

    def decode_cost(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> DecodeCost:
        _, k = self._header(parts, meta, shape)
        n = math.prod(shape)
        # numpy's choice shuffles an int64 arange of n, or for n > 10_000 and k <= n / 50 fills
        # Floyd's hash set of ~2.4 k uint64; then k int64 are copied and sorted; plus the output
        floyd = n > 10_000 and k <= n // 50
        scratch = 4 * n + (56 * k if floyd else 8 * n + 16 * k)
        return DecodeCost(scratch_bytes=scratch, work=2 * n + 32 * k)

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        seed, k = self._header(parts, meta, shape)
        n = math.prod(shape)
        expect_part(self.name, parts[0], "the values", dtype=torch.float32, numel=k)
        return scatter(parts[0].reshape(-1), self.indices(seed, n, k), shape)
