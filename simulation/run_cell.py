"""Run one sweep cell: fedsqueeze's ServerApp and ClientApp in Flower's simulation engine.

``python -m fedsqueeze.simulation.run_cell RUN_CONFIG.toml --num-supernodes N`` runs the
project's apps with the run-config keys of the TOML file (``run_simulation`` itself passes an
empty run config, so the apps are wrapped to see these keys). The sweep starts one such
process per cell, which it owns: stopping it stops the whole simulation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["make_apps", "run_cell", "main"]


def make_apps(overrides: Mapping[str, Any], client_mods: Sequence[Any] = ()) -> tuple[Any, Any]:
    """fedsqueeze's ServerApp and ClientApp, seeing ``overrides`` on top of their run config.

    ``client_mods`` go outside the compression mod (e.g. :func:`fedsqueeze.simulation.hostile.hostile_mod`).
    """
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from fedsqueeze.client import CompressionMod
    from fedsqueeze.client import app as client_module
    from fedsqueeze.server import app as server_module

    fixed = dict(overrides)

    def with_overrides(context: Context) -> Context:
        return Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=context.node_config,
            state=context.state,
            run_config={**context.run_config, **fixed},
        )

    compression = CompressionMod(lambda context: client_module.first_model_of(with_overrides(context)))
    client_app = ClientApp(mods=[*client_mods, compression])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return client_module.train(msg, with_overrides(context))

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return client_module.evaluate(msg, with_overrides(context))

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return client_module.query(msg, with_overrides(context))

    server_app = ServerApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        server_module.main(grid, with_overrides(context))

    return server_app, client_app


def run_cell(config: Mapping[str, Any], num_supernodes: int, client_mods: Sequence[Any] = ()) -> None:
    """Run the simulation for one cell in this process (Ray, one CPU per simulated client)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    server_app, client_app = make_apps(config, client_mods)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1},
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedsqueeze.simulation.run_cell", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_config", type=Path, help="TOML file of run-config keys")
    parser.add_argument("--num-supernodes", type=int, default=10, help="simulated clients (default: 10)")
    args = parser.parse_args(argv)
    with open(args.run_config, "rb") as f:
        config = tomllib.load(f)
    run_cell(config, args.num_supernodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
