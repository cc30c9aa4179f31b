"""The client's error-feedback state in ``context.state``: written and read without np.save/np.load per array."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedsqueeze.client.mod import _state_record, _state_tensors
from fedsqueeze.protocol import arrays_to_tensors, tensors_to_arrays


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "residual/fc1.weight": torch.randn(120, 400, generator=g),
        "residual/fc1.bias": torch.randn(120, generator=g),
        "residual/conv.weight": torch.randn(6, 1, 5, 5, generator=g).double(),
        "residual/empty": torch.zeros(0, 3),
        "codec/calls": torch.tensor(7, dtype=torch.int64),
        "codec/mask": torch.tensor([True, False, True]),
        "codec/half": torch.randn(4, generator=g).half(),
    }


def test_the_record_has_the_bytes_np_save_writes() -> None:
    fast, slow = _state_record(state()), tensors_to_arrays(state())
    assert list(fast.keys()) == list(slow.keys())
    for name, array in slow.items():
        got = fast[name]
        assert (got.dtype, tuple(got.shape), got.stype) == (array.dtype, tuple(array.shape), array.stype), name
        assert got.data == array.data, name


def test_reading_equals_np_load_and_owns_its_memory() -> None:
    record = tensors_to_arrays(state())
    fast, slow = _state_tensors(record), arrays_to_tensors(record)
    assert list(fast) == list(slow)
    for name, t in slow.items():
        assert fast[name].dtype == t.dtype and torch.equal(fast[name], t), name
    fast["residual/fc1.bias"] += 1  # writable, and not a view of the record's bytes
    assert torch.equal(arrays_to_tensors(record)["residual/fc1.bias"], slow["residual/fc1.bias"])


def test_arrays_of_another_layout_are_read_by_np_load() -> None:
    # Fortran order has another header: the fast path must not misread it
    values = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    record = ArrayRecord({"residual/w": Array(values)})
    assert torch.equal(_state_tensors(record)["residual/w"], torch.from_numpy(np.ascontiguousarray(values)))
    truncated = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=Array(values).data[:-4])
    with pytest.raises(ValueError):
        _state_tensors(ArrayRecord({"residual/w": truncated}))


def test_a_non_numpy_array_is_refused_as_before() -> None:
    record = ArrayRecord({"residual/w": Array(dtype="float32", shape=(2,), stype="raw", data=b"\0" * 8)})
    with pytest.raises(TypeError):
        arrays_to_tensors(record)
    with pytest.raises(TypeError):
        _state_tensors(record)
