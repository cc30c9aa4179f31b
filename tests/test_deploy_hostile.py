"""A hostile SuperNode in a real deployment: its malformed and oversize replies are rejected, the run finishes.

Nothing hostile is in the package's ClientApp: the test starts one SuperNode with ``tests/helpers/hostile_site``
first on ``PYTHONPATH``, whose ``sitecustomize`` wraps that node's ClientApp with
:func:`fedsqueeze.simulation.hostile.hostile_mod`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers.deployment import REPO_ROOT, deploy_settings, load_deploy_script, read_rows, run_config

local = load_deploy_script()

HOSTILE = 1  # partition id of the hostile SuperNode
#: Round 1: an npy header that claims 2**40 float32 values (4 TiB); round 2: a blob whose codec spec is malformed.
KINDS = ["huge-npy-header", "d3-bad-spec"]


@pytest.mark.slow  # a SuperLink, 2 SuperNodes, 2 rounds: about 2 minutes
def test_a_hostile_supernodes_replies_are_rejected_and_the_run_finishes(tmp_path: Path, mnist_path: Path) -> None:
    results = tmp_path / "results"
    config = run_config(results, mnist_path, num_server_rounds=2, max_samples_per_client=150)
    site = REPO_ROOT / "tests" / "helpers" / "hostile_site"
    hostile_env = {
        "PYTHONPATH": os.pathsep.join(p for p in [str(site), os.environ.get("PYTHONPATH", "")] if p),
        "FEDSQUEEZE_TEST_HOSTILE_KINDS": ",".join(KINDS),
        "FEDSQUEEZE_TEST_HOSTILE_PARTITION": str(HOSTILE),
    }
    deployment = local.start(deploy_settings(tmp_path, config, nodes=2), node_env={HOSTILE: hostile_env})
    try:
        done = deployment.run_app(timeout=400)
    finally:
        deployment.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ClientApp made hostile" in (tmp_path / "logs" / f"supernode-{HOSTILE}.log").read_text()
    summary = json.loads((results / "summary.json").read_text())
    rejected = summary["rejected"]
    assert [r["round"] for r in rejected] == [1, 2], rejected
    assert len({r["node_id"] for r in rejected}) == 1  # both from the hostile node
    assert "header says shape (1099511627776,)" in rejected[0]["reason"]  # refused before anything is allocated
    assert "encoded with 'topk(ratio=0.5) < quantize(bits=4)'" in rejected[1]["reason"]
    rows = read_rows(results, "rounds.csv")
    assert [(int(r["replies"]), int(r["rejected"])) for r in rows] == [(2, 1), (2, 1)], rows
    assert summary["num_rounds"] == 2 and summary["num_nodes"] == 2
    print(json.dumps({"rejected": rejected, "rounds": rows}))
