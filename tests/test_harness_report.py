"""Grid expansion and the report's numbers, checked against the results table they come from."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedsqueeze.simulation.grid import BUILTIN_GRIDS, load_grid, parse_grid
from fedsqueeze.simulation.report import pareto_front, write_report
from fedsqueeze.simulation.sweep import CELL_FILE, collect_results


def test_grid_expands_codecs_times_axes_in_seed_major_order() -> None:
    grid = parse_grid(
        {
            "base": {"num-server-rounds": 3, "num-supernodes": 4},
            "axes": {"seed": [0, 1], "lr": [0.1]},
            "codecs": [
                {"name": "fp32", "uplink": "identity", "downlink": "identity"},
                {"name": "top", "uplink": "topk(ratio=0.01)", "seed": [5], "model": "mcmahan-cnn"},
            ],
        }
    )
    assert [(c.codec, c.config["seed"]) for c in grid.cells] == [("fp32", 0), ("top", 5), ("fp32", 1)]
    top = grid.cells[1]
    assert top.num_supernodes == 4 and "num-supernodes" not in top.config
    assert top.config["model"] == "mcmahan-cnn" and top.config["downlink-codec"] == "identity"
    assert len({c.id for c in grid.cells}) == 3
    # the key depends on the run, not on the label: same config, same key
    again = parse_grid({"base": {"num-server-rounds": 3, "num-supernodes": 4}, "axes": {"seed": [0], "lr": [0.1]},
                        "codecs": [{"name": "renamed", "uplink": "identity", "downlink": "identity"}]})
    assert again.cells[0].key == grid.cells[0].key


@pytest.mark.parametrize("bad", [{"codecs": []}, {"codecs": [{"uplink": "identity"}]}, {"oops": 1, "codecs": [{"name": "a", "uplink": "identity"}]}])
def test_bad_grids_say_what_is_wrong(bad: dict) -> None:
    with pytest.raises(ValueError, match="grid"):
        parse_grid(bad)


def test_builtin_grids_parse_and_name_valid_codecs() -> None:
    from fedsqueeze.codecs import parse

    assert {"baseline", "smoke", "mcmahan"} <= set(BUILTIN_GRIDS)
    for name in BUILTIN_GRIDS:
        for cell in load_grid(name).cells:
            parse(cell.config["uplink-codec"])
            parse(cell.config["downlink-codec"])


def test_pareto_front() -> None:
    points = [(100, 0.9), (10, 0.8), (50, 0.95), (10, 0.7), (200, 0.95)]
    assert pareto_front(points) == [1, 2]


def _fake_cell(out: Path, cell_id: str, codec: str, seed: int, up: str, down: str, accs: list[float], up_bytes: list[int]) -> None:
    d = out / "cells" / cell_id
    d.mkdir(parents=True)
    cols = ["round", "accuracy", "loss", "uplink_bytes", "downlink_bytes", "uplink_fp32_bytes", "downlink_fp32_bytes",
            "cumulative_uplink_bytes", "cumulative_downlink_bytes", "cumulative_bytes", "cumulative_fp32_bytes", "replies",
            "client_encode_seconds", "client_train_seconds", "uplink_payload_bytes"]
    cum_up = cum_down = 0
    with open(d / "rounds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i, (acc, ub) in enumerate(zip(accs, up_bytes), start=1):
            cum_up += ub
            cum_down += 1000
            w.writerow([i, acc, 0.1, ub, 1000, 4000, 4000, cum_up, cum_down, cum_up + cum_down, 8000 * i, 2, 0.5, 1.5, ub // 2])
    (d / "summary.json").write_text("{}")
    config = {"seed": seed, "model": "lenet5", "dataset": "mnist", "partitioner": "iid", "uplink-codec": up, "downlink-codec": down}
    (d / CELL_FILE).write_text(json.dumps({"id": cell_id, "codec": codec, "num_supernodes": 2, "config": config}))


def test_report_numbers_match_the_results_table(tmp_path: Path) -> None:
    _fake_cell(tmp_path, "a0", "fp32", 0, "identity", "identity", [0.5, 0.9], [4000, 4000])
    _fake_cell(tmp_path, "a1", "fp32", 1, "identity", "identity", [0.6, 0.92], [4000, 4000])
    _fake_cell(tmp_path, "b0", "top", 0, "topk", "identity", [0.4, 0.88], [100, 60])
    _fake_cell(tmp_path, "b1", "top", 1, "topk", "identity", [0.45, 0.9], [80, 40])
    collect_results(tmp_path)
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    report = write_report(tmp_path)
    by_codec = {s["codec"]: s for s in report["summaries"]}
    top, fp32 = by_codec["top"], by_codec["fp32"]
    # every number recomputed from the table
    top_rows = [r for r in rows if r["codec"] == "top"]
    up_per_run = {}
    for r in top_rows:
        up_per_run[r["cell"]] = up_per_run.get(r["cell"], 0) + int(r["uplink_bytes"])
    assert top["uplink_bytes"] == pytest.approx(sum(up_per_run.values()) / 2)
    assert top["final_accuracy"] == pytest.approx((0.88 + 0.9) / 2)
    assert top["gap_to_fp32_points"] == pytest.approx(100 * ((0.88 - 0.9) + (0.9 - 0.92)) / 2)
    assert top["uplink_ratio"] == pytest.approx(8000 / ((160 + 120) / 2))
    assert top["total_ratio"] == pytest.approx(16000 / ((160 + 120) / 2 + 2000))
    assert top["codec_time_share"] == pytest.approx(0.25)
    assert top["uplink_bits_per_param"] == pytest.approx(8 * 140 / 4 / 61706)
    # payload bytes are half the wire bytes in this table: 4 bytes x params x 4 replies / 70
    assert top["uplink_payload_ratio"] == pytest.approx(4 * 61706 * 4 / 70)
    # target: FP32's mean final accuracy minus a point = 0.90; reached in round 2 by both seeds of fp32
    assert top["target_accuracy"] == pytest.approx(0.90)
    assert top["seeds_reaching_target"] == 1 and top["uplink_bytes_to_target"] == pytest.approx(120)
    assert fp32["gap_to_fp32_points"] == pytest.approx(0.0)
    assert top["pareto"] and fp32["pareto"]
    text = (tmp_path / "report.md").read_text()
    assert "| top | 2 | 89.00 ± 1.41 | -2.00 |" in text
    assert f"{4 * 61706 * 4 / 70:.1f}x" in text
    for plot in report["plots"]:
        assert (tmp_path / plot).stat().st_size > 1000
