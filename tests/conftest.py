"""Shared pytest fixtures: the offline MNIST copy, and one torch thread for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedsqueeze.data import DATA_ENV_VAR, Dataset, load_dataset

#: The repository root (this file lives in ``<root>/tests``).
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Where CI and this workspace keep MNIST: ``../shared/datasets/mnist.npz`` from the root.
SHARED_MNIST_PATH = REPO_ROOT.parent / "shared" / "datasets" / "mnist.npz"


def find_mnist() -> Path | None:
    """``mnist.npz`` named by ``$FEDSQUEEZE_DATA`` (the file or its folder), else the shared copy; None if absent."""
    candidates = []
    if os.environ.get(DATA_ENV_VAR):
        named = Path(os.environ[DATA_ENV_VAR])
        candidates.append(named / "mnist.npz" if named.is_dir() else named)
    candidates.append(SHARED_MNIST_PATH)
    return next((path for path in candidates if path.is_file() and path.suffix == ".npz"), None)


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    """Path of ``mnist.npz``.

    Where it is missing the test fails when the environment variable ``CI`` is set (so that CI
    cannot pass with the end-to-end tests skipped) and is skipped, saying why, otherwise.
    """
    path = find_mnist()
    if path is None:
        reason = (
            f"MNIST not found: tests that need it read ${DATA_ENV_VAR} (an mnist.npz file or a folder "
            f"holding one) or {SHARED_MNIST_PATH} (../shared/datasets/mnist.npz beside the repository)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so a missing dataset is a failure, not a skip", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def mnist(mnist_path: Path) -> Dataset:
    """The full MNIST dataset as normalised tensors (loaded once per test session)."""
    return load_dataset("mnist", mnist_path)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run the suite on one torch thread (small models train faster, and runs are repeatable across
    machines); the previous setting is restored when the session ends."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
