"""Load ``deploy/local.py`` (a script, not part of the package) and find free loopback ports for it."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType

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
