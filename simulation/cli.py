"""The ``fedsqueeze`` command: ``sweep``, ``report``, ``grids``, ``predict`` and ``bench``.

``predict`` and ``bench`` hand every argument after their name, ``--help`` included, to the
``main`` of the module that implements them, so their options and help are that module's own.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "DELEGATED"]

#: Subcommands implemented by another module's ``main(argv)``: name -> (module, one-line help).
DELEGATED: dict[str, tuple[str, str]] = {
    "predict": ("fedsqueeze.predict", "run an exported compact model on images"),
    "bench": ("fedsqueeze.simulation.codec_bench", "codec benchmark (bytes, error, MB/s)"),
}


def _sweep(args: argparse.Namespace) -> int:
    from fedsqueeze.simulation.grid import load_grid
    from fedsqueeze.simulation.ray_cluster import (
        RayClusterUnreachable,
        check_reachable,
        ray_settings,
        resolve_ray_address,
    )
    from fedsqueeze.simulation.report import write_report
    from fedsqueeze.simulation.sweep import SimulationRunner, run_sweep

    if args.data_dir:  # through the environment, so that cell identities do not depend on local paths
        os.environ["FEDSQUEEZE_DATA"] = str(Path(args.data_dir).resolve())
    grid = load_grid(args.grid)
    address, source = resolve_ray_address(args.ray_address, grid.ray_address)
    try:
        cluster = ray_settings(args, address)
        if cluster.is_cluster:  # once up front: a clear error now rather than one failed cell after another
            check_reachable(address, cluster.connect_timeout)
    except (ValueError, RayClusterUnreachable) as exc:
        print(f"fedsqueeze sweep: error: {exc} (address from {source})", file=sys.stderr)
        return 2
    print(f"grid {grid.name!r}: {len(grid.cells)} cells -> {args.out}; Ray: {address} ({source})", file=sys.stderr)
    runner = SimulationRunner(timeout=args.cell_timeout, cluster=cluster)
    ray = {"address": address, "source": source}
    path = run_sweep(grid, Path(args.out), runner=runner, progress=not args.quiet, ray=ray)
    print(f"results: {path}")
    if not args.no_report:
        write_report(Path(args.out), args.target)
        print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedsqueeze.simulation.report import load_rows, markdown_table, summarize, write_report

    write_report(Path(args.dir), args.target, args.ignore_key)
    print(markdown_table(summarize(load_rows(Path(args.dir), args.ignore_key), args.target)))
    print(f"written: {Path(args.dir) / 'report.md'}, report.json and PNG plots")
    return 0


def _grids(args: argparse.Namespace) -> int:
    from fedsqueeze.simulation.grid import BUILTIN_GRIDS, load_grid

    for name, path in BUILTIN_GRIDS.items():
        grid = load_grid(path)
        print(f"{name:12s} {len(grid.cells):4d} cells  {grid.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``fedsqueeze`` command (delegated subcommands appear in its help only)."""
    from fedsqueeze.simulation.ray_cluster import LOCAL, add_ray_options

    parser = argparse.ArgumentParser(
        prog="fedsqueeze", description="Federated-learning compression: sweeps, reports, on-device prediction."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sweep", help="run a grid of codecs through Flower's simulation engine (resumable)")
    p.add_argument("grid", help="grid TOML file, or a built-in grid name (see `fedsqueeze grids`)")
    p.add_argument("--out", required=True, help="output directory; finished cells in it are not rerun")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder or file with the dataset (e.g. mnist.npz); default: $FEDSQUEEZE_DATA, else download",
    )
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="accuracy (0-1) for the bytes-to-target column (default: FP32 final minus 1 point)",
    )
    p.add_argument(
        "--cell-timeout", type=float, default=3600.0, help="seconds before a cell is stopped (default: 3600)"
    )
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_ray_options(p, address_default=f"the grid's ray-address, else $RAY_ADDRESS, else {LOCAL}")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="plots and tables from a sweep directory")
    p.add_argument("dir", help="the --out directory of a sweep")
    p.add_argument("--target", type=float, default=None, help="accuracy (0-1) for the bytes-to-target column")
    p.add_argument(
        "--ignore-key",
        action="append",
        default=[],
        metavar="KEY",
        help="a run-config key that must not split settings (repeatable), e.g. a default changed mid-sweep",
    )
    p.set_defaults(func=_report)

    p = sub.add_parser("grids", help="list the built-in grids")
    p.set_defaults(func=_grids)

    for name, (_, summary) in DELEGATED.items():
        # never parsed here (main hands these on before parsing); listed so that --help shows them
        sub.add_parser(name, help=f"{summary}; `fedsqueeze {name} --help` for its options", add_help=False)
    return parser


def exit_code(result: object) -> int:
    """The process exit status for what a ``main`` returned: an int as it is, anything else 0.

    Delegated ``main`` functions return an exit status (``predict``), ``None``, or their results
    (``bench`` returns its rows); only an int is a status.
    """
    if isinstance(result, bool) or not isinstance(result, int):
        return 0
    return result


def _delegate(module: str, argv: Sequence[str]) -> int:
    return exit_code(importlib.import_module(module).main(list(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedsqueeze`` command on ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Usage errors and ``--help`` exit through argparse's ``SystemExit`` (status 2 and 0).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in DELEGATED:
        return _delegate(DELEGATED[args_list[0]][0], args_list[1:])
    args = build_parser().parse_args(args_list)
    return exit_code(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
