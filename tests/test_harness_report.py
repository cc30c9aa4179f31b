"""Grid expansion and the report's numbers, checked against the results table they come from."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from fedsqueeze.simulation.grid import BUILTIN_GRIDS, load_grid, parse_grid
from fedsqueeze.simulation.report import LAST_ROUNDS, load_rows, pareto_front, setting_keys, summarize, write_report
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
    again = parse_grid(
        {
            "base": {"num-server-rounds": 3, "num-supernodes": 4},
            "axes": {"seed": [0], "lr": [0.1]},
            "codecs": [{"name": "renamed", "uplink": "identity", "downlink": "identity"}],
        }
    )
    assert again.cells[0].key == grid.cells[0].key


@pytest.mark.parametrize(
    "bad",
    [
        {"codecs": []},
        {"codecs": [{"uplink": "identity"}]},
        {"oops": 1, "codecs": [{"name": "a", "uplink": "identity"}]},
    ],
)
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


def _fake_cell(
    out: Path,
    cell_id: str,
    codec: str,
    seed: int,
    up: str,
    down: str,
    accs: list[float],
    up_bytes: list[int],
    config: dict | None = None,
) -> None:
    d = out / "cells" / cell_id
    d.mkdir(parents=True)
    cols = [
        "round",
        "accuracy",
        "loss",
        "uplink_bytes",
        "downlink_bytes",
        "uplink_fp32_bytes",
        "downlink_fp32_bytes",
        "cumulative_uplink_bytes",
        "cumulative_downlink_bytes",
        "cumulative_bytes",
        "cumulative_fp32_bytes",
        "replies",
        "rejected",
        "client_encode_seconds",
        "client_train_seconds",
        "uplink_payload_bytes",
    ]
    cum_up = cum_down = 0
    with open(d / "rounds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i, (acc, ub) in enumerate(zip(accs, up_bytes, strict=True), start=1):
            cum_up += ub
            cum_down += 1000
            w.writerow(
                [
                    i,
                    acc,
                    0.1,
                    ub,
                    1000,
                    4000,
                    4000,
                    cum_up,
                    cum_down,
                    cum_up + cum_down,
                    8000 * i,
                    2,
                    0,
                    0.5,
                    1.5,
                    ub // 2,
                ]
            )
    # the run's resolved config (app defaults filled in) lives only in summary.json, as the real runs write it
    resolved = {"lr": 0.05, "momentum": 0.9, "results-dir": str(d), **(config or {})}
    (d / "summary.json").write_text(json.dumps({"config": resolved}))
    grid_config = {
        "seed": seed,
        "model": "lenet5",
        "dataset": "mnist",
        "partitioner": "iid",
        "uplink-codec": up,
        "downlink-codec": down,
    }
    (d / CELL_FILE).write_text(json.dumps({"id": cell_id, "codec": codec, "num_supernodes": 2, "config": grid_config}))


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
    assert top["gap_to_fp32_final_points"] == pytest.approx(100 * ((0.88 - 0.9) + (0.9 - 0.92)) / 2)
    # two rounds only: the last-5 window is the whole run
    assert top["last_rounds"] == 2
    assert top["last5_accuracy"] == pytest.approx(((0.4 + 0.88) / 2 + (0.45 + 0.9) / 2) / 2)
    assert top["gap_to_fp32_last5_points"] == pytest.approx(100 * ((0.64 - 0.7) + (0.675 - 0.76)) / 2)
    assert top["uplink_ratio"] == pytest.approx(8000 / ((160 + 120) / 2))
    assert top["total_ratio"] == pytest.approx(16000 / ((160 + 120) / 2 + 2000))
    assert top["codec_time_share"] == pytest.approx(0.25)
    assert top["uplink_bits_per_param"] == pytest.approx(8 * 140 / 4 / 61706)
    # payload bytes are half the wire bytes in this table: 4 bytes x params x 4 replies / 70
    assert top["uplink_payload_ratio"] == pytest.approx(4 * 61706 * 4 / 70)
    # target: FP32's mean last-5 accuracy minus a point = 0.72; both seeds of top reach it in round 2
    assert top["target_accuracy"] == pytest.approx((0.7 + 0.76) / 2 - 0.01)
    assert top["seeds_reaching_target"] == 2 and top["uplink_bytes_to_target"] == pytest.approx((160 + 120) / 2)
    assert fp32["gap_to_fp32_final_points"] == pytest.approx(0.0)
    assert fp32["gap_to_fp32_last5_points"] == pytest.approx(0.0)
    assert top["pareto"] and fp32["pareto"]
    assert top["ok"] is True and fp32["ok"] is True and report["problem_cells"] == []
    text = (tmp_path / "report.md").read_text()
    assert "| top | 2 | yes | 65.75 ± 2.47 | 89.00 ± 1.41 | -7.25 | -2.00 |" in text
    assert "last-2 mean acc. (%)" in text and "gap to FP32, last-2 mean (pts)" in text
    assert "Every cell ended with finite loss and no rejected replies." in text
    assert f"{4 * 61706 * 4 / 70:.1f}x" in text
    for plot in report["plots"]:
        assert (tmp_path / plot).stat().st_size > 1000


# ---------------------------------------------------------------- hand-built results tables

_CODECS = {"fp32": ("identity", "identity"), "top": ("topk", "identity"), "int8": ("quantize", "quantize")}


def _rows(
    cell: str,
    codec: str,
    seed: int,
    accs: list[float],
    *,
    up: float = 100.0,
    losses: list[float] | None = None,
    rejected: list[int] | None = None,
    **config: object,
) -> list[dict[str, str]]:
    """Rows of one cell as load_rows gives them: results.csv columns, then the cell's config as config.* columns."""
    uplink, downlink = _CODECS[codec]
    rows = []
    for i, acc in enumerate(accs):
        row = {
            "cell": cell,
            "codec": codec,
            "seed": str(seed),
            "model": "lenet5",
            "dataset": "mnist",
            "partitioner": "pathological",
            "num_supernodes": "100",
            "uplink_codec": uplink,
            "downlink_codec": downlink,
            "round": str(i + 1),
            "accuracy": str(acc),
            "loss": str((losses or [0.5] * len(accs))[i]),
            "uplink_bytes": str(up),
            "downlink_bytes": "1000",
            "uplink_fp32_bytes": "4000",
            "downlink_fp32_bytes": "4000",
            "cumulative_uplink_bytes": str(up * (i + 1)),
            "cumulative_bytes": str((up + 1000) * (i + 1)),
            "replies": "10",
            "rejected": str((rejected or [0] * len(accs))[i]),
        }
        row.update({f"config.{k}": str(v) for k, v in {"seed": seed, "lr": 0.05, "momentum": 0.9, **config}.items()})
        rows.append(row)
    return rows


# two seeds of FP32 and top-k over 8 rounds, oscillating as cross-device runs do
FP32_ACCS = {0: [0.1, 0.3, 0.5, 0.7, 0.6, 0.8, 0.65, 0.9], 1: [0.2, 0.4, 0.6, 0.75, 0.7, 0.85, 0.7, 0.8]}
TOP_ACCS = {0: [0.1, 0.2, 0.4, 0.6, 0.55, 0.7, 0.6, 0.95], 1: [0.1, 0.3, 0.5, 0.7, 0.72, 0.74, 0.76, 0.85]}


def _table(**config: object) -> list[dict[str, str]]:
    rows = []
    for seed in (0, 1):
        rows += _rows(f"fp32-s{seed}", "fp32", seed, FP32_ACCS[seed], up=4000, **config)
        rows += _rows(f"top-s{seed}", "top", seed, TOP_ACCS[seed], up=40, **config)
    return rows


def test_last5_means_gaps_and_target_are_recomputed_from_the_rows() -> None:
    summaries = {s.codec: s for s in summarize(_table())}
    top, fp32 = summaries["top"], summaries["fp32"]
    assert LAST_ROUNDS == 5 and top.last_rounds == 5
    last5 = {seed: statistics.fmean(TOP_ACCS[seed][-5:]) for seed in (0, 1)}
    fp32_last5 = {seed: statistics.fmean(FP32_ACCS[seed][-5:]) for seed in (0, 1)}
    assert top.last5_accuracy == pytest.approx(statistics.fmean(last5.values()))
    assert top.last5_accuracy_std == pytest.approx(statistics.stdev(last5.values()))
    # the final column stays: the last round alone
    assert top.final_accuracy == pytest.approx((0.95 + 0.85) / 2)
    assert top.final_accuracy_std == pytest.approx(statistics.stdev([0.95, 0.85]))
    assert top.gap_to_fp32_last5_points == pytest.approx(
        statistics.fmean(100 * (last5[s] - fp32_last5[s]) for s in (0, 1))
    )
    assert top.gap_to_fp32_final_points == pytest.approx(100 * ((0.95 - 0.9) + (0.85 - 0.8)) / 2)
    # the final gap alone would call top better than FP32; the last-5 gap says it is worse
    assert top.gap_to_fp32_final_points > 0 > top.gap_to_fp32_last5_points
    target = statistics.fmean(fp32_last5.values()) - 0.01
    assert top.target_accuracy == pytest.approx(target)
    reach = {s: next(i for i, a in enumerate(TOP_ACCS[s]) if a >= target) for s in (0, 1)}
    assert top.seeds_reaching_target == 2
    assert top.uplink_bytes_to_target == pytest.approx(statistics.fmean(40 * (reach[s] + 1) for s in (0, 1)))
    assert fp32.gap_to_fp32_last5_points == pytest.approx(0.0) and fp32.ok is True


def test_last5_gap_compares_the_same_rounds_of_fp32() -> None:
    # a top-k run cut at round 6 is compared with FP32's rounds 2-6, not with FP32's last five
    rows = _rows("fp32-s0", "fp32", 0, FP32_ACCS[0]) + _rows("top-s0", "top", 0, TOP_ACCS[0][:6])
    top = {s.codec: s for s in summarize(rows)}["top"]
    expected = 100 * (statistics.fmean(TOP_ACCS[0][1:6]) - statistics.fmean(FP32_ACCS[0][1:6]))
    assert top.gap_to_fp32_last5_points == pytest.approx(expected)
    assert top.gap_to_fp32_final_points == pytest.approx(100 * (TOP_ACCS[0][5] - FP32_ACCS[0][5]))


def test_pareto_frontier_uses_the_last5_mean() -> None:
    # int8 spends more uplink than top; by final accuracy top dominates it, by the last-5 mean int8 is on the front
    rows = []
    for seed in (0, 1):
        rows += _rows(f"fp32-s{seed}", "fp32", seed, [0.9] * 8, up=4000)
        rows += _rows(f"top-s{seed}", "top", seed, [0.5] * 7 + [0.95], up=40)
        rows += _rows(f"int8-s{seed}", "int8", seed, [0.85] * 8, up=1000)
    summaries = {s.codec: s for s in summarize(rows)}
    assert summaries["top"].final_accuracy > summaries["int8"].final_accuracy
    assert summaries["int8"].last5_accuracy > summaries["top"].last5_accuracy
    assert {name for name, s in summaries.items() if s.pareto} == {"fp32", "top", "int8"}


def test_cells_differing_in_any_axis_but_seed_and_codec_are_separate_settings() -> None:
    rows = _table(lr=0.05, momentum=0.9) + [
        {**r, "cell": "m-" + r["cell"], "config.momentum": "0.0"} for r in _table(lr=0.05, momentum=0.9)
    ]
    # a key one codec entry sets for itself (error feedback) belongs to the codec, not to the setting
    for r in rows:
        if r["codec"] == "top":
            r["config.error-feedback"] = "False"
    summaries = summarize(rows)
    settings = {s.setting for s in summaries}
    assert len(settings) == 2 and len(summaries) == 4
    assert all("momentum=" in label and "error-feedback" not in label for label in settings)
    assert "lr=" not in " ".join(settings)  # lr is the same everywhere: not in the label
    for s in summaries:
        assert s.seeds == 2 and s.setting_config["momentum"] in s.setting
        # each codec is compared with the FP32 of its own momentum
        if s.codec == "fp32":
            assert s.gap_to_fp32_last5_points == pytest.approx(0.0)
    momentum = {s.setting_config["momentum"] for s in summaries}
    assert momentum == {"0.9", "0.0"}


def test_setting_keys_are_federation_keys_and_axes() -> None:
    from fedsqueeze.simulation.report import _runs

    rows = _table(lr=0.05) + [{**r, "cell": "x-" + r["cell"], "config.lr": "0.1"} for r in _table(lr=0.05)]
    for r in rows:
        r["config.num-server-rounds"] = "8"
        r["config.results-dir"] = "/tmp/" + r["cell"]  # differs per cell but never defines a setting
    keys = setting_keys(_runs(rows))
    assert keys == ["model", "dataset", "partitioner", "num-supernodes", "num-server-rounds", "lr"]


def test_a_model_set_by_one_codec_entry_splits_the_setting() -> None:
    rows = _table()
    for r in rows:
        if r["codec"] == "top":
            r["model"] = r["config.model"] = "mcmahan-cnn"
    summaries = {s.codec: s for s in summarize(rows)}
    assert summaries["top"].setting != summaries["fp32"].setting
    assert summaries["top"].gap_to_fp32_last5_points is None


def test_non_finite_loss_and_rejected_replies_mark_the_codec_not_ok() -> None:
    rows = _rows("fp32-s0", "fp32", 0, FP32_ACCS[0])
    rows += _rows("top-s0", "top", 0, TOP_ACCS[0], losses=[0.5] * 7 + [math.inf])
    rows += _rows("top-s1", "top", 1, TOP_ACCS[1], rejected=[0, 0, 3, 0, 0, 0, 2, 0])
    rows += _rows("int8-s0", "int8", 0, TOP_ACCS[0], losses=[math.nan] * 4 + [0.5] * 4)  # recovered: ends finite
    summaries = {s.codec: s for s in summarize(rows)}
    assert summaries["fp32"].ok is True and summaries["int8"].ok is True
    top = summaries["top"]
    assert top.ok is False and top.rejected_replies == 5
    assert top.problem_cells == ["top-s0 (final loss inf)", "top-s1 (5 rejected replies)"]
    # without a rejected column the report cannot vouch for the cell
    unknown = [{k: v for k, v in r.items() if k != "rejected"} for r in _rows("fp32-s0", "fp32", 0, [0.5] * 3)]
    assert summarize(unknown)[0].ok is None and summarize(unknown)[0].rejected_replies is None


def test_report_lists_the_offending_cells(tmp_path: Path) -> None:
    _fake_cell(tmp_path, "a0", "fp32", 0, "identity", "identity", [0.5, 0.9], [4000, 4000])
    _fake_cell(tmp_path, "b0", "top", 0, "topk", "identity", [0.4, 0.88], [100, 60])
    rounds = tmp_path / "cells" / "b0" / "rounds.csv"
    lines = rounds.read_text().splitlines()
    last = lines[-1].split(",")
    last[2], last[12] = "nan", "4"  # loss, rejected
    rounds.write_text("\n".join([*lines[:-1], ",".join(last)]) + "\n")
    collect_results(tmp_path)
    report = write_report(tmp_path)
    assert report["problem_cells"] == ["b0 (final loss nan, 4 rejected replies)"]
    text = (tmp_path / "report.md").read_text()
    assert "Cells not ok (non-finite final loss or rejected replies): b0 (final loss nan, 4 rejected replies)." in text
    assert "| top | 1 | **no** |" in text and "| fp32 | 1 | yes |" in text


def test_load_rows_reads_each_cells_resolved_config_and_settings_follow_it(tmp_path: Path) -> None:
    # lr appears in no results.csv column and in no grid key: only summary.json's resolved config has it
    for lr in (0.05, 0.01):
        for seed in (0, 1):
            _fake_cell(
                tmp_path, f"a{lr}-{seed}", "fp32", seed, "identity", "identity", [0.5, 0.9], [4000, 4000], {"lr": lr}
            )
            _fake_cell(tmp_path, f"b{lr}-{seed}", "top", seed, "topk", "identity", [0.4, 0.8], [100, 60], {"lr": lr})
    collect_results(tmp_path)
    rows = load_rows(tmp_path)
    assert {r["config.lr"] for r in rows} == {"0.05", "0.01"}
    assert "lr" not in rows[0] and "config.results-dir" in rows[0]
    report = write_report(tmp_path)
    settings = sorted({s["setting"] for s in report["summaries"]})
    assert settings == ["lenet5 / mnist / iid / 2 clients · lr=0.01", "lenet5 / mnist / iid / 2 clients · lr=0.05"]
    assert all(s["seeds"] == 2 for s in report["summaries"])
    text = (tmp_path / "report.md").read_text()
    assert "### lenet5 / mnist / iid / 2 clients · lr=0.01 (2 rounds)" in text
    assert len(report["plots"]) == 4


def test_an_ignored_key_does_not_split_settings(tmp_path: Path) -> None:
    """A default that changed between cells of one sweep: ignored, the seeds are one setting again."""
    for seed, staleness in ((0, 0), (1, 20)):
        _fake_cell(
            tmp_path,
            f"a{seed}",
            "fp32",
            seed,
            "identity",
            "identity",
            [0.5, 0.9],
            [4000, 4000],
            {"max-feedback-staleness": staleness},
        )
    collect_results(tmp_path)
    assert len({s["setting"] for s in write_report(tmp_path)["summaries"]}) == 2
    report = write_report(tmp_path, ignore_keys=["max-feedback-staleness"])
    assert [(s["setting"], s["seeds"]) for s in report["summaries"]] == [("lenet5 / mnist / iid / 2 clients", 2)]
    assert all("config.max-feedback-staleness" not in r for r in load_rows(tmp_path, ["max-feedback-staleness"]))


def test_load_rows_falls_back_on_grid_json_without_cell_folders(tmp_path: Path) -> None:
    _fake_cell(tmp_path, "a0", "fp32", 0, "identity", "identity", [0.5, 0.9], [4000, 4000])
    _fake_cell(tmp_path, "a1", "fp32", 0, "identity", "identity", [0.5, 0.9], [4000, 4000])
    collect_results(tmp_path)
    grid = {
        "cells": [
            {"id": "a0", "codec": "fp32", "num_supernodes": 2, "config": {"fraction-train": 0.1}},
            {"id": "a1", "codec": "fp32", "num_supernodes": 2, "config": {"fraction-train": 0.2}},
        ]
    }
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    import shutil

    shutil.rmtree(tmp_path / "cells")
    rows = load_rows(tmp_path)
    assert {r["config.fraction-train"] for r in rows} == {"0.1", "0.2"}
    assert len({s.setting for s in summarize(rows)}) == 2


def test_cells_written_before_a_new_round_column_are_collected_with_it_blank(tmp_path: Path) -> None:
    """A sweep resumed with a newer fedsqueeze: finished cells lack a column that the new ones write."""
    _fake_cell(tmp_path, "a0", "fp32", 0, "identity", "identity", [0.5, 0.9], [4000, 4000])
    _fake_cell(tmp_path, "b0", "top", 0, "topk", "identity", [0.4, 0.88], [100, 60])
    newer = tmp_path / "cells" / "b0" / "rounds.csv"
    lines = newer.read_text().splitlines()
    newer.write_text("\n".join([lines[0] + ",downlink_lag", *(line + ",0.25" for line in lines[1:])]) + "\n")
    collect_results(tmp_path)
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["cell"], r["downlink_lag"]) for r in rows] == [("a0", ""), ("a0", ""), ("b0", "0.25"), ("b0", "0.25")]
    assert {s["codec"] for s in write_report(tmp_path)["summaries"]} == {"fp32", "top"}
