"""The node's error-feedback state in ``context.state``: every float32 tensor in one Array.

A node writes its residual (and its codec's state) into ``context.state`` after every reply and
reads it back before the next. Flower's ``Array`` and ``ArrayRecord`` cost ~6 us per array to
build and read, twice that right after training, when the caches hold the training's data; a
LeNet-5 residual is ten arrays, which cost more than the error feedback's arithmetic. So the
float32 tensors travel as two arrays: their values one after the other (a plain ``np.save``
array, as ``Array.numpy()`` reads it) and their layout (names and shapes, JSON in a uint8 array).
They are read back as views of one fresh buffer. Tensors of other dtypes (a codec's counters) keep
an array each. Records of one array per tensor, as nodes wrote them before, are read too.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from fedsqueeze.protocol import arrays_to_tensors

VALUES = "fedsqueeze.float32-values"
"""The key of the float32 tensors' values, one after the other, in a record :func:`state_record` wrote."""
LAYOUT = "fedsqueeze.float32-layout"
"""The key of their names and shapes: JSON ``[[name, [dims...]], ...]`` as uint8."""

_FLOAT32 = np.dtype(np.float32)
_UINT8 = np.dtype(np.uint8)
_READ_FAST = frozenset({"float32", "float64", "float16", "int64", "int32", "uint8", "bool"})
_DTYPE_NAMES = {np.dtype(name): name for name in _READ_FAST}


def state_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The node's state tensors as an ArrayRecord: float32 ones in one array, others an array each.

    Raises ``ValueError`` for a tensor named as one of the two packed arrays (:data:`VALUES`, :data:`LAYOUT`).
    """
    if VALUES in tensors or LAYOUT in tensors:
        raise ValueError(f"node state: the names {VALUES!r} and {LAYOUT!r} are reserved; rename the tensor")
    out = ArrayRecord()  # filled in place: ArrayRecord(dict) copies every Array once more
    packed = {name: t for name, t in tensors.items() if t.dtype == torch.float32}
    if packed:
        shapes = tuple((name, tuple(t.shape)) for name, t in packed.items())
        count = sum(t.numel() for t in packed.values())
        views = [_contiguous(t).data for t in packed.values()]
        out[VALUES] = _numpy_array(_FLOAT32, (count,), b"".join((_npy_header(_FLOAT32, (count,)), *views)))
        layout = _layout_bytes(shapes)
        out[LAYOUT] = _numpy_array(_UINT8, (len(layout),), _npy_header(_UINT8, (len(layout),)) + layout)
    for name, t in tensors.items():
        if name not in packed:
            array = _contiguous(t)
            data = b"".join((_npy_header(array.dtype, array.shape), array.data))  # one copy of the values
            out[name] = _numpy_array(array.dtype, array.shape, data)
    return out


def state_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Read what :func:`state_record` wrote (or a record of one numpy array per tensor): fresh tensors.

    Raises
    ------
    ValueError
        For a layout that is not what :func:`state_record` writes, or values of another count.
    TypeError
        For an array that is not numpy-serialised, as ``arrays_to_tensors``.
    """
    out: dict[str, torch.Tensor] = {}
    if VALUES in record or LAYOUT in record:
        if VALUES not in record or LAYOUT not in record:
            raise ValueError(f"node state: {VALUES!r} and {LAYOUT!r} come together; found only one of them")
        shapes, sizes = _layout(record[LAYOUT])
        values = _read(record[VALUES])
        if values.dtype != torch.float32 or values.dim() != 1 or values.numel() != sum(sizes):
            raise ValueError(
                f"node state: {VALUES!r} must be {sum(sizes)} float32 values for its layout, "
                f"found {values.numel()} {values.dtype}"
            )
        for (name, shape), part in zip(shapes, values.split_with_sizes(sizes), strict=True):
            out[name] = part.view(shape)
    for name, array in record.items():
        if name not in (VALUES, LAYOUT):
            out[name] = _read(array)
    return out


def _contiguous(t: torch.Tensor) -> np.ndarray:
    if t.is_contiguous() and t.is_cpu and not t.requires_grad:
        return t.numpy()  # the usual case, without the conversions that would return their input
    return np.require(t.detach().cpu().numpy(), requirements="C")  # not ascontiguousarray: it makes 0-d 1-d


def _numpy_array(dtype: np.dtype[Any], shape: tuple[int, ...], data: bytes) -> Array:
    name = _DTYPE_NAMES.get(dtype) or str(dtype)  # str(np.dtype) costs more than the copy of the values
    return Array(dtype=name, shape=shape, stype=SType.NUMPY, data=data)


@functools.lru_cache(maxsize=1024)
def _npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes before the data of a C-contiguous array of ``dtype`` and ``shape``."""
    data = Array(np.zeros(shape, dtype)).data
    return data[: len(data) - math.prod(shape) * dtype.itemsize]


@functools.lru_cache(maxsize=64)
def _layout_bytes(shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> bytes:
    return json.dumps([[name, list(shape)] for name, shape in shapes]).encode()


def _layout(array: Array) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], tuple[int, ...]]:
    """(name, shape) and size of each packed tensor, from the layout array; a ValueError for anything else."""
    return _parsed_layout(array.data, tuple(array.shape), array.dtype, array.stype)


@functools.lru_cache(maxsize=64)
def _parsed_layout(
    data: bytes, shape: tuple[int, ...], dtype: str, stype: str
) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], tuple[int, ...]]:
    """:func:`_layout`, cached: the layout array is the same each round."""
    layout = _read(Array(dtype=dtype, shape=shape, stype=stype, data=data)).numpy().tobytes()
    try:
        entries = json.loads(layout)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"node state: {LAYOUT!r} is not JSON ({err})") from None
    ok = isinstance(entries, list) and all(_is_entry(e) for e in entries)
    if not ok or len({e[0] for e in entries}) != len(entries):
        raise ValueError(f"node state: {LAYOUT!r} must list distinct [name, [dims...]] pairs, found {layout[:80]!r}")
    shapes = tuple((name, tuple(dims)) for name, dims in entries)
    return shapes, tuple(math.prod(shape) for _, shape in shapes)


def _is_entry(entry: object) -> bool:
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)):
        return False
    return all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[1])


def _read(array: Array) -> torch.Tensor:
    """A fresh tensor of one numpy-serialised array: its bytes as :func:`state_record` writes them, else ``np.load``."""
    dtype = np.dtype(array.dtype) if array.stype == SType.NUMPY and array.dtype in _READ_FAST else None
    if dtype is not None:
        shape = tuple(array.shape)
        header, count = _npy_header(dtype, shape), math.prod(shape)
        if len(array.data) == len(header) + count * dtype.itemsize and array.data.startswith(header):
            values = np.frombuffer(array.data, dtype, count=count, offset=len(header))
            return torch.from_numpy(values.reshape(shape).copy())
    return next(iter(arrays_to_tensors(ArrayRecord({"array": array})).values()))
