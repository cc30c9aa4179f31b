"""Protocol pieces: wire-size counting against Flower's own serialization, payload records, run config."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, push_objects
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.framing import message_bytes
from fedsqueeze.protocol import (
    DELTA,
    FULL,
    PACKED_FIELD,
    PAYLOAD_FORMAT,
    WIRE_NAMES,
    Downlink,
    ProtocolError,
    Uplink,
    add_tensors,
    all_finite,
    arrays_to_tensors,
    edit_payload,
    subtract_tensors,
    tensors_to_arrays,
)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 11, 1, 1


def sample_message() -> Message:
    rng = np.random.default_rng(0)
    content = RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "w": Array(rng.standard_normal((50, 40)).astype(np.float32)),
                    "b": Array(rng.standard_normal(40).astype(np.float32)),
                }
            ),
            "config": ConfigRecord({"server-round": 3, "lr": 0.1, "blob": os.urandom(777)}),
            "metrics": MetricRecord({"num-examples": 12}),
        }
    )
    return Message(content, dst_node_id=99, message_type="train")


def test_message_bytes_equal_the_pieces_flower_pushes() -> None:
    msg = sample_message()
    pushed: dict[str, bytes] = {}
    # Flower's own push routine, as the ServerApp and SuperNodes use it
    push_objects(
        get_all_nested_objects(msg),
        lambda object_id, content: pushed.__setitem__(object_id, content),
        keep_objects=True,
    )
    envelope = message_to_proto(remove_content_from_message(msg))
    envelope.metadata.message_id = msg.object_id
    expected = (
        len(envelope.SerializeToString())
        + len(get_object_tree(msg).SerializeToString())
        + sum(len(c) for c in pushed.values())
    )
    assert message_bytes(msg) == expected
    # The pieces are the whole message: Flower rebuilds it from them
    rebuilt = inflate_object_from_contents(msg.object_id, dict(pushed), keep_object_contents=True)
    assert isinstance(rebuilt, Message)
    assert np.array_equal(rebuilt.content["arrays"]["w"].numpy(), msg.content["arrays"]["w"].numpy())
    assert rebuilt.content["config"]["blob"] == msg.content["config"]["blob"]


def test_message_bytes_follow_the_payload_and_exceed_the_monolithic_proto() -> None:
    def with_blob(n: int) -> Message:
        return Message(RecordDict({"p": ConfigRecord({"blob": b"\x01" * n})}), dst_node_id=5, message_type="train")

    small, large = message_bytes(with_blob(1000)), message_bytes(with_blob(101_000))
    assert 100_000 <= large - small <= 100_010  # the blob, plus a few digits of length prefixes
    msg = sample_message()
    # Flower splits a message into content-addressed pieces; each carries a header and IDs
    assert message_bytes(msg) > message_to_proto(msg).ByteSize()
    assert message_bytes(msg) > 50 * 40 * 4 + 777


def test_a_configrecord_carries_a_blob_more_cheaply_than_an_array() -> None:
    """The measurement behind the payload record: bytes in a ConfigRecord, not a custom-stype Array."""
    blob = os.urandom(2000)
    as_config = Message(RecordDict({"p": ConfigRecord({"blob": blob})}), dst_node_id=5, message_type="train")
    as_array = Message(
        RecordDict(
            {"p": ArrayRecord({"blob": Array(dtype="uint8", shape=(len(blob),), stype="fedsqueeze", data=blob)})}
        ),
        dst_node_id=5,
        message_type="train",
    )
    as_npy = Message(
        RecordDict({"p": ArrayRecord({"blob": Array(np.frombuffer(blob, dtype=np.uint8))})}),
        dst_node_id=5,
        message_type="train",
    )
    config_size, array_size, npy_size = message_bytes(as_config), message_bytes(as_array), message_bytes(as_npy)
    assert config_size + 200 < array_size < npy_size


def test_payload_records_round_trip_and_refuse_bad_fields() -> None:
    folded = {"config": ConfigRecord({"lr": 0.1, "my-key": [1, 2], "flag": True, "raw": b"\x00"})}
    down = Downlink(DELTA, 4, 2, [b"a", b"bc"], "quantize | zstd", "weights", base_digest="ab" * 32, folded=folded)
    assert Downlink.from_record(down.to_record()) == down
    metrics = {"metrics": MetricRecord({"num-examples": 3, "train-loss": 0.25, "custom": [1.5, 2.0]})}
    up = Uplink(FULL, 4, b"xyz", folded=metrics)
    assert Uplink.from_record(up.to_record()) == up

    bad_downlinks: list[tuple[ConfigRecord, str]] = [
        (edit_payload(down.to_record(), kind="half"), "kind must be 'full' or 'delta'"),
        (edit_payload(down.to_record(), kind=99), "known name's index"),
        (edit_payload(down.to_record(), blobs=[]), "non-empty list of bytes"),
        (edit_payload(down.to_record(), blobs=["a"]), "non-empty list of bytes"),
        (edit_payload(down.to_record(), base_digest=b"short"), "32-byte"),
        (Downlink(FULL, 1, -1, [b"a", b"b"], "identity").to_record(), "exactly one blob"),
    ]
    for record, reason in bad_downlinks:
        with pytest.raises(ProtocolError, match=reason):
            Downlink.from_record(record)
    bad_uplinks: list[tuple[ConfigRecord, str]] = [
        (edit_payload(up.to_record(), version="4"), "'version' has type str, expected int"),
        (edit_payload(up.to_record(), version=True), "'version' has type bool"),
        (edit_payload(up.to_record(), folded=[["m", True, {"x": "text"}]]), "expected a number"),
        (edit_payload(up.to_record(), folded=[["c", False, {"x": {"nested": 1}}]]), "ConfigRecord cannot"),
        (edit_payload(up.to_record(), folded=[["c", 1, {}]]), "is_metric"),
    ]
    for record, reason in bad_uplinks:
        with pytest.raises(ProtocolError, match=reason):
            Uplink.from_record(record)


def test_a_payload_record_that_is_not_this_format_is_refused_by_name() -> None:
    good = Uplink(DELTA, 1, b"blob").to_record()
    cases: list[tuple[ConfigRecord, str]] = [
        (ConfigRecord({"kind": "delta", "version": 1, "blob": b"blob"}), "one bytes field 'p'.*format 2"),
        (ConfigRecord({**good, "extra": 1}), "one bytes field 'p'"),
        (ConfigRecord({PACKED_FIELD: "text"}), "one bytes field 'p'"),
        (ConfigRecord({PACKED_FIELD: b"\xc1"}), "not valid msgpack"),
        (ConfigRecord({PACKED_FIELD: good[PACKED_FIELD] + b"\x00"}), "not valid msgpack"),
        (ConfigRecord({PACKED_FIELD: msgpack.packb([1, 1, 1, b"", []])}), "format must be 2, got 1"),
        (ConfigRecord({PACKED_FIELD: msgpack.packb({"a": 1})}), "format must be 2"),
        (ConfigRecord({PACKED_FIELD: msgpack.packb([PAYLOAD_FORMAT, 1, 1])}), "must hold 4 fields, got 2"),
    ]
    for record, reason in cases:
        with pytest.raises(ProtocolError, match=reason):
            Uplink.from_record(record)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), prefix=st.booleans())
def test_any_bytes_in_the_payload_field_give_a_protocol_error_or_a_payload(data: bytes, prefix: bool) -> None:
    raw = msgpack.packb([PAYLOAD_FORMAT])[:-1] + data if prefix else data  # often a valid start
    for parse_as in (Uplink, Downlink):
        try:
            parse_as.from_record(ConfigRecord({PACKED_FIELD: raw}))
        except ProtocolError:
            pass


def test_known_names_travel_as_one_byte_and_others_as_text() -> None:
    known = Uplink(DELTA, 1, b"", folded={"metrics": MetricRecord({"num-examples": 1, "train-loss": 0.5})})
    other = Uplink(DELTA, 1, b"", folded={"metrics": MetricRecord({"num-exampleZ": 1, "train-losZ": 0.5})})
    assert len(other.to_record()[PACKED_FIELD]) - len(known.to_record()[PACKED_FIELD]) == 2 * 11  # type: ignore[arg-type]
    assert Uplink.from_record(other.to_record()) == other
    assert len(set(WIRE_NAMES)) == len(WIRE_NAMES)


def test_tensor_helpers_keep_names_order_and_exact_values() -> None:
    a = {"z": torch.randn(3, 2), "a": torch.arange(4, dtype=torch.int64)}
    back = arrays_to_tensors(tensors_to_arrays(a))
    assert list(back) == ["z", "a"] and all(torch.equal(back[k], a[k]) for k in a)
    d = subtract_tensors(a, {"z": torch.ones(3, 2), "a": torch.ones(4, dtype=torch.int64)})
    assert torch.equal(add_tensors(d, {"z": torch.ones(3, 2), "a": torch.ones(4, dtype=torch.int64)})["a"], a["a"])
    with pytest.raises(ValueError, match="missing"):
        add_tensors(a, {"z": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="shape"):
        add_tensors(a, {"z": torch.zeros(2, 3), "a": torch.zeros(4)})
    with pytest.raises(TypeError):
        arrays_to_tensors(ArrayRecord({"x": Array(dtype="uint8", shape=(1,), stype="other", data=b"1")}))


def test_zero_dimensional_tensors_keep_their_shape_as_arrays() -> None:
    # found while packing the node state: np.ascontiguousarray returns at least 1-D, so a 0-d tensor
    # (BatchNorm's num_batches_tracked) reached the ClientApp as shape (1,) instead of ()
    tensors = {"bn.num_batches_tracked": torch.tensor(7), "w": torch.arange(6.0).reshape(2, 3).T}
    record = tensors_to_arrays(tensors)
    assert record["bn.num_batches_tracked"].shape == ()
    back = arrays_to_tensors(record)
    for name, t in tensors.items():
        assert back[name].shape == t.shape and torch.equal(back[name], t), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_names_the_first_tensor_with_nan_or_infinity_and_passes_sums_that_overflow(
    dtype: torch.dtype,
) -> None:
    biggest = torch.finfo(dtype).max
    overflowing_sum = torch.full((4, 3), biggest, dtype=dtype)  # finite values whose sum is infinite
    tensors = {"big": overflowing_sum, "counts": torch.arange(5), "empty": torch.zeros(0, 3, dtype=dtype)}
    assert all_finite(tensors) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.zeros(7, 5, dtype=dtype)
        t[3, 2] = bad
        assert all_finite({**tensors, "bad": t, "also_bad": t.clone()}) == "bad"
    inf_pair = torch.tensor([float("inf"), float("-inf")], dtype=dtype)
    assert all_finite({"ok": torch.ones(3, dtype=dtype), "pair": inf_pair}) == "pair"  # inf - inf sums to NaN


def test_all_finite_tests_float8_tensors_which_have_no_sum() -> None:
    ok = torch.zeros(4, dtype=torch.float8_e5m2)
    bad = torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2)
    assert all_finite({"ok": ok}) is None
    assert all_finite({"ok": ok, "bad": bad}) == "bad"
