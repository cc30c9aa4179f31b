"""End to end: fedsqueeze's ServerApp and ClientApp through Flower's simulation engine (Ray)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest

from fedsqueeze.simulation.run_cell import run_cell


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # Flower's simulation engine (Ray)
def test_simulation_learns_and_its_byte_totals_add_up(tmp_path: Path, mnist_path: Path) -> None:
    overrides = {
        "num-server-rounds": 2,
        "max-samples-per-client": 300,
        "data-dir": str(mnist_path),
        "results-dir": str(tmp_path / "results"),
        "min-train-nodes": 3,
        "local-epochs": 2,
        "uplink-codec": "topk(ratio=0.1) | quantize(bits=8) | zstd",
        "downlink-codec": "quantize(bits=8) | zstd",
        "initial-model": "seeded",
    }
    # fedsqueeze's own ServerApp and ClientApp (with the compression mod), seeing these keys
    run_cell(overrides, num_supernodes=3)

    results = tmp_path / "results"
    rounds = read_csv(results / "rounds.csv")
    messages = read_csv(results / "messages.csv")
    summary = json.loads((results / "summary.json").read_text())

    assert [int(r["round"]) for r in rounds] == [1, 2]
    assert float(rounds[-1]["accuracy"]) > 0.2
    assert summary["final_accuracy"] == pytest.approx(float(rounds[-1]["accuracy"]))
    assert summary["num_nodes"] == 3 and summary["rejected"] == []

    # Every train message both ways, every round: 2 rounds x 3 nodes x 2 directions, and in
    # round 1 the one-time query for each node's stable key, both ways (no model in it)
    train = [m for m in messages if m["message_type"] == "train"]
    hello = [m for m in messages if m["message_type"] != "train"]
    assert len(train) == 12 and len(hello) == 6
    assert {(m["round"], m["kind"], m["fp32_bytes"]) for m in hello} == {("1", "hello", "0")}
    sums: dict[tuple[int, str], dict[str, int]] = defaultdict(lambda: {"bytes": 0, "fp32_bytes": 0})
    for m in messages:
        sums[(int(m["round"]), m["direction"])]["bytes"] += int(m["bytes"])
        sums[(int(m["round"]), m["direction"])]["fp32_bytes"] += int(m["fp32_bytes"])
    for m in train:
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

    # Only deltas, the first from the model each node built from the seed (an all-zero delta:
    # no first broadcast), the second against the reference each node kept in its context.state
    kinds = {(int(m["round"]), m["direction"]): set() for m in train}
    for m in train:
        kinds[(int(m["round"]), m["direction"])].add(m["kind"])
    first_down = [m for m in train if m["round"] == "1" and m["direction"] == "down"]
    assert all(int(m["payload_bytes"]) * 100 < int(m["fp32_bytes"]) for m in first_down)
    assert kinds[(1, "down")] == kinds[(2, "down")] == {"delta"}
    assert kinds[(1, "up")] == kinds[(2, "up")] == {"delta"}
    assert totals["uplink_bytes"] * 5 < totals["uplink_fp32_bytes"]
