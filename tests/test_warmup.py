"""Sparsity warm-up: the schedule, the round's spec on both sides, and error feedback across a spec change."""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from test_mod import PlusOneApp, context, full, train_message, weights
from test_strategy import NODES, FakeGrid, contexts, global_model, make_client

from fedsqueeze.client import compression_mod
from fedsqueeze.client.mod import STATE_FEEDBACK, STATE_REFERENCE
from fedsqueeze.client.state_record import state_tensors
from fedsqueeze.codecs import blob_spec, decode, parse
from fedsqueeze.config import RunConfig
from fedsqueeze.protocol import DELTA, PAYLOAD_KEY, Downlink, Uplink, arrays_to_tensors, edit_payload, tensors_to_arrays
from fedsqueeze.server.app import make_compressed_strategy
from fedsqueeze.server.strategy import CompressedStrategy
from fedsqueeze.server.warmup import warmup_codec, warmup_ratio

UPLINK = "topk(ratio=0.01) | quantize(bits=8) | zstd"


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


# ---------------------------------------------------------------------- schedule
def test_the_ratio_grows_exponentially_to_the_configured_one_at_round_w_plus_1() -> None:
    ratios = [warmup_ratio(0.01, r, 5) for r in range(1, 9)]
    # ratio ** (r / 6): 0.01 ** (1/6) = 0.464, then 0.215, 0.1, 0.0464, 0.0215, then 0.01 for good
    assert ratios == [0.464, 0.215, 0.1, 0.0464, 0.0215, 0.01, 0.01, 0.01]
    assert all(a > b for a, b in zip(ratios[:5], ratios[1:6], strict=True))
    for r in range(1, 6):  # within the rounding to three significant digits of the exact schedule
        assert ratios[r - 1] == pytest.approx(0.01 ** (r / 6), rel=5e-3)


def test_no_warmup_and_rounds_past_it_keep_the_configured_ratio() -> None:
    assert [warmup_ratio(0.05, r, 0) for r in (1, 2, 30)] == [0.05, 0.05, 0.05]
    assert warmup_ratio(1.0, 1, 3) == 1.0
    with pytest.raises(ValueError, match="warm-up rounds must be >= 0"):
        warmup_ratio(0.01, 1, -1)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        warmup_ratio(0.0, 1, 3)


def test_the_warmed_codec_changes_only_the_sparsifiers_ratio() -> None:
    codec = parse(UPLINK)
    first = warmup_codec(codec, 1, 5)
    assert first.spec == "topk(ratio=0.464) | quantize | zstd"
    assert [type(s) for s in first.stages] == [type(s) for s in codec.stages]
    assert warmup_codec(codec, 6, 5) is codec
    assert warmup_codec(codec, 1, 0) is codec
    assert warmup_codec(parse("randomk(ratio=0.01, seed=3) | fp16"), 2, 3).spec == "randomk(ratio=0.1,seed=3) | fp16"


@pytest.mark.parametrize("spec", ["quantize(bits=8) | zstd", "svd(rank=2) | zstd", "budget(bpp=0.5) | topk | zstd"])
def test_pipelines_without_a_warmed_sparsifier_are_unaffected(spec: str) -> None:
    codec = parse(spec)
    assert all(warmup_codec(codec, r, 5) is codec for r in range(1, 8))


def test_the_run_config_key_reaches_the_strategy_and_is_checked() -> None:
    strategy = make_compressed_strategy(RunConfig.from_mapping({"uplink-codec": UPLINK, "uplink-warmup-rounds": 4}))
    assert strategy.uplink_warmup_rounds == 4
    with pytest.raises(ValueError, match="'uplink-warmup-rounds' must be >= 0"):
        RunConfig.from_mapping({"uplink-warmup-rounds": -1})
    with pytest.raises(ValueError, match="uplink_warmup_rounds must be >= 0"):
        CompressedStrategy(FedAvg(), uplink_warmup_rounds=-2)


# ---------------------------------------------------------------------- the round's spec on both sides
def test_nodes_encode_with_the_rounds_spec_and_the_server_accepts_it() -> None:
    app, ctx = make_client(), contexts(NODES)
    strategy = CompressedStrategy(FedAvg(), uplink=UPLINK, downlink="quantize(bits=8) | zstd", uplink_warmup_rounds=3)
    arrays = tensors_to_arrays(global_model())
    seen = []
    for server_round in range(1, 6):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(NODES)))
        expected = warmup_codec(parse(UPLINK), server_round, 3).spec
        assert {Downlink.from_record(m.content.config_records[PAYLOAD_KEY]).uplink for m in messages} == {expected}
        replies = [app(m, ctx[m.metadata.dst_node_id]) for m in messages]
        specs = {blob_spec(Uplink.from_record(r.content.config_records[PAYLOAD_KEY]).blob) for r in replies}
        assert specs == {expected}
        seen.append(expected)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        assert new_arrays is not None
        arrays = new_arrays
        reference = strategy.downlink_state.reference
        assert reference is not None
        for node_id in NODES:  # the references stay bit-identical through the spec changes
            held = arrays_to_tensors(ctx[node_id].state[STATE_REFERENCE])
            assert all(torch.equal(held[k], reference[k]) for k in held)
    assert strategy.rejections == []
    assert seen[0] != seen[1] != seen[2] and seen[3] == seen[4] == parse(UPLINK).spec


def test_a_reply_encoded_with_another_spec_than_the_rounds_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    app, ctx = make_client(), contexts(NODES)
    strategy = CompressedStrategy(FedAvg(), uplink=UPLINK, downlink="quantize(bits=8) | zstd", uplink_warmup_rounds=3)
    messages = list(strategy.configure_train(1, tensors_to_arrays(global_model()), ConfigRecord(), FakeGrid(NODES)))
    stale = messages[0]  # this node is told the configured spec, as a node ignoring the warm-up would use
    stale.content[PAYLOAD_KEY] = edit_payload(stale.content.config_records[PAYLOAD_KEY], uplink=parse(UPLINK).spec)
    replies = [app(m, ctx[m.metadata.dst_node_id]) for m in messages]
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, replies)
    assert [r.node_id for r in strategy.rejections] == [stale.metadata.dst_node_id]
    reason = strategy.rejections[0].reason
    assert "expected the configured 'topk(ratio=0.316) | quantize | zstd' of this round" in reason
    assert "dropped the reply" in caplog.text


# ---------------------------------------------------------------------- error feedback across a spec change
def _delta_round(version: int, uplink: str, model: dict[str, torch.Tensor]) -> Downlink:
    zeros = parse("identity").encode({k: torch.zeros_like(v) for k, v in model.items()})
    return Downlink(DELTA, version, version - 1, [zeros], uplink)


def test_error_feedback_is_conserved_when_the_warmed_ratio_changes() -> None:
    """What the node sent over three rounds plus its residual is exactly the sum of its updates (+1 each round)."""
    model, ctx = weights(), context()
    client = PlusOneApp(mods=[compression_mod])
    specs = ["topk(ratio=0.5)", "topk(ratio=0.25)", "topk(ratio=0.1)"]
    sent = {k: torch.zeros_like(v) for k, v in model.items()}
    for version, spec in enumerate(specs, start=1):
        down = full(model, spec) if version == 1 else _delta_round(version, spec, model)
        reply = client.app(_message(down), ctx)
        up = Uplink.from_record(reply.content.config_records[PAYLOAD_KEY])
        assert blob_spec(up.blob) == spec
        for k, v in decode(up.blob).items():
            sent[k] += v
    residual = state_tensors(ctx.state[STATE_FEEDBACK])  # type: ignore[arg-type]
    for k in model:
        assert torch.allclose(sent[k] + residual[f"residual/{k}"], torch.full_like(model[k], 3.0), atol=1e-5)
        assert float(residual[f"residual/{k}"].abs().sum()) > 0  # something was held back, and kept


def test_a_pipeline_of_other_stages_starts_from_no_residual() -> None:
    model, ctx = weights(), context()
    client = PlusOneApp(mods=[compression_mod])
    client.app(_message(full(model, "topk(ratio=0.25)")), ctx)
    assert STATE_FEEDBACK in ctx.state
    reply = client.app(_message(_delta_round(2, "quantize(bits=8)", model)), ctx)
    delta = decode(Uplink.from_record(reply.content.config_records[PAYLOAD_KEY]).blob)
    # no residual of topk was added: the update is +1 everywhere, up to 8-bit rounding
    assert all(torch.allclose(delta[k], torch.ones_like(model[k]), atol=1e-2) for k in model)


def _message(down: Downlink) -> Message:
    return train_message(down)
