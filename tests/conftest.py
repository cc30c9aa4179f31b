"""Shared pytest fixtures: the offline MNIST copy in ``../shared/datasets`` beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsqueeze.data import Dataset, load_dataset

#: The repository root (this file lives in ``<root>/tests``).
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Where CI and this workspace keep MNIST: ``../shared/datasets/mnist.npz`` from the root.
MNIST_PATH = REPO_ROOT.parent / "shared" / "datasets" / "mnist.npz"


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    """Path of the shared ``mnist.npz``; skips the test if it is absent."""
    if not MNIST_PATH.is_file():
        pytest.skip(
            f"MNIST not found at {MNIST_PATH}: tests that need it expect the shared data "
            f"folder beside the repository (../shared/datasets/mnist.npz)"
        )
    return MNIST_PATH


@pytest.fixture(scope="session")
def mnist(mnist_path: Path) -> Dataset:
    """The full MNIST dataset as normalised tensors (loaded once per test session)."""
    return load_dataset("mnist", mnist_path)
