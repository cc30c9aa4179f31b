"""Splitting a dataset's training samples among clients: partitioners, the server's holdout, one client's data."""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from fedsqueeze.data.loading import load_dataset

if TYPE_CHECKING:
    from fedsqueeze.config import RunConfig

__all__ = [
    "PARTITIONERS",
    "clear_partition_cache",
    "client_data",
    "client_data_of_run",
    "client_indices",
    "holdout_split",
    "partition",
]

#: Partitioning schemes accepted by :func:`partition`.
PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "classes")


_PARTITION_CACHE: dict[tuple, tuple[np.ndarray, ...]] = {}
_PARTITION_CACHE_SIZE = 64
_PARTITION_LOCK = threading.Lock()


def _is_int(value: object) -> bool:
    """True for Python and numpy integers, False for bools."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def partition(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str = "iid",
    *,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample indices among clients with a Flower Datasets partitioner.

    - ``"iid"``: samples shuffled with ``seed``, then cut into equal parts
      (``IidPartitioner``).
    - ``"dirichlet"``: per class, shares drawn from Dirichlet(``alpha``)
      (``DirichletPartitioner`` without self-balancing, redrawn up to 10 times until every
      client has at least ``min(10, N // num_partitions)`` samples); small ``alpha`` means
      skewed label distributions and sizes.
    - ``"classes"``: each client holds exactly ``classes_per_partition`` classes, each
      class split evenly among the clients holding it (``PathologicalPartitioner``,
      ``class_assignment_mode="first-deterministic"``: client ``i`` gets class
      ``i % num_classes`` and random others, so all classes are used once there are at
      least as many clients as classes).

    Results are cached per process (keyed on a hash of ``labels`` and the arguments).

    Parameters
    ----------
    labels : numpy.ndarray
        Integer class labels, shape ``(N,)``.
    num_partitions : int
        Number of clients, 1..N.
    partitioner : str
        One of :data:`PARTITIONERS` (default: ``"iid"``).
    alpha : float
        Dirichlet concentration, > 0; used by ``"dirichlet"`` only (default: 0.5).
    classes_per_partition : int
        Classes per client, 1..number of classes; used by ``"classes"`` only (default: 2).
    seed : int
        Seed, >= 0; the same seed gives the same partition (default: 0).

    Returns
    -------
    list of numpy.ndarray
        ``num_partitions`` sorted, read-only int64 index arrays into ``labels``, pairwise
        disjoint (for ``"iid"`` and ``"dirichlet"`` they cover all indices).

    Raises
    ------
    ValueError
        If an argument is invalid, or the partitioner cannot satisfy it (for instance more
        clients per class than samples of that class).
    """
    labels = np.asarray(labels)
    param = _check_partition_args(labels, num_partitions, partitioner, alpha, classes_per_partition, seed)
    n = len(labels)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    digest = hashlib.blake2b(labels.tobytes(), digest_size=16).hexdigest()
    key = (digest, n, int(num_partitions), partitioner, param, int(seed))
    with _PARTITION_LOCK:
        cached = _PARTITION_CACHE.get(key)
    if cached is None:
        cached = _partition(labels, int(num_partitions), partitioner, param, int(seed))
        with _PARTITION_LOCK:
            if len(_PARTITION_CACHE) >= _PARTITION_CACHE_SIZE:
                _PARTITION_CACHE.clear()
            _PARTITION_CACHE[key] = cached
    return list(cached)


def _check_partition_args(
    labels: np.ndarray, num_partitions: int, partitioner: str, alpha: float, classes_per_partition: int, seed: int
) -> float | int | None:
    """Validate :func:`partition`'s arguments; return the partitioner's parameter (alpha, classes or None)."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}")
    n = len(labels)
    if not _is_int(num_partitions) or not 1 <= num_partitions <= n:
        raise ValueError(f"num_partitions must be an integer in 1..{n}, got {num_partitions!r}")
    if partitioner not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {partitioner!r}; choose one of {', '.join(PARTITIONERS)}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if partitioner == "dirichlet":
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        return float(alpha)
    if partitioner == "classes":
        num_classes = len(np.unique(labels))
        if not _is_int(classes_per_partition) or not 1 <= classes_per_partition <= num_classes:
            raise ValueError(
                f"classes_per_partition must be an integer in 1..{num_classes} (the number of "
                f"classes in labels), got {classes_per_partition!r}"
            )
        return int(classes_per_partition)
    return None


def _partition(
    labels: np.ndarray, num_partitions: int, partitioner: str, param: float | int | None, seed: int
) -> tuple[np.ndarray, ...]:
    """Run the Flower Datasets partitioner and map its rows back to indices into ``labels``."""
    import datasets as hf_datasets  # imported lazily: only partitioning needs them
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    index = np.arange(len(labels), dtype=np.int64)
    if partitioner == "iid":
        # IidPartitioner cuts contiguous shards: shuffle first so the seed matters.
        index = np.random.default_rng(seed).permutation(len(labels))
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(cast(float, param)),
            min_partition_size=min(10, len(labels) // num_partitions),
            self_balancing=False,
            shuffle=False,
            seed=seed,
        )
    else:
        part = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(cast(int, param)),
            class_assignment_mode="first-deterministic",
            shuffle=False,
            seed=seed,
        )
    # Arrow format: columns come back as pyarrow arrays, which numpy converts at once
    # (the default format converts row by row: seconds for 60k rows).
    part.dataset = hf_datasets.Dataset.from_dict({"label": labels[index], "index": index}).with_format("arrow")
    try:
        with warnings.catch_warnings():
            # Dirichlet warns before each retry; its final failure is a ValueError below.
            warnings.simplefilter("ignore")
            parts = _partition_indices(part, num_partitions)
    except ValueError as err:
        settings = {
            "dirichlet": f" (alpha={param}, at least {min(10, len(labels) // num_partitions)} samples per client)",
            "classes": f" (classes_per_partition={param})",
        }
        raise ValueError(
            f"cannot split {len(labels)} samples into {num_partitions} {partitioner!r} "
            f"partitions{settings.get(partitioner, '')}: {err}"
        ) from err
    result = []
    for indices in parts:
        indices = np.sort(indices)
        indices.flags.writeable = False
        result.append(indices)
    return tuple(result)


def _partition_indices(part: Any, num_partitions: int) -> list[np.ndarray]:
    """The ``index`` column of each partition of a partitioner's dataset.

    ``load_partition`` goes through ``Dataset.select``, whose fingerprinting hashes
    the row list element by element: seconds for 60k rows held as numpy scalars. The
    Dirichlet and pathological partitioners compute every partition when
    ``num_partitions`` is first read and keep the rows in ``_partition_id_to_indices``
    (flwr-datasets 0.5 and 0.6): read them there when that holds them all, else fall
    back to ``load_partition``.
    """
    if part.num_partitions != num_partitions:  # Dirichlet and pathological: computes all
        raise ValueError(f"partitioner made {part.num_partitions} partitions, not {num_partitions}")
    computed = getattr(part, "_partition_id_to_indices", None)
    if isinstance(computed, dict) and sorted(computed) == list(range(num_partitions)):
        index = np.asarray(part.dataset["index"], dtype=np.int64)
        return [index[np.asarray(computed[i], dtype=np.int64)] for i in range(num_partitions)]
    return [np.asarray(part.load_partition(i)["index"], dtype=np.int64) for i in range(num_partitions)]


def holdout_split(num_train: int, holdout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split training indices into ``holdout`` samples kept back and the rest.

    The server keeps the held-out images as its unlabeled proxy set for distillation
    (:func:`fedsqueeze.server.distill.proxy_split` is this function); clients partition only
    the rest (:func:`client_indices` with ``holdout``). Both sides compute it from the run
    config alone, so the split is the same everywhere without being sent.

    Parameters
    ----------
    num_train : int
        Number of training samples.
    holdout : int
        Samples kept back, 1..num_train - 1.
    seed : int
        Seed of the permutation (default: 0).

    Returns
    -------
    held_out, rest : torch.Tensor
        Sorted int64 index tensors; disjoint, together all of ``range(num_train)``.
    """
    if not _is_int(num_train) or num_train < 2:
        raise ValueError(f"num_train must be an integer >= 2, got {num_train!r}")
    if not _is_int(holdout) or not 1 <= holdout < num_train:
        raise ValueError(
            f"holdout must be an integer in 1..{num_train - 1} (fewer than the training samples), got {holdout!r}"
        )
    order = torch.randperm(int(num_train), generator=torch.Generator().manual_seed(int(seed)))
    return order[:holdout].sort().values, order[holdout:].sort().values


def client_indices(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str = "dirichlet",
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
    max_samples: int | None = None,
    holdout: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Return the indices into the training set of one client's samples.

    With ``holdout > 0`` the ``holdout`` samples of :func:`holdout_split` (``seed``) are
    removed first (the server's proxy set) and the partitioner splits the remaining samples
    only; no client ever gets a held-out sample. The partition cache stays correct: it is
    keyed on the label array actually partitioned, and positions in it are mapped back to
    training indices after the cache.

    Parameters
    ----------
    dataset, partition_id, num_partitions, partitioner, alpha, classes_per_partition, seed, max_samples, data_dir
        As in :func:`client_data`.
    holdout : int
        Training samples kept away from every client, 0 for none (default: 0).

    Returns
    -------
    numpy.ndarray
        Sorted int64 indices into the training set.

    Raises
    ------
    ValueError
        If an argument is invalid (see :func:`client_data` and :func:`holdout_split`).
    """
    if not _is_int(num_partitions) or num_partitions < 1:
        raise ValueError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if not _is_int(partition_id) or not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id must be an integer in 0..{num_partitions - 1} "
            f"(num_partitions={num_partitions}), got {partition_id!r}"
        )
    if max_samples is not None and (not _is_int(max_samples) or max_samples < 1):
        raise ValueError(f"max_samples must be None or an integer >= 1, got {max_samples!r}")
    if not _is_int(holdout) or holdout < 0:
        raise ValueError(f"holdout must be an integer >= 0, got {holdout!r}")
    data = load_dataset(dataset, data_dir)
    labels = data.y_train.numpy()
    pool: np.ndarray | None = None
    if holdout:
        pool = holdout_split(len(labels), holdout, seed)[1].numpy()
        labels = labels[pool]
    parts = partition(
        labels,
        num_partitions,
        partitioner,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
        seed=seed,
    )
    indices = parts[partition_id] if pool is None else pool[parts[partition_id]]
    if max_samples is not None and max_samples < len(indices):
        rng = np.random.default_rng([seed, partition_id])
        indices = np.sort(rng.choice(indices, size=max_samples, replace=False))
    return np.array(indices, dtype=np.int64)


def client_data(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str = "dirichlet",
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
    max_samples: int | None = None,
    holdout: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return one client's training images and labels.

    Parameters
    ----------
    dataset : str
        Dataset name, see :func:`load_dataset`.
    partition_id : int
        This client's partition, 0..num_partitions-1.
    num_partitions : int
        Number of clients.
    partitioner : str
        One of :data:`PARTITIONERS` (default: ``"dirichlet"``).
    alpha : float
        Dirichlet concentration (default: 0.5).
    classes_per_partition : int
        Classes per client for ``"classes"`` (default: 2).
    seed : int
        Partitioning seed, also used for the ``max_samples`` subset and the ``holdout``
        split (default: 0).
    max_samples : int or None
        Keep at most this many samples, a random subset chosen from ``seed`` and
        ``partition_id``; None keeps all (default: None).
    holdout : int
        Training samples kept away from all clients (the server's proxy set, see
        :func:`holdout_split`); the partitioner splits the rest; 0 for none (default: 0).
    data_dir : str or os.PathLike or None
        Where the data lies, see :func:`load_dataset` (default: None).

    Returns
    -------
    tuple of (torch.Tensor, torch.Tensor)
        Images float32 ``(n, C, H, W)`` and labels int64 ``(n,)``: fresh copies.

    Raises
    ------
    ValueError
        If ``partition_id`` is out of range, ``max_samples`` is not a positive integer,
        ``holdout`` is negative or not smaller than the training set, or a partitioning
        argument is invalid.
    """
    indices = client_indices(
        dataset,
        partition_id,
        num_partitions,
        partitioner=partitioner,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
        seed=seed,
        max_samples=max_samples,
        holdout=holdout,
        data_dir=data_dir,
    )
    data = load_dataset(dataset, data_dir)
    idx = torch.from_numpy(indices)
    return data.x_train[idx], data.y_train[idx]


def clear_partition_cache() -> None:
    """Forget the partitions :func:`partition` computed in this process."""
    with _PARTITION_LOCK:
        _PARTITION_CACHE.clear()


def client_data_of_run(run: RunConfig, partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`client_data` with the dataset and partitioning keys of a run config: what node
    ``partition_id`` of ``num_partitions`` trains on (never the server's distillation proxy images)."""
    return client_data(
        run.dataset,
        partition_id,
        num_partitions,
        partitioner=run.partitioner,
        alpha=run.dirichlet_alpha,
        classes_per_partition=run.classes_per_partition,
        seed=run.seed,
        max_samples=run.max_samples_per_client or None,
        holdout=run.proxy_holdout(),
        data_dir=run.data_dir or None,
    )
