"""The client's error-feedback state in ``context.state``: float32 tensors in one array, read back exactly."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedsqueeze.client.state_record import LAYOUT, VALUES, state_record, state_tensors
from fedsqueeze.protocol import arrays_to_tensors, tensors_to_arrays


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "residual/fc1.weight": torch.randn(120, 400, generator=g),
        "residual/fc1.bias": torch.randn(120, generator=g),
        "residual/conv.weight": torch.randn(6, 1, 5, 5, generator=g).double(),
        "residual/empty": torch.zeros(0, 3),
        "residual/scalar": torch.tensor(2.5),
        "codec/calls": torch.tensor(7, dtype=torch.int64),
        "codec/mask": torch.tensor([True, False, True]),
        "codec/half": torch.randn(4, generator=g).half(),
        "codec/q": torch.randn(30, 2, generator=g).T,  # not contiguous
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert (got[name].dtype, got[name].shape) == (t.dtype, t.shape), name
        assert torch.equal(got[name], t), name


def test_state_reads_back_exactly_with_every_float32_tensor_in_one_array() -> None:
    record = state_record(state())
    float32 = [name for name, t in state().items() if t.dtype == torch.float32]
    assert set(record) == {VALUES, LAYOUT} | (set(state()) - set(float32))
    values = record[VALUES].numpy()  # a plain np.save array, as Flower reads it
    assert values.dtype == np.float32 and values.size == sum(state()[n].numel() for n in float32)
    assert_same(state_tensors(record), state())


def test_the_arrays_are_what_np_save_writes() -> None:
    record = state_record(state())
    plain = tensors_to_arrays({k: v for k, v in state().items() if v.dtype != torch.float32})
    for name, array in plain.items():
        assert (record[name].dtype, record[name].shape, record[name].data) == (array.dtype, array.shape, array.data)
    layout = json.loads(record[LAYOUT].numpy().tobytes())
    assert [name for name, _ in layout] == [n for n, t in state().items() if t.dtype == torch.float32]


def test_the_packed_arrays_names_are_reserved() -> None:
    with pytest.raises(ValueError, match="reserved"):
        state_record({VALUES: torch.zeros(2, dtype=torch.int64)})


def test_tensors_read_are_fresh_memory() -> None:
    record = state_record(state())
    first = state_tensors(record)
    first["residual/fc1.bias"] += 1  # writable, and not a view of the record's bytes
    assert torch.equal(state_tensors(record)["residual/fc1.bias"], state()["residual/fc1.bias"])


def test_a_record_of_one_array_per_tensor_is_read_as_before() -> None:
    # what nodes wrote before the float32 tensors were packed, and what a restored node may hold
    record = tensors_to_arrays(state())
    assert_same(state_tensors(record), arrays_to_tensors(record))


def test_arrays_of_another_layout_are_read_by_np_load() -> None:
    # Fortran order has another header: the fast path must not misread it
    values = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    record = ArrayRecord({"residual/w": Array(values)})
    assert torch.equal(state_tensors(record)["residual/w"], torch.from_numpy(np.ascontiguousarray(values)))
    truncated = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=Array(values).data[:-4])
    with pytest.raises(ValueError):
        state_tensors(ArrayRecord({"residual/w": truncated}))


def test_a_non_numpy_array_is_refused_as_before() -> None:
    record = ArrayRecord({"residual/w": Array(dtype="float32", shape=(2,), stype="raw", data=b"\0" * 8)})
    with pytest.raises(TypeError):
        arrays_to_tensors(record)
    with pytest.raises(TypeError):
        state_tensors(record)


def _with(record: ArrayRecord, key: str, array: Array | None) -> ArrayRecord:
    out = ArrayRecord({k: v for k, v in record.items() if k != key})
    if array is not None:
        out[key] = array
    return out


@pytest.mark.parametrize(
    ("key", "array", "message"),
    [
        (VALUES, np.zeros(5, np.float32), "must be 48181 float32 values for its layout, found 5 torch.float32"),
        (VALUES, np.zeros(48_181, np.float64), "found 48181 torch.float64"),
        (LAYOUT, np.frombuffer(b"not json", np.uint8), "is not JSON"),
        (LAYOUT, np.frombuffer(b'[["a", [-1]]]', np.uint8), "distinct \\[name, \\[dims...\\]\\] pairs"),
        (LAYOUT, np.frombuffer(b'[["a", [1]], ["a", [1]]]', np.uint8), "distinct"),
        (LAYOUT, None, "come together"),
    ],
)
def test_a_damaged_record_is_refused_with_what_was_wrong(key: str, array: np.ndarray | None, message: str) -> None:
    record = _with(state_record(state()), key, None if array is None else Array(array))
    with pytest.raises(ValueError, match=message):
        state_tensors(record)


def test_a_node_with_an_unusable_residual_replies_without_it(caplog: pytest.LogCaptureFixture) -> None:
    # found while packing the state: a residual that could not be read failed the node's reply every round
    # from then on (the unreadable record stayed); now it is dropped with an error logged
    from flwr.app import ConfigRecord, RecordDict

    from fedsqueeze.client.mod import STATE_FEEDBACK, STATE_META, _encode_reply
    from fedsqueeze.codecs import decode, parse
    from fedsqueeze.protocol import DELTA, Downlink

    spec = "topk(ratio=0.5)"
    state_ = RecordDict()
    state_[STATE_META] = ConfigRecord({"version": 2, "uplink": spec, "feedback-version": 1})
    state_[STATE_FEEDBACK] = _with(state_record({"residual/w": torch.ones(100)}), LAYOUT, Array(np.zeros(3, np.uint8)))
    down = Downlink(kind=DELTA, version=2, base=1, blobs=[], uplink=spec)
    local = torch.arange(1.0, 101.0)
    with caplog.at_level(logging.ERROR):
        kind, blob = _encode_reply({"w": local}, {"w": torch.zeros(100)}, parse(spec), state_, down)
    sent = decode(blob)["w"]
    assert kind == DELTA and torch.equal(sent, torch.where(local > 50, local, 0.0))  # no residual of ones added
    assert "error-feedback state is unusable" in caplog.text
    assert torch.equal(state_tensors(state_[STATE_FEEDBACK])["residual/w"], local - sent)  # a new, readable one
