"""Protocol pieces: wire-size counting against Flower's own serialization, payload records, run config."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, push_objects
from flwr.supercore.task_identity import TaskIdentity

from fedsqueeze.framing import message_bytes
from fedsqueeze.protocol import (
    DELTA,
    FULL,
    Downlink,
    ProtocolError,
    Uplink,
    add_tensors,
    arrays_to_tensors,
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
    down = Downlink(DELTA, 4, 2, [b"a", b"bc"], "quantize | zstd", "weights")
    assert Downlink.from_record(down.to_record()) == down
    up = Uplink(FULL, 4, b"xyz")
    assert Uplink.from_record(up.to_record()) == up

    record = down.to_record()
    record["kind"] = "half"
    with pytest.raises(ProtocolError, match="kind"):
        Downlink.from_record(record)
    record = down.to_record()
    del record["blobs"]
    with pytest.raises(ProtocolError, match="blobs"):
        Downlink.from_record(record)
    record = Downlink(FULL, 1, -1, [b"a", b"b"], "identity").to_record()
    with pytest.raises(ProtocolError, match="exactly one blob"):
        Downlink.from_record(record)
    record = up.to_record()
    record["version"] = "4"
    with pytest.raises(ProtocolError, match="version"):
        Uplink.from_record(record)
    record = up.to_record()
    record["version"] = True
    with pytest.raises(ProtocolError, match="version"):
        Uplink.from_record(record)


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
