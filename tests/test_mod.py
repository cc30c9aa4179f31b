"""The client mod: it works in a plain Flower ClientApp, keeps its state, and refuses what it cannot use."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedsqueeze.client import compression_mod
from fedsqueeze.client.mod import STATE_FEEDBACK, STATE_META, STATE_REFERENCE
from fedsqueeze.client.state_record import state_tensors
from fedsqueeze.codecs import decode, parse
from fedsqueeze.protocol import (
    DELTA,
    ENCODE_TIME_METRIC,
    FULL,
    PAYLOAD_KEY,
    Downlink,
    Uplink,
    arrays_to_tensors,
    edit_payload,
    tensors_to_arrays,
)

NODE = 42


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 3, 1, 1


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(8, 5, generator=g), "layer.bias": torch.randn(8, generator=g)}


def context() -> Context:
    return Context(run_id=3, node_id=NODE, node_config={}, state=RecordDict(), run_config={})


def train_message(
    payload: Downlink | None, model: dict[str, torch.Tensor] | None = None, kind: str = "train"
) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1, "lr": 0.1})})
    if payload is not None:
        content[PAYLOAD_KEY] = payload.to_record()
    if model is not None:
        content["arrays"] = tensors_to_arrays(model)
    return Message(content, dst_node_id=NODE, message_type=kind)


def full(model: dict[str, torch.Tensor], uplink: str = "identity", version: int = 1) -> Downlink:
    return Downlink(FULL, version, -1, [parse("zstd").encode(model)], uplink)


class PlusOneApp:
    """A minimal ClientApp that knows nothing about fedsqueeze: it adds 1 to every array."""

    def train(self, msg: Message, ctx: Context) -> Message:
        """The train handler: reply with every array plus one."""
        self.seen.append(msg.content)
        arrays = msg.content["arrays"]
        plus_one = ArrayRecord({k: type(a)(a.numpy() + 1) for k, a in arrays.items()})
        return Message(RecordDict({"arrays": plus_one, "metrics": MetricRecord({"num-examples": 3})}), reply_to=msg)

    def __init__(self, *, mods: list | None = None) -> None:
        self.seen: list[RecordDict] = []
        self.app = ClientApp(mods=mods or [])

        self.app.train()(self.train)

        @self.app.evaluate()
        def evaluate(msg: Message, ctx: Context) -> Message:
            self.seen.append(msg.content)
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 3, "acc": 0.5})}), reply_to=msg)


def test_a_plain_clientapp_gets_plain_arrays_and_replies_compressed() -> None:
    model = weights()
    client = PlusOneApp(mods=[compression_mod])
    reply = client.app(train_message(full(model)), context())

    # The app saw Flower's usual records, with the model as plain numpy arrays
    (seen,) = client.seen
    assert PAYLOAD_KEY not in seen and set(seen) == {"config", "arrays"}
    received = arrays_to_tensors(seen["arrays"])
    assert all(torch.equal(received[k], model[k]) for k in model)

    # Its reply went out as a fedsqueeze payload: the full local model (lossless uplink)
    assert not reply.has_error()
    assert set(reply.content) == {PAYLOAD_KEY}  # the metrics travel folded into the payload record
    up = Uplink.from_record(reply.content[PAYLOAD_KEY])
    assert up.kind == FULL and up.version == 1
    local = decode(up.blob)
    assert all(torch.equal(local[k], model[k] + 1) for k in model)
    metrics = up.folded["metrics"]
    assert metrics["num-examples"] == 3
    assert 0 <= metrics[ENCODE_TIME_METRIC] < 10


def test_the_mod_can_be_called_directly_and_a_lossy_uplink_sends_the_delta() -> None:
    model, ctx = weights(), context()
    client = PlusOneApp()
    reply = compression_mod(train_message(full(model, "quantize(bits=8) | zstd")), ctx, client.train)
    up = Uplink.from_record(reply.content[PAYLOAD_KEY])
    assert up.kind == DELTA
    delta = decode(up.blob)
    assert all(torch.allclose(delta[k], torch.ones_like(model[k]), atol=1e-6) for k in model)
    assert STATE_FEEDBACK in ctx.state  # the residual persists for the next round


def test_error_feedback_carries_what_topk_dropped_to_the_next_round() -> None:
    model, ctx = weights(), context()
    client = PlusOneApp(mods=[compression_mod])
    uplink = "topk(ratio=0.25)"
    first = Uplink.from_record(client.app(train_message(full(model, uplink)), ctx).content[PAYLOAD_KEY])
    residual = state_tensors(ctx.state[STATE_FEEDBACK])  # type: ignore[arg-type]
    sent = decode(first.blob)
    for k in model:  # what was sent plus what is kept is exactly the update (+1 everywhere)
        assert torch.allclose(sent[k] + residual[f"residual/{k}"], torch.ones_like(model[k]))
        assert 0 < int((sent[k] != 0).sum()) < model[k].numel()
    # Next round: the node's reference is version 1; a delta of zeros keeps it, and the
    # residual is added to the new update of +1, so the large entries now are ~2.
    zero = Downlink(DELTA, 2, 1, [parse("identity").encode({k: torch.zeros_like(v) for k, v in model.items()})], uplink)
    second = decode(Uplink.from_record(client.app(train_message(zero), ctx).content[PAYLOAD_KEY]).blob)
    assert max(float(t.max()) for t in second.values()) == pytest.approx(2.0)


def test_messages_without_a_payload_pass_through_untouched() -> None:
    model = weights()
    client = PlusOneApp(mods=[compression_mod])
    ctx = context()
    plain = train_message(None, model)
    reply = client.app(plain, ctx)
    assert client.seen[0] is plain.content  # the very same records
    assert set(reply.content) == {"arrays", "metrics"} and PAYLOAD_KEY not in reply.content
    assert ENCODE_TIME_METRIC not in reply.content["metrics"]
    assert len(ctx.state) == 0

    evaluation = train_message(full(model), model, kind="evaluate")
    reply = client.app(evaluation, ctx)
    assert client.seen[1] is evaluation.content and not reply.has_error()


def test_deltas_are_added_to_the_held_reference_in_order() -> None:
    model, ctx = weights(), context()
    client = PlusOneApp(mods=[compression_mod])
    client.app(train_message(full(model, version=5)), ctx)
    steps = [weights(1), weights(2)]
    codec = parse("quantize(bits=8)")
    blobs = [codec.encode(s) for s in steps]
    client.app(train_message(Downlink(DELTA, 7, 5, blobs, "identity")), ctx)
    expected = dict(model)
    for blob in blobs:
        expected = {k: torch.add(expected[k], decode(blob)[k]) for k in expected}
    received = arrays_to_tensors(client.seen[-1]["arrays"])
    held = arrays_to_tensors(ctx.state[STATE_REFERENCE])
    assert all(torch.equal(received[k], expected[k]) and torch.equal(held[k], expected[k]) for k in model)
    assert ctx.state[STATE_META]["version"] == 7


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda m: Downlink(DELTA, 2, 1, [parse("identity").encode(m)], "identity"), "holds none"),
        (lambda m: Downlink(FULL, 1, -1, [b"not a blob"], "identity"), "cannot decode"),
        (lambda m: Downlink(FULL, 1, -1, [parse("identity").encode(m)], "nosuchcodec"), "nosuchcodec"),
    ],
)
def test_unusable_payloads_give_an_error_reply_without_calling_the_app(make, reason: str) -> None:  # type: ignore[no-untyped-def]
    client = PlusOneApp(mods=[compression_mod])
    reply = client.app(train_message(make(weights())), context())
    assert reply.has_error() and reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert reason in (reply.error.reason or "")
    assert client.seen == []


def test_a_malformed_payload_record_gives_an_error_reply() -> None:
    msg = train_message(full(weights()))
    msg.content[PAYLOAD_KEY] = edit_payload(msg.content[PAYLOAD_KEY], version="7")  # type: ignore[arg-type]
    client = PlusOneApp(mods=[compression_mod])
    reply = client.app(msg, context())
    assert reply.has_error() and "version" in (reply.error.reason or "")


def test_a_reply_that_does_not_fit_the_received_model_gives_an_error_reply() -> None:
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        bad = {"layer.weight": torch.zeros(8, 6), "layer.bias": torch.zeros(8)}
        return Message(
            RecordDict({"arrays": tensors_to_arrays(bad), "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg
        )

    reply = app(train_message(full(weights())), context())
    assert reply.has_error() and "shape (8, 6)" in (reply.error.reason or "")


def test_the_server_chosen_arrays_key_and_a_reply_without_metrics() -> None:
    app = ClientApp(mods=[compression_mod])
    keys: list[set[str]] = []

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        keys.append(set(msg.content))
        return Message(RecordDict({"weights": msg.content["weights"]}), reply_to=msg)

    payload = full(weights())
    payload.arrays_key = "weights"
    reply = app(train_message(payload), context())
    assert keys == [{"config", "weights"}]
    up = Uplink.from_record(reply.content[PAYLOAD_KEY])
    assert up.kind == FULL and len(up.blob) > 0
    assert ENCODE_TIME_METRIC in up.folded["metrics"]


def test_a_fresh_node_applies_deltas_from_the_all_zero_model() -> None:
    model, ctx = weights(), context()
    client = PlusOneApp(mods=[compression_mod])
    blob = parse("quantize(bits=8)").encode(model)
    client.app(train_message(Downlink(DELTA, 1, 0, [blob], "identity")), ctx)
    received = arrays_to_tensors(client.seen[-1]["arrays"])
    assert all(torch.equal(received[k], decode(blob)[k]) for k in model)
    # A node that already holds a reference refuses a delta from zeros
    reply = client.app(train_message(Downlink(DELTA, 2, 0, [blob], "identity")), ctx)
    assert reply.has_error() and "holds version 1" in (reply.error.reason or "")
