"""Loading datasets (MNIST, CIFAR-10) as normalised tensors: from an npz file, torchvision's layout or a download."""

from __future__ import annotations

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
    "Dataset",
    "clear_dataset_cache",
    "default_cache_dir",
    "load_dataset",
    "normalisation",
]

#: Environment variable naming a data file or folder, used when no ``data_dir`` is given.
DATA_ENV_VAR = "FEDSQUEEZE_DATA"


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
        return f"Dataset(name={self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)})"


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
            raise ValueError(f"{source}: y_{split} must be {len(x)} integer labels, found {y.dtype} {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise ValueError(f"{source}: y_{split} must lie in 0..{spec.num_classes - 1}, found {y.min()}..{y.max()}")


def _read_npz(name: str, path: Path) -> dict[str, np.ndarray]:
    """Read the four arrays from an npz file (no pickle); ValueError if keys are missing."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; expected keys {list(keys)}, found {npz.files}")
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


def _find_local(name: str, location: Path, looked: list[str], *, strict: bool = True) -> dict[str, np.ndarray] | None:
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
            warnings.warn(f"no {name} data at {given}; downloading it into {cache_dir}", stacklevel=3)
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


def clear_dataset_cache() -> None:
    """Forget the datasets :func:`load_dataset` loaded in this process."""
    with _DATASET_LOCK:
        _DATASET_CACHE.clear()
