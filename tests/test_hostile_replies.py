"""Hostile replies (issue 9, S1-S5): each is dropped with one log line naming the node, and the round
goes on with the honest replies, whose aggregate is exactly what the inner strategy makes of them alone."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from test_strategy import FakeGrid, contexts, global_model, make_client

from fedsqueeze.codecs import parse
from fedsqueeze.protocol import (
    DELTA,
    PAYLOAD_KEY,
    Downlink,
    arrays_to_tensors,
    edit_metric,
    edit_payload,
    tensors_to_arrays,
)
from fedsqueeze.server.strategy import CompressedStrategy

NODES = [101, 102, 103, 104]
HOSTILE = 103
UPLINK = "quantize(bits=8) | zstd"


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


def raw_blob(spec: bytes, body: bytes) -> bytes:
    """A blob in the v1 layout with any header spec and body (lengths as one-byte varints)."""
    assert len(spec) < 128 and len(body) < 128
    return b"FSQZ\x01" + bytes([len(spec)]) + spec + bytes([len(body)]) + body


def set_blob(blob: bytes) -> Callable[[Message], None]:
    return set_field("blob", blob)


def set_field(name: str, value: object) -> Callable[[Message], None]:
    def mutate(reply: Message) -> None:
        reply.content[PAYLOAD_KEY] = edit_payload(reply.content[PAYLOAD_KEY], **{name: value})  # type: ignore[arg-type]

    return mutate


def set_payload(record: ConfigRecord) -> Callable[[Message], None]:
    def mutate(reply: Message) -> None:
        reply.content[PAYLOAD_KEY] = record

    return mutate


def set_metric(name: str, value: object) -> Callable[[Message], None]:
    def mutate(reply: Message) -> None:
        reply.content[PAYLOAD_KEY] = edit_metric(reply.content[PAYLOAD_KEY], name, value)  # type: ignore[arg-type]

    return mutate


def plain_reply(arrays: ArrayRecord) -> Callable[[Message], None]:
    """Replace the payload with a plain ArrayRecord, as a node without the mod would send."""

    def mutate(reply: Message) -> None:
        metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0})
        reply.content = RecordDict({"arrays": arrays, "metrics": metrics})

    return mutate


def plain_reply_named(key: str) -> Callable[[Message], None]:
    def mutate(reply: Message) -> None:
        metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0})
        reply.content = RecordDict({key: tensors_to_arrays(global_model()), "metrics": metrics})

    return mutate


def npy_with_header_shape(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 16


def plain_model(**replace: Array) -> ArrayRecord:
    arrays = tensors_to_arrays(global_model())
    return ArrayRecord({k: replace.get(k, v) for k, v in arrays.items()})


D1_BODY = b"\x01\x01w\x01\x01\x01\x00\x00\x03" + b"\x00\x05\x01\x00" + b"\x00\x01\x01\x00" * 2
LONG_PIPELINE = " | ".join(["topk"] * 142)  # 991 characters: within the header limit

HOSTILE_REPLIES: dict[str, tuple[Callable[[Message], None], str]] = {
    # S1/S5: blobs whose header names another pipeline than the configured one are never decoded
    "D1 quantize granularity": (set_blob(raw_blob(b"quantize(granularity=8)", D1_BODY)), "expected the configured"),
    "D2 deep spec": (set_blob(raw_blob(b"svd(rank=" + b"~" * 100 + b"1)", b"")), "expected the configured"),
    "D3 bad operator": (set_blob(raw_blob(b"topk(ratio=0.5) < quantize(bits=4)", b"")), "expected the configured"),
    "S5 142-stage pipeline": (
        set_blob(
            b"FSQZ\x01"
            + bytes([0x80 | (len(LONG_PIPELINE) & 0x7F), len(LONG_PIPELINE) >> 7])
            + LONG_PIPELINE.encode()
            + b"\x00"
        ),
        "expected the configured",
    ),
    "tucker blob": (set_blob(raw_blob(b"tucker(ranks=4)", b"\x00")), "expected the configured"),
    "not a blob": (set_blob(b"\x00" * 40), "cannot be decoded"),
    # S2: plain replies with broken numpy payloads
    "S2 empty array data": (
        plain_reply(plain_model(**{"fc.bias": Array("float32", (10,), "numpy.ndarray", b"")})),
        "header cannot be read",
    ),
    "S2 huge npy header": (
        plain_reply(
            plain_model(**{"fc.bias": Array("float32", (10,), "numpy.ndarray", npy_with_header_shape((2**40,)))})
        ),
        "expected shape (10,)",
    ),
    "plain wrong stype": (
        plain_reply(plain_model(**{"fc.bias": Array("float32", (10,), "custom", b"\0" * 40)})),
        "serialisation type",
    ),
    # S3: metrics of the wrong type
    "S3 list encode seconds": (set_metric("fsq-encode-s", [1.0, 2.0]), "metrics"),
    "metric is a string": (set_metric("train-loss", "high"), "expected a number"),
    # S4: replies that would break the inner strategy
    "S4 wrong arrays key": (plain_reply_named("weights"), "expected exactly one named 'arrays'"),
    "S4 NaN num-examples": (set_metric("num-examples", float("nan")), "'num-examples'"),
    "zero num-examples": (set_metric("num-examples", 0), "positive integer"),
    "fractional num-examples": (set_metric("num-examples", 2.5), "positive integer"),
    "inf train-loss": (set_metric("train-loss", float("inf")), "finite"),
    "wrong version": (set_field("version", 7), "version 7"),
    "version of wrong type": (set_field("version", "1"), "'version'"),
    "folded list malformed": (set_field("folded", ["metrics"]), "folded"),
    # Payload format 2: the record's one field is msgpack, which is parsed, never evaluated
    "payload not msgpack": (set_payload(ConfigRecord({"p": b"\xc1\x00"})), "not valid msgpack"),
    "payload of format 1": (set_payload(ConfigRecord({"kind": "delta", "version": 1, "blob": b""})), "format 2"),
    "payload nested deeply": (set_payload(ConfigRecord({"p": b"\x91" * 100_000 + b"\x00"})), "not valid msgpack"),
    "folded metric key unknown index": (set_field("folded", [[3, True, {200: 1.0}]]), "known name's index"),
}


@pytest.mark.parametrize("name", list(HOSTILE_REPLIES))
def test_a_hostile_reply_is_dropped_and_the_round_aggregates_the_honest_ones(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    mutate, reason = HOSTILE_REPLIES[name]
    honest = run_round(None)
    strategy = CompressedStrategy(FedAvg(), uplink=UPLINK, downlink="identity", seed=0)
    with caplog.at_level(logging.WARNING):
        got = run_round(mutate, strategy)
    assert [r.node_id for r in strategy.rejections] == [HOSTILE], name
    assert reason in strategy.rejections[0].reason, strategy.rejections[0].reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"node {HOSTILE}" in warnings[0]
    assert all(torch.isfinite(t).all() for t in got.values())
    # The honest replies alone give the same model as a round in which the hostile node was absent
    assert all(torch.equal(got[k], honest[k]) for k in got), name


def run_round(mutate: Callable[[Message], None] | None, strategy: CompressedStrategy | None = None) -> dict:
    strategy = strategy or CompressedStrategy(FedAvg(), uplink=UPLINK, downlink="identity", seed=0)
    app, ctx = make_client(), contexts(NODES)
    messages = list(strategy.configure_train(1, tensors_to_arrays(global_model()), ConfigRecord(), FakeGrid(NODES)))
    replies = [app(m, ctx[m.metadata.dst_node_id]) for m in messages]
    if mutate is None:
        replies = [r for r in replies if r.metadata.src_node_id != HOSTILE]
    else:
        mutate(next(r for r in replies if r.metadata.src_node_id == HOSTILE))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return arrays_to_tensors(arrays)


def test_a_reply_with_extra_metrics_is_dropped_not_the_round(caplog: pytest.LogCaptureFixture) -> None:
    strategy = CompressedStrategy(FedAvg(), uplink=UPLINK, downlink="identity", seed=0)
    got = run_round(set_metric("extra", 1.0), strategy)
    assert [r.node_id for r in strategy.rejections] == [HOSTILE] and "differ" in strategy.rejections[0].reason
    honest = run_round(None)
    assert all(torch.equal(got[k], honest[k]) for k in got)


def test_the_configured_pipeline_with_a_hostile_body_is_a_decode_error() -> None:
    """D1 under the very spec the server is configured with: rejected as undecodable, no crash."""
    strategy = CompressedStrategy(FedAvg(), uplink="quantize(granularity=8)", downlink="identity", seed=0)
    run_round(set_blob(raw_blob(b"quantize(granularity=8)", D1_BODY)), strategy)
    assert [r.node_id for r in strategy.rejections] == [HOSTILE]
    assert "cannot be decoded" in strategy.rejections[0].reason


@pytest.mark.parametrize("how", ["garbage blob", "wrong layout", "bad record"])
def test_a_corrupt_broadcast_gives_the_client_an_error_reply(how: str) -> None:
    """Round 1 goes normally; round 2's payload to node 101 is corrupted on the way."""
    nodes = [101, 102]
    app, ctx = make_client(), contexts(nodes)
    strategy = CompressedStrategy(FedAvg(), uplink=UPLINK, downlink="quantize(bits=8) | zstd", seed=0)
    arrays = tensors_to_arrays(global_model())
    messages = strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(nodes))
    arrays, _ = strategy.aggregate_train(1, [app(m, ctx[m.metadata.dst_node_id]) for m in messages])
    assert arrays is not None
    messages = strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid(nodes))
    msg = next(m for m in messages if m.metadata.dst_node_id == 101)
    payload = msg.content[PAYLOAD_KEY]
    assert Downlink.from_record(payload).kind == DELTA
    if how == "garbage blob":
        msg.content[PAYLOAD_KEY] = edit_payload(payload, blobs=[b"FSQZ\x01\x05zstd!\x00"])  # type: ignore[arg-type]
    elif how == "wrong layout":
        blob = parse("identity").encode({"other": torch.zeros(3)})
        msg.content[PAYLOAD_KEY] = edit_payload(payload, blobs=[blob])  # type: ignore[arg-type]
    else:
        msg.content[PAYLOAD_KEY] = edit_payload(payload, blobs="not a list")  # type: ignore[arg-type]
    reply = app(msg, ctx[101])
    assert reply.has_error() and reply.error.reason.startswith("fedsqueeze: ")
    expected = {"garbage blob": "cannot decode", "wrong layout": "does not fit", "bad record": "'blobs'"}[how]
    assert expected in reply.error.reason, reply.error.reason
