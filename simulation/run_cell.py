"""Run one sweep cell: fedsqueeze's ServerApp and ClientApp in Flower's simulation engine.

``python -m fedsqueeze.simulation.run_cell RUN_CONFIG.toml --num-supernodes N`` runs the
project's apps with the run-config keys of the TOML file (``run_simulation`` itself passes an
empty run config, so the apps are wrapped to see these keys). The sweep starts one such
process per cell, which it owns: stopping it stops the whole simulation.

By default each cell starts a private Ray instance on this machine. With ``--ray-address
HOST:PORT`` (or ``$RAY_ADDRESS``) it joins an existing Ray cluster instead, whose nodes then run
the simulated clients; ``summary.json`` records under ``ray`` which cluster the cell ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsqueeze.simulation.ray_cluster import (
    LOCAL,
    RayClusterUnreachable,
    RaySettings,
    add_ray_options,
    connect_to_cluster,
    ray_settings,
    resolve_ray_address,
)

__all__ = ["make_apps", "run_cell", "main", "build_parser"]


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


def run_cell(
    config: Mapping[str, Any],
    num_supernodes: int,
    client_mods: Sequence[Any] = (),
    cluster: RaySettings | None = None,
) -> dict[str, Any]:
    """Run the simulation for one cell in this process, and say where it ran.

    With the default ``cluster`` the cell starts a private Ray instance on all of this machine's
    CPUs; with a cluster address it joins that cluster (see :class:`RaySettings`). What is
    returned is also added to the run's ``summary.json`` under ``ray``: ``address``, ``host``
    (this machine), ``client_resources``, and for a cluster what :func:`connect_to_cluster` reports.

    Raises
    ------
    RayClusterUnreachable
        If the cluster cannot be reached within ``cluster.connect_timeout``.
    """
    cluster = cluster or RaySettings()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    server_app, client_app = make_apps(config, client_mods)
    init_args: dict[str, Any] = {}
    if cluster.is_cluster:
        ran_on = connect_to_cluster(cluster)
    else:
        cpus = os.cpu_count() or 1
        ran_on = {"address": LOCAL, "cpus": cpus}
        # "local" explicitly: neither $RAY_ADDRESS nor a cluster started here by `ray start` is joined
        init_args = {"address": LOCAL, "num_cpus": cpus}
    ran_on = {**ran_on, "host": socket.gethostname(), "client_resources": cluster.client_resources}
    backend_config: dict[str, Any] = {"client_resources": cluster.client_resources, "init_args": init_args}
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=num_supernodes, backend_config=backend_config
    )
    _record_cluster(config, ran_on)
    return ran_on


def _record_cluster(config: Mapping[str, Any], ran_on: Mapping[str, Any]) -> None:
    from fedsqueeze.config import RunConfig

    path = Path(str(config.get("results-dir", RunConfig().results_dir))) / "summary.json"
    if not path.is_file():  # the run failed before its summary; nothing to annotate
        return
    summary = json.loads(path.read_text())
    summary["ray"] = dict(ran_on)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m fedsqueeze.simulation.run_cell``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedsqueeze.simulation.run_cell", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_config", type=Path, help="TOML file of run-config keys")
    parser.add_argument("--num-supernodes", type=int, default=10, help="simulated clients (default: 10)")
    add_ray_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    address, _ = resolve_ray_address(args.ray_address, None)
    try:
        cluster = ray_settings(args, address)
    except ValueError as exc:
        parser.error(str(exc))
    with open(args.run_config, "rb") as f:
        config = tomllib.load(f)
    try:
        run_cell(config, args.num_supernodes, cluster=cluster)
    except RayClusterUnreachable as exc:
        print(f"run_cell: error: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)  # a timed-out ray.init may still hold a thread; exiting normally could wait on it
    return 0


if __name__ == "__main__":
    sys.exit(main())
