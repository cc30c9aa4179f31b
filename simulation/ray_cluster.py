"""Running the harness's cells on an existing Ray cluster instead of a private Ray per cell.

By default each cell starts a private Ray instance on this machine. With ``--ray-address
HOST:PORT`` (or the grid's top-level ``ray-address``, or ``$RAY_ADDRESS``) it joins an existing
Ray cluster instead, whose nodes then run the simulated clients.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LOCAL",
    "RaySettings",
    "RayClusterUnreachable",
    "parse_ray_address",
    "resolve_ray_address",
    "check_reachable",
    "connect_to_cluster",
    "add_ray_options",
    "ray_settings",
]

#: The Ray address meaning "a private Ray instance for this cell" (Ray's own spelling).
LOCAL = "local"
#: Environment variables the cluster's workers must see. Workers of a cluster started with
#: ``ray start`` inherit that command's environment, not the driver's.
FORWARDED_ENV = ("FEDSQUEEZE_DATA",)


class RayClusterUnreachable(ConnectionError):
    """The Ray cluster at the given address did not answer within the connection timeout."""


def parse_ray_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of a Ray cluster address ``HOST:PORT`` (``[IPv6]:PORT`` too).

    Raises
    ------
    ValueError
        If ``address`` is not of that form, naming what was expected and what was found.
    """
    expected = f"expected HOST:PORT (a Ray head's GCS address, e.g. 10.0.0.5:6379) or {LOCAL!r}"
    if "://" in address:
        raise ValueError(
            f"Ray address {address!r}: Ray Client addresses (ray://) are not supported; run the sweep on a node "
            f"of the cluster and give the head's GCS address; {expected}"
        )
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"Ray address {address!r}: {expected}, found {address!r}")
    return host, int(port)


@dataclass(frozen=True)
class RaySettings:
    """Where a cell's simulated clients run, and what each of them reserves.

    Parameters
    ----------
    address : str
        :data:`LOCAL` (default): a private Ray instance for the cell on all of this machine's CPUs.
        ``HOST:PORT``: the GCS address of an existing Ray cluster (``ray start --head --port=PORT``);
        the machine running the cell must be one of its nodes.
    connect_timeout : float
        Seconds to wait for the cluster to answer before giving up (cluster addresses only).
    client_cpus, client_gpus : float
        Ray resources reserved by each simulated client (one Ray actor each); the cluster runs as
        many clients at once as its nodes fit.

    Raises
    ------
    ValueError
        If the address is malformed, the timeout not positive or a resource negative.
    """

    address: str = LOCAL
    connect_timeout: float = 30.0
    client_cpus: float = 1.0
    client_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.address != LOCAL:
            parse_ray_address(self.address)
        if not self.connect_timeout > 0:
            raise ValueError(f"Ray connect timeout: expected seconds > 0, found {self.connect_timeout!r}")
        if not self.client_cpus > 0 or not self.client_gpus >= 0:
            raise ValueError(
                f"client resources: expected CPUs > 0 and GPUs >= 0, found {self.client_cpus!r} CPUs "
                f"and {self.client_gpus!r} GPUs"
            )

    @property
    def is_cluster(self) -> bool:
        """Whether the cell joins an existing cluster rather than starting its own Ray."""
        return self.address != LOCAL

    @property
    def client_resources(self) -> dict[str, float]:
        """Flower's ``client_resources`` for one simulated client."""
        return {"num_cpus": self.client_cpus, "num_gpus": self.client_gpus}


def resolve_ray_address(
    option: str | None, grid_value: str | None, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """The Ray address to use and where it came from, first given of: option, grid, ``$RAY_ADDRESS``.

    Empty values count as not given; with none given the address is :data:`LOCAL` (source
    ``"default"``). ``--ray-address local`` thus runs a grid that names a cluster on this machine.
    """
    environ = os.environ if environ is None else environ
    for value, source in (
        (option, "--ray-address"),
        (grid_value, "grid key ray-address"),
        (environ.get("RAY_ADDRESS"), "RAY_ADDRESS"),
    ):
        if value:
            return value, source
    return LOCAL, "default"


def check_reachable(address: str, timeout: float) -> None:
    """Fail fast unless something accepts TCP connections at the Ray ``address``.

    Raises
    ------
    RayClusterUnreachable
        If no connection is accepted within ``timeout`` seconds (refused, no route, timed out).
    """
    host, port = parse_ray_address(address)
    start = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise RayClusterUnreachable(
            f"Ray cluster at {address!r} is not reachable: expected a Ray head node's GCS listening there "
            f"(`ray start --head --port={port}`), found {exc.strerror or exc!s} after "
            f"{time.monotonic() - start:.1f} s (timeout {timeout:g} s)"
        ) from exc


def _worker_env() -> dict[str, str]:
    # As Flower does for the Ray instance it starts: workers see this driver's import path.
    pythonpath = os.pathsep.join(p for p in [*sys.path, os.environ.get("PYTHONPATH", "")] if p)
    return {"PYTHONPATH": pythonpath, **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}


def connect_to_cluster(settings: RaySettings) -> dict[str, Any]:
    """Connect this process to the Ray cluster of ``settings`` and describe it.

    Flower's simulation engine then uses this connection (it starts Ray only when none exists).
    The wait is bounded by ``settings.connect_timeout`` in all.

    Returns
    -------
    dict
        ``address`` as given, ``gcs_address`` as Ray resolved it, this driver's ``job_id``, and the
        cluster's alive ``nodes`` and total ``cpus`` and ``gpus``.

    Raises
    ------
    RayClusterUnreachable
        If the cluster does not answer in time or refuses the connection. A timed-out attempt
        may still be blocked in a daemon thread; a process should exit soon after this error.
    """
    deadline = time.monotonic() + settings.connect_timeout
    check_reachable(settings.address, settings.connect_timeout)
    import ray

    failure: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(
                address=settings.address,
                runtime_env={"env_vars": _worker_env()},
                logging_level=logging.WARNING,
                log_to_driver=True,
            )
        except BaseException as exc:  # handed to the waiting thread
            failure.append(exc)

    # ray.init retries an unanswering address for minutes: wait for it in a thread, bounded
    thread = threading.Thread(target=init, name="ray-init", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0.0))
    if thread.is_alive() or failure:
        found = f"{type(failure[0]).__name__}: {failure[0]}" if failure else "no answer"
        raise RayClusterUnreachable(
            f"Ray cluster at {settings.address!r}: expected a Ray cluster to accept this driver within "
            f"{settings.connect_timeout:g} s (the port is open), found {found}"
        ) from (failure[0] if failure else None)
    context = ray.get_runtime_context()
    resources = ray.cluster_resources()
    return {
        "address": settings.address,
        "gcs_address": context.gcs_address,
        "job_id": context.get_job_id(),
        "nodes": sum(1 for node in ray.nodes() if node.get("Alive")),
        "cpus": resources.get("CPU", 0.0),
        "gpus": resources.get("GPU", 0.0),
    }


def add_ray_options(parser: argparse.ArgumentParser, address_default: str = f"$RAY_ADDRESS, else {LOCAL}") -> None:
    """The Ray options shared by ``run_cell`` and ``fedsqueeze sweep``; ``address_default`` is for the help."""
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="GCS address of an existing Ray cluster to run on (this machine must be one of its nodes), "
        f"or {LOCAL!r} for a private Ray instance per cell; default: {address_default}",
    )
    parser.add_argument(
        "--ray-connect-timeout",
        type=float,
        default=RaySettings.connect_timeout,
        help=f"seconds to wait for the Ray cluster to answer (default: {RaySettings.connect_timeout:g})",
    )
    parser.add_argument(
        "--client-cpus",
        type=float,
        default=RaySettings.client_cpus,
        help=f"Ray CPUs reserved per simulated client (default: {RaySettings.client_cpus:g})",
    )
    parser.add_argument(
        "--client-gpus",
        type=float,
        default=RaySettings.client_gpus,
        help=f"Ray GPUs reserved per simulated client (default: {RaySettings.client_gpus:g})",
    )


def ray_settings(args: argparse.Namespace, address: str) -> RaySettings:
    """:class:`RaySettings` from the options of :func:`add_ray_options` and a resolved address."""
    return RaySettings(
        address=address,
        connect_timeout=args.ray_connect_timeout,
        client_cpus=args.client_cpus,
        client_gpus=args.client_gpus,
    )
