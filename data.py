"""Datasets (MNIST, CIFAR-10) as normalised tensors, and their label-based partitioning among clients."""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATA_ENV_VAR",
    "DATASET_NAMES",
    "PARTITIONERS",
    "Dataset",
    "load_dataset",
    "partition",
    "client_data",
    "client_indices",
    "clear_caches",
    "default_cache_dir",
    "holdout_split",
    "normalisation",
]

#: Environment variable naming a data file or folder, used when no ``data_dir`` is given.
DATA_ENV_VAR = "FEDSQUEEZE_DATA"

#: Partitioning schemes accepted by :func:`partition`.
PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "classes")


@dataclass(frozen=True)
class _Spec:
    """What a dataset looks like on disk and how to normalise it."""

    image_shape: tuple[int, ...]  # as stored in the npz: HW (grey) or HWC (colour)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_folder: str  # folder torchvision's loader reads below its root
    torchvision_class: str


_SPECS: dict[str, _Spec] = {
    "mnist": _Spec((28, 28), 10, (0.1307,), (0.3081,), "MNIST/raw", "MNIST"),
    "cifar10": _Spec(
        (32, 32, 3),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "cifar-10-batches-py",
        "CIFAR10",
    ),
}

#: Names accepted by :func:`load_dataset`.
DATASET_NAMES: tuple[str, ...] = tuple(_SPECS)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset held in memory as normalised tensors.

    The tensors are shared by every caller of :func:`load_dataset` in the process:
    index them (which copies) rather than modify them in place.

    Attributes
    ----------
    name : str
        Dataset name, one of :data:`DATASET_NAMES`.
    x_train : torch.Tensor
        Training images, float32 ``(N, C, H, W)``, normalised per channel.
    y_train : torch.Tensor
        Training labels, int64 ``(N,)``.
    x_test : torch.Tensor
        Test images, float32 ``(M, C, H, W)``.
    y_test : torch.Tensor
        Test labels, int64 ``(M,)``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset."""
        return _SPECS[self.name].num_classes

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)})"
        )


# ----------------------------------------------------------------------------- loading


def _canonical_name(name: str) -> str:
    """Map ``"MNIST"``, ``"cifar-10"`` ... to a key of ``_SPECS``; ValueError if unknown."""
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else None
    if key not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    return key


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel mean and std that :func:`load_dataset` normalises ``name`` with.

    Pixels are scaled to [0, 1] first, then ``(x - mean) / std`` per channel.

    Parameters
    ----------
    name : str
        Dataset name, see :func:`load_dataset`.

    Returns
    -------
    tuple of (tuple of float, tuple of float)
        ``(mean, std)``, one value per channel.
    """
    spec = _SPECS[_canonical_name(name)]
    return spec.mean, spec.std


def default_cache_dir() -> Path:
    """Return the download folder: ``$XDG_CACHE_HOME/fedsqueeze`` or ``~/.cache/fedsqueeze``.

    Returns
    -------
    pathlib.Path
        The folder (it may not exist yet).
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedsqueeze"


def _normalise(images: np.ndarray, spec: _Spec) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W), normalised per channel."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x.to(torch.float32).contiguous()
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    x.div_(255.0).sub_(mean).div_(std)
    return x


def _check_arrays(name: str, source: str, arrays: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless the four arrays hold images and labels of dataset ``name``."""
    spec = _SPECS[name]
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != len(spec.image_shape) + 1 or x.shape[1:] != spec.image_shape:
            raise ValueError(
                f"{source}: x_{split} must be uint8 images of shape (N, "
                f"{', '.join(map(str, spec.image_shape))}) for {name}, "
                f"found {x.dtype} {x.shape}"
            )
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{source}: y_{split} must be {len(x)} integer labels, found {y.dtype} {y.shape}"
            )
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise ValueError(
                f"{source}: y_{split} must lie in 0..{spec.num_classes - 1}, "
                f"found {y.min()}..{y.max()}"
            )


def _read_npz(name: str, path: Path) -> dict[str, np.ndarray]:
    """Read the four arrays from an npz file (no pickle); ValueError if keys are missing."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise ValueError(
                f"{path}: missing arrays {missing}; expected keys {list(keys)}, found {npz.files}"
            )
        arrays = {k: npz[k] for k in keys}
    _check_arrays(name, str(path), arrays)
    return arrays


def _read_torchvision(name: str, root: Path, *, download: bool) -> dict[str, np.ndarray]:
    """Load both splits with torchvision's own loader below ``root`` (downloading if asked)."""
    import torchvision.datasets  # imported lazily: it is slow and only needed here

    cls = getattr(torchvision.datasets, _SPECS[name].torchvision_class)
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        ds = cls(str(root), train=split == "train", download=download)
        arrays[f"x_{split}"] = np.asarray(ds.data, dtype=np.uint8)
        arrays[f"y_{split}"] = np.asarray(ds.targets, dtype=np.int64)
    _check_arrays(name, f"{root} (torchvision layout)", arrays)
    return arrays


def _download(name: str, root: Path) -> dict[str, np.ndarray]:
    """Download ``name`` with torchvision into ``root`` and load it."""
    root.mkdir(parents=True, exist_ok=True)
    return _read_torchvision(name, root, download=True)


def _find_local(
    name: str, location: Path, looked: list[str], *, strict: bool = True
) -> dict[str, np.ndarray] | None:
    """Load ``name`` from a file or folder if it holds a copy; note each place tried in ``looked``.

    An unreadable torchvision folder raises ValueError when ``strict``, else counts as
    absent (an interrupted download in the cache folder is completed by the next one).
    """
    spec = _SPECS[name]
    if location.is_file():
        looked.append(f"{location} (file)")
        if location.suffix != ".npz":
            raise ValueError(f"{location}: expected an .npz file or a folder, found another file")
        return _read_npz(name, location)
    if not location.is_dir():
        looked.append(f"{location} (does not exist)")
        return None
    npz = location / f"{name}.npz"
    looked.append(str(npz))
    if npz.is_file():
        return _read_npz(name, npz)
    folder = location / spec.torchvision_folder
    looked.append(f"{folder} (torchvision layout)")
    if folder.is_dir():
        try:
            return _read_torchvision(name, location, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            if strict:
                raise ValueError(f"{folder} exists but cannot be read: {err}") from err
            looked[-1] = f"{folder} (torchvision layout, incomplete)"
    return None


_DATASET_CACHE: dict[tuple[str, str | None], Dataset] = {}
_DATASET_LOCK = threading.Lock()  # held while loading: concurrent callers wait for one load


def load_dataset(name: str = "mnist", data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Load a dataset as normalised tensors, once per process.

    Where the data comes from, in this order:

    1. ``data_dir`` if given, else the environment variable ``FEDSQUEEZE_DATA`` if set.
       It may name an ``.npz`` file (keys ``x_train``, ``y_train``, ``x_test``,
       ``y_test``; images uint8, ``(N, 28, 28)`` for MNIST, ``(N, 32, 32, 3)`` for
       CIFAR-10) or a folder holding ``mnist.npz`` / ``cifar10.npz`` or torchvision's
       layout (``MNIST/raw``, ``cifar-10-batches-py``).
    2. The download folder :func:`default_cache_dir`, with the same folder rules.
    3. A download there with torchvision (needs internet).

    Pixels are scaled to [0, 1] and normalised per channel (MNIST mean 0.1307, std
    0.3081; CIFAR-10 means 0.4914, 0.4822, 0.4465 and stds 0.2470, 0.2435, 0.2616).

    Parameters
    ----------
    name : str
        ``"mnist"`` or ``"cifar10"`` (case and dashes are ignored) (default: ``"mnist"``).
    data_dir : str or os.PathLike or None
        File or folder to load from; None uses ``FEDSQUEEZE_DATA`` (default: None).

    Returns
    -------
    Dataset
        The same object for the same arguments (and environment) within a process.

    Raises
    ------
    ValueError
        If the name is unknown, or a file that was found holds the wrong content.
    FileNotFoundError
        If no copy was found and the download failed; the message lists every place
        looked, the download error and how to provide the data.
    """
    key = _canonical_name(name)
    given = os.fspath(data_dir) if data_dir is not None else os.environ.get(DATA_ENV_VAR) or None
    cache_key = (key, str(Path(given).expanduser().resolve()) if given else None)
    with _DATASET_LOCK:
        if cache_key not in _DATASET_CACHE:
            _DATASET_CACHE[cache_key] = _load(key, given)
        return _DATASET_CACHE[cache_key]


def _load(name: str, given: str | None) -> Dataset:
    """Find (or download) dataset ``name`` and convert it to tensors."""
    spec = _SPECS[name]
    looked: list[str] = []
    arrays = None
    if given:
        arrays = _find_local(name, Path(given).expanduser(), looked)
    else:
        looked.append(f"no data-dir given and ${DATA_ENV_VAR} unset")
    cache_dir = default_cache_dir()
    if arrays is None:
        arrays = _find_local(name, cache_dir, looked, strict=False)
    if arrays is None:
        if given:
            warnings.warn(
                f"no {name} data at {given}; downloading it into {cache_dir}", stacklevel=3
            )
        try:
            arrays = _download(name, cache_dir)
        except Exception as err:  # noqa: BLE001 - any download failure ends in one clear error
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            places = "\n".join(f"  - {place}" for place in looked)
            raise FileNotFoundError(
                f"cannot find the {name} dataset. Looked in:\n{places}\n"
                f"and the download into {cache_dir} failed: {reason}\n"
                f"To fix: set 'data-dir' in the run config, or the environment variable "
                f"{DATA_ENV_VAR}, to a folder holding {name}.npz (keys x_train, y_train, "
                f"x_test, y_test) or torchvision's '{spec.torchvision_folder}' folder, "
                f"or run once with internet access."
            ) from err
    return Dataset(
        name=name,
        x_train=_normalise(arrays["x_train"], spec),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=_normalise(arrays["x_test"], spec),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
    )


# ------------------------------------------------------------------------- partitioning

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
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    n = len(labels)
    if not _is_int(num_partitions) or not 1 <= num_partitions <= n:
        raise ValueError(f"num_partitions must be an integer in 1..{n}, got {num_partitions!r}")
    if partitioner not in PARTITIONERS:
        raise ValueError(
            f"unknown partitioner {partitioner!r}; choose one of {', '.join(PARTITIONERS)}"
        )
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if partitioner == "dirichlet":
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
            math.isfinite(alpha) and alpha > 0
        ):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        param: float | int | None = float(alpha)
    elif partitioner == "classes":
        num_classes = len(np.unique(labels))
        if not _is_int(classes_per_partition) or not 1 <= classes_per_partition <= num_classes:
            raise ValueError(
                f"classes_per_partition must be an integer in 1..{num_classes} (the number of "
                f"classes in labels), got {classes_per_partition!r}"
            )
        param = int(classes_per_partition)
    else:
        param = None

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
            alpha=float(param),
            min_partition_size=min(10, len(labels) // num_partitions),
            self_balancing=False,
            shuffle=False,
            seed=seed,
        )
    else:
        part = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(param),
            class_assignment_mode="first-deterministic",
            shuffle=False,
            seed=seed,
        )
    # Arrow format: columns come back as pyarrow arrays, which numpy converts at once
    # (the default format converts row by row: seconds for 60k rows).
    part.dataset = hf_datasets.Dataset.from_dict(
        {"label": labels[index], "index": index}
    ).with_format("arrow")
    try:
        with warnings.catch_warnings():
            # Dirichlet warns before each retry; its final failure is a ValueError below.
            warnings.simplefilter("ignore")
            parts = _partition_indices(part, num_partitions)
    except ValueError as err:
        settings = {
            "dirichlet": f" (alpha={param}, at least {min(10, len(labels) // num_partitions)} "
            f"samples per client)",
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


def _partition_indices(part: object, num_partitions: int) -> list[np.ndarray]:
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
    return [
        np.asarray(part.load_partition(i)["index"], dtype=np.int64) for i in range(num_partitions)
    ]


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
        raise ValueError(f"holdout must be an integer in 1..{num_train - 1} (fewer than the training samples), got {holdout!r}")
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


def clear_caches(*, datasets: bool = True, partitions: bool = True) -> None:
    """Forget datasets and/or partitions cached in this process (mainly for tests).

    Parameters
    ----------
    datasets : bool
        Forget the loaded datasets (default: True).
    partitions : bool
        Forget the computed partitions (default: True).
    """
    if datasets:
        with _DATASET_LOCK:
            _DATASET_CACHE.clear()
    if partitions:
        with _PARTITION_LOCK:
            _PARTITION_CACHE.clear()
