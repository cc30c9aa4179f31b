"""The ``fedsqueeze`` command: every subcommand hands its options on, and exit statuses are right."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedsqueeze.simulation import cli
from fedsqueeze.simulation import report as report_module
from fedsqueeze.simulation import sweep as sweep_module
from fedsqueeze.simulation.grid import BUILTIN_GRIDS
from fedsqueeze.simulation.ray_cluster import LOCAL, RaySettings


def _exit_status(argv: list[str]) -> int:
    """What ``fedsqueeze ARGV`` exits with, run in this process."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return 0 if stop.code is None else int(stop.code)


def test_bench_quick_passes_data_dir_and_out_on_and_exits_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the delegated main returns its rows (a list): the status must still be 0
    assert cli.main(["bench", "--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    with (tmp_path / "o" / "codec_bench.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["status"] for r in rows} == {"ok"}
    assert "--quick" in (tmp_path / "o" / "codec_bench.md").read_text()
    assert "synthetic-20000" in capsys.readouterr().out  # --quick reached the benchmark


@pytest.mark.parametrize(
    ("command", "module_option"),
    [
        ("bench", "--synthetic-params"),
        ("predict", "--labels"),
        ("sweep", "--cell-timeout"),
        ("report", "--target"),
        ("grids", "--help"),
    ],
)
def test_help_of_every_subcommand_is_its_own(
    command: str, module_option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_status([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and module_option in out


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_status(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ["sweep", "report", "grids", *cli.DELEGATED]:
        assert command in out


@pytest.mark.parametrize(
    "argv",
    [["bench", "--quick"], ["predict", "m.pt", "x.npy"], ["sweep", "smoke", "--out", "o"], ["report", "d"], ["grids"]],
)
def test_an_unknown_option_is_a_usage_error_naming_it(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_status([*argv, "--no-such-option"]) == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_predict_passes_its_arguments_on_and_its_status_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((2, 28, 28), dtype=np.uint8))
    missing_model = tmp_path / "no-model.pt"
    assert cli.main(["predict", str(missing_model), str(images), "--key", "x"]) == 2
    assert "fedsqueeze predict: error" in capsys.readouterr().err


def test_sweep_passes_every_option_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    def fake_run_sweep(grid: Any, out: Path, *, runner: Any, progress: bool, ray: dict[str, str]) -> Path:
        seen.update(
            grid=grid.name,
            out=out,
            timeout=runner.timeout,
            progress=progress,
            data=os.environ.get("FEDSQUEEZE_DATA"),
            cluster=runner.cluster,
            ray=ray,
        )
        return out / "results.csv"

    def fake_write_report(out: Path, target: float | None) -> None:
        seen["report"] = (out, target)

    monkeypatch.setattr(sweep_module, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(report_module, "write_report", fake_write_report)
    monkeypatch.delenv("FEDSQUEEZE_DATA", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "sweep"
    status = cli.main(
        [
            "sweep",
            "smoke",
            "--out",
            str(out),
            "--data-dir",
            str(tmp_path),
            "--target",
            "0.9",
            "--cell-timeout",
            "12.5",
            "--quiet",
            "--ray-address",
            LOCAL,
            "--ray-connect-timeout",
            "9",
            "--client-cpus",
            "0.5",
            "--client-gpus",
            "0.25",
        ]
    )
    assert status == 0
    assert seen == {
        "grid": "smoke",
        "out": out,
        "timeout": 12.5,
        "progress": False,
        "data": str(tmp_path.resolve()),
        "cluster": RaySettings(LOCAL, connect_timeout=9.0, client_cpus=0.5, client_gpus=0.25),
        "ray": {"address": LOCAL, "source": "--ray-address"},
        "report": (out, 0.9),
    }
    assert str(out / "results.csv") in capsys.readouterr().out

    seen.clear()
    assert cli.main(["sweep", str(BUILTIN_GRIDS["smoke"]), "--out", str(out), "--no-report"]) == 0
    assert seen["progress"] is True and seen["timeout"] == 3600.0 and "report" not in seen
    assert seen["cluster"] == RaySettings() and seen["ray"] == {"address": LOCAL, "source": "default"}


def test_report_passes_dir_and_target_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(report_module, "write_report", lambda out, target, ig: seen.append(("write", out, target, ig)))
    monkeypatch.setattr(report_module, "load_rows", lambda out, ig: seen.append(("load", out, ig)) or ["row"])
    monkeypatch.setattr(report_module, "summarize", lambda rows, target: seen.append(("sum", rows, target)) or "s")
    monkeypatch.setattr(report_module, "markdown_table", lambda summary: f"table of {summary}")
    assert cli.main(["report", str(tmp_path), "--target", "0.75", "--ignore-key", "lr"]) == 0
    assert seen == [("write", tmp_path, 0.75, ["lr"]), ("load", tmp_path, ["lr"]), ("sum", ["row"], 0.75)]
    assert "table of s" in capsys.readouterr().out


def test_grids_lists_every_builtin_grid(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["grids"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == list(BUILTIN_GRIDS)


@pytest.mark.parametrize(("returned", "status"), [(None, 0), ([1, 2], 0), (0, 0), (2, 2), (True, 0), ("x", 0)])
def test_exit_code_of_whatever_main_returns(returned: object, status: int) -> None:
    assert cli.exit_code(returned) == status


def test_the_command_exits_with_the_delegated_status(tmp_path: Path) -> None:
    # a real process, as the console script runs it: statuses survive the trip through sys.exit
    run = [sys.executable, "-m", "fedsqueeze.simulation.cli"]
    ok = subprocess.run([*run, "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "--labels" in ok.stdout
    bad = subprocess.run(
        [*run, "predict", str(tmp_path / "none.pt"), str(tmp_path / "none.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "error" in bad.stderr
