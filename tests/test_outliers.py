"""A reply whose update dwarfs the round's others is dropped; its node then empties its error-feedback residual."""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import ConfigRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from test_strategy import NODES, FakeGrid, _task_identity, contexts, global_model, local_model
from test_strategy import make_client as strategy_client

from fedsqueeze.client.mod import STATE_FEEDBACK
from fedsqueeze.protocol import PAYLOAD_KEY, Downlink, arrays_to_tensors, tensors_to_arrays
from fedsqueeze.server.outliers import outliers, update_norm
from fedsqueeze.server.strategy import CompressedStrategy

__all__ = ["_task_identity"]  # the autouse fixture, used here too


def test_only_norms_over_the_ratio_times_the_median_are_outliers() -> None:
    reasons = outliers([5.0, 6.0, 14.0, 4.8e7], max_ratio=10)
    assert reasons[:3] == [None, None, None]  # 14 is 2.3x the median (10): an honest spread
    assert reasons[3] is not None and "the round's median 10" in reasons[3]
    assert outliers([5.0, 4.8e7], max_ratio=10) == [None, None]  # two replies: no typical size
    assert outliers([5.0, 6.0, 4.8e7], max_ratio=0) == [None, None, None]  # off
    assert outliers([0.0, 0.0, 1.0], max_ratio=10) == [None, None, None]  # median 0: no scale


def test_update_norm_is_over_float_tensors_only() -> None:
    ref = {"w": torch.zeros(2), "steps": torch.tensor(3)}
    assert update_norm({"w": torch.tensor([3.0, 4.0]), "steps": torch.tensor(9)}, ref) == pytest.approx(5.0)


DIVERGED = 103


def make_client(diverged_round: int) -> ClientApp:
    """Nodes as in test_strategy; node 103's training diverges in ``diverged_round`` (a huge, finite step)."""

    def train_step(received: dict[str, torch.Tensor], node_id: int, server_round: int) -> dict[str, torch.Tensor]:
        local = local_model(received, node_id, server_round)
        if node_id == DIVERGED and server_round == diverged_round:
            local = {k: v + 1e6 for k, v in local.items()}
        return local

    return strategy_client(train_step)


def test_a_diverged_update_is_dropped_and_its_node_rejoins_the_next_round(caplog: pytest.LogCaptureFixture) -> None:
    app, ctx = make_client(diverged_round=1), contexts(NODES)
    strategy = CompressedStrategy(FedAvg(), uplink="topk(ratio=0.1) | quantize(bits=8) | zstd", downlink="identity")
    arrays = tensors_to_arrays(global_model())
    feedback: dict[int, list[bool]] = {n: [] for n in NODES}
    for server_round in (1, 2, 3):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(NODES)))
        for m in messages:
            feedback[m.metadata.dst_node_id].append(Downlink.from_record(m.content[PAYLOAD_KEY]).error_feedback)
        replies = [app(m, ctx[m.metadata.dst_node_id]) for m in messages]
        with caplog.at_level(logging.WARNING):
            new, _ = strategy.aggregate_train(server_round, replies)
        assert new is not None
        step = max(float((arrays_to_tensors(new)[k] - arrays_to_tensors(arrays)[k]).abs().max()) for k in new)
        assert step < 1.0, f"round {server_round}: the aggregate moved by {step}"  # the 1e6 step never reaches it
        arrays = new
        if server_round == 2:  # the round without error feedback emptied node 103's residual
            assert STATE_FEEDBACK not in ctx[DIVERGED].state
    assert [(r.round, r.node_id) for r in strategy.rejections] == [(1, DIVERGED)]
    assert "x the round's median" in strategy.rejections[0].reason
    assert any("diverged or hostile update" in r.getMessage() for r in caplog.records)
    assert feedback == {101: [True] * 3, 102: [True] * 3, DIVERGED: [True, False, True]}


def test_without_the_rule_the_diverged_update_reaches_the_aggregate() -> None:
    app, ctx = make_client(diverged_round=1), contexts(NODES)
    strategy = CompressedStrategy(
        FedAvg(), uplink="topk(ratio=0.1) | quantize(bits=8) | zstd", downlink="identity", max_update_norm_ratio=0
    )
    arrays = tensors_to_arrays(global_model())
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(NODES)))
    new, _ = strategy.aggregate_train(1, [app(m, ctx[m.metadata.dst_node_id]) for m in messages])
    assert new is not None and strategy.rejections == []
    assert max(float(t.abs().max()) for t in arrays_to_tensors(new).values()) > 1e5


def test_a_negative_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match="max_update_norm_ratio must be >= 0"):
        CompressedStrategy(FedAvg(), max_update_norm_ratio=-1)
