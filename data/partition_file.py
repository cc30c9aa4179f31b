"""One client's data as a file of its own, for SuperNodes that should not hold or partition the whole dataset.

Partitioning needs Flower Datasets (and Hugging Face ``datasets``, ``pyarrow``, ...), which an edge
device need not install, and the whole training set, which it need not hold. A machine with the full
install cuts each client's share once (``deploy/make_partitions.py``) into ``.npz`` files; a SuperNode
started with ``--node-config "data-file=... partition-id=I num-partitions=N"`` trains on its file alone.

The file holds ``x_train, y_train, x_test, y_test`` (float32 images, int64 labels) and ``meta``, the
settings it was cut with as UTF-8 JSON bytes. Reading it checks those settings against the run's, so a
file cut for another partitioner, seed or sample cap is refused rather than trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["PARTITION_SETTINGS", "partition_meta", "write_partition_file", "read_partition_file"]

#: Run-config keys that decide a client's share of the data; a file records them and must match the run.
PARTITION_SETTINGS = (
    "dataset",
    "partitioner",
    "dirichlet-alpha",
    "classes-per-partition",
    "seed",
    "max-samples-per-client",
)

_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def partition_meta(run: Mapping[str, Any], partition_id: int, num_partitions: int, holdout: int) -> dict[str, Any]:
    """The settings that decide one client's share: the run's :data:`PARTITION_SETTINGS`, its place and holdout."""
    meta = {key: run[key] for key in PARTITION_SETTINGS}
    meta.update({"partition-id": int(partition_id), "num-partitions": int(num_partitions), "holdout": int(holdout)})
    return meta


def write_partition_file(
    path: str | os.PathLike[str],
    meta: Mapping[str, Any],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
) -> Path:
    """Write one client's data and the settings it was cut with (see the module docstring); return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        name: t.detach().cpu().numpy() for name, t in zip(_ARRAYS, (x_train, y_train, x_test, y_test), strict=True)
    }
    payload["meta"] = np.frombuffer(json.dumps(dict(meta), sort_keys=True).encode(), dtype=np.uint8)
    with open(target, "wb") as f:
        np.savez(f, **payload)
    return target


def read_partition_file(
    path: str | os.PathLike[str], expected: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read a file written by :func:`write_partition_file`: ``x_train, y_train, x_test, y_test``.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` file.
    expected : mapping
        The settings this node's share must have been cut with (:func:`partition_meta` of the run).

    Raises
    ------
    ValueError
        If the file lacks an array or ``meta``, an array has the wrong dtype or rank, or a setting
        differs from ``expected`` (the message names each one, expected against found).
    """
    with np.load(Path(path), allow_pickle=False) as npz:
        missing = [k for k in (*_ARRAYS, "meta") if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; expected {[*_ARRAYS, 'meta']}, found {npz.files}")
        meta = json.loads(npz["meta"].tobytes().decode())
        arrays = {k: npz[k] for k in _ARRAYS}
    wrong = {k: (v, meta.get(k)) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: expected {want!r}, found {got!r}" for k, (want, got) in wrong.items())
        raise ValueError(
            f"{path} was cut with other settings than this run's ({detail}); cut it again with "
            "deploy/make_partitions.py and the run's config"
        )
    for name in _ARRAYS:
        want = np.float32 if name.startswith("x") else np.int64
        rank = 4 if name.startswith("x") else 1
        if arrays[name].dtype != want or arrays[name].ndim != rank:
            raise ValueError(
                f"{path}: {name} must be {np.dtype(want).name} of rank {rank}, "
                f"found {arrays[name].dtype} of rank {arrays[name].ndim}"
            )
    x_train, y_train, x_test, y_test = (torch.from_numpy(arrays[k].copy()) for k in _ARRAYS)
    return x_train, y_train, x_test, y_test
