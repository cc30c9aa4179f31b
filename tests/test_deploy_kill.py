"""A SuperNode killed with SIGKILL mid-run: the run finishes with the others, each round within the timeout."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers.deployment import free_ports, load_deploy_script

local = load_deploy_script()

#: Seconds the server waits for a round's replies: above a normal round here (about 30 s with three
#: nodes on two cores), below the SuperLink's heartbeat timeout that otherwise decides (about 60 s).
ROUND_TIMEOUT = 45.0


def _rounds(results: Path) -> list[dict[str, str]]:
    path = results / "rounds.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


@pytest.mark.slow  # a SuperLink, 3 SuperNodes, 3 rounds, one of them waiting out the timeout: about 3 minutes
def test_a_killed_supernode_costs_at_most_the_round_timeout(tmp_path: Path, mnist_path: Path) -> None:
    port, node_port_base = free_ports(2)
    results = tmp_path / "results"
    settings = local.DeploySettings(
        workdir=tmp_path,
        app_dir=Path(local.__file__).resolve().parents[1],
        nodes=3,
        port=port,
        node_port_base=node_port_base,
        tls=False,
        auth=False,
        run_config=(
            f"num-server-rounds=3 max-samples-per-client=150 round-timeout={ROUND_TIMEOUT} "
            f'data-dir="{mnist_path}" results-dir="{results}"'
        ),
    )
    deployment = local.start(settings)
    outcome: dict[str, object] = {}
    try:
        runner = threading.Thread(target=lambda: outcome.update(done=deployment.run_app(timeout=600)))
        runner.start()
        deadline = time.monotonic() + 240
        while not _rounds(results) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _rounds(results), "round 1 did not finish"
        time.sleep(4)  # round 2's messages are out; the node has pulled its own (3 s polling)
        killed_at = time.monotonic()
        deployment.kill_supernode(2)
        runner.join(timeout=480)
        finished_at = time.monotonic()
    finally:
        deployment.stop()
    done = outcome["done"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # type: ignore[attr-defined]
    rows = _rounds(results)
    summary = json.loads((results / "summary.json").read_text())
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    accepted = [int(r["replies"]) - int(r["rejected"]) for r in rows]
    assert accepted == [3, 2, 2], rows
    # If the SuperLink's error reply for the dead node comes within a round, it is charged to that node
    for rejection in summary["rejected"]:
        assert str(rejection["node_id"]) in summary["per_node"] and "Node Unavailable" in rejection["reason"]
    # The dead node costs at most the timeout (plus evaluation and Flower's 3 s polling), per round
    assert all(float(r["round_seconds"]) <= ROUND_TIMEOUT + 15 for r in rows[1:]), rows
    assert finished_at - killed_at <= 2 * (ROUND_TIMEOUT + 15)
    # No reply is charged to the SuperLink's own id: three nodes, as deployed
    assert summary["num_nodes"] == 3 and "1" not in summary["per_node"], summary["per_node"]
    print(json.dumps({"rounds": rows, "killed_to_finished_s": round(finished_at - killed_at, 1)}))


@pytest.mark.slow  # two runs on a SuperLink and 2 SuperNodes: about 4 minutes
def test_a_killed_serverapp_resumes_from_its_checkpoint(tmp_path: Path, mnist_path: Path) -> None:
    port, node_port_base = free_ports(2)
    results = tmp_path / "results"
    run_config = f'num-server-rounds=3 max-samples-per-client=100 data-dir="{mnist_path}" results-dir="{results}"'
    settings = local.DeploySettings(
        workdir=tmp_path,
        app_dir=Path(local.__file__).resolve().parents[1],
        nodes=2,
        port=port,
        node_port_base=node_port_base,
        tls=False,
        auth=False,
        run_config=run_config,
    )
    deployment = local.start(settings)
    outcome: dict[str, object] = {}
    try:
        runner = threading.Thread(target=lambda: outcome.update(first=deployment.run_app(timeout=400)))
        runner.start()
        deadline = time.monotonic() + 300
        while len(_rounds(results)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        serverapps = deployment.serverapp_pids()
        assert len(_rounds(results)) == 2 and len(serverapps) == 1, (_rounds(results), serverapps)
        os.kill(serverapps[0], signal.SIGKILL)
        runner.join(timeout=300)
        assert not runner.is_alive(), "flwr run did not return after its ServerApp was killed"
        resumed = local.Deployment(
            dataclasses.replace(settings, run_config=run_config + " resume=true"), deployment.env
        )
        done = resumed.run_app(timeout=300)
    finally:
        deployment.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [int(r["round"]) for r in _rounds(results)] == [1, 2, 3]
    messages = list(csv.DictReader((results / "messages.csv").open()))
    catch_up = [m for m in messages if m["round"] == "3" and m["direction"] == "down" and m["message_type"] == "train"]
    assert len(catch_up) == 2 and {m["kind"] for m in catch_up} == {"delta"}, catch_up
    summary = json.loads((results / "summary.json").read_text())
    assert summary["num_rounds"] == 3 and summary["rejected"] == []
