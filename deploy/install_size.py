#!/usr/bin/env python3
"""Installed size of a set of requirements and everything they pull in, read from this environment.

It walks the requirements' dependency closure among the distributions installed here (markers and
extras honoured) and adds up the sizes of the files each one's RECORD lists. Nothing is downloaded, so
every package of the closure must be installed here (the full install has them all)::

    python deploy/install_size.py fedsqueeze            # the edge / SuperNode install
    python deploy/install_size.py "fedsqueeze[full]"    # everything: simulation, harness, plots
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def closure(requirements: Iterable[str]) -> dict[str, metadata.Distribution]:
    """Installed distributions needed by ``requirements``, by normalised name.

    Raises
    ------
    metadata.PackageNotFoundError
        If a needed distribution is not installed here.
    """
    found: dict[str, metadata.Distribution] = {}
    todo: list[tuple[Requirement, frozenset[str]]] = [(Requirement(r), frozenset()) for r in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, parent_extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (parent_extras or {""})):
            continue
        name = req.name.lower().replace("_", "-")
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = found.setdefault(name, metadata.distribution(req.name))
        todo += [(Requirement(r), frozenset(req.extras)) for r in dist.requires or []]
    return found


def installed_bytes(dist: metadata.Distribution) -> int:
    """Bytes of the files a distribution's RECORD lists (an editable install counts its sources too)."""
    total = 0
    for file in dist.files or []:
        path = Path(file.locate())
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():  # an editable install's source folder
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("requirements", nargs="+", help='e.g. fedsqueeze or "fedsqueeze[full]"')
    parser.add_argument(
        "--without",
        nargs="*",
        default=[],
        help="leave out these and all they need (e.g. torch, whose size depends on its build)",
    )
    parser.add_argument("--top", type=int, default=8, help="list the largest this many distributions")
    args = parser.parse_args(argv)
    needed = closure(args.requirements)
    if args.without:  # also drops what torch needs and others share (filelock, fsspec, ...): a lower bound
        left_out = set(closure(args.without))
        needed = {n: d for n, d in needed.items() if n not in left_out}
    sizes = {name: installed_bytes(dist) for name, dist in needed.items()}
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[: args.top]
    print(
        json.dumps(
            {
                "requirements": args.requirements,
                "distributions": len(sizes),
                "installed_mb": round(sum(sizes.values()) / 1e6, 1),
                "largest_mb": {k: round(v / 1e6, 1) for k, v in largest},
                "has": {p: p in sizes for p in ("ray", "matplotlib", "flwr-datasets", "torchvision")},
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
