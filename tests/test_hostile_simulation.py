"""A hostile node in a real simulation (issue 9): every bad reply kind is dropped with a reason, the run
completes, and the honest nodes' model is exactly what it is when the hostile node only sends errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedsqueeze.simulation.hostile import HOSTILE_KINDS, hostile_mod
from fedsqueeze.simulation.run_cell import run_cell

KINDS = [k for k in HOSTILE_KINDS if k != "error"]


def run(tmp_path: Path, mnist_path: Path, name: str, kinds: list[str]) -> Path:
    overrides = {
        "num-server-rounds": len(KINDS),
        "max-samples-per-client": 150,
        "min-train-nodes": 4,
        "data-dir": str(mnist_path),
        "results-dir": str(tmp_path / name),
    }
    run_cell(overrides, num_supernodes=4, client_mods=[hostile_mod({3}, kinds)])
    return tmp_path / name


@pytest.mark.slow
def test_each_hostile_reply_is_dropped_and_the_honest_run_is_unchanged(tmp_path: Path, mnist_path: Path) -> None:
    hostile = run(tmp_path, mnist_path, "hostile", KINDS)
    silent = run(tmp_path, mnist_path, "errors", ["error"])
    summary = json.loads((hostile / "summary.json").read_text())
    rejected = summary["rejected"]
    assert [r["round"] for r in rejected] == list(range(1, len(KINDS) + 1))  # one per round, that node's
    assert len({r["node_id"] for r in rejected}) == 1
    with open(hostile / "rounds.csv", newline="") as f:
        rounds = list(csv.DictReader(f))
    with open(silent / "rounds.csv", newline="") as f:
        baseline = list(csv.DictReader(f))
    assert len(rounds) == len(KINDS) and all(math.isfinite(float(r["loss"])) for r in rounds)
    assert [r["accuracy"] for r in rounds] == [r["accuracy"] for r in baseline]
    assert float(rounds[-1]["accuracy"]) > 0.2  # learning (chance is 0.1) from 3 x 150 samples in 9 rounds
