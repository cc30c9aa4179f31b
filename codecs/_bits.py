"""Vectorized bit packing and varint coding used by the quantization and sparsification stages."""

from __future__ import annotations

import functools

import numpy as np

from ._errors import CodecError


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes < 2**bits into a uint8 array, little-end first (bits in 1, 2, 4, 8)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8).ravel()
    if bits == 8:
        return codes
    if bits == 1:
        return np.packbits(codes, bitorder="little")
    per = 8 // bits
    pad = (-codes.size) % per
    if pad:
        codes = np.concatenate([codes, np.zeros(pad, np.uint8)])
    grouped = codes.reshape(-1, per)
    out = grouped[:, 0].copy()
    for j in range(1, per):
        out |= grouped[:, j] << np.uint8(bits * j)
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`; raises CodecError if ``packed`` has the wrong length."""
    expected = -(-count * bits // 8)
    if packed.size != expected:
        raise CodecError(f"packed codes hold {packed.size} bytes, expected {expected} for {count} {bits}-bit codes")
    if bits == 8:
        return packed
    if bits == 1:
        return np.unpackbits(packed, count=count, bitorder="little")
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((packed.size, per), np.uint8)
    for j in range(per):
        out[:, j] = (packed >> np.uint8(bits * j)) & mask
    return out.ravel()[:count]


SMALL_UNPACK = 8192
"""Up to this many codes, :func:`unpack_float32` looks each packed byte up in a table (one numpy call
instead of ~8: 4.0 -> 1.1 us for 150 4-bit codes); above it the shifts are faster (table lookups of
48,000 4-bit codes: 49 us, shifts: 26 us)."""


@functools.cache
def _code_table(bits: int) -> np.ndarray:
    """The float32 codes of each byte value 0..255, little-end first, one item of 8 / bits codes per byte."""
    per = 8 // bits
    codes = (np.arange(256)[:, None] >> (np.arange(per) * bits)) & ((1 << bits) - 1)
    table = np.ascontiguousarray(codes, np.float32).view(np.dtype((np.void, 4 * per))).reshape(256)
    table.flags.writeable = False
    return table


def unpack_float32(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """:func:`unpack_bits` as a new float32 array; raises CodecError if ``packed`` has the wrong length."""
    small = count <= SMALL_UNPACK and packed.dtype == np.uint8 and packed.ndim == 1
    if bits == 8 or not small or packed.size != -(-count * bits // 8):
        return unpack_bits(packed, bits, count).astype(np.float32)
    values: np.ndarray = _code_table(bits)[packed].view(np.float32)
    return values[:count]


def varint_bytes(value: int) -> bytes:
    """The LEB128 varint of one integer ``value`` >= 0 (the scalar form of :func:`varint_encode`)."""
    if value < 0:
        raise ValueError(f"varint must be >= 0, got {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_sizes(values: np.ndarray) -> np.ndarray:
    """Bytes of the LEB128 varint of each non-negative integer (int64)."""
    v = np.ascontiguousarray(values, dtype=np.uint64)
    nbytes = np.ones(v.size, np.int64)
    longest = (int(v.max()).bit_length() + 6) // 7 if v.size else 1  # only the passes some value needs
    for j in range(1, longest):
        nbytes += v >= np.uint64(1 << (7 * j))
    return nbytes


def varint_encode(values: np.ndarray, nbytes: np.ndarray | None = None) -> np.ndarray:
    """LEB128 varints of non-negative integers, vectorized; returns uint8.

    ``nbytes``, if given, must be :func:`varint_sizes` of ``values`` (saves computing it twice).
    """
    v = np.ascontiguousarray(values, dtype=np.uint64)
    if nbytes is None:
        nbytes = varint_sizes(v)
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.empty(int(ends[-1]) if v.size else 0, np.uint8)
    for j in range(int(nbytes.max()) if v.size else 0):
        sel = nbytes > j
        byte = ((v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= (nbytes[sel] > j + 1).astype(np.uint8) << np.uint8(7)
        out[starts[sel] + j] = byte
    return out


def varint_decode(data: np.ndarray, count: int) -> np.ndarray:
    """Decode exactly ``count`` LEB128 varints filling ``data``; CodecError otherwise."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    ends = np.flatnonzero(data < 0x80)
    if ends.size != count or (count and ends[-1] != data.size - 1) or (not count and data.size):
        raise CodecError(f"varint stream of {data.size} bytes does not hold exactly {count} values")
    if not count:
        return np.zeros(0, np.uint64)
    if ends.size == data.size:  # every varint one byte (index gaps below 128): the bytes are the values
        return data.astype(np.uint64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > 9:  # 63 bits at most
        raise CodecError("varint longer than 9 bytes in an index stream")
    out = np.zeros(count, np.uint64)
    for j in range(int(lengths.max())):
        sel = lengths > j
        out[sel] |= (data[starts[sel] + j] & np.uint8(0x7F)).astype(np.uint64) << np.uint64(7 * j)
    return out
