"""What a deployed node keeps on disk so that, restarted, it can rejoin with a delta catch-up.

A SuperNode keeps fedsqueeze's per-node state (the model version it holds, that model, the uplink
error-feedback residual) in ``context.state``, in memory: a SuperNode that crashes and is started
again holds nothing, and the server has to send it the whole model. With the node-config key
``state-dir`` set, the compression mod also writes that state to the folder after every reply
it sends, and reads it back on a node that lost it.

Format of the folder (no pickle anywhere; every file is written to a temporary name and then
moved into place with :func:`os.replace`, so a crash leaves the previous state whole):

- ``state.json``: the manifest, written last. ``format``, the Flower ``run_id``, the ``uplink``
  codec spec, ``arch`` (the compact student's architecture string after a ``broadcast-compact``
  switch, else empty), ``versions`` (newest last; each ``version``, ``file``, ``digest`` of the model),
  ``names`` (the tensor names, in order) and ``feedback`` (``file``, ``version`` the residual was
  made against, ``names``) or null.
- ``reference-<version>.npz``: a model version the node holds, its tensors as ``arr_0 ..``
  in the manifest's name order (read with ``allow_pickle=False``). The latest two are kept:
  a node killed after it replied but before the server accepted the reply is still asked
  for the catch-up from the version before.
- ``feedback-<version>.npz``: the error-feedback residual and codec state, the same way.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log

from fedsqueeze.protocol import model_digest

__all__ = ["STATE_DIR_KEY", "NodeState", "NodeStateError", "load_node_state", "save_node_state"]

#: Node-config key naming the folder where a deployed node keeps its state across restarts.
STATE_DIR_KEY = "state-dir"
FORMAT = "fedsqueeze-node-state/1"
MANIFEST = "state.json"
#: Model versions kept on disk: the newest, and the one before for a reply the server never got.
KEEP_VERSIONS = 2
_FILE_NAME = re.compile(r"(reference|feedback)-\d+\.npz")

Tensors = dict[str, torch.Tensor]


class NodeStateError(ValueError):
    """A saved node state that cannot be used: corrupt, of another format, or inconsistent."""


@dataclass(frozen=True)
class NodeState:
    """One node's state: the model ``reference`` at ``version`` and the uplink residual, for run ``run_id``.

    ``node`` is the node's stable key (its partition id, else its node id): a folder that another
    node wrote is refused.
    """

    run_id: int
    node: int
    version: int
    reference: Tensors
    uplink: str
    feedback: Tensors | None = None
    feedback_version: int | None = None
    arch: str = ""  # the compact student's architecture string once the run switched to it (broadcast-compact)


def save_node_state(directory: str | os.PathLike[str], state: NodeState) -> None:
    """Write ``state`` to ``directory``, keeping the previous version of the same run beside it.

    Raises
    ------
    OSError
        If the folder cannot be written; the state saved before stays whole.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    kept = [v for v in _previous_versions(folder, state) if v["version"] != state.version]
    reference_file = f"reference-{state.version}.npz"
    _write_npz(folder / reference_file, state.reference)
    names = list(state.reference)
    versions = [
        *kept[-(KEEP_VERSIONS - 1) :],
        {"version": state.version, "file": reference_file, "digest": model_digest(state.reference)},
    ]
    feedback = None
    if state.feedback is not None and state.feedback_version is not None:
        feedback_file = f"feedback-{state.version}.npz"
        _write_npz(folder / feedback_file, state.feedback)
        feedback = {"file": feedback_file, "version": state.feedback_version, "names": list(state.feedback)}
    manifest = {
        "format": FORMAT,
        "run_id": state.run_id,
        "node": state.node,
        "uplink": state.uplink,
        "arch": state.arch,
        "names": names,
        "versions": versions,
        "feedback": feedback,
    }
    _atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    in_use = {v["file"] for v in versions} | ({feedback["file"]} if feedback else set())
    for stale in folder.glob("*.npz"):
        if _FILE_NAME.fullmatch(stale.name) and stale.name not in in_use:
            stale.unlink(missing_ok=True)


def load_node_state(
    directory: str | os.PathLike[str], run_id: int, node: int, usable: Callable[[int], bool]
) -> NodeState | None:
    """The newest version saved by ``node`` for which ``usable(version)`` holds, for run ``run_id``; None if none.

    Never raises for what is in the folder: a missing folder or manifest, a state of another run
    or no usable version give None (logged at INFO), a corrupt or foreign state (another format,
    another node's) gives None with an ERROR log saying what was wrong. The node then holds
    nothing, and the server sends it the model in full.
    """
    folder = Path(directory)
    if not (folder / MANIFEST).exists():
        log(logging.INFO, "fedsqueeze: no saved node state in %s", folder)
        return None
    try:
        return _load(folder, run_id, node, usable)
    except (NodeStateError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        log(
            logging.ERROR,
            "fedsqueeze: the node state saved in %s is unusable (%s: %s); this node holds no model "
            "and the server will send it in full",
            folder,
            type(err).__name__,
            err,
        )
        return None


def _load(folder: Path, run_id: int, node: int, usable: Callable[[int], bool]) -> NodeState | None:
    manifest = _read_manifest(folder / MANIFEST)
    if manifest["node"] != node:
        raise NodeStateError(f"it was written by node {manifest['node']}, this is node {node} (a shared state-dir?)")
    if manifest["run_id"] != run_id:
        log(
            logging.INFO,
            "fedsqueeze: the node state in %s is of run %s, not %s: not used",
            folder,
            manifest["run_id"],
            run_id,
        )
        return None
    chosen = [v for v in manifest["versions"] if usable(v["version"])]
    if not chosen:
        held = [v["version"] for v in manifest["versions"]]
        log(logging.INFO, "fedsqueeze: the node state in %s holds versions %s, none of them asked for", folder, held)
        return None
    entry = chosen[-1]
    reference = _read_npz(folder / entry["file"], manifest["names"])
    found = model_digest(reference)
    if found != entry["digest"]:
        raise NodeStateError(f"{entry['file']} has digest {found[:16]}.., the manifest says {entry['digest'][:16]}..")
    feedback, feedback_version = None, None
    if manifest["feedback"] is not None:
        feedback = _read_npz(folder / manifest["feedback"]["file"], manifest["feedback"]["names"])
        feedback_version = manifest["feedback"]["version"]
    arch = manifest.get("arch", "")
    return NodeState(run_id, node, entry["version"], reference, manifest["uplink"], feedback, feedback_version, arch)


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, checked field by field (it decides which files are opened)."""
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise NodeStateError(f"{path.name}: expected format {FORMAT!r}, found {found!r}")
    _expect(isinstance(manifest.get("run_id"), int), path, "run_id", "an integer", manifest.get("run_id"))
    _expect(isinstance(manifest.get("node"), int), path, "node", "an integer", manifest.get("node"))
    _expect(isinstance(manifest.get("uplink"), str), path, "uplink", "a codec spec", manifest.get("uplink"))
    _expect(_is_names(manifest.get("names")), path, "names", "a list of strings", manifest.get("names"))
    arch = manifest.get("arch", "")
    _expect(isinstance(arch, str), path, "arch", "a student architecture string, or empty", arch)
    versions = manifest.get("versions")
    _expect(isinstance(versions, list) and bool(versions), path, "versions", "a non-empty list", versions)
    for entry in versions or ():
        _expect(
            _is_entry(entry, {"version": int, "file": str, "digest": str}),
            path,
            "versions",
            "entries of version, file (reference-<n>.npz), digest",
            entry,
        )
    feedback = manifest.get("feedback")
    if feedback is not None:
        ok = _is_entry(feedback, {"file": str, "version": int}) and _is_names(feedback.get("names"))
        _expect(ok, path, "feedback", "null or file (feedback-<n>.npz), version, names", feedback)
    return manifest


def _is_entry(entry: object, fields: Mapping[str, type]) -> bool:
    return (
        isinstance(entry, dict)
        and all(isinstance(entry.get(k), t) and not isinstance(entry.get(k), bool) for k, t in fields.items())
        and _FILE_NAME.fullmatch(entry["file"]) is not None  # a bare name in the folder: no path from the file
    )


def _is_names(names: object) -> bool:
    return isinstance(names, list) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)


def _expect(ok: bool, path: Path, field: str, expected: str, found: object) -> None:
    if not ok:
        raise NodeStateError(f"{path.name}: {field!r} must be {expected}, found {str(found)[:200]}")


def _read_npz(path: Path, names: list[str]) -> Tensors:
    with np.load(path, allow_pickle=False) as npz:
        keys = [f"arr_{i}" for i in range(len(names))]
        if sorted(npz.files) != sorted(keys):
            raise NodeStateError(
                f"{path.name}: expected the arrays {keys[:3]}.. ({len(keys)}), found {npz.files[:3]}.."
            )
        arrays = [npz[k] for k in keys]
    return {name: torch.from_numpy(np.array(a, copy=True)) for name, a in zip(names, arrays, strict=True)}


def _write_npz(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, *(t.detach().cpu().numpy() for t in tensors.values()))
    _atomic_write(path, buffer.getvalue())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _previous_versions(folder: Path, state: NodeState) -> list[dict[str, Any]]:
    """The versions saved before for the same run whose files are still there (else none)."""
    try:
        manifest = _read_manifest(folder / MANIFEST)
    except (OSError, ValueError):
        return []  # nothing saved yet, or unusable: it is replaced
    same_model = manifest["names"] == list(state.reference) and manifest.get("arch", "") == state.arch
    if manifest["run_id"] != state.run_id or not same_model:
        return []
    return [v for v in manifest["versions"] if (folder / v["file"]).exists()]
