"""Byte truth in a real deployment: a counting proxy between the SuperNodes and the SuperLink."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from helpers.deployment import deploy_settings, load_deploy_script, run_config
from helpers.proxy import CountingProxy, Exchange, classify

from fedsqueeze.server.results import add_wire_measurement

local = load_deploy_script()


def test_classify_splits_heads_bodies_idle_and_fab() -> None:
    exchanges = [
        Exchange("/v1/fleet/push-object", request_head=100, request_body=1000, response_head=50, response_body=2),
        Exchange("/v1/fleet/pull-object", request_head=100, request_body=90, response_head=50, response_body=700),
        Exchange("/v1/fleet/pull-messages", request_head=100, request_body=12, response_head=50, response_body=0),
        Exchange("/v1/fleet/send-node-heartbeat", request_head=100, request_body=20, response_head=50, response_body=2),
        Exchange("/v1/fleet/get-fab", request_head=100, request_body=80, response_head=50, response_body=16000),
    ]
    got = classify(exchanges)
    assert got["message_bodies"] == {"up": 1000, "down": 700}
    assert got["http_headers"] == {"up": 500, "down": 250}
    assert got["idle"] == {"up": 32, "down": 2}
    assert got["fab_download"] == {"up": 80, "down": 16000}
    assert got["control"] == {"up": 90, "down": 2}


def test_a_wire_measurement_needs_every_section(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({"totals": {"uplink_bytes": 10, "downlink_bytes": 10}}))
    with pytest.raises(ValueError, match="'idle' must map 'up' and 'down'"):
        add_wire_measurement(tmp_path, {"message_bodies": {"up": 1, "down": 1}, "http_headers": {"up": 1, "down": 1}})


@pytest.mark.slow  # a SuperLink, 2 SuperNodes and a ClientApp process per message: about 2 minutes
def test_reported_message_bytes_agree_with_the_wire(tmp_path: Path, mnist_path: Path) -> None:
    results = tmp_path / "results"
    config = run_config(results, mnist_path, num_server_rounds=2, max_samples_per_client=200)
    settings = deploy_settings(tmp_path, config, nodes=2)
    proxy = CountingProxy(("127.0.0.1", settings.port))
    settings = dataclasses.replace(settings, node_superlink=f"127.0.0.1:{proxy.port}")
    deployment = local.start(settings)
    try:
        done = deployment.run_app(timeout=300)
    finally:
        deployment.stop()
        proxy.close()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wire = classify(proxy.exchanges)
    entry = add_wire_measurement(results, wire)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["wire"] == json.loads(json.dumps(entry))
    ratio = entry["measured_over_reported"]
    assert 0.98 <= ratio["up"] <= 1.02 and 0.98 <= ratio["down"] <= 1.02, (ratio, wire, summary["totals"])
    # The FAB is downloaded once or twice (a SuperNode may find it in the FLWR_HOME the nodes share),
    # its bytes plus a small response envelope each time; it is small since fab-include names two modules
    fab_bytes = len(build_fab_from_disk(settings.app_dir))
    assert fab_bytes <= wire["fab_download"]["down"] <= 2 * (fab_bytes + 1_000)
    assert fab_bytes < 150_000
    assert wire["http_headers"]["up"] > wire["message_bodies"]["up"]  # ~850 B of headers per request
    (tmp_path / "wire.json").write_text(json.dumps({"by_path": proxy.by_path(), "raw": proxy.raw, **entry}))
    print(json.dumps({"by_path": proxy.by_path(), "raw": proxy.raw, "totals": summary["totals"], **entry}))
