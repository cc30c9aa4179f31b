"""DownlinkState: what each node is sent, and that memory stays bounded in nodes and rounds."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codecs import decode, parse
from fedsqueeze.protocol import DELTA, FULL, add_tensors
from fedsqueeze.server.downlink import DownlinkState


def model(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 64, generator=g) * 0.01 + step * 0.001, "b": torch.randn(64, generator=g)}


def state(max_snapshots: int = 32) -> DownlinkState:
    return DownlinkState(
        parse("quantize(bits=8) | zstd", seed=0), parse("zstd"), initial=model(0), max_snapshots=max_snapshots
    )


def apply(held: dict[str, torch.Tensor], blobs: list[bytes]) -> dict[str, torch.Tensor]:
    for blob in blobs:
        held = add_tensors(held, decode(blob))
    return held


def test_an_up_to_date_node_gets_one_step_and_holds_the_servers_reference_bit_for_bit() -> None:
    s = state()
    held = model(0)
    for version in range(1, 6):
        s.advance(model(version))
        plan = s.plan(7)
        assert plan.kind == DELTA and plan.base == version - 1 and len(plan.blobs) == 1
        held = apply(held, plan.blobs)
        s.acknowledge(7, version)
        assert s.reference is not None and all(torch.equal(held[k], s.reference[k]) for k in held)


def test_a_stale_node_gets_one_catch_up_delta_far_smaller_than_the_model() -> None:
    s = state()
    for version in range(1, 13):
        s.advance(model(version))
    full = s.plan(999_999)  # a node never seen holds version 0 (the shared first model)
    assert full.kind == DELTA and full.base == 0 and len(full.blobs) == 1  # one delta, not 12 steps
    s.forget(5)
    assert s.plan(5).kind == FULL
    s.acknowledge(8, 3)
    plan = s.plan(8)
    assert plan.kind == DELTA and plan.base == 3 and len(plan.blobs) == 1
    model_bytes = sum(4 * t.numel() for t in model(0).values())
    assert plan.size < model_bytes / 3
    # The node ends near the server's reference: one quantization error of the 9-round delta
    held = apply(model(0), full.blobs)
    assert s.reference is not None
    err = max(float((held[k] - s.reference[k]).abs().max()) for k in held)
    span = max(float((s.reference[k] - model(0)[k]).abs().max()) for k in held)
    assert err <= span / 100


def test_memory_is_bounded_whatever_the_rounds() -> None:
    s = state(max_snapshots=4)
    for version in range(1, 40):
        s.advance(model(version))
    assert len(s._snapshots) == 4  # noqa: SLF001 - the bound under test
    fp32 = sum(4 * t.numel() for t in model(0).values())
    assert sum(len(b) for b in s._steps.values()) <= fp32  # noqa: SLF001
    s.acknowledge(1, 2)  # older than every snapshot, and the chain is gone: full
    assert s.plan(1).kind == FULL
    assert s.plan(2).kind == DELTA  # a node never seen holds the first model, which is always kept


def test_without_snapshots_a_stale_node_gets_the_exact_chain() -> None:
    s = DownlinkState(parse("topk(ratio=0.1) | zstd"), parse("zstd"), initial=None, max_snapshots=0)
    for version in range(1, 5):
        s.advance(model(version))
    s.acknowledge(3, 1)
    plan = s.plan(3)
    assert plan.kind == DELTA and len(plan.blobs) == 3  # the exact chain of steps


def test_a_sparse_downlink_catches_stale_nodes_up_through_a_dense_delta() -> None:
    s = DownlinkState(
        parse("topk(ratio=0.1) | quantize(bits=8) | zstd"),
        parse("zstd"),
        initial=model(0),
        delta_codec=parse("quantize(bits=8) | zstd"),
    )
    for version in range(1, 16):
        s.advance(model(version))
    s.acknowledge(4, 14)
    assert len(s.plan(4).blobs) == 1 and s.plan(4).base == 14  # one step behind: the sparse step itself
    s.acknowledge(5, 2)
    plan = s.plan(5)
    assert plan.kind == DELTA and plan.base == 2 and len(plan.blobs) == 1  # one dense catch-up, not 13 steps
    assert decode(plan.blobs[0])  # an int8 delta of every entry
    assert plan.size < sum(4 * t.numel() for t in model(0).values()) / 3


def test_the_strategy_picks_a_dense_catch_up_for_a_sparse_downlink() -> None:
    from flwr.serverapp.strategy import FedAvg

    from fedsqueeze.server.strategy import CompressedStrategy

    sparse = CompressedStrategy(FedAvg(), downlink="topk(ratio=0.1) | quantize(bits=8) | zstd")
    assert sparse.catchup_delta.spec == parse("quantize(bits=8) | zstd").spec
    dense = CompressedStrategy(FedAvg(), downlink="quantize(bits=4) | zstd")
    assert dense.catchup_delta.spec == dense.downlink.spec
    # with node memory too: a sparse catch-up of many missed steps loses what the memory would correct too late
    remembered = CompressedStrategy(
        FedAvg(), downlink="budget(bpp=0.2) | topk | quantize | zstd", catchup_memory_bytes=2**26
    )
    assert remembered.catchup_delta.spec == parse("quantize(bits=8) | zstd").spec
    low_rank = CompressedStrategy(FedAvg(), downlink=LOW_RANK, catchup_memory_bytes=2**26)
    assert low_rank.catchup_delta.spec == low_rank.downlink.spec


# ---------------------------------------------------------------- per-node catch-up error feedback
LOW_RANK = "svd(rank=2) | quantize(bits=8) | zstd"


def drifting(step: int) -> dict[str, torch.Tensor]:
    """A model moving the same low-rank way every round (the codec's rank: only its rounding is lost)."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(64, 64, generator=g)
    direction = torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g)
    return {"w": start + 0.01 * step * direction}


def tracked_state(memory_bytes: int) -> DownlinkState:
    codec = parse(LOW_RANK, seed=0)
    return DownlinkState(codec, parse("zstd"), initial=drifting(0), catchup_memory_bytes=memory_bytes)


def distance(held: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None) -> float:
    assert reference is not None
    return max(float((held[k] - reference[k]).abs().max()) for k in held)


def visit(s: DownlinkState, node: int, held: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Send ``node`` its payload, apply it as the node does, and acknowledge it."""
    plan = s.plan(node)
    assert plan.kind == DELTA
    held = apply(held, plan.blobs)
    s.acknowledge(node, plan.version)
    return held


def test_with_node_memory_a_lossy_catch_up_error_is_corrected_at_the_next_visit() -> None:
    tracked, untracked = tracked_state(10**8), tracked_state(0)
    untracked.delta_codec = tracked.codec  # the same lossy catch-ups, without memory
    errors: dict[str, list[float]] = {"tracked": [], "untracked": []}
    for name, s in (("tracked", tracked), ("untracked", untracked)):
        held = drifting(0)
        for version in range(1, 31):
            s.advance(drifting(version))
            if version % 5 == 0:  # the node comes back every 5 rounds
                held = visit(s, 4, held)
                errors[name].append(distance(held, s.reference))
    # Without memory each catch-up adds an error that is never sent again; with it the error stays bounded.
    assert errors["tracked"][-1] < errors["untracked"][-1] / 2
    assert max(errors["tracked"][1:]) <= 2 * errors["tracked"][0]


def test_node_memory_tracks_the_nodes_model_bit_for_bit_and_a_one_step_node_gets_the_shared_step() -> None:
    s = tracked_state(10**8)
    held = drifting(0)
    for version in range(1, 4):
        s.advance(drifting(version))
    held = visit(s, 9, held)  # three versions behind: a catch-up of its own, tracked
    version, server_copy = s._held[9]  # noqa: SLF001 - the state under test
    assert version == 3 and all(torch.equal(held[k], server_copy[k]) for k in held)
    s.advance(drifting(4))
    plan = s.plan(9)  # one step behind but off the reference: its own catch-up, not the shared step
    assert plan.blobs != [s._steps[4]]  # noqa: SLF001
    s.advance(drifting(5))
    s.acknowledge(11, 4)  # a node that holds version 4 exactly gets the shared step
    assert s.plan(11).blobs == [s._steps[5]]  # noqa: SLF001


def test_node_memory_is_bounded_and_nodes_beyond_it_get_the_dense_catch_up() -> None:
    each = sum(4 * t.numel() for t in drifting(0).values())
    s = tracked_state(3 * each)
    s.delta_codec = parse("quantize(bits=8) | zstd")  # the dense catch-ups of nodes beyond memory
    for version in range(1, 4):
        s.advance(drifting(version))
    plans = {}
    for node in range(5):
        plans[node] = s.plan(node)
        s.acknowledge(node, s.version)
    assert sorted(s._held) == [0, 1, 2]  # noqa: SLF001 - the bound under test
    assert len(plans[0].blobs) == 1  # a catch-up of its own
    assert plans[4].blobs == [s._steps[v] for v in (1, 2, 3)]  # noqa: SLF001 - as without memory (cheapest: the chain)
    s.advance(drifting(4))
    assert s.plan(0).blobs != [s._steps[4]]  # noqa: SLF001 - a tracked node: its own catch-up
    assert s.plan(4).blobs == [s._steps[4]]  # noqa: SLF001 - it holds the reference exactly


def test_with_node_memory_a_node_whose_payload_was_not_acknowledged_gets_the_chain() -> None:
    """It may hold the unacknowledged version or the one before (a reply lost, or rejected): the chain serves both."""
    s = tracked_state(10**8)
    s.advance(drifting(1))
    assert s.plan(5).blobs == [s._steps[1]]  # noqa: SLF001 - sent, and its reply never accepted
    for version in (2, 3):
        s.advance(drifting(version))
    plan = s.plan(5)
    assert plan.base == 0 and plan.blobs == [s._steps[v] for v in (1, 2, 3)]  # noqa: SLF001
    held = apply(apply(drifting(0), [s._steps[1]]), plan.blobs[1:])  # noqa: SLF001 - it held version 1
    assert s.reference is not None and all(torch.equal(held[k], s.reference[k]) for k in held)
    s.acknowledge(5, 3)
    for version in (4, 5):
        s.advance(drifting(version))
    assert len(s.plan(5).blobs) == 1  # acknowledged again: a catch-up of its own


def test_lag_is_how_far_the_reference_trails_the_servers_model() -> None:
    exact = DownlinkState(parse("zstd"), parse("zstd"), initial=model(0))
    sparse = DownlinkState(parse("topk(ratio=0.01) | zstd", seed=0), parse("zstd"), initial=model(0))
    lags = []
    for version in range(1, 4):
        exact.advance(model(version))
        sparse.advance(model(version))
        assert sparse.reference is not None
        gap = sum(float((model(version)[k] - sparse.reference[k]).square().sum()) for k in ("w", "b"))
        norm = sum(float(model(version)[k].square().sum()) for k in ("w", "b"))
        assert abs(sparse.lag - (gap / norm) ** 0.5) < 1e-6
        lags.append(sparse.lag)
        assert exact.lag == 0.0  # a lossless downlink sends the model itself
    start = sum(float((model(1)[k] - model(0)[k]).square().sum()) for k in ("w", "b")) ** 0.5
    start /= sum(float(model(1)[k].square().sum()) for k in ("w", "b")) ** 0.5
    assert 0.9 * start < lags[0] < start  # a step of 1 % of the entries leaves most of the way behind


def near_float32_limits(step: int) -> dict[str, torch.Tensor]:
    """A model whose weights sit near float32's largest, in both signs: a delta of it spans more than float32."""
    return {"w": torch.tensor([-3e38, 3e38] * 20) * (1 - 0.01 * step)}


def test_a_downlink_step_that_rebuilds_beyond_float32_sends_the_model_whole() -> None:
    # found by the encode-side fuzz run: a finite delta whose quantized reconstruction overflows
    # float32 (a range wider than float32's) encoded to a blob that decodes to infinity; the
    # server's reference became infinite, and so did every node's model
    s = DownlinkState(parse("quantize(bits=8) | zstd", seed=0), parse("zstd"), initial={"w": torch.zeros(40)})
    s.advance(near_float32_limits(0))
    assert s.reference is not None and all(bool(torch.isfinite(t).all()) for t in s.reference.values())
    assert torch.equal(s.reference["w"], near_float32_limits(0)["w"]) and s.lag == 0.0
    plan = s.plan(3)
    assert plan.kind == FULL  # no step before this version: the node gets the model itself


@pytest.mark.parametrize("memory_bytes", [0, 10**6], ids=["shared catch-up", "node memory"])
def test_a_catch_up_that_rebuilds_beyond_float32_is_not_sent(memory_bytes: int) -> None:
    # the same overflow in a catch-up delta: each step spans half of float32's range, the catch-up
    # from version 0 all of it; the node gets the chain of steps instead
    g = torch.Generator().manual_seed(0)
    half = {"w": torch.cat([torch.tensor([-1.5e38, 1.5e38]), (torch.rand(4000, generator=g) - 0.5) * 3e38])}
    s = DownlinkState(
        parse("quantize(bits=8) | zstd", seed=0),
        parse("zstd"),
        initial={"w": torch.zeros(4002)},
        catchup_memory_bytes=memory_bytes,
    )
    s.advance(half)
    s.advance({"w": 2 * half["w"]})
    plan = s.plan(5)  # a node never seen holds version 0
    assert plan.kind == DELTA and plan.base == 0 and len(plan.blobs) == 2  # the chain, not one catch-up
    held = apply({"w": torch.zeros(4002)}, plan.blobs)
    assert s.reference is not None and torch.equal(held["w"], s.reference["w"])
    assert bool(torch.isfinite(held["w"]).all())
