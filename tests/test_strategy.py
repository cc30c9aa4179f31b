"""CompressedStrategy: exact FedAvg with lossless codecs, bit-identical references, rejected replies."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum
from flwr.supercore.task_identity import TaskIdentity

from fedsqueeze.client import compression_mod
from fedsqueeze.client.mod import STATE_REFERENCE
from fedsqueeze.codecs import parse
from fedsqueeze.framing import wire_bytes
from fedsqueeze.protocol import (
    DELTA,
    FULL,
    PAYLOAD_KEY,
    Downlink,
    Uplink,
    arrays_to_tensors,
    edit_payload,
    tensors_to_arrays,
)
from fedsqueeze.server.strategy import DOWN, UP, CompressedStrategy

NODES = [101, 102, 103]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages built outside a running app need a task identity (the ServerApp's node is 1)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


class FakeGrid:
    """The part of a Grid that Flower's strategies and the stable node order use."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        """Answer the one-time query as nodes with the client mod do (stable key = node id)."""
        ctx = contexts(self.node_ids)
        return [compression_mod(m, ctx[m.metadata.dst_node_id], lambda *_: None) for m in messages]  # type: ignore[arg-type,return-value]


def global_model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "fc.weight": torch.randn(10, 36, generator=g),
        "fc.bias": torch.randn(10, generator=g),
    }


def local_model(received: dict[str, torch.Tensor], node_id: int, server_round: int) -> dict[str, torch.Tensor]:
    """What 'training' gives on a node: a deterministic step away from what it received."""
    g = torch.Generator().manual_seed(node_id * 1000 + server_round)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in received.items()}


TrainStep = Callable[[dict[str, torch.Tensor], int, int], dict[str, torch.Tensor]]


def make_client(train_step: TrainStep = local_model) -> ClientApp:
    """A ClientApp with the compression mod whose 'training' is ``train_step(received, node_id, server_round)``."""
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        received = arrays_to_tensors(msg.content["arrays"])
        server_round = int(msg.content["config"]["server-round"])
        local = train_step(received, context.node_id, server_round)
        metrics = MetricRecord({"num-examples": context.node_id - 90, "train-loss": float(context.node_id)})
        return Message(RecordDict({"arrays": tensors_to_arrays(local), "metrics": metrics}), reply_to=msg)

    return app


def contexts(node_ids: list[int]) -> dict[int, Context]:
    return {i: Context(run_id=7, node_id=i, node_config={}, state=RecordDict(), run_config={}) for i in node_ids}


def plain_reply(msg: Message, weights: dict[str, torch.Tensor], node_id: int) -> Message:
    metrics = MetricRecord({"num-examples": node_id - 90, "train-loss": float(node_id)})
    return Message(RecordDict({"arrays": tensors_to_arrays(weights), "metrics": metrics}), reply_to=msg)


def test_identity_codec_then_fedavg_equals_plain_fedavg_exactly() -> None:
    weights = global_model()
    arrays = tensors_to_arrays(weights)
    app, ctx = make_client(), contexts(NODES)
    strategy = CompressedStrategy(FedAvg(), uplink="identity", downlink="identity")

    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(NODES)))
    assert all(PAYLOAD_KEY in m.content and "arrays" not in m.content for m in messages)
    messages.sort(key=lambda m: m.metadata.dst_node_id)  # FedAvg sums in reply order
    replies = [app(m, ctx[m.metadata.dst_node_id]) for m in messages]
    assert all(not r.has_error() and "arrays" not in r.content for r in replies)
    compressed, metrics = strategy.aggregate_train(1, replies)

    # Plain Flower on the very same local weights
    plain = FedAvg()
    plain_messages = sorted(
        plain.configure_train(1, arrays, ConfigRecord(), FakeGrid(NODES)), key=lambda m: m.metadata.dst_node_id
    )
    plain_replies = [
        plain_reply(m, local_model(weights, m.metadata.dst_node_id, 1), m.metadata.dst_node_id) for m in plain_messages
    ]
    expected, expected_metrics = plain.aggregate_train(1, plain_replies)

    assert compressed is not None and expected is not None and metrics is not None
    got, want = arrays_to_tensors(compressed), arrays_to_tensors(expected)
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert metrics["train-loss"] == expected_metrics["train-loss"]
    assert strategy.rejections == []


@pytest.mark.parametrize("inner", [FedAvg(), FedProx(proximal_mu=0.1), FedMedian(), FedAdam(), FedTrimmedAvg(), Krum()])
def test_lossy_codecs_track_the_reference_bit_for_bit(inner: object) -> None:
    """Over rounds the nodes' reference equals the server's, and the aggregate stays near plain."""
    app, ctx = make_client(), contexts(NODES)
    strategy = CompressedStrategy(
        inner, uplink="topk(ratio=0.2) | quantize(bits=8) | zstd", downlink="quantize(bits=8) | zstd"
    )
    arrays = tensors_to_arrays(global_model())
    for server_round in range(1, 5):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(NODES)))
        kinds = {Downlink.from_record(m.content[PAYLOAD_KEY]).kind for m in messages}
        assert kinds == ({FULL} if server_round == 1 else {DELTA})
        replies = [app(m, ctx[m.metadata.dst_node_id]) for m in messages]
        assert all(Uplink.from_record(r.content[PAYLOAD_KEY]).kind == DELTA for r in replies)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        assert new_arrays is not None
        arrays = new_arrays
        server_reference = strategy.downlink_state.reference  # noqa: SLF001 - the invariant under test
        assert server_reference is not None
        for node_id in NODES:
            held = arrays_to_tensors(ctx[node_id].state[STATE_REFERENCE])
            assert all(torch.equal(held[k], server_reference[k]) for k in held)
    assert strategy.rejections == []
    up = [t for t in strategy.traffic if t.message_type == "train" and t.direction == UP]
    down = [t for t in strategy.traffic if t.message_type == "train" and t.direction == DOWN]
    assert len(up) == len(down) == 4 * len(NODES)
    assert sum(t.bytes for t in up) < sum(t.fp32_bytes for t in up) / 2
    assert sum(t.bytes for t in down[3:]) < sum(t.fp32_bytes for t in down[3:]) / 2


def test_lossy_aggregate_is_close_to_plain_fedavg() -> None:
    app, ctx = make_client(), contexts(NODES)
    weights = global_model()
    strategy = CompressedStrategy(FedAvg(), uplink="quantize(bits=8)", downlink="identity")
    messages = strategy.configure_train(1, tensors_to_arrays(weights), ConfigRecord(), FakeGrid(NODES))
    got, _ = strategy.aggregate_train(1, [app(m, ctx[m.metadata.dst_node_id]) for m in messages])
    assert got is not None
    total = sum(n - 90 for n in NODES)
    for name, value in arrays_to_tensors(got).items():
        want = sum(local_model(weights, n, 1)[name] * (n - 90) / total for n in NODES)
        assert torch.allclose(value, want, atol=2e-3), name


def corrupt(reply: Message, how: str) -> Message:
    blob = Uplink.from_record(reply.content[PAYLOAD_KEY]).blob  # type: ignore[arg-type]
    if how == "flipped":
        blob = blob[:20] + bytes(b ^ 0xA5 for b in blob[20:40]) + blob[40:]
    elif how == "truncated":
        blob = blob[: len(blob) // 2]
    elif how == "wrong-shape":
        blob = parse("identity").encode(
            {"conv.weight": torch.zeros(4, 1, 3, 4), "fc.weight": torch.zeros(10, 36), "fc.bias": torch.zeros(10)}
        )
    elif how == "nan":  # the encoder refuses NaN, so write one into the raw float32 bytes
        raw = bytearray(parse("identity").encode({k: torch.zeros_like(v) for k, v in global_model().items()}))
        raw[-4:] = bytes.fromhex("0000c07f")  # float32 NaN as the last value of the last tensor
        blob = bytes(raw)
    elif how == "missing":
        blob = parse("identity").encode({"fc.weight": torch.zeros(10, 36)})
    reply.content[PAYLOAD_KEY] = edit_payload(reply.content[PAYLOAD_KEY], blob=blob)  # type: ignore[arg-type]
    return reply


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("flipped", "cannot be decoded"),
        ("truncated", "cannot be decoded"),
        ("wrong-shape", "has shape"),
        ("nan", "NaN"),
        ("missing", "names differ"),
        ("error", "replied with error 2: boom"),
    ],
)
def test_a_bad_reply_is_dropped_with_one_log_line(how: str, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    nodes = [101, 102, 103, 104]
    app, ctx = make_client(), contexts(nodes)
    strategy = CompressedStrategy(FedAvg(), uplink="identity", downlink="identity")
    weights = global_model()
    messages = list(strategy.configure_train(1, tensors_to_arrays(weights), ConfigRecord(), FakeGrid(nodes)))
    replies = [app(m, ctx[m.metadata.dst_node_id]) for m in messages]
    bad_index = next(i for i, r in enumerate(replies) if r.metadata.src_node_id == 103)
    if how == "error":
        from flwr.app import Error

        replies[bad_index] = Message(Error(2, "boom"), reply_to=messages[bad_index])
    else:
        corrupt(replies[bad_index], how)

    with caplog.at_level(logging.WARNING):
        got, metrics = strategy.aggregate_train(1, replies)

    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "node 103" in lines[0] and reason in lines[0]
    assert [(r.round, r.node_id) for r in strategy.rejections] == [(1, 103)]
    assert got is not None and metrics is not None
    good = [n for n in nodes if n != 103]
    total = sum(n - 90 for n in good)
    for name, value in arrays_to_tensors(got).items():
        want = sum(local_model(weights, n, 1)[name] * (n - 90) / total for n in good)
        assert torch.allclose(value, want, atol=1e-6), name
    ups = [t for t in strategy.traffic if t.message_type == "train" and t.direction == UP]
    assert len(ups) == 4 and sum(t.kind in ("rejected", "error") for t in ups) == 1


def test_rejection_reasons_name_the_fault(caplog: pytest.LogCaptureFixture) -> None:
    strategy = CompressedStrategy(FedAvg(), uplink="identity", downlink="identity")
    app, ctx = make_client(), contexts(NODES)
    messages = list(strategy.configure_train(1, tensors_to_arrays(global_model()), ConfigRecord(), FakeGrid(NODES)))
    replies = [app(m, ctx[m.metadata.dst_node_id]) for m in messages]
    corrupt(replies[0], "wrong-shape")
    corrupt(replies[1], "missing")
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, replies)
    reasons = " | ".join(r.reason for r in strategy.rejections)
    assert "shape (4, 1, 3, 4), expected (4, 1, 3, 3)" in reasons
    assert "missing ['conv.weight', 'fc.bias']" in reasons


def test_a_node_that_lost_its_reference_gets_the_full_model_next_round(caplog: pytest.LogCaptureFixture) -> None:
    app, ctx = make_client(), contexts(NODES)
    strategy = CompressedStrategy(FedAvg(), uplink="quantize(bits=8) | zstd", downlink="quantize(bits=8) | zstd")
    arrays = tensors_to_arrays(global_model())

    def run(server_round: int) -> dict[int, str]:
        nonlocal arrays
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(NODES)))
        kinds = {m.metadata.dst_node_id: Downlink.from_record(m.content[PAYLOAD_KEY]).kind for m in messages}
        new, _ = strategy.aggregate_train(server_round, [app(m, ctx[m.metadata.dst_node_id]) for m in messages])
        assert new is not None
        arrays = new
        return kinds

    assert set(run(1).values()) == {FULL}
    ctx[102] = contexts([102])[102]  # node 102 restarts and forgets everything
    with caplog.at_level(logging.WARNING):
        assert set(run(2).values()) == {DELTA}
    assert [(r.round, r.node_id) for r in strategy.rejections] == [(2, 102)]
    assert "holds none" in strategy.rejections[0].reason
    assert run(3) == {101: DELTA, 102: FULL, 103: DELTA}
    assert run(4) == {101: DELTA, 102: DELTA, 103: DELTA}


def test_a_node_that_missed_rounds_catches_up_with_a_chain_of_deltas() -> None:
    app, ctx = make_client(), contexts(NODES)
    big = {"w": torch.randn(200, 100, generator=torch.Generator().manual_seed(3))}
    strategy = CompressedStrategy(FedAvg(), uplink="identity", downlink="topk(ratio=0.01) | quantize(bits=8) | zstd")
    arrays = tensors_to_arrays(big)
    payloads: dict[int, Downlink] = {}
    for server_round, sampled in enumerate([NODES, [101, 102], [101, 102], NODES], start=1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(sampled)))
        payloads = {m.metadata.dst_node_id: Downlink.from_record(m.content[PAYLOAD_KEY]) for m in messages}
        new, _ = strategy.aggregate_train(server_round, [app(m, ctx[m.metadata.dst_node_id]) for m in messages])
        assert new is not None
        arrays = new
    late = payloads[103]
    assert late.kind == DELTA and late.base == 1 and late.version == 4 and len(late.blobs) == 3
    assert strategy.rejections == []
    held = arrays_to_tensors(ctx[103].state[STATE_REFERENCE])
    assert strategy.downlink_state.reference is not None  # noqa: SLF001
    assert torch.equal(held["w"], strategy.downlink_state.reference["w"])  # noqa: SLF001


class FailingCodec:
    """A catch-up codec whose eigensolver does not converge."""

    def encode(self, update: object) -> bytes:
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    def encode_rebuilt(self, update: object) -> tuple[bytes, None]:
        return self.encode(update), None


def late_catch_up(
    catchup_memory_bytes: int, failing: bool = False
) -> tuple[Downlink, CompressedStrategy, dict[int, Context]]:
    """Node 103 misses rounds 2-3 of a low-rank downlink; its round-4 payload, the strategy, the nodes."""
    app, ctx = make_client(), contexts(NODES)
    big = {"w": torch.randn(200, 100, generator=torch.Generator().manual_seed(3))}
    strategy = CompressedStrategy(
        FedAvg(),
        uplink="identity",
        downlink="svd(rank=2) | quantize(bits=8) | zstd",
        catchup_memory_bytes=catchup_memory_bytes,
    )
    arrays = tensors_to_arrays(big)
    payloads: dict[int, Downlink] = {}
    for server_round, sampled in enumerate([NODES, [101, 102], [101, 102], NODES], start=1):
        if failing and server_round == 4:
            strategy.downlink_state.node_delta_codec = FailingCodec()  # type: ignore[assignment]
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(sampled)))
        payloads = {m.metadata.dst_node_id: Downlink.from_record(m.content[PAYLOAD_KEY]) for m in messages}
        new, _ = strategy.aggregate_train(server_round, [app(m, ctx[m.metadata.dst_node_id]) for m in messages])
        assert new is not None
        arrays = new
    assert strategy.rejections == []
    return payloads[103], strategy, ctx


def test_a_catch_up_that_cannot_be_encoded_sends_the_full_model_and_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    late, strategy, ctx = late_catch_up(10**7, failing=True)
    assert late.kind == FULL
    assert [(g.round, g.node_id) for g in strategy.guard_events] == [(4, 103)]
    assert "LinAlgError" in strategy.guard_events[0].reason and "full model" in caplog.text
    held = arrays_to_tensors(ctx[103].state[STATE_REFERENCE])
    assert strategy.downlink_state.reference is not None
    assert torch.equal(held["w"], strategy.downlink_state.reference["w"])


def test_with_catch_up_memory_a_late_node_gets_a_low_rank_catch_up_and_the_server_knows_its_model() -> None:
    late, strategy, ctx = late_catch_up(10**7)
    exact, _, _ = late_catch_up(0)  # without memory: the exact chain of steps (cheaper here than int8)
    assert late.kind == exact.kind == DELTA and late.base == exact.base == 1
    assert len(late.blobs) == 1 and len(exact.blobs) == 3
    assert sum(map(len, late.blobs)) * 2 < sum(map(len, exact.blobs))
    assert strategy.catchup_delta.spec == strategy.downlink.spec
    held = arrays_to_tensors(ctx[103].state[STATE_REFERENCE])
    version, server_copy = strategy.downlink_state._held[103]  # noqa: SLF001 - the invariant under test
    assert version == 4 and torch.equal(held["w"], server_copy["w"])


def test_catch_up_memory_changes_nothing_when_every_node_takes_part_in_every_round() -> None:
    sent: list[list[bytes]] = []
    for memory in (0, 10**7):
        app, ctx = make_client(), contexts(NODES)
        strategy = CompressedStrategy(
            FedAvg(), uplink="identity", downlink="svd(rank=2) | quantize(bits=8) | zstd", catchup_memory_bytes=memory
        )
        arrays, blobs = tensors_to_arrays(global_model()), []
        for server_round in range(1, 5):
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(NODES)))
            blobs += [b for m in messages for b in Downlink.from_record(m.content[PAYLOAD_KEY]).blobs]
            new, _ = strategy.aggregate_train(server_round, [app(m, ctx[m.metadata.dst_node_id]) for m in messages])
            assert new is not None
            arrays = new
        assert strategy.downlink_state._held == {}  # noqa: SLF001 - nobody needed a catch-up of its own
        sent.append(blobs)
    assert sent[0] == sent[1]


def test_traffic_records_match_message_sizes() -> None:
    app, ctx = make_client(), contexts(NODES)
    strategy = CompressedStrategy(FedAvg(), uplink="fp16", downlink="identity")
    messages = list(strategy.configure_train(1, tensors_to_arrays(global_model()), ConfigRecord(), FakeGrid(NODES)))
    down_sizes = {m.metadata.dst_node_id: wire_bytes(m) for m in messages}
    replies = [app(m, ctx[m.metadata.dst_node_id]) for m in messages]
    up_sizes = {r.metadata.src_node_id: wire_bytes(r) for r in replies}
    strategy.aggregate_train(1, replies)
    for t in [t for t in strategy.traffic if t.message_type == "train"]:
        assert t.bytes == (down_sizes if t.direction == DOWN else up_sizes)[t.node_id]
        assert t.payload_bytes > 0 and t.payload_bytes < t.bytes
    ups = [t for t in strategy.traffic if t.message_type == "train" and t.direction == UP]
    assert all(t.bytes < 0.75 * t.fp32_bytes for t in ups)  # fp16 halves the arrays


def test_bad_codec_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="uplink"):
        CompressedStrategy(FedAvg(), uplink="nosuchstage", downlink="identity")
    with pytest.raises(ValueError, match="catchup codec must be lossless"):
        CompressedStrategy(FedAvg(), catchup="quantize(bits=8)")
    with pytest.raises(TypeError):
        CompressedStrategy("fedavg")  # type: ignore[arg-type]


def test_start_from_zero_sends_the_first_model_through_the_downlink_codec() -> None:
    app, ctx = make_client(), contexts(NODES)
    codec = "quantize(bits=8) | zstd"
    lossless_start = CompressedStrategy(FedAvg(), uplink="identity", downlink=codec)
    zero_start = CompressedStrategy(FedAvg(), uplink="identity", downlink=codec, initial="zeros")
    arrays = tensors_to_arrays(global_model())
    full_first = list(lossless_start.configure_train(1, arrays, ConfigRecord(), FakeGrid(NODES)))
    first = list(zero_start.configure_train(1, arrays, ConfigRecord(), FakeGrid(NODES)))
    payloads = [Downlink.from_record(m.content[PAYLOAD_KEY]) for m in first]
    assert all(p.kind == DELTA and p.base == 0 and p.version == 1 for p in payloads)
    assert Downlink.from_record(full_first[0].content[PAYLOAD_KEY]).kind == FULL
    assert sum(t.payload_bytes for t in zero_start.traffic) < 0.4 * sum(t.payload_bytes for t in lossless_start.traffic)

    replies = [app(m, ctx[m.metadata.dst_node_id]) for m in first]
    assert not any(r.has_error() for r in replies)
    arrays, _ = zero_start.aggregate_train(1, replies)
    assert arrays is not None
    reference = zero_start.downlink_state.reference  # noqa: SLF001
    assert reference is not None
    for node_id in NODES:  # nodes and server agree bit for bit on the lossy first model
        held = arrays_to_tensors(ctx[node_id].state[STATE_REFERENCE])
        assert all(torch.equal(held[k], reference[k]) for k in held)
    assert any(not torch.equal(reference[k], global_model()[k]) for k in reference)  # it was lossy

    ctx[102] = contexts([102])[102]  # a node that lost its state is not assumed to hold zeros
    second = {
        m.metadata.dst_node_id: Downlink.from_record(m.content[PAYLOAD_KEY])
        for m in zero_start.configure_train(2, arrays, ConfigRecord(), FakeGrid(NODES))
    }
    assert {n: p.kind for n, p in second.items()} == {101: DELTA, 102: DELTA, 103: DELTA}
    assert second[102].base == 1  # the server believes it holds version 1; the node will say otherwise


def test_a_blob_that_decodes_far_larger_than_the_model_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    app, ctx = make_client(), contexts(NODES)
    strategy = CompressedStrategy(FedAvg(), uplink="zstd", downlink="identity")
    messages = list(strategy.configure_train(1, tensors_to_arrays(global_model()), ConfigRecord(), FakeGrid(NODES)))
    replies = [app(m, ctx[m.metadata.dst_node_id]) for m in messages]
    huge = {**global_model(), "fc.weight": torch.zeros(3000, 1000)}  # 3M zeros, a few kB after zstd
    blob = parse("zstd").encode(huge)
    assert len(blob) < 100_000
    replies[0].content[PAYLOAD_KEY] = edit_payload(replies[0].content[PAYLOAD_KEY], blob=blob)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        got, _ = strategy.aggregate_train(1, replies)
    assert got is not None
    assert len(strategy.rejections) == 1 and "over the limit" in strategy.rejections[0].reason


class OverflowingFedAvg(FedAvg):
    """An inner strategy whose arithmetic overflows (as a far too large server step would)."""

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        arrays, metrics = super().aggregate_train(server_round, replies)
        assert arrays is not None
        return tensors_to_arrays({k: v * float("inf") for k, v in arrays_to_tensors(arrays).items()}), metrics


def test_a_non_finite_aggregate_is_refused_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    app, ctx = make_client(), contexts(NODES)
    weights = global_model()
    strategy = CompressedStrategy(OverflowingFedAvg(), uplink="identity", downlink="identity")
    messages = strategy.configure_train(1, tensors_to_arrays(weights), ConfigRecord(), FakeGrid(NODES))
    with caplog.at_level(logging.ERROR):
        got, _ = strategy.aggregate_train(1, [app(m, ctx[m.metadata.dst_node_id]) for m in messages])
    assert got is not None
    assert all(torch.equal(arrays_to_tensors(got)[k], weights[k]) for k in weights)
    assert len(strategy.guard_events) == 1 and "NaN or infinite" in strategy.guard_events[0].reason
    assert any("kept the round's starting model" in r.getMessage() for r in caplog.records)
