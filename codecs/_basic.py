"""Baseline stages: ``identity`` (FP32), ``fp16`` and ``bf16`` casts, and ``zstd`` entropy coding."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import zstandard

from ._errors import CodecError
from ._stage import EncodeContext, Encoded, Stage, check_param, expect_part, expect_parts, is_int, register_stage

FP16_MAX = 65504.0


@register_stage
@dataclass(frozen=True)
class Identity(Stage):
    """Send float32 as it is: the FP32 baseline.

    Math: y = x. Cost: 32 bits per parameter, no compute. Pays: never; it is the reference
    every other codec is measured against (and with ``zstd`` after it, ~1.1x).
    """

    name: ClassVar[str] = "identity"
    lossless: ClassVar[bool] = True
    passthrough: ClassVar[bool] = True

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        return None  # leave the tensor as it is (raw float32, or to the next stage)

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        raise CodecError("stage 'identity' never produces encoded nodes")


@dataclass(frozen=True)
class _Cast(Stage):
    dtype: ClassVar[torch.dtype]

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        return Encoded([self._cast(x)])

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        expect_parts(self.name, parts, 1)
        expect_part(self.name, parts[0], "the values", dtype=self.dtype, shape=shape)
        return parts[0].to(torch.float32)


@register_stage
@dataclass(frozen=True)
class FP16(_Cast):
    """Round to IEEE half precision.

    Math: y = fp16(clamp(x, -65504, 65504)); relative error <= 2**-11 inside fp16's normal
    range, values below ~6e-8 flush to zero. Cost: 16 bits per parameter, one pass. Pays: 2x
    for almost no accuracy loss; on deltas (small magnitudes) mind the subnormal range.
    """

    name: ClassVar[str] = "fp16"
    dtype: ClassVar[torch.dtype] = torch.float16

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


@register_stage
@dataclass(frozen=True)
class BF16(_Cast):
    """Round to bfloat16 (8 exponent bits, 7 mantissa bits).

    Math: y = bf16(x); relative error <= 2**-8, same range as float32. Cost: 16 bits per
    parameter. Pays: 2x where fp16's range would overflow or underflow.
    """

    name: ClassVar[str] = "bf16"
    dtype: ClassVar[torch.dtype] = torch.bfloat16


@register_stage
@dataclass(frozen=True)
class Zstd(Stage):
    """Zstandard entropy coding of the whole serialized body (must be the last stages).

    Math: lossless. Cost: at level 1 ~700 MB/s of int8 codes to compress on one core of this
    kind of CPU, ~3 GB/s to decompress; level 3 compresses about half as fast for sizes within
    -10 %..+6 % of level 1 on model updates (measured by ``fedsqueeze bench``). Pays: after
    quantization or sparsification, where codes and index gaps are skewed (2-3x more); on raw
    float32 only ~1.1x.

    Parameters
    ----------
    level : int
        Compression level 1..22 (default: 1).
    """

    name: ClassVar[str] = "zstd"
    kind: ClassVar = "bytes"
    lossless: ClassVar[bool] = True
    level: int = 1

    def __post_init__(self) -> None:
        check_param(is_int(self.level) and 1 <= self.level <= 22, self.name, "level", "an integer in 1..22", self.level)

    def encode_bytes(self, data: bytes) -> bytes:
        return _compressor(self.level).compress(data)

    def encode_bytes_split(self, data: bytes, starts: Sequence[int]) -> bytes:
        """One frame; in a body of <= SPLIT_MAX_BODY, a block boundary around each record of >= SPLIT_RECORD_BYTES.

        zstd codes the literals of a block with one Huffman table, so a block that mixes, say,
        8-bit codes of one tensor with 4-bit factors of another codes both worse: on the McMahan
        CNN a budgeted update (dense 8-bit conv2, 4-bit rank-32 fc1) took 10 % more bytes than its
        records compressed apart. Flushing a block at those boundaries gives each large record
        its own tables; small records stay together, where a new table would cost more than it saves.
        """
        cuts = _block_cuts(len(data), starts) if len(data) <= SPLIT_MAX_BODY else []
        if not cuts:
            return self.encode_bytes(data)
        stream = _compressor(self.level).compressobj(size=len(data))
        view, out, done = memoryview(data), [], 0
        for cut in cuts:
            out += [stream.compress(view[done:cut]), stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)]
            done = cut
        out += [stream.compress(view[done:]), stream.flush()]
        return b"".join(out)

    def decode_bytes(self, data: bytes | memoryview, max_size: int) -> bytes:
        data = bytes(data)
        try:
            params = zstandard.get_frame_parameters(data)
        except zstandard.ZstdError as exc:
            raise CodecError(f"stage 'zstd': not a zstd frame ({exc})") from None
        size = params.content_size
        if size == zstandard.CONTENTSIZE_UNKNOWN or size == zstandard.CONTENTSIZE_ERROR:
            raise CodecError("stage 'zstd': the frame does not declare its content size")
        if size > max_size:
            raise CodecError(f"stage 'zstd': frame declares {size} bytes, over the limit of {max_size}")
        frame_len = zstd_frame_length(data)
        if frame_len != len(data):
            raise CodecError(f"stage 'zstd': {len(data) - frame_len} unexpected trailing bytes after the frame")
        try:
            out = _decompressor().decompress(data, max_output_size=max_size)
        except zstandard.ZstdError as exc:
            raise CodecError(f"stage 'zstd': corrupt frame ({exc})") from None
        if len(out) != size:
            raise CodecError(f"stage 'zstd': frame declared {size} bytes but held {len(out)}")
        return out


SPLIT_RECORD_BYTES = 4096
"""Records at least this long get zstd blocks of their own (smaller ones: -3 to +10 % when split alone)."""
SPLIT_MAX_BODY = 1 << 20
"""Bodies up to this size are split. zstd's streaming API, which splitting needs, compresses ~12 %
slower than its one-shot call (a 10 MB body: 31 against 28 ms); bodies this large gain ~1-2 %."""


def _block_cuts(size: int, starts: Sequence[int]) -> list[int]:
    """Offsets strictly inside ``(0, size)`` around every record of >= SPLIT_RECORD_BYTES, ascending."""
    ends = [*starts[1:], size] if starts else []  # an update without tensors has no records
    large = [(start, end) for start, end in zip(starts, ends, strict=True) if end - start >= SPLIT_RECORD_BYTES]
    cuts = {edge for record in large for edge in record}
    return sorted(c for c in cuts if 0 < c < size)


_CONTEXTS = threading.local()  # zstd contexts are not thread-safe: one set per thread


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level`` (making one allocates its context: ~10 us, as much as
    compressing a small update)."""
    cache: dict[int, zstandard.ZstdCompressor] = _CONTEXTS.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor."""
    found: zstandard.ZstdDecompressor | None = getattr(_CONTEXTS, "decompressor", None)
    if found is None:
        found = _CONTEXTS.decompressor = zstandard.ZstdDecompressor()
    return found


ZSTD_BLOCK_RLE = 1
ZSTD_BLOCK_RESERVED = 3


def zstd_frame_length(data: bytes) -> int:
    """Bytes taken by the zstd frame at the start of ``data``: header, blocks and checksum.

    Walks the block headers (RFC 8878, section 3.1.1) without decompressing; raises
    :class:`CodecError` for a reserved block type or a frame cut short.
    """
    try:
        pos = zstandard.frame_header_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"stage 'zstd': bad frame header ({exc})") from None
    has_checksum = len(data) > 4 and bool(data[4] & 0x04)
    while True:
        if pos + 3 > len(data):
            raise CodecError(f"stage 'zstd': frame cut short at offset {pos}, in a block header")
        header = int.from_bytes(data[pos : pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == ZSTD_BLOCK_RESERVED:
            raise CodecError(f"stage 'zstd': reserved block type at offset {pos}")
        pos += 3 + (1 if kind == ZSTD_BLOCK_RLE else size)
        if last:
            break
    pos += 4 if has_checksum else 0
    if pos > len(data):
        raise CodecError(f"stage 'zstd': frame cut short; it needs {pos} bytes, found {len(data)}")
    return pos
