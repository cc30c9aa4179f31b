"""Low-level byte reading and writing for the wire format: varints, dtypes, bounds checks."""

from __future__ import annotations

import functools
import sys
from typing import Any, Final

import numpy as np
import torch

from ._bits import varint_bytes
from ._errors import CodecError

MAGIC: Final = b"FSQZ"
VERSION: Final = 1
MAX_NDIM: Final = 8

# dtype code <-> (torch dtype, bytes per element). Codes are part of the wire format (FORMAT.md).
DTYPES: Final[dict[int, torch.dtype]] = {
    1: torch.float32,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.float64,
    5: torch.uint8,
    6: torch.int8,
    7: torch.int16,
    8: torch.int32,
    9: torch.int64,
    10: torch.bool,
}
DTYPE_CODES: Final[dict[torch.dtype, int]] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES: Final = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


def dtype_code(dtype: torch.dtype) -> int:
    """Return the wire code of ``dtype`` or raise ``ValueError`` naming the supported ones."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_CODES)
        raise ValueError(f"unsupported dtype {dtype}; expected one of: {allowed}") from None


TAG_RAW: Final = 0
"""The tag of a raw node (a tensor sent as it is); tag i + 1 is a node of tensor stage i."""


@functools.lru_cache(maxsize=4096)
def shape_bytes(shape: tuple[int, ...]) -> bytes:
    """The wire form of a shape: ndim, then each dimension as a varint."""
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensors may have at most {MAX_NDIM} dimensions, got {len(shape)}")
    return bytes((len(shape),)) + b"".join(varint_bytes(d) for d in shape)


@functools.lru_cache(maxsize=4096)
def raw_node_head(code: int, shape: tuple[int, ...]) -> bytes:
    """Tag, dtype code and shape of a raw node of wire dtype ``code``: what precedes its data."""
    return bytes((TAG_RAW, code)) + shape_bytes(shape)


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    size = _ITEMSIZES.get(dtype)
    return torch.empty((), dtype=dtype).element_size() if size is None else size


_ITEMSIZES: Final = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPES.values()}


class Writer:
    """Append-only byte buffer with helpers for the wire format's primitive types."""

    def __init__(self) -> None:
        self._parts: list[bytes | memoryview] = []
        self.size = 0

    def raw(self, data: bytes | memoryview) -> None:
        self._parts.append(data)
        self.size += len(data)

    def extend(self, other: Writer) -> None:
        """Append another writer's bytes without copying them."""
        self._parts.extend(other._parts)
        self.size += other.size

    def u8(self, value: int) -> None:
        self.raw(bytes((value,)))

    def varint(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"varint must be >= 0, got {value}")
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
        self.raw(bytes(out))

    def blob(self, data: bytes) -> None:
        """A varint length followed by the bytes."""
        self.varint(len(data))
        self.raw(data)

    def shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) > MAX_NDIM:
            raise ValueError(f"tensors may have at most {MAX_NDIM} dimensions, got {len(shape)}")
        self.u8(len(shape))
        for dim in shape:
            self.varint(dim)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Bounds-checked reader: every read past the end raises :class:`CodecError`."""

    def __init__(self, data: bytes | bytearray | memoryview, what: str = "blob") -> None:
        self._data = memoryview(data)
        self._size = len(self._data)
        self.pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        pos = self.pos
        end = pos + n
        if n < 0 or end > self._size:
            raise CodecError(
                f"truncated {self._what}: {what} needs {n} bytes at offset {pos}, only {self.remaining} left"
            )
        self.pos = end
        return self._data[pos:end]

    def u8(self, what: str) -> int:
        pos = self.pos
        if pos >= self._size:
            return self.take(1, what)[0]  # raises, naming what was cut short
        self.pos = pos + 1
        return self._data[pos]

    def next_u8(self) -> int:
        """The next byte, or -1 at the end (nothing consumed; :meth:`u8` then raises with a message)."""
        pos = self.pos
        if pos >= self._size:
            return -1
        self.pos = pos + 1
        return self._data[pos]

    def take_or_none(self, n: int) -> memoryview | None:
        """:meth:`take` without a message: None (nothing consumed) where :meth:`take` would raise."""
        pos = self.pos
        end = pos + n
        if n < 0 or end > self._size:
            return None
        self.pos = end
        return self._data[pos:end]

    def take_after(self, head: bytes, n: int) -> memoryview | None:
        """The ``n`` bytes after ``head`` if both come next in full, else None (nothing consumed)."""
        pos = self.pos
        start = pos + len(head)
        end = start + n
        if n < 0 or end > self._size or self._data[pos:start] != head:
            return None
        self.pos = end
        return self._data[start:end]

    def empty_blob(self) -> bytes | None:
        """``b""`` if a zero-length blob comes next (consumed), else None (nothing consumed)."""
        pos = self.pos
        if pos < self._size and self._data[pos] == 0:
            self.pos = pos + 1
            return b""
        return None

    def varint(self, what: str, max_value: int = 2**63 - 1) -> int:
        result = 0
        for shift in range(0, 70, 7):
            byte = self.u8(what)
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if result > max_value:
                    raise CodecError(f"{what} is {result}, more than the limit of {max_value}")
                return result
        raise CodecError(f"{what}: varint longer than 10 bytes at offset {self.pos}")

    def blob(self, what: str, max_len: int) -> memoryview:
        n = self.varint(f"length of {what}", max_len)
        return self.take(n, what)

    def shape(self, what: str, max_elements: int) -> tuple[int, ...]:
        dims = self.plain_shape(max_elements)
        if dims is not None:
            return dims
        ndim = self.u8(f"ndim of {what}")
        if ndim > MAX_NDIM:
            raise CodecError(f"{what} has {ndim} dimensions; at most {MAX_NDIM} are allowed")
        dims = tuple(
            self.varint(f"dimension {i} of {what} (over the element limit)", max_elements) for i in range(ndim)
        )
        if extent(dims) > max_elements:
            raise CodecError(
                f"{what} has shape {dims}, which spans {extent(dims)} positions (product of the non-zero "
                f"dimensions), over the limit of {max_elements} elements"
            )
        return dims

    def plain_shape(self, max_elements: int) -> tuple[int, ...] | None:
        """A well-formed shape read without formatting any message, or None (nothing consumed)
        for anything :meth:`shape` would refuse or read differently: it then reads it again, slowly."""
        data, pos, size = self._data, self.pos, self._size
        if pos >= size or data[pos] > MAX_NDIM:
            return None
        if data[pos] == 1 and pos + 1 < size and data[pos + 1] < 0x80:  # one dimension below 128: most parts
            if max(data[pos + 1], 1) > max_elements:
                return None
            self.pos = pos + 2
            return (data[pos + 1],)
        dims = []
        pos += 1
        for _ in range(data[pos - 1]):
            value = shift = 0
            while True:
                if pos >= size or shift > 56:
                    return None
                byte = data[pos]
                pos += 1
                value |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
            if value > max_elements:
                return None
            dims.append(value)
        shape = tuple(dims)
        if extent(shape) > max_elements:
            return None
        self.pos = pos
        return shape

    def expect_end(self) -> None:
        if self.remaining:
            raise CodecError(f"{self.remaining} unexpected trailing bytes in {self._what}")


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def extent(shape: tuple[int, ...]) -> int:
    """Product of the non-zero dimensions: what strides must address even when numel is 0."""
    n = 1
    for dim in shape:
        n *= max(dim, 1)
    return n


LITTLE_ENDIAN: Final = sys.byteorder == "little"


def tensor_to_bytes(t: torch.Tensor) -> memoryview:
    """Little-endian bytes of a CPU tensor (bfloat16 and bool included), without a copy if contiguous."""
    if LITTLE_ENDIAN and t.dtype is not torch.bfloat16 and t.is_contiguous() and not t.requires_grad and t.is_cpu:
        return t.numpy().reshape(-1).data.cast("B")  # the common case, without the checks below: ~40 per encode
    if t.requires_grad or not t.is_contiguous() or not t.is_cpu:
        t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr = t.numpy()
    if arr.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts only
        arr = arr.byteswap()
    return arr.reshape(-1).data.cast("B")


def _numpy_dtypes(dtype: torch.dtype) -> tuple[np.dtype[Any], np.dtype[Any]]:
    """(little-endian, native) numpy dtypes that hold ``dtype``'s bytes (bfloat16 as int16)."""
    storage = torch.empty((), dtype=torch.int16 if dtype == torch.bfloat16 else dtype).numpy().dtype
    return storage.newbyteorder("<"), storage.newbyteorder("=")


_NUMPY_DTYPES: Final = {dtype: _numpy_dtypes(dtype) for dtype in DTYPES.values()}
WIRE_NUMPY_DTYPES: Final = {code: _NUMPY_DTYPES[dtype][0] for code, dtype in DTYPES.items() if dtype != torch.bool}
"""Little-endian numpy dtype of each wire dtype code whose every byte pattern is valid (all but bool)."""


def tensor_from_bytes(data: memoryview | bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`tensor_to_bytes`; copies so that the result owns writable memory."""
    wire, native = _NUMPY_DTYPES[dtype]
    arr = np.frombuffer(data, dtype=wire).copy()
    if wire != native:  # pragma: no cover - big-endian hosts only
        arr = arr.astype(native)
    if dtype == torch.bfloat16:
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(arr.reshape(shape))
