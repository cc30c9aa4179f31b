#!/usr/bin/env python3
"""Cut each client's share of the data into a file of its own, for SuperNodes without the full install.

Run it where fedsqueeze is fully installed (partitioning needs Flower Datasets), with the run config the
federation will use, then copy file I to SuperNode I and start it with
``--node-config "data-file=/path/partition-I-of-N.npz partition-id=I num-partitions=N"``::

    python deploy/make_partitions.py --num-partitions 2 --out parts \
        --run-config 'max-samples-per-client=500 data-dir="../shared/datasets/mnist.npz"'

Each file holds the node's training share (exactly what ``client_data`` gives it), its share of the test
set for evaluation, and the settings it was cut with, which the ClientApp checks against the run's.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from flwr.common.config import parse_config_args

from fedsqueeze.config import RunConfig
from fedsqueeze.data import client_data_of_run, load_dataset
from fedsqueeze.data.partition_file import partition_meta, write_partition_file

#: The app's pyproject.toml, whose [tool.flwr.app.config] gives the run config's defaults.
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def run_config(overrides: str) -> RunConfig:
    """The app's run config with ``overrides`` (as ``flwr run --run-config`` takes them) applied."""
    with open(PYPROJECT, "rb") as f:
        defaults = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    return RunConfig.from_mapping({**defaults, **parse_config_args([overrides] if overrides else None)})


def make_partitions(run: RunConfig, num_partitions: int, out: Path) -> list[Path]:
    """Write ``partition-I-of-N.npz`` for I in 0..N-1 into ``out``; return the paths."""
    data = load_dataset(run.dataset, run.data_dir or None)
    paths = []
    for pid in range(num_partitions):
        x, y = client_data_of_run(run, pid, num_partitions)
        meta = partition_meta(run, pid, num_partitions, run.proxy_holdout())
        paths.append(
            write_partition_file(
                out / f"partition-{pid}-of-{num_partitions}.npz",
                meta,
                x,
                y,
                data.x_test[pid::num_partitions],
                data.y_test[pid::num_partitions],
            )
        )
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-partitions", type=int, required=True, help="number of SuperNodes")
    parser.add_argument("--out", type=Path, required=True, help="folder for the files")
    parser.add_argument("--run-config", default="", help="the run's overrides, as for flwr run --run-config")
    args = parser.parse_args(argv)
    if args.num_partitions < 1:
        parser.error(f"--num-partitions must be at least 1, got {args.num_partitions}")
    for path in make_partitions(run_config(args.run_config), args.num_partitions, args.out):
        print(f"{path} ({path.stat().st_size:,} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
