"""The FAB that `flwr run` builds from this repository ships only the app's entry points, and is small."""

from __future__ import annotations

import io
import tomllib
import zipfile

from flwr.cli.build import build_fab_from_disk
from helpers.deployment import REPO_ROOT

#: The ceiling the deployment issue set for the bundle every SuperNode downloads at every run.
FAB_LIMIT_BYTES = 150_000


def _fab() -> tuple[bytes, list[str]]:
    fab = build_fab_from_disk(REPO_ROOT)
    return fab, zipfile.ZipFile(io.BytesIO(fab)).namelist()


def test_fab_is_small_and_holds_no_benchmarks_tests_docs_or_simulation() -> None:
    fab, names = _fab()
    assert len(fab) <= FAB_LIMIT_BYTES, f"FAB is {len(fab):,} B, expected at most {FAB_LIMIT_BYTES:,} B"
    banned = ("benchmarks/", "tests/", "simulation/", "examples/", "deploy/", "results/")
    assert [n for n in names if n.startswith(banned) or n.endswith(".md")] == []


def test_fab_holds_the_component_modules_and_the_run_config() -> None:
    _, names = _fab()
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    components = project["tool"]["flwr"]["app"]["components"]
    # "fedsqueeze.server.app:app" -> server/app.py (the FAB's files sit at the repository root)
    modules = {v.split(":")[0].removeprefix("fedsqueeze.").replace(".", "/") + ".py" for v in components.values()}
    assert modules <= set(names), f"FAB lacks {modules - set(names)}; it holds {names}"
    assert "pyproject.toml" in names
