"""The ``fedsqueeze`` command: ``sweep``, ``report``, ``predict`` and ``bench``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _sweep(args: argparse.Namespace) -> int:
    from fedsqueeze.simulation.grid import load_grid
    from fedsqueeze.simulation.report import write_report
    from fedsqueeze.simulation.sweep import SimulationRunner, run_sweep

    if args.data_dir:  # through the environment, so that cell identities do not depend on local paths
        os.environ["FEDSQUEEZE_DATA"] = str(Path(args.data_dir).resolve())
    grid = load_grid(args.grid)
    print(f"grid {grid.name!r}: {len(grid.cells)} cells -> {args.out}", file=sys.stderr)
    path = run_sweep(grid, Path(args.out), runner=SimulationRunner(timeout=args.cell_timeout), progress=not args.quiet)
    print(f"results: {path}")
    if not args.no_report:
        write_report(Path(args.out), args.target)
        print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedsqueeze.simulation.report import markdown_table, summarize, load_rows, write_report

    write_report(Path(args.dir), args.target)
    print(markdown_table(summarize(load_rows(Path(args.dir)), args.target)))
    print(f"written: {Path(args.dir) / 'report.md'}, report.json and PNG plots")
    return 0


def _grids(args: argparse.Namespace) -> int:
    from fedsqueeze.simulation.grid import BUILTIN_GRIDS, load_grid

    for name, path in BUILTIN_GRIDS.items():
        grid = load_grid(path)
        print(f"{name:12s} {len(grid.cells):4d} cells  {grid.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsqueeze", description="Federated-learning compression: sweeps, reports, on-device prediction.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sweep", help="run a grid of codecs through Flower's simulation engine (resumable)")
    p.add_argument("grid", help="grid TOML file, or a built-in grid name (see `fedsqueeze grids`)")
    p.add_argument("--out", required=True, help="output directory; finished cells in it are not rerun")
    p.add_argument("--data-dir", default=None, help="folder or file with the dataset (e.g. mnist.npz); default: $FEDSQUEEZE_DATA, else download")
    p.add_argument("--target", type=float, default=None, help="accuracy (0-1) for the bytes-to-target column (default: FP32 final minus 1 point)")
    p.add_argument("--cell-timeout", type=float, default=3600.0, help="seconds before a cell is stopped (default: 3600)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="plots and tables from a sweep directory")
    p.add_argument("dir", help="the --out directory of a sweep")
    p.add_argument("--target", type=float, default=None, help="accuracy (0-1) for the bytes-to-target column")
    p.set_defaults(func=_report)

    p = sub.add_parser("grids", help="list the built-in grids")
    p.set_defaults(func=_grids)

    p = sub.add_parser("predict", help="run an exported compact model on images", add_help=False)
    p.set_defaults(func=lambda a: _delegate("fedsqueeze.predict", a.rest))
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("bench", help="codec benchmark (bytes, error, MB/s)", add_help=False)
    p.set_defaults(func=lambda a: _delegate("fedsqueeze.simulation.codec_bench", a.rest))
    p.add_argument("rest", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    return int(importlib.import_module(module).main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
