"""End to end: fedsqueeze's ServerApp and ClientApp through Flower's simulation engine (Ray)."""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsqueeze.client import app as fedsqueeze_client
from fedsqueeze.client import compression_mod
from fedsqueeze.server import app as fedsqueeze_server

#: Run-config overrides; ``run_simulation`` passes an empty run config, so the wrapper apps
#: below merge these in (the test sets them before the run; Ray ships the apps by value).
OVERRIDES: dict[str, Any] = {}

client_app = ClientApp(mods=[compression_mod])


def _with_overrides(context: Context) -> Context:
    """The same context (its state included) with the run config overrides; Flower forbids editing it."""
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config={**context.run_config, **OVERRIDES},
    )


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return fedsqueeze_client.train(msg, _with_overrides(context))


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    fedsqueeze_server.main(grid, _with_overrides(context))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_simulation_learns_and_its_byte_totals_add_up(tmp_path: Path, mnist_path: Path) -> None:
    import ray.cloudpickle
    from flwr.simulation import run_simulation

    OVERRIDES.update(
        {
            "num-server-rounds": 2,
            "max-samples-per-client": 300,
            "data-dir": str(mnist_path),
            "results-dir": str(tmp_path / "results"),
            "min-train-nodes": 3,
            "local-epochs": 2,
            "uplink-codec": "topk(ratio=0.1) | quantize(bits=8) | zstd",
            "downlink-codec": "quantize(bits=8) | zstd",
            "start-from-zero": True,
        }
    )
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=3,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
        )
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    results = tmp_path / "results"
    rounds = read_csv(results / "rounds.csv")
    messages = read_csv(results / "messages.csv")
    summary = json.loads((results / "summary.json").read_text())

    assert [int(r["round"]) for r in rounds] == [1, 2]
    assert float(rounds[-1]["accuracy"]) > 0.2
    assert summary["final_accuracy"] == pytest.approx(float(rounds[-1]["accuracy"]))
    assert summary["num_nodes"] == 3 and summary["rejected"] == []

    # Every train message both ways, every round: 2 rounds x 3 nodes x 2 directions
    assert len(messages) == 12
    sums: dict[tuple[int, str], dict[str, int]] = defaultdict(lambda: {"bytes": 0, "fp32_bytes": 0})
    for m in messages:
        sums[(int(m["round"]), m["direction"])]["bytes"] += int(m["bytes"])
        sums[(int(m["round"]), m["direction"])]["fp32_bytes"] += int(m["fp32_bytes"])
        assert 0 < int(m["payload_bytes"]) < int(m["bytes"])
    cumulative = 0
    for r in rounds:
        n = int(r["round"])
        assert int(r["uplink_bytes"]) == sums[(n, "up")]["bytes"]
        assert int(r["downlink_bytes"]) == sums[(n, "down")]["bytes"]
        assert int(r["uplink_fp32_bytes"]) == sums[(n, "up")]["fp32_bytes"]
        assert int(r["downlink_fp32_bytes"]) == sums[(n, "down")]["fp32_bytes"]
        cumulative += int(r["uplink_bytes"]) + int(r["downlink_bytes"])
        assert int(r["cumulative_bytes"]) == cumulative
    totals = summary["totals"]
    assert totals["uplink_bytes"] == sum(int(m["bytes"]) for m in messages if m["direction"] == "up")
    assert totals["downlink_bytes"] == sum(int(m["bytes"]) for m in messages if m["direction"] == "down")
    assert totals["total_bytes"] == cumulative
    assert totals["total_fp32_bytes"] == sum(int(m["fp32_bytes"]) for m in messages)
    assert sum(v["uplink_bytes"] + v["downlink_bytes"] for v in summary["per_node"].values()) == cumulative

    # Only deltas, the first from the all-zero model, the second against the reference that
    # each node kept in its context.state from round 1
    kinds = {(int(m["round"]), m["direction"]): set() for m in messages}
    for m in messages:
        kinds[(int(m["round"]), m["direction"])].add(m["kind"])
    assert kinds[(1, "down")] == kinds[(2, "down")] == {"delta"}
    assert kinds[(1, "up")] == kinds[(2, "up")] == {"delta"}
    assert totals["uplink_bytes"] * 5 < totals["uplink_fp32_bytes"]
