"""Framing bytes per message: pinned, so a change in Flower's framing or in fedsqueeze's records shows.

``message_bytes`` reads Flower's private serialization code (fedsqueeze/framing.py). The exact
sizes below were measured with flwr 1.42; if this test fails after a Flower upgrade, the byte
accounting of every result must be re-checked before the numbers are updated.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from test_strategy import FakeGrid, contexts

from fedsqueeze.client import CompressionMod
from fedsqueeze.framing import message_bytes
from fedsqueeze.models import first_model
from fedsqueeze.protocol import PAYLOAD_KEY, Downlink, Uplink, arrays_to_tensors, tensors_to_arrays
from fedsqueeze.server.strategy import CompressedStrategy

# 19-digit node ids, as Flower draws them: their varints are part of the framing
NODES = [4038654934485940047, 5038654934485940047]


def setup_function() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


def lenet_rounds(rounds: int = 2) -> tuple[CompressedStrategy, set[int], set[int]]:
    """Two rounds of fedsqueeze's defaults on LeNet-5, with 'training' a small random step.

    Returns the strategy and the message pieces (:func:`message_bytes`) that are not blobs, of the
    last round's replies and of its train messages.
    """
    weights = first_model("lenet5", "mnist", 0)
    app = ClientApp(mods=[CompressionMod(lambda context: weights)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        received = arrays_to_tensors(msg.content["arrays"])
        g = torch.Generator().manual_seed(context.node_id % 1000)
        local = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in received.items()}
        metrics = MetricRecord({"num-examples": 600, "train-loss": 0.5, "train-seconds": 1.0})
        return Message(RecordDict({"arrays": tensors_to_arrays(local), "metrics": metrics}), reply_to=msg)

    strategy = CompressedStrategy(
        FedAvg(),
        uplink="topk(ratio=0.01) | quantize(bits=8) | zstd",
        downlink="quantize(bits=8) | zstd",
        initial="shared",
        seed=0,
    )
    ctx = contexts(NODES)
    arrays: ArrayRecord | None = tensors_to_arrays(weights)
    for server_round in range(1, rounds + 1):
        assert arrays is not None
        config = ConfigRecord({"server-round": server_round, "lr": 0.05})
        messages = strategy.configure_train(server_round, arrays, config, FakeGrid(NODES))
        for msg in messages:  # as the SuperLink does when it takes a message: it is named by its object id,
            msg.metadata.__dict__["_message_id"] = msg.object_id  # and the reply names it in reply_to
        down_framing = {
            message_bytes(m) - sum(map(len, Downlink.from_record(m.content[PAYLOAD_KEY]).blobs)) for m in messages
        }  # type: ignore[arg-type]
        replies = [app(m, ctx[m.metadata.dst_node_id]) for m in messages]
        # Flower's message framing of each reply, before the strategy turns it into a plain one
        reply_framing = {message_bytes(r) - len(Uplink.from_record(r.content[PAYLOAD_KEY]).blob) for r in replies}  # type: ignore[arg-type]
        arrays, _ = strategy.aggregate_train(server_round, replies)
    assert strategy.rejections == []
    return strategy, reply_framing, down_framing


def test_wire_framing_of_lenet5_train_messages_is_pinned() -> None:
    train = [t for t in lenet_rounds()[0].traffic if t.message_type == "train"]
    up = {t.bytes - t.payload_bytes for t in train if t.direction == "up"}
    down = {t.bytes - t.payload_bytes for t in train if t.direction == "down" and t.round == 2}
    # One payload record (blob, version, kind and the folded metrics) and nothing else
    assert all(t.bytes > t.payload_bytes for t in train)
    assert up == {PINNED_REPLY_FRAMING}
    assert down == {PINNED_DOWN_FRAMING}


def test_flower_message_framing_of_a_lenet5_train_reply_is_pinned() -> None:
    """The message's own pieces (message_bytes: envelope, object tree, object bodies), without the
    per-request ids that wire_bytes adds: the measure of issue 8's target of 800 B (was ~1,150 B).

    Of the 798 B, 728 are Flower's for any one-record reply (envelope with two 64-hex ids, the tree
    of 3 object ids, the Message and RecordDict bodies naming their children); 70 are fedsqueeze's
    (the record's name and field, and the packed kind, version and four metrics besides the blob).
    """
    _, reply_framing, down_framing = lenet_rounds()
    assert reply_framing == {PINNED_REPLY_MESSAGE_FRAMING}
    assert down_framing == {PINNED_DOWN_MESSAGE_FRAMING}


def test_message_bytes_of_a_fixed_message_are_pinned() -> None:
    """A change here means Flower changed its framing (or fedsqueeze's counting)."""
    content = RecordDict(
        {
            "arrays": tensors_to_arrays({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}),
            "config": ConfigRecord({"server-round": 3, "lr": 0.1}),
        }
    )
    msg = Message(content, dst_node_id=NODES[0], message_type="train")
    assert message_bytes(msg) == PINNED_FIXED_MESSAGE_BYTES


#: Bytes of a LeNet-5 train reply and train message that are not codec blobs, as wire_bytes counts them
#: (the push/pull request bodies, with their per-object ids), flwr 1.42.0. The reply's pin was 820 B
#: until the test gave the sent messages ids as the SuperLink does: without a reply-to id, wire_bytes
#: counted the replies as if they were pulled (no per-object push requests), 500 B short.
#: Payload format 2 (one msgpack field, known names as indices, record "fsq") cut them from 1,320 /
#: 929 / 899 B.
PINNED_REPLY_FRAMING = 1189
PINNED_REPLY_MESSAGE_FRAMING = 798
PINNED_DOWN_FRAMING = 700
PINNED_DOWN_MESSAGE_FRAMING = 675
#: Measured with flwr 1.42.0: envelope with a 64-hex message id, object tree of 5 objects, their bodies.
PINNED_FIXED_MESSAGE_BYTES = 1499
