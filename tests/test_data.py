"""Tests of fedsqueeze.data: loading, normalisation, the missing-data error, partitioning, client data."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsqueeze import data
from fedsqueeze.data import Dataset, clear_caches, client_data, load_dataset, partition


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No data anywhere: empty cache folder, no FEDSQUEEZE_DATA, downloads fail at once."""
    torchvision_datasets = pytest.importorskip("torchvision.datasets")

    def fail(self: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nnetwork is unreachable")

    monkeypatch.setattr(torchvision_datasets.MNIST, "download", fail)
    monkeypatch.setattr(torchvision_datasets.CIFAR10, "download", fail)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)
    return tmp_path


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# ----------------------------------------------------------------------------- loading


def test_load_mnist_from_the_shared_npz(mnist: Dataset) -> None:
    assert mnist.name == "mnist"
    assert mnist.x_train.shape == (60_000, 1, 28, 28)
    assert mnist.x_test.shape == (10_000, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32
    assert mnist.y_train.dtype == torch.int64
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert abs(mnist.x_train.mean().item()) < 0.01
    assert abs(mnist.x_train.std().item() - 1.0) < 0.01
    assert mnist.num_classes == 10


def test_load_is_cached_per_process(mnist_path: Path, mnist: Dataset) -> None:
    assert load_dataset("mnist", mnist_path) is mnist
    assert load_dataset("MNIST", str(mnist_path)) is mnist


def tiny_mnist(folder: Path, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Write a small random ``mnist.npz`` into ``folder``; return its test images and labels."""
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    write_npz(folder / "mnist.npz", x_train=images, y_train=labels, x_test=images[: n // 2], y_test=labels[: n // 2])
    return images[: n // 2], labels[: n // 2]


def test_env_var_may_name_a_folder_holding_mnist_npz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, labels = tiny_mnist(tmp_path / "env")
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "env"))
    loaded = load_dataset("mnist")
    assert loaded.x_test.shape == (6, 1, 28, 28)
    assert loaded.y_test.tolist() == labels.tolist()
    assert load_dataset() is loaded


def test_explicit_data_dir_wins_over_the_env_var(
    tmp_path: Path, mnist: Dataset, mnist_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "nothing-here"))
    assert load_dataset("mnist", mnist_path) is mnist


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format of the original MNIST files."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_load_mnist_from_torchvision_layout(tmp_path: Path, offline: Path) -> None:
    rng = np.random.default_rng(0)
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    splits = {"train": 20, "t10k": 8}
    expected = {}
    for prefix, n in splits.items():
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        expected[prefix] = (images, labels)
    loaded = load_dataset("mnist", tmp_path / "tv")
    assert loaded.x_train.shape == (20, 1, 28, 28)
    assert loaded.y_test.tolist() == expected["t10k"][1].tolist()
    pixels = torch.from_numpy(expected["train"][0]).float().div(255).unsqueeze(1)
    torch.testing.assert_close(loaded.x_train, (pixels - 0.1307) / 0.3081)


def test_load_cifar10_npz_normalises_each_channel(tmp_path: Path) -> None:
    # Every pixel is (r, g, b) = (0, 128, 255): after HWC -> CHW each channel is constant.
    images = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    images[..., 1], images[..., 2] = 128, 255
    labels = np.arange(6, dtype=np.uint8)
    write_npz(tmp_path / "cifar10.npz", x_train=images, y_train=labels, x_test=images[:2], y_test=labels[:2])
    loaded = load_dataset("CIFAR-10", tmp_path)
    assert loaded.name == "cifar10"
    assert loaded.x_train.shape == (6, 3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465])
    std = torch.tensor([0.2470, 0.2435, 0.2616])
    expected = (torch.tensor([0.0, 128.0, 255.0]) / 255 - mean) / std
    torch.testing.assert_close(loaded.x_train[:, :, 5, 7], expected.expand(6, 3))
    assert loaded.y_train.tolist() == list(range(6))


def test_missing_data_error_names_every_place_looked(offline: Path) -> None:
    empty = offline / "empty"
    empty.mkdir()
    with pytest.warns(UserWarning, match="downloading"):
        with pytest.raises(FileNotFoundError) as info:
            load_dataset("mnist", empty)
    message = str(info.value)
    cache = offline / "cache" / "fedsqueeze"
    for place in (empty / "mnist.npz", empty / "MNIST" / "raw", cache):
        assert str(place) in message
    assert "network is unreachable" in message
    assert "Error downloading train-images-idx3-ubyte.gz: network is unreachable" in message
    assert data.DATA_ENV_VAR in message and "data-dir" in message


def test_unreadable_torchvision_folder_is_an_error_where_given(offline: Path) -> None:
    (offline / "given" / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(ValueError, match="MNIST/raw exists but cannot be read"):
        load_dataset("mnist", offline / "given")


def test_incomplete_download_in_the_cache_is_downloaded_again(offline: Path) -> None:
    (offline / "cache" / "fedsqueeze" / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)raw \(torchvision layout, incomplete\).*"
        r"download into .* failed",
    ):
        load_dataset("mnist")


def test_missing_data_without_data_dir_mentions_the_env_var(offline: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{data.DATA_ENV_VAR} unset"):
        load_dataset("cifar10")


def test_npz_with_missing_keys_is_rejected(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "mnist.npz", x_train=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="missing arrays.*y_train"):
        load_dataset("mnist", path)


def test_npz_with_wrong_image_shape_is_rejected(tmp_path: Path) -> None:
    images = np.zeros((2, 28, 28), np.uint8)
    labels = np.zeros(2, np.uint8)
    path = write_npz(tmp_path / "mine.npz", x_train=images, y_train=labels, x_test=images, y_test=labels)
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\) for cifar10"):
        load_dataset("cifar10", path)


def test_a_file_that_is_not_npz_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mnist.csv"
    path.write_text("0,1\n")
    with pytest.raises(ValueError, match=r"\.npz"):
        load_dataset("mnist", path)


def test_unknown_dataset_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="imagenet.*mnist, cifar10"):
        load_dataset("imagenet")


# ------------------------------------------------------------------------- partitioning


def label_array(mnist: Dataset) -> np.ndarray:
    return mnist.y_train.numpy()


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_everything(mnist: Dataset, partitioner: str) -> None:
    labels = label_array(mnist)
    parts = partition(labels, 10, partitioner, alpha=0.5, seed=1)
    assert len(parts) == 10
    merged = np.concatenate(parts)
    assert len(merged) == len(labels)
    assert np.array_equal(np.sort(merged), np.arange(len(labels)))
    assert all(len(p) > 0 and np.all(np.diff(p) > 0) for p in parts)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "classes"])
def test_partition_is_reproducible_from_the_seed(mnist: Dataset, partitioner: str) -> None:
    labels = label_array(mnist)
    first = partition(labels, 10, partitioner, seed=5)
    clear_caches(datasets=False)  # recompute instead of returning the cached arrays
    again = partition(labels, 10, partitioner, seed=5)
    other = partition(labels, 10, partitioner, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_partition_results_are_read_only(mnist: Dataset) -> None:
    parts = partition(label_array(mnist), 4, "iid")
    with pytest.raises(ValueError):
        parts[0][0] = 1


def test_iid_partitions_are_equal_sized_and_balanced(mnist: Dataset) -> None:
    labels = label_array(mnist)
    parts = partition(labels, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    overall = np.bincount(labels, minlength=10) / len(labels)
    for p in parts:
        share = np.bincount(labels[p], minlength=10) / len(p)
        assert np.abs(share - overall).max() < 0.03


def test_classes_partitioner_gives_each_client_k_classes(mnist: Dataset) -> None:
    labels = label_array(mnist)
    for k in (1, 2, 3):
        parts = partition(labels, 10, "classes", classes_per_partition=k, seed=2)
        assert all(len(np.unique(labels[p])) == k for p in parts)
        merged = np.concatenate(parts)
        assert len(np.unique(merged)) == len(merged)  # disjoint
        assert set(labels[merged]) == set(range(10))  # every class is used


def _mean_top_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def test_small_dirichlet_alpha_skews_the_labels(mnist: Dataset) -> None:
    labels = label_array(mnist)
    skewed = _mean_top_class_share(labels, partition(labels, 10, "dirichlet", alpha=0.1))
    even = _mean_top_class_share(labels, partition(labels, 10, "dirichlet", alpha=1000.0))
    assert skewed > 0.4  # most of a client's data comes from one class
    assert even < 0.15  # close to the 0.11 of the whole set
    sizes = [len(p) for p in partition(labels, 10, "dirichlet", alpha=0.1)]
    assert max(sizes) > 2 * min(sizes)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"partitioner": "shards"}, "shards.*iid, dirichlet, classes"),
        ({"num_partitions": 0}, "num_partitions"),
        ({"num_partitions": 101}, r"num_partitions must be an integer in 1\.\.100"),
        ({"partitioner": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"partitioner": "dirichlet", "alpha": float("nan")}, "alpha"),
        ({"partitioner": "classes", "classes_per_partition": 0}, r"classes_per_partition.*1\.\.10"),
        ({"partitioner": "classes", "classes_per_partition": 11}, r"classes_per_partition.*1\.\.10"),
        ({"seed": -1}, "seed"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    labels = np.arange(100) % 10
    args = {"num_partitions": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        partition(labels, **args)


def test_partition_rejects_non_label_arrays() -> None:
    with pytest.raises(ValueError, match="1-D integer"):
        partition(np.zeros((4, 2), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="1-D integer"):
        partition(np.linspace(0, 1, 10), 2)


def test_impossible_dirichlet_split_says_why() -> None:
    labels = np.arange(40) % 2
    with pytest.raises(ValueError, match="cannot split 40 samples into 20 'dirichlet'.*alpha=0.01"):
        partition(labels, 20, "dirichlet", alpha=0.01)


# ---------------------------------------------------------------------------- client data


def test_client_data_is_the_partition(mnist: Dataset, mnist_path: Path) -> None:
    parts = partition(label_array(mnist), 5, "dirichlet", alpha=0.5, seed=3)
    x, y = client_data("mnist", 2, 5, partitioner="dirichlet", alpha=0.5, seed=3, data_dir=mnist_path)
    idx = torch.as_tensor(np.array(parts[2]))
    assert torch.equal(y, mnist.y_train[idx])
    assert torch.equal(x, mnist.x_train[idx])
    x[0].fill_(0.0)  # a copy: the shared dataset is untouched
    assert not torch.equal(mnist.x_train[idx[0]], x[0])


def test_client_data_max_samples_takes_a_seeded_subset(mnist: Dataset, mnist_path: Path) -> None:
    kwargs = {"partitioner": "iid", "data_dir": mnist_path}
    full_x, full_y = client_data("mnist", 1, 10, **kwargs)
    x, y = client_data("mnist", 1, 10, max_samples=100, **kwargs)
    x2, y2 = client_data("mnist", 1, 10, max_samples=100, **kwargs)
    x3, _ = client_data("mnist", 1, 10, max_samples=100, seed=1, **kwargs)
    assert x.shape == (100, 1, 28, 28) and y.shape == (100,)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, x3)
    # every sampled image is one of this client's images
    flat = full_x.flatten(1)
    for row in x[:10].flatten(1):
        assert (flat == row).all(dim=1).any()
    big_x, _ = client_data("mnist", 1, 10, max_samples=10**6, **kwargs)
    assert torch.equal(big_x, full_x)


@pytest.mark.parametrize("partition_id", [-1, 4, 2.0])
def test_client_data_rejects_bad_partition_id(partition_id: object, mnist_path: Path) -> None:
    with pytest.raises(ValueError, match=r"partition_id must be an integer in 0\.\.3"):
        client_data("mnist", partition_id, 4, data_dir=mnist_path)


def test_client_data_rejects_bad_max_samples(mnist_path: Path) -> None:
    with pytest.raises(ValueError, match="max_samples"):
        client_data("mnist", 0, 4, max_samples=0, data_dir=mnist_path)


def test_data_package_reexports_loading_and_partitioning() -> None:
    """``fedsqueeze.data`` stays the one import path for client and server code after the split."""
    from fedsqueeze.data import loading, partitioning

    for name in data.__all__:
        owners = [m for m in (loading, partitioning) if hasattr(m, name)]
        assert owners or name == "clear_caches", f"{name} is defined in neither module"
        if owners:
            assert getattr(data, name) is getattr(owners[0], name)
    assert partitioning.load_dataset is loading.load_dataset  # client_data reads the same cached dataset


def test_clear_caches_forgets_datasets_and_partitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsqueeze.data import loading, partitioning

    # Fresh caches for this test, so the session's MNIST stays cached for the others
    monkeypatch.setattr(loading, "_DATASET_CACHE", {})
    monkeypatch.setattr(partitioning, "_PARTITION_CACHE", {})
    rng = np.random.default_rng(0)
    images = {f"x_{s}": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 40), ("test", 10))}
    labels = {f"y_{s}": np.arange(n) % 10 for s, n in (("train", 40), ("test", 10))}
    path = write_npz(tmp_path / "mnist.npz", **images, **labels)
    first = load_dataset("mnist", path)
    part = partition(labels["y_train"], 4, "iid", seed=1)
    clear_caches(partitions=False)
    assert load_dataset("mnist", path) is not first  # reloaded
    assert partition(labels["y_train"], 4, "iid", seed=1)[0] is part[0]  # still cached
    clear_caches(datasets=False)
    again = partition(labels["y_train"], 4, "iid", seed=1)
    assert again[0] is not part[0] and all(np.array_equal(a, b) for a, b in zip(again, part, strict=True))
