"""Faults of a deployment, without one: the SuperLink's error reply for a dead node, and the round timeout."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flwr.app import ConfigRecord, Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from test_strategy import FakeGrid, contexts, global_model, make_client

from fedsqueeze.config import RunConfig
from fedsqueeze.protocol import DELTA, FULL, PAYLOAD_KEY, Downlink, tensors_to_arrays
from fedsqueeze.server.strategy import UP, CompressedStrategy

NODES = [101, 102, 103]
DEAD = 103
SUPERLINK_ID = 1  # the source id of the replies the SuperLink makes for nodes that are gone


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


def _pushed(messages: list[Message]) -> list[Message]:
    """Give the messages ids, as a grid does when it pushes them."""
    for i, msg in enumerate(messages):
        msg.metadata.__dict__["_message_id"] = f"message-{i}"
    return messages


def _superlink_error_for(msg: Message) -> Message:
    """The error reply a SuperLink makes for a node that died: its source is the SuperLink's id."""
    reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = SUPERLINK_ID
    return reply


def _two_rounds_then_third(dead_reply: Callable[[Message], Message]) -> tuple[CompressedStrategy, dict[int, Downlink]]:
    """Round 1: every node replies; round 2: DEAD's reply is ``dead_reply``; return what round 3 sends."""
    app, ctx = make_client(), contexts(NODES)
    strategy = CompressedStrategy(FedAvg(), uplink="quantize(bits=8) | zstd", downlink="quantize(bits=8) | zstd")
    arrays = tensors_to_arrays(global_model())
    for server_round in (1, 2):
        messages = _pushed(list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(NODES))))
        replies = [
            dead_reply(m)
            if m.metadata.dst_node_id == DEAD and server_round == 2
            else app(m, ctx[m.metadata.dst_node_id])
            for m in messages
        ]
        new, _ = strategy.aggregate_train(server_round, replies)
        assert new is not None
        arrays = new
    third = strategy.configure_train(3, arrays, ConfigRecord(), FakeGrid(NODES))
    return strategy, {m.metadata.dst_node_id: Downlink.from_record(m.content[PAYLOAD_KEY]) for m in third}


def test_the_superlinks_error_reply_is_charged_to_the_node_the_message_was_for() -> None:
    strategy, third = _two_rounds_then_third(_superlink_error_for)
    assert [(r.round, r.node_id) for r in strategy.rejections] == [(2, DEAD)]
    up = {t.node_id: t.kind for t in strategy.traffic if t.direction == UP and t.round == 2}
    assert set(up) == set(NODES) and up[DEAD] == "error" and "error" not in (up[101], up[102])
    assert SUPERLINK_ID not in {t.node_id for t in strategy.traffic}
    # The SuperLink's reply says nothing of what the node holds (restarted with its saved state, it still
    # holds version 1): it keeps its version and is sent a delta from there; had it lost it, it would say so.
    assert third[DEAD].kind == DELTA and third[DEAD].base == 1 and third[101].base == 2


@pytest.mark.parametrize("code", [ErrorCode.MOD_FAILED_PRECONDITION, ErrorCode.CLIENT_APP_RAISED_EXCEPTION])
def test_an_error_from_the_node_itself_makes_the_server_send_it_the_full_model(code: int) -> None:
    strategy, third = _two_rounds_then_third(lambda m: Message(Error(code, "fedsqueeze: cannot use it"), reply_to=m))
    assert [(r.round, r.node_id) for r in strategy.rejections] == [(2, DEAD)]
    assert {n: p.kind for n, p in third.items()} == {101: DELTA, 102: DELTA, DEAD: FULL}


def test_a_reply_to_no_known_message_stands_for_its_source() -> None:
    strategy = CompressedStrategy(FedAvg())
    messages = _pushed(
        list(strategy.configure_train(1, tensors_to_arrays(global_model()), ConfigRecord(), FakeGrid(NODES)))
    )
    stray = _superlink_error_for(messages[0])
    stray.metadata.__dict__["_reply_to_message_id"] = "not-sent-this-round"
    assert strategy._recipient(stray) == SUPERLINK_ID
    assert strategy._recipient(_superlink_error_for(messages[1])) == messages[1].metadata.dst_node_id


@pytest.mark.parametrize("bad", [0.0, -5.0])
def test_round_timeout_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="'round-timeout' must be > 0 seconds"):
        RunConfig.from_mapping({"round-timeout": bad})
    assert RunConfig.from_mapping({"round-timeout": 30}).round_timeout == 30.0
