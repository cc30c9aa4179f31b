"""A real two-cell sweep through Flower's simulation engine: interrupted, resumed, compared."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsqueeze.simulation.grid import Cell, parse_grid
from fedsqueeze.simulation.report import write_report
from fedsqueeze.simulation.sweep import SimulationRunner, cell_finished, run_sweep

#: Columns that measure wall time and legitimately differ between two runs.
TIME_COLUMNS = {"round_seconds", "elapsed_seconds", "client_encode_seconds", "client_train_seconds"}
#: Wire sizes include Flower's random 64-bit run and node ids (varints of varying length), repeated per request.
WIRE_COLUMNS = {
    "uplink_bytes",
    "downlink_bytes",
    "uplink_fp32_bytes",
    "downlink_fp32_bytes",
    "cumulative_uplink_bytes",
    "cumulative_downlink_bytes",
    "cumulative_bytes",
    "cumulative_fp32_bytes",
}


def tiny_grid(data_dir: Path):
    return parse_grid(
        {
            "base": {
                "num-supernodes": 2,
                "num-server-rounds": 2,
                "max-samples-per-client": 150,
                "partitioner": "iid",
                "data-dir": str(data_dir),
                "local-epochs": 1,
            },
            "axes": {"seed": [0]},
            "codecs": [
                {"name": "fp32", "uplink": "identity", "downlink": "identity"},
                {
                    "name": "qsgd",
                    "uplink": "topk(ratio=0.05) | quantize(bits=4, stochastic=true) | zstd",
                    "downlink": "quantize(bits=8) | zstd",
                },
            ],
        },
        name="tiny",
    )


def comparable(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in csv.DictReader(f)]


def assert_same_results(a: list[dict[str, str]], b: list[dict[str, str]]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        # accuracy, loss, codec payload bytes, replies...: exactly equal
        assert {k: v for k, v in ra.items() if k not in WIRE_COLUMNS} == {
            k: v for k, v in rb.items() if k not in WIRE_COLUMNS
        }
        # Wire sizes: equal up to the varint lengths of Flower's random run and node ids, which every
        # push/pull request of a message repeats (wire_bytes): <= 128 bytes per message, 4 a round
        for column in WIRE_COLUMNS:
            assert abs(int(ra[column]) - int(rb[column])) <= 128 * 4 * int(ra["round"]), column


class Interrupt(Exception):
    pass


@pytest.mark.slow  # Flower's simulation engine (Ray)
def test_interrupted_sweep_resumes_to_the_same_results(tmp_path: Path, mnist_path: Path) -> None:
    grid = tiny_grid(mnist_path)
    real = SimulationRunner(timeout=600)

    # uninterrupted reference
    reference = run_sweep(grid, tmp_path / "a", progress=False)

    # interrupted after the first round of the second cell
    def interrupting(cell: Cell, cell_dir: Path, on_round: Callable[[int], None]) -> None:
        def on_round_then_stop(n: int) -> None:
            on_round(n)
            if cell is grid.cells[1] and n > 0:
                raise Interrupt

        real(cell, cell_dir, on_round_then_stop)

    with pytest.raises(Interrupt):
        run_sweep(grid, tmp_path / "b", runner=interrupting, progress=False)
    first, second = (tmp_path / "b" / "cells" / c.id for c in grid.cells)
    assert cell_finished(first) and not cell_finished(second)
    first_mtime = (first / "summary.json").stat().st_mtime_ns

    ran: list[str] = []

    def recording(cell: Cell, cell_dir: Path, on_round: Callable[[int], None]) -> None:
        ran.append(cell.id)
        real(cell, cell_dir, on_round)

    resumed = run_sweep(grid, tmp_path / "b", runner=recording, progress=False)
    assert ran == [grid.cells[1].id]  # the finished cell was not rerun
    assert (first / "summary.json").stat().st_mtime_ns == first_mtime

    a, b = comparable(reference), comparable(resumed)
    assert len(a) == 4 and [r["round"] for r in a] == ["1", "2", "1", "2"]
    assert_same_results(a, b)

    # byte accounting: each cell's totals are the sums of its logged messages
    for cell in grid.cells:
        cell_dir = tmp_path / "b" / "cells" / cell.id
        summary = json.loads((cell_dir / "summary.json").read_text())
        with open(cell_dir / "messages.csv", newline="") as f:
            messages = list(csv.DictReader(f))
        assert summary["totals"]["total_bytes"] == sum(int(m["bytes"]) for m in messages)
        rows = [r for r in b if r["cell"] == cell.id]
        assert int(rows[-1]["cumulative_bytes"]) == summary["totals"]["total_bytes"]

    report = write_report(tmp_path / "b")
    by_codec = {s["codec"]: s for s in report["summaries"]}
    assert by_codec["qsgd"]["uplink_ratio"] > 5
    # FP32 through fedsqueeze costs what plain Flower costs, give or take the record layout
    # (one blob instead of one .npy array per tensor: slightly smaller)
    assert 0.95 < by_codec["fp32"]["uplink_ratio"] < 1.1
