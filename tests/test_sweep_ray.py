"""Sweeps on an existing Ray cluster: address resolution, bounded connection errors, and a real head node.

The slow test starts its own Ray head with ``ray start --head --block`` in a process group of its
own and stops exactly that group: ``ray stop`` would stop every Ray process of the user on the
machine, other people's simulations included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsqueeze.simulation import cli
from fedsqueeze.simulation.grid import Cell, parse_grid
from fedsqueeze.simulation.ray_cluster import (
    LOCAL,
    RayClusterUnreachable,
    RaySettings,
    check_reachable,
    parse_ray_address,
    ray_settings,
    resolve_ray_address,
)
from fedsqueeze.simulation.run_cell import build_parser
from fedsqueeze.simulation.sweep import SimulationRunner, cell_finished, run_sweep

CODECS = [
    {"name": "fp32", "uplink": "identity", "downlink": "identity"},
    {"name": "int8", "uplink": "quantize(bits=8) | zstd", "downlink": "quantize(bits=8) | zstd"},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released; nothing else binds it that fast)."""
    return free_port()


# --- address resolution and validation ---------------------------------------------------------


def test_the_option_wins_over_the_grid_which_wins_over_ray_address() -> None:
    env = {"RAY_ADDRESS": "10.0.0.3:6379"}
    assert resolve_ray_address("10.0.0.1:6379", "10.0.0.2:6379", env) == ("10.0.0.1:6379", "--ray-address")
    assert resolve_ray_address(None, "10.0.0.2:6379", env) == ("10.0.0.2:6379", "grid key ray-address")
    assert resolve_ray_address("", None, env) == ("10.0.0.3:6379", "RAY_ADDRESS")
    assert resolve_ray_address(None, None, {"RAY_ADDRESS": ""}) == (LOCAL, "default")
    # `--ray-address local` runs a grid written for a cluster on a private Ray
    assert resolve_ray_address(LOCAL, "10.0.0.2:6379", env) == (LOCAL, "--ray-address")


@pytest.mark.parametrize("address", ["", "auto", "10.0.0.5", ":6379", "host:0", "host:65536", "host:63x"])
def test_a_malformed_address_is_refused_naming_expected_and_found(address: str) -> None:
    with pytest.raises(ValueError, match=r"expected HOST:PORT.*found") as info:
        RaySettings(address=address)
    assert repr(address) in str(info.value)


def test_a_ray_client_address_is_refused_saying_what_to_give_instead() -> None:
    with pytest.raises(ValueError, match=r"ray://.*not supported.*GCS address"):
        parse_ray_address("ray://10.0.0.5:10001")
    assert parse_ray_address("[::1]:6379") == ("::1", 6379)
    assert parse_ray_address("head.example:6379") == ("head.example", 6379)


@pytest.mark.parametrize(("cpus", "gpus"), [(0.0, 0.0), (-1.0, 0.0), (1.0, -0.5)])
def test_client_resources_must_be_positive_cpus_and_non_negative_gpus(cpus: float, gpus: float) -> None:
    with pytest.raises(ValueError, match="expected CPUs > 0 and GPUs >= 0"):
        RaySettings(client_cpus=cpus, client_gpus=gpus)


def test_the_grid_names_its_cluster_at_the_top_level_outside_every_cell() -> None:
    plain = parse_grid({"base": {"num-server-rounds": 2}, "codecs": CODECS}, name="g")
    on_cluster = parse_grid(
        {"ray-address": "10.0.0.5:6379", "base": {"num-server-rounds": 2}, "codecs": CODECS}, name="g"
    )
    assert plain.ray_address is None and on_cluster.ray_address == "10.0.0.5:6379"
    # where cells run is not part of what they are: a sweep resumed on another cluster reruns nothing
    assert [c.id for c in on_cluster.cells] == [c.id for c in plain.cells]
    assert all("ray-address" not in c.config for c in on_cluster.cells)

    with pytest.raises(ValueError, match=r"ray-address found in base; expected it at the top level"):
        parse_grid({"base": {"ray-address": "10.0.0.5:6379"}, "codecs": CODECS}, name="g")
    with pytest.raises(ValueError, match=r"ray-address found in codec 'fp32'"):
        parse_grid({"codecs": [{**CODECS[0], "ray-address": "h:1"}]}, name="g")
    with pytest.raises(ValueError, match=r"grid 'g': ray-address: .*expected HOST:PORT.*found 'nowhere'"):
        parse_grid({"ray-address": "nowhere", "codecs": CODECS}, name="g")
    with pytest.raises(ValueError, match=r"expected a string HOST:PORT, found 6379"):
        parse_grid({"ray-address": 6379, "codecs": CODECS}, name="g")


def test_the_runner_hands_every_ray_setting_to_the_cell_process(tmp_path: Path) -> None:
    cluster = RaySettings(address="10.0.0.5:6379", connect_timeout=7.5, client_cpus=0.5, client_gpus=0.25)
    cell = Cell(codec="fp32", config={"seed": 0}, num_supernodes=4)
    command = SimulationRunner(cluster=cluster).command(cell, tmp_path / "run_config.toml")
    assert command[1:3] == ["-m", "fedsqueeze.simulation.run_cell"]
    args = build_parser().parse_args(command[3:])
    assert args.num_supernodes == 4
    assert ray_settings(args, args.ray_address) == cluster
    # the private default is passed explicitly too, so the child ignores a $RAY_ADDRESS of its own
    local = SimulationRunner().command(cell, tmp_path / "run_config.toml")
    assert local[local.index("--ray-address") + 1] == LOCAL


def test_grid_json_records_the_ray_the_sweep_was_given(tmp_path: Path) -> None:
    grid = parse_grid({"base": {"num-server-rounds": 1}, "codecs": CODECS[:1]}, name="g")

    def fake_cell(cell: Cell, cell_dir: Path, on_round: Callable[[int], None]) -> None:
        (cell_dir / "rounds.csv").write_text("round,accuracy\n1,0.5\n")
        (cell_dir / "summary.json").write_text(json.dumps({"config": {"uplink-codec": "identity"}}))
        on_round(1)

    ray = {"address": "10.0.0.5:6379", "source": "--ray-address"}
    run_sweep(grid, tmp_path / "out", runner=fake_cell, progress=False, ray=ray)
    assert json.loads((tmp_path / "out" / "grid.json").read_text())["ray"] == ray


# --- unreachable clusters: a clear error, bounded in time ----------------------------------------


def test_an_unreachable_address_fails_fast_naming_it_and_what_was_expected() -> None:
    address = f"127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(RayClusterUnreachable) as info:
        check_reachable(address, timeout=5.0)
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert repr(address) in message and "expected a Ray head node's GCS listening there" in message
    assert "found" in message and "ray start --head --port=" in message


def test_the_sweep_refuses_an_unreachable_cluster_before_running_any_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{closed_port()}"
    out = tmp_path / "out"
    status = cli.main(["sweep", "smoke", "--out", str(out), "--ray-address", address, "--quiet", "--no-report"])
    assert status == 2
    err = capsys.readouterr().err
    assert f"fedsqueeze sweep: error: Ray cluster at {address!r} is not reachable" in err
    assert "(address from --ray-address)" in err
    assert not out.exists()  # no cell was started

    # the same from $RAY_ADDRESS, which the error names as the source
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert cli.main(["sweep", "smoke", "--out", str(out), "--quiet", "--no-report"]) == 2
    assert "(address from RAY_ADDRESS)" in capsys.readouterr().err


def test_a_cell_gives_up_on_a_port_that_never_answers_within_its_timeout(tmp_path: Path) -> None:
    # a listening socket that never speaks: TCP connects (the kernel's backlog), Ray gets no answer
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        config = tmp_path / "run_config.toml"
        config.write_text(f'results-dir = "{tmp_path}"\n')
        command = [sys.executable, "-m", "fedsqueeze.simulation.run_cell", str(config), "--num-supernodes", "2"]
        start = time.monotonic()
        done = subprocess.run(
            [*command, "--ray-address", address, "--ray-connect-timeout", "3"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        elapsed = time.monotonic() - start
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"run_cell: error: Ray cluster at {address!r}: expected a Ray cluster to accept this driver" in done.stderr
    assert "within 3 s" in done.stderr
    # 3 s of waiting plus importing torch, Flower and Ray on a loaded machine; Ray alone retries for minutes
    assert elapsed < 60, elapsed


# --- a real head node on loopback ----------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    address: str
    port: int
    temp_dir: Path
    process: subprocess.Popen[bytes]

    @property
    def logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"


def processes_of(session: int, marker: str) -> list[int]:
    """Live processes in ``session`` or whose command line names ``marker`` (the head's temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _, _, sid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue  # exited while we looked
        if state != "Z" and (int(sid) == session or marker in command):
            found.append(int(entry.name))
    return found


def stop_head(head: Head) -> list[int]:
    """Stop the head's process group, then any straggler of its session; return what had to be SIGKILLed."""
    try:
        os.killpg(head.process.pid, signal.SIGTERM)
        head.process.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(head.process.pid, signal.SIGKILL)
        head.process.wait(timeout=10)
    deadline = time.monotonic() + 15
    while (left := processes_of(head.process.pid, str(head.temp_dir))) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[Head]:
    """A Ray head on loopback with 2 CPUs, all its ports free ones, stopped (only it) afterwards."""
    # Ray's Unix sockets live under the temp dir and must fit in 107 bytes: pytest's tmp_path is too deep
    temp_dir = Path(tempfile.mkdtemp(prefix="fsq-ray-", dir="/tmp"))
    port = free_port()
    ports = {
        f"--{name}": str(free_port())
        for name in (
            "ray-client-server-port",
            "dashboard-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
    }
    # the head's workers must get the import path and data location from the driver, not from here
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "FEDSQUEEZE_DATA", "RAY_ADDRESS"}}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
    command += [f"--port={port}", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp_dir}"]
    command += [item for pair in ports.items() for item in pair]
    log = open(tmp_path / "ray-head.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = Head(address=f"127.0.0.1:{port}", port=port, temp_dir=temp_dir, process=process)
    try:
        deadline = time.monotonic() + 120
        while not (temp_dir / "ray_current_cluster").is_file():  # written once the head is up
            assert process.poll() is None, (tmp_path / "ray-head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not come up within 120 s"
            time.sleep(0.5)
        yield head
    finally:
        left = stop_head(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the Ray head still ran after its group was stopped: {left}"
    assert not processes_of(process.pid, str(temp_dir))


@pytest.mark.slow  # a Ray head plus two cells of Flower's simulation engine on it
def test_a_sweep_runs_on_an_existing_ray_cluster(
    ray_head: Head, tmp_path: Path, mnist_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("FEDSQUEEZE_DATA", str(mnist_path))  # restored afterwards; the sweep sets it too
    lines = [f'ray-address = "{ray_head.address}"', "[base]", "num-supernodes = 2", "num-server-rounds = 2"]
    lines += ["max-samples-per-client = 50", 'partitioner = "iid"', "[axes]", "seed = [0]"]
    for codec in CODECS:
        lines += ["[[codecs]]", *(f'{k} = "{v}"' for k, v in codec.items())]
    grid_file = tmp_path / "on-ray.toml"
    grid_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"

    argv = ["sweep", str(grid_file), "--out", str(out), "--data-dir", str(mnist_path), "--quiet", "--no-report"]
    assert cli.main([*argv, "--cell-timeout", "300"]) == 0

    grid_json = json.loads((out / "grid.json").read_text())
    assert grid_json["ray"] == {"address": ray_head.address, "source": "grid key ray-address"}
    job_ids = []
    for cell in grid_json["cells"]:
        cell_dir = out / "cells" / cell["id"]
        assert cell_finished(cell_dir)
        ray = json.loads((cell_dir / "summary.json").read_text())["ray"]
        assert ray["address"] == ray_head.address
        assert ray["gcs_address"].endswith(f":{ray_head.port}")  # the head's GCS, not a private Ray
        assert ray["nodes"] == 1 and ray["cpus"] == 2.0
        assert ray["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
        job_ids.append(ray["job_id"])
    assert len(set(job_ids)) == len(grid_json["cells"]) == 2  # one job per cell
    # the cluster's side: its own logs hold a driver log of each cell's job
    driver_logs = [p.name for p in ray_head.logs.glob("python-core-driver-*.log")]
    for job_id in job_ids:
        assert any(name.startswith(f"python-core-driver-{job_id}") for name in driver_logs), (job_id, driver_logs)
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # header, two rounds of each cell
