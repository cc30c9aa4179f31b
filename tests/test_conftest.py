"""The suite's own rule: a test that needs MNIST skips locally when it is missing, and fails under CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NEEDS_MNIST = "def test_needs_mnist(mnist_path):\n    print('MNIST at', mnist_path)\n"


def _run_suite(tmp_path: Path, env_changes: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    """Run a one-test suite with this repository's conftest in a clone-like folder without ../shared."""
    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).with_name("conftest.py"), tests / "conftest.py")
    (tests / "test_needs_mnist.py").write_text(NEEDS_MNIST)
    env = {k: v for k, v in os.environ.items() if k not in env_changes}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-s", "-p", "no:cacheprovider", str(tests)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip


def test_missing_mnist_fails_under_ci(tmp_path: Path) -> None:
    done = _run_suite(tmp_path, {"CI": "true", "FEDSQUEEZE_DATA": None})
    assert done.returncode == 1, done.stdout
    assert "1 error" in done.stdout and "CI is set, so a missing dataset is a failure" in done.stdout


def test_missing_mnist_skips_with_a_reason_locally(tmp_path: Path) -> None:
    done = _run_suite(tmp_path, {"CI": None, "FEDSQUEEZE_DATA": None})
    assert done.returncode == 0, done.stdout
    assert "1 skipped" in done.stdout and "MNIST not found" in done.stdout


@pytest.mark.parametrize("named", ["file", "folder"])
def test_fedsqueeze_data_names_the_file_or_its_folder(tmp_path: Path, named: str) -> None:
    data = tmp_path / "data" / "mnist.npz"
    data.parent.mkdir()
    data.write_bytes(b"")  # the fixture only locates the file; the test does not load it
    target = data if named == "file" else data.parent
    done = _run_suite(tmp_path, {"CI": "true", "FEDSQUEEZE_DATA": str(target)})
    assert done.returncode == 0, done.stdout
    assert f"MNIST at {data}" in done.stdout
