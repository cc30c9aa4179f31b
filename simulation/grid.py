"""Sweep grids: a TOML file naming codecs, seeds and run-config keys, expanded into cells."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Cell", "Grid", "load_grid", "parse_grid", "BUILTIN_GRIDS", "builtin_grid_path"]

GRIDS_DIR = Path(__file__).parent / "grids"
#: Built-in grids shipped with the package: ``fedsqueeze sweep baseline --out DIR``.
BUILTIN_GRIDS = {p.stem: p for p in sorted(GRIDS_DIR.glob("*.toml"))}
#: Top-level key naming the Ray cluster the grid runs on.
RAY_ADDRESS_KEY = "ray-address"
#: Keys of a codec entry that are not run-config keys.
_CODEC_KEYS = {"name", "uplink", "downlink"}


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a codec label, the run-config overrides, and the federation size.

    Parameters
    ----------
    codec : str
        The label of the codec entry (e.g. ``"top1%+EF"``); one line per label in plots.
    config : dict
        Run-config keys (kebab-case) for this run, ``uplink-codec``/``downlink-codec`` included.
    num_supernodes : int
        Number of simulated clients.
    """

    codec: str
    config: Mapping[str, Any] = field(hash=False)
    num_supernodes: int = 10

    @property
    def key(self) -> str:
        """A hash of everything that defines the run: equal keys mean equal runs."""
        blob = json.dumps({"config": dict(self.config), "n": self.num_supernodes}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def id(self) -> str:
        """Directory name: readable label, seed, and the hash."""
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.codec).strip("-").lower() or "cell"
        return f"{slug}-s{self.config.get('seed', 0)}-{self.key}"


@dataclass(frozen=True)
class Grid:
    """A named list of cells; ``ray_address`` is the grid's top-level ``ray-address`` (None if absent)."""

    name: str
    cells: list[Cell]
    description: str = ""
    ray_address: str | None = None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def parse_grid(data: Mapping[str, Any], name: str = "grid") -> Grid:
    """Expand a grid mapping (the parsed TOML) into cells.

    Layout::

        description = "..."
        ray-address = "10.0.0.5:6379"  # optional: run on this Ray cluster (not part of any cell's identity)
        [base]                 # run-config keys shared by every cell, plus num-supernodes
        num-server-rounds = 30
        num-supernodes = 10
        [axes]                 # every combination of these lists is run for each codec
        seed = [0, 1, 2]
        [[codecs]]             # one entry per line in the plots
        name = "fp32"
        uplink = "identity"
        downlink = "identity"
        # any other key overrides base/axes for this entry, e.g. seed = [0] or model = "mcmahan-cnn"
    """
    unknown = set(data) - {"description", RAY_ADDRESS_KEY, "base", "axes", "codecs"}
    if unknown:
        raise ValueError(
            f"grid {name!r}: unknown top-level keys {sorted(unknown)}; "
            f"expected description, {RAY_ADDRESS_KEY}, base, axes, codecs"
        )
    ray_address = _ray_address(data, name)
    base = dict(data.get("base", {}))
    axes = {k: _as_list(v) for k, v in dict(data.get("axes", {})).items()}
    codecs = data.get("codecs", [])
    if not codecs:
        raise ValueError(f"grid {name!r}: needs at least one [[codecs]] entry with name, uplink and downlink")
    ordered: list[tuple[int, int, Cell]] = []
    seen: set[str] = set()
    for entry_index, entry in enumerate(codecs):
        missing = {"name", "uplink"} - set(entry)
        if missing:
            raise ValueError(f"grid {name!r}: codec entry {entry} lacks {sorted(missing)}")
        label = str(entry["name"])
        if label in seen:
            raise ValueError(f"grid {name!r}: codec name {label!r} appears twice")
        seen.add(label)
        overrides = {k: v for k, v in entry.items() if k not in _CODEC_KEYS}
        entry_axes = {k: _as_list(overrides.pop(k)) if k in overrides else v for k, v in axes.items()}
        for combo_index, combo in enumerate(itertools.product(*entry_axes.values())):
            config = {**base, **dict(zip(entry_axes, combo, strict=True)), **overrides}
            config["uplink-codec"] = str(entry["uplink"])
            config["downlink-codec"] = str(entry.get("downlink", "identity"))
            n = int(config.pop("num-supernodes", 10))
            ordered.append((combo_index, entry_index, Cell(codec=label, config=config, num_supernodes=n)))
    # seed-major order: a sweep cut short still has every codec for the first seeds
    cells = [cell for _, _, cell in sorted(ordered, key=lambda t: (t[0], t[1]))]
    return Grid(name=name, cells=cells, description=str(data.get("description", "")), ray_address=ray_address)


def _ray_address(data: Mapping[str, Any], name: str) -> str | None:
    from fedsqueeze.simulation.ray_cluster import LOCAL, parse_ray_address

    misplaced = [
        section
        for section, table in [("base", data.get("base", {})), ("axes", data.get("axes", {}))]
        + [(f"codec {e.get('name')!r}", e) for e in data.get("codecs", []) if isinstance(e, Mapping)]
        if RAY_ADDRESS_KEY in table
    ]
    if misplaced:
        raise ValueError(
            f"grid {name!r}: {RAY_ADDRESS_KEY} found in {', '.join(misplaced)}; expected it at the top level "
            "(where cells run is not a run-config key and not part of a cell)"
        )
    if RAY_ADDRESS_KEY not in data:
        return None
    value = data[RAY_ADDRESS_KEY]
    if not isinstance(value, str):
        raise ValueError(f"grid {name!r}: {RAY_ADDRESS_KEY} expected a string HOST:PORT, found {value!r}")
    if value != LOCAL:
        try:
            parse_ray_address(value)
        except ValueError as exc:
            raise ValueError(f"grid {name!r}: {RAY_ADDRESS_KEY}: {exc}") from exc
    return value


def builtin_grid_path(name_or_path: str | Path) -> Path:
    """A path as given, or the path of a built-in grid by name (e.g. ``baseline``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if str(name_or_path) in BUILTIN_GRIDS:
        return BUILTIN_GRIDS[str(name_or_path)]
    raise FileNotFoundError(
        f"no grid file {str(name_or_path)!r}; give a TOML path or a built-in grid: {', '.join(BUILTIN_GRIDS)}"
    )


def load_grid(path: str | Path) -> Grid:
    """Read and expand a grid TOML file (or a built-in grid by name)."""
    path = builtin_grid_path(path)
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return parse_grid(data, name=path.stem)
