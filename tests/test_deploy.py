"""A real deployment on loopback (deploy/local.py): TLS, SuperNode authentication, 2 nodes, 2 rounds."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers.deployment import deploy_settings, load_deploy_script, pid_alive, run_config

local = load_deploy_script()


def _group_members(pgids: set[int]) -> set[int]:
    """Live processes whose process group is one of ``pgids``."""
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) in pgids and pid_alive(int(entry.name)):
                    members.add(int(entry.name))
            except ProcessLookupError:
                continue
    return members


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait up to ``timeout`` s for ``proc`` to exit (its children may live on: stop() ends them)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)


def test_connection_config_names_the_certificate(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    local.write_connection(config, "here", "127.0.0.1:9", tmp_path / "ca.crt")
    text = config.read_text()
    assert 'default = "here"' in text and "[superlink.here]" in text
    assert f'root-certificates = "{tmp_path / "ca.crt"}"' in text and "insecure" not in text
    local.write_connection(config, "plain", "127.0.0.1:9", None)
    assert "insecure = true" in config.read_text()


def test_certificate_is_valid_for_loopback(tmp_path: Path) -> None:
    from cryptography import x509

    local.make_certificates(tmp_path / "ca.crt", tmp_path / "s.pem", tmp_path / "s.key")
    cert = x509.load_pem_x509_certificate((tmp_path / "s.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert (tmp_path / "s.key").stat().st_mode & 0o077 == 0


def test_node_key_is_openssh_ecdsa_p384(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    local.make_node_key(tmp_path / "k")
    private = load_ssh_private_key((tmp_path / "k").read_bytes(), None)
    public = load_ssh_public_key((tmp_path / "k.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert public == private.public_key()


@pytest.mark.slow  # a SuperLink, 2 SuperNodes and a ClientApp process per message: about 2 minutes
def test_tls_and_node_auth_two_nodes_two_rounds(tmp_path: Path, mnist_path: Path) -> None:
    results = tmp_path / "results"
    config = run_config(results, mnist_path, num_server_rounds=2, max_samples_per_client=200)
    deployment = local.start(deploy_settings(tmp_path, config, nodes=2, secure=True))
    try:
        pgids = {p.pid for p in [deployment.superlink, *deployment.supernodes] if p is not None}
        done = deployment.run_app(timeout=300)
        started = deployment.started_pids()
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summary = json.loads((results / "summary.json").read_text())
        assert summary["num_rounds"] == 2 and summary["num_nodes"] == 2
        assert "Uvicorn running on https://127.0.0.1" in (tmp_path / "logs" / "superlink.log").read_text()

        # A SuperNode whose key was never registered is refused and does not join.
        local.make_node_key(deployment.node_key(2))
        stranger = deployment.start_supernode(2)
        pgids.add(stranger.pid)
        _wait_exit(stranger, timeout=60)
        assert stranger.returncode not in (None, 0)
        assert "Failed to activate SuperNode" in (tmp_path / "logs" / "supernode-2.log").read_text()
    finally:
        deployment.stop()
    assert _group_members(pgids) == set(), "stop() left processes of the deployment running"
    assert {pid for pid in started if pid_alive(pid)} == set(), "stop() left a descendant running"


@pytest.mark.slow  # waits out the SuperLink's heartbeat timeout: about 2 minutes
def test_a_restarted_registered_supernode_is_retried_until_it_is_back(tmp_path: Path) -> None:
    deployment = local.start(deploy_settings(tmp_path, "", nodes=1, secure=True))
    try:
        deployment.kill_supernode(0)  # a crash: the SuperLink still lists it online
        attempts = deployment.restart_supernode(0, timeout=180)
        local.wait_for_nodes(deployment, 1, timeout=30)
    finally:
        deployment.stop()
    log = (tmp_path / "logs" / "supernode-0.log").read_text()
    # Refused while listed online (Flower 1.42), then back once the SuperLink marked it offline
    assert attempts > 1 and log.count("Failed to activate SuperNode") == attempts - 1, (attempts, log[-2000:])
