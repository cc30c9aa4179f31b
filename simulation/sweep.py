"""Run a grid of cells through Flower's simulation engine, resumably, into one results table."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from fedsqueeze.simulation.grid import Cell, Grid
from fedsqueeze.simulation.ray_cluster import RaySettings

__all__ = [
    "Runner",
    "SimulationRunner",
    "run_sweep",
    "collect_results",
    "cell_finished",
    "RESULT_COLUMNS",
    "offline_env",
]

#: Columns of the sweep's ``results.csv`` before the per-round columns of each cell's rounds.csv.
RESULT_COLUMNS = [
    "cell",
    "codec",
    "seed",
    "model",
    "dataset",
    "partitioner",
    "num_supernodes",
    "uplink_codec",
    "downlink_codec",
]
CELL_FILE = "cell.json"


class Runner(Protocol):
    """Runs one cell, writing its rounds.csv and summary.json into ``cell_dir``."""

    def __call__(self, cell: Cell, cell_dir: Path, on_round: Callable[[int], None]) -> None: ...


def offline_env(flwr_home: Path) -> dict[str, str]:
    """Environment that keeps Flower and Ray offline and quiet, with Flower's state in ``flwr_home``."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _count_rounds(rounds_csv: Path) -> int:
    try:
        with open(rounds_csv) as f:
            return max(0, sum(1 for _ in f) - 1)
    except FileNotFoundError:
        return 0


class SimulationRunner:
    """Run each cell in a child process of its own through Flower's simulation engine.

    The child (``python -m fedsqueeze.simulation.run_cell``) runs fedsqueeze's ServerApp and
    ClientApp with ``flwr.simulation.run_simulation``; it is started in a new process group, so
    an interrupted sweep stops its simulation completely and leaves nothing running.

    Parameters
    ----------
    timeout : float
        Seconds after which a cell is stopped and counted as failed (default: 3600).
    cluster : RaySettings
        Where the cells' simulated clients run: by default a private Ray instance per cell; with
        a cluster address every cell joins that Ray cluster.
    """

    def __init__(self, timeout: float = 3600.0, cluster: RaySettings | None = None) -> None:

        self.timeout = timeout
        self.cluster = cluster or RaySettings()

    def command(self, cell: Cell, run_config: Path) -> list[str]:
        """The child process's command line for ``cell`` with its run config in ``run_config``."""
        return [
            sys.executable,
            "-m",
            "fedsqueeze.simulation.run_cell",
            str(run_config),
            "--num-supernodes",
            str(cell.num_supernodes),
            # always explicit, so that the child does not fall back on its own $RAY_ADDRESS
            "--ray-address",
            self.cluster.address,
            "--ray-connect-timeout",
            repr(self.cluster.connect_timeout),
            "--client-cpus",
            repr(self.cluster.client_cpus),
            "--client-gpus",
            repr(self.cluster.client_gpus),
        ]

    def __call__(self, cell: Cell, cell_dir: Path, on_round: Callable[[int], None]) -> None:
        cell_dir = cell_dir.resolve()
        config = {**cell.config, "results-dir": str(cell_dir)}
        run_config = cell_dir / "run_config.toml"
        run_config.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items()))
        command = self.command(cell, run_config)
        log_path = cell_dir / "simulation.log"
        with open(log_path, "w") as log:
            # a neutral working directory: Ray puts it first on the actors' sys.path
            proc = subprocess.Popen(
                command,
                cwd=cell_dir,
                env=offline_env(cell_dir / ".flwr"),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            start, seen = time.monotonic(), 0
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
                    rounds = _count_rounds(cell_dir / "rounds.csv")
                    if rounds != seen:
                        on_round(rounds - seen)
                        seen = rounds
                    if time.monotonic() - start > self.timeout:
                        raise TimeoutError(f"cell {cell.id} ran over {self.timeout:.0f} s")
            except BaseException:
                _stop(proc)
                raise
        on_round(_count_rounds(cell_dir / "rounds.csv") - seen)
        if proc.returncode != 0 or not (cell_dir / "summary.json").is_file():
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"cell {cell.id} failed (exit code {proc.returncode}); log {log_path}:\n{tail}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cell_finished(cell_dir: Path) -> bool:
    """A cell counts as done only when its run finished and its marker was written last."""
    return (cell_dir / CELL_FILE).is_file() and (cell_dir / "summary.json").is_file()


def run_sweep(
    grid: Grid,
    out: Path,
    *,
    runner: Runner | None = None,
    progress: bool = True,
    ray: Mapping[str, str] | None = None,
) -> Path:
    """Run every cell of ``grid`` not already finished in ``out``; return the results table path.

    Finished cells are never rerun; a cell that was interrupted is cleared and run again.
    After each cell the sweep-wide ``results.csv`` (one row per cell and round) is rebuilt
    from the finished cells, so it is complete whenever the sweep stops.

    ``ray`` (e.g. ``{"address": ..., "source": ...}``) says which Ray this run of the sweep was
    given; ``grid.json`` records it (default: the runner's address, if it has one). Each cell's
    ``summary.json`` records the cluster that cell ran on.
    """
    runner = runner or SimulationRunner()
    out = Path(out)
    if ray is None and isinstance(runner, SimulationRunner):
        ray = {"address": runner.cluster.address}
    (out / "cells").mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(
        json.dumps(
            {
                "name": grid.name,
                "description": grid.description,
                **({"ray": dict(ray)} if ray is not None else {}),
                "cells": [
                    {"id": c.id, "codec": c.codec, "num_supernodes": c.num_supernodes, "config": dict(c.config)}
                    for c in grid.cells
                ],
            },
            indent=2,
        )
        + "\n"
    )
    total_rounds = sum(int(c.config.get("num-server-rounds", 1)) for c in grid.cells)
    cells_bar = tqdm(total=len(grid.cells), desc="cells", unit="cell", disable=not progress, position=0)
    rounds_bar = tqdm(total=total_rounds, desc="rounds", unit="round", disable=not progress, position=1)
    try:
        for cell in grid.cells:
            cell_dir = out / "cells" / cell.id
            rounds = int(cell.config.get("num-server-rounds", 1))
            if cell_finished(cell_dir):
                cells_bar.update(1)
                rounds_bar.update(rounds)
                continue
            if cell_dir.exists():
                shutil.rmtree(cell_dir)  # an interrupted cell starts again from scratch
            cell_dir.mkdir(parents=True)
            cells_bar.set_postfix_str(f"{cell.codec} seed={cell.config.get('seed', 0)}")
            runner(cell, cell_dir, rounds_bar.update)
            marker = {
                "id": cell.id,
                "key": cell.key,
                "codec": cell.codec,
                "num_supernodes": cell.num_supernodes,
                "config": dict(cell.config),
            }
            (cell_dir / (CELL_FILE + ".tmp")).write_text(json.dumps(marker, indent=2) + "\n")
            os.replace(cell_dir / (CELL_FILE + ".tmp"), cell_dir / CELL_FILE)
            cells_bar.update(1)
            collect_results(out)
    finally:
        cells_bar.close()
        rounds_bar.close()
    return collect_results(out)


def collect_results(out: Path) -> Path:
    """(Re)build ``out/results.csv`` from every finished cell, in grid order."""
    out = Path(out)
    order = (
        {c["id"]: i for i, c in enumerate(json.loads((out / "grid.json").read_text())["cells"])}
        if (out / "grid.json").is_file()
        else {}
    )
    rows: list[dict[str, str]] = []
    round_columns: list[str] = []
    cell_dirs = sorted(
        (d for d in (out / "cells").iterdir() if cell_finished(d)),
        key=lambda d: (order.get(d.name, len(order)), d.name),
    )
    for cell_dir in cell_dirs:
        marker = json.loads((cell_dir / CELL_FILE).read_text())
        # the run's own config, with the app's defaults filled in, over the grid's keys
        cfg = {**marker["config"], **json.loads((cell_dir / "summary.json").read_text()).get("config", {})}
        with open(cell_dir / "rounds.csv", newline="") as f:
            reader = csv.DictReader(f)
            # cells of an older fedsqueeze (a resumed sweep) may lack newer columns: the union, blank where absent
            round_columns += [c for c in reader.fieldnames or [] if c not in round_columns]
            for row in reader:
                rows.append(
                    {
                        "cell": marker["id"],
                        "codec": marker["codec"],
                        "seed": str(cfg.get("seed", 0)),
                        "model": str(cfg.get("model", "")),
                        "dataset": str(cfg.get("dataset", "")),
                        "partitioner": str(cfg.get("partitioner", "")),
                        "num_supernodes": str(marker["num_supernodes"]),
                        "uplink_codec": cfg["uplink-codec"],
                        "downlink_codec": cfg["downlink-codec"],
                        **row,
                    }
                )
    path = out / "results.csv"
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS + round_columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
