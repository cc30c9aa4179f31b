"""What the deployment tests share: ``deploy/local.py`` (a script, not part of the package) loaded as a module,
free loopback ports, settings, the results a run writes, and a run in the background."""

from __future__ import annotations

import csv
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

#: The repository root (this file lives in ``<root>/tests/helpers``).
REPO_ROOT = Path(__file__).resolve().parents[2]


def load_deploy_script() -> ModuleType:
    """``deploy/local.py`` as a module (the repository root is not put on ``sys.path``: its ``codecs/``
    folder would shadow the standard library's ``codecs``)."""
    name = "fedsqueeze_deploy_local"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "deploy" / "local.py")
    assert spec is not None and spec.loader is not None, "deploy/local.py is missing"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that nothing listens on right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def run_config(results: Path, data: Path, **keys: object) -> str:
    """A ``--run-config`` string: ``keys`` (``max_samples_per_client`` for ``max-samples-per-client``),
    plus ``data-dir`` and ``results-dir``."""
    items = [f"{k.replace('_', '-')}={json.dumps(v) if isinstance(v, str) else v}" for k, v in keys.items()]
    return " ".join([*items, f"data-dir={json.dumps(str(data))}", f"results-dir={json.dumps(str(results))}"])


def deploy_settings(workdir: Path, config: str, *, nodes: int = 2, secure: bool = False, **extra: Any) -> Any:
    """``DeploySettings`` on free loopback ports; ``secure``: TLS and SuperNode authentication."""
    local = load_deploy_script()
    port, node_port_base = free_ports(2)  # SuperNode i opens port node_port_base + i
    return local.DeploySettings(
        workdir=workdir,
        app_dir=REPO_ROOT,
        nodes=nodes,
        port=port,
        node_port_base=node_port_base,
        tls=secure,
        auth=secure,
        run_config=config,
        **extra,
    )


def read_rows(results: Path, name: str) -> list[dict[str, str]]:
    """The rows of ``rounds.csv`` or ``messages.csv`` written so far (none if the file is not there yet)."""
    path = results / name
    return list(csv.DictReader(path.open())) if path.exists() else []


class BackgroundRun:
    """``deployment.run_app()`` in a thread, so that a test can act on the deployment while it runs."""

    def __init__(self, deployment: Any, timeout: float) -> None:
        self._outcome: dict[str, subprocess.CompletedProcess[str]] = {}
        self._thread = threading.Thread(target=lambda: self._outcome.update(done=deployment.run_app(timeout=timeout)))
        self._thread.start()

    def wait_for_rounds(self, results: Path, count: int, timeout: float) -> None:
        """Wait until ``rounds.csv`` holds ``count`` rounds; fail the test if it does not in time."""
        deadline = time.monotonic() + timeout
        while len(read_rows(results, "rounds.csv")) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(read_rows(results, "rounds.csv")) >= count, f"round {count} did not finish in {timeout:.0f} s"

    def join(self, timeout: float) -> subprocess.CompletedProcess[str]:
        """``flwr run``'s outcome; fails the test if it has not returned within ``timeout`` s."""
        self._thread.join(timeout=timeout)
        assert not self._thread.is_alive(), f"flwr run did not return within {timeout:.0f} s"
        return self._outcome["done"]
