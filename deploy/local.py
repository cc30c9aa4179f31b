#!/usr/bin/env python3
"""Run fedsqueeze on a real Flower deployment on this machine: one SuperLink and N SuperNodes on loopback.

By default the deployment is secured as a real one would be: TLS (a throw-away CA and a server certificate
for 127.0.0.1/localhost, made here with the ``cryptography`` package that Flower itself depends on) and
SuperNode authentication (one ECDSA P-384 key per SuperNode, registered with ``flwr supernode register``).
It writes the connection to ``$FLWR_HOME/config.toml``, runs ``flwr run <app> <connection> --stream``, and
at the end stops exactly the processes it started, by their process-group ids (each one is started in a
session of its own), never by name.

Usage (from the repository root, with the venv's ``bin`` on PATH)::

    python deploy/local.py --nodes 2 --rounds 2 --run-config 'max-samples-per-client=500'

See README.md, "Deployment", for what each part needs on a real network.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Environment of every Flower process started here: no telemetry or update checks, nothing installed at run time.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass(frozen=True)
class DeploySettings:
    """What to start and where."""

    workdir: Path
    app_dir: Path
    nodes: int = 2
    port: int = 9500  # the SuperLink's one HTTP port (Fleet, Control and Runtime APIs)
    node_port_base: int = 9601  # SuperNode i opens its runtime API on node_port_base + i
    tls: bool = True
    auth: bool = True
    connection: str = "fedsqueeze-local"
    run_config: str = ""
    #: Where SuperNodes connect (default: the SuperLink itself); e.g. a byte-counting proxy in front of it.
    node_superlink: str = ""
    extra_node_args: tuple[str, ...] = ()
    #: Give each SuperNode a ``state-dir`` (``<workdir>/node-state/<i>``): restarted, it rejoins with a delta.
    node_state: bool = True

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Deployment:
    """The processes started for one deployment; :meth:`stop` ends exactly these."""

    settings: DeploySettings
    env: dict[str, str]
    superlink: subprocess.Popen[bytes] | None = None
    supernodes: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    #: Extra environment variables of SuperNode i (and so of its ClientApp processes).
    node_env: dict[int, dict[str, str]] = field(default_factory=dict)

    # ---------------------------------------------------------------- files
    def paths(self) -> dict[str, Path]:
        w = self.settings.workdir
        return {
            "ca": w / "certs" / "ca.crt",
            "cert": w / "certs" / "server.pem",
            "key": w / "certs" / "server.key",
            "home": w / "flwr-home",
            "db": w / "superlink.db",
            "logs": w / "logs",
        }

    def node_key(self, index: int) -> Path:
        return self.settings.workdir / "keys" / f"supernode-{index}"

    def node_state_dir(self, index: int) -> Path:
        """Where SuperNode ``index`` keeps its model and residual across restarts (node-config ``state-dir``)."""
        return self.settings.workdir / "node-state" / str(index)

    def prepare(self) -> None:
        """Make the certificates, node keys and ``$FLWR_HOME/config.toml``."""
        p = self.paths()
        for d in (p["home"], p["logs"], p["ca"].parent, self.node_key(0).parent):
            d.mkdir(parents=True, exist_ok=True)
        if self.settings.tls:
            make_certificates(p["ca"], p["cert"], p["key"])
        if self.settings.auth:
            for i in range(self.settings.nodes):
                make_node_key(self.node_key(i))
        write_connection(
            p["home"] / "config.toml",
            self.settings.connection,
            self.settings.address,
            p["ca"] if self.settings.tls else None,
        )

    # ---------------------------------------------------------------- processes
    def _spawn(
        self, args: Sequence[str], log_name: str, extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.paths()["logs"] / log_name, "ab")  # noqa: SIM115 (closed with the process's end)
        # A session of its own: its process group then holds the ClientApp/ServerApp processes it starts,
        # and stop() can end that group by its id without touching anything else on the host.
        return subprocess.Popen(
            list(args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **(extra_env or {})},
            cwd=self.settings.workdir,
            start_new_session=True,
        )

    def superlink_args(self) -> list[str]:
        p, s = self.paths(), self.settings
        args = [
            "flower-superlink",
            "--host",
            "127.0.0.1",
            "--port",
            str(s.port),
            "--database",
            str(p["db"]),
            "--disable-runtime-dependency-installation",
        ]
        if s.tls:
            args += [
                "--ssl-ca-certfile",
                str(p["ca"]),
                "--ssl-certfile",
                str(p["cert"]),
                "--ssl-keyfile",
                str(p["key"]),
            ]
        else:
            args.append("--insecure")
        if s.auth:
            args.append("--enable-supernode-auth")
        return args

    def supernode_args(self, index: int) -> list[str]:
        s = self.settings
        args = [
            "flower-supernode",
            "--superlink",
            s.node_superlink or s.address,
            "--host",
            "127.0.0.1",
            "--port",
            str(s.node_port_base + index),
            "--node-config",
            f"partition-id={index} num-partitions={s.nodes}"
            + (f" state-dir={json.dumps(str(self.node_state_dir(index)))}" if s.node_state else ""),
            *s.extra_node_args,
        ]
        args += ["--root-certificates", str(self.paths()["ca"])] if s.tls else ["--insecure"]
        if s.auth:
            args += ["--auth-supernode-private-key", str(self.node_key(index))]
        return args

    def start_superlink(self, timeout: float = 60.0) -> None:
        self.superlink = self._spawn(self.superlink_args(), "superlink.log")
        wait_for_port("127.0.0.1", self.settings.port, timeout, self.superlink)

    def register_nodes(self) -> None:
        """Register every SuperNode's public key with the SuperLink (node authentication)."""
        for i in range(self.settings.nodes):
            self.flwr(["supernode", "register", str(self.node_key(i)) + ".pub", self.settings.connection])

    def start_supernode(self, index: int) -> subprocess.Popen[bytes]:
        while len(self.supernodes) <= index:
            self.supernodes.append(None)
        proc = self._spawn(self.supernode_args(index), f"supernode-{index}.log", self.node_env.get(index))
        self.supernodes[index] = proc
        return proc

    def kill_supernode(self, index: int) -> None:
        """SIGKILL SuperNode ``index`` and the processes it started (as a crash or a power cut would)."""
        proc = self.supernodes[index]
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    def restart_supernode(self, index: int, timeout: float = 180.0) -> int:
        """Start SuperNode ``index`` again until the SuperLink accepts it; return how many starts it took.

        A SuperNode restarted with a registered key while the SuperLink still lists it online is
        refused ("Failed to activate SuperNode") and exits without retrying (its ``flower-superexec``
        lives on): each refused start is cleaned up and retried, 3 s later, until the SuperLink has
        marked the old one offline (its heartbeat timeout, about a minute). A start counts as accepted
        when the node logs its id (``SuperNode ID:``), which it does once activated.

        Raises
        ------
        RuntimeError
            If no start is accepted within ``timeout`` seconds.
        """
        log = self.paths()["logs"] / f"supernode-{index}.log"
        deadline, attempts = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            attempts += 1
            seen = log.stat().st_size if log.exists() else 0
            proc = self.start_supernode(index)
            while proc.poll() is None and time.monotonic() < deadline:
                with open(log, "rb") as f:
                    f.seek(seen)
                    if b"SuperNode ID:" in f.read():
                        return attempts
                time.sleep(0.5)
            self.kill_supernode(index)  # the refused start's superexec, by its group id
            time.sleep(3.0)
        raise RuntimeError(
            f"SuperNode {index} was not accepted within {timeout:.0f} s ({attempts} starts; the SuperLink refuses "
            f"a registered key it still lists online until the old node's heartbeat times out); see {log}"
        )

    def flwr(self, args: Sequence[str], timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment's ``$FLWR_HOME``."""
        done = subprocess.run(
            ["flwr", *args], env=self.env, cwd=self.settings.app_dir, text=True, capture_output=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"`flwr {shlex.join(args)}` failed with exit code {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def run_app(self, timeout: float = 1800.0) -> subprocess.CompletedProcess[str]:
        """``flwr run <app> <connection> --stream``: submit the run and follow it to its end."""
        args = ["run", str(self.settings.app_dir), self.settings.connection, "--stream"]
        if self.settings.run_config:
            args += ["--run-config", self.settings.run_config]
        done = self.flwr(args, timeout=timeout, check=False)
        (self.paths()["logs"] / "flwr-run.log").write_text(done.stdout + done.stderr)
        return done

    def started_pids(self) -> set[int]:
        """Live processes this deployment started: its processes and all their descendants (the SuperLink's
        ``flower-superexec`` starts a session of its own, so its process group is not the SuperLink's)."""
        roots = {p.pid for p in [*self.supernodes, self.superlink] if p is not None and p.poll() is None}
        return roots | descendants(roots)

    def serverapp_pids(self) -> list[int]:
        """Pids of the ``flwr-serverapp`` processes the SuperLink runs now (one per run in progress)."""
        if self.superlink is None:
            return []
        found = []
        for pid in descendants({self.superlink.pid}):
            try:
                if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                continue
        return found

    def stop(self, grace: float = 10.0) -> None:
        """End every process this deployment started, by id: SIGTERM, then SIGKILL after ``grace`` s.

        Each process group it made is signalled, then any descendant still alive (one that left the
        group) is signalled by its pid.
        """
        procs = [p for p in [*self.supernodes, self.superlink] if p is not None]
        strays = self.started_pids()
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # its children too, even if the leader has exited
            proc.wait()
        for pid in strays - {p.pid for p in procs}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def descendants(roots: set[int]) -> set[int]:
    """Pids of the live descendants of ``roots`` (from ``/proc``; empty where there is no ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group that start_new_session made: its id is the leader's pid
    except ProcessLookupError:
        pass


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts connections on ``host:port``.

    Raises
    ------
    RuntimeError
        If ``proc`` exits first or nothing listens within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode} before listening on {host}:{port}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def make_certificates(ca_path: Path, cert_path: Path, key_path: Path, days: int = 30) -> None:
    """A self-signed CA and a server certificate signed by it, valid for 127.0.0.1, ::1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsqueeze local CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)


def make_node_key(path: Path) -> None:
    """An ECDSA P-384 key pair in OpenSSH format, ``path`` and ``path.pub`` (as ``ssh-keygen -t ecdsa -b 384``
    makes them, without a passphrase)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_name(path.name + ".pub").write_bytes(public + b"\n")


def write_connection(config_path: Path, name: str, address: str, root_certificates: Path | None) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection, ``name``, made the default."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates))}")
    config_path.write_text("\n".join(lines) + "\n")


def deployment_env(home: Path) -> dict[str, str]:
    """This process's environment with ``FLWR_HOME`` set, telemetry off, and this Python's ``bin`` first on PATH
    (each SuperNode starts ``flower-superexec`` and ``flwr-clientapp`` by name)."""
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(home)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def start(
    settings: DeploySettings, *, node_timeout: float = 60.0, node_env: dict[int, dict[str, str]] | None = None
) -> Deployment:
    """Prepare files, start the SuperLink, register keys and start the SuperNodes; stops all on failure.

    ``node_env`` adds environment variables to SuperNode i (and so to its ClientApp processes).
    """
    deployment = Deployment(settings, deployment_env(settings.workdir / "flwr-home"), node_env=dict(node_env or {}))
    deployment.prepare()
    try:
        deployment.start_superlink()
        if settings.auth:
            deployment.register_nodes()
        for i in range(settings.nodes):
            deployment.start_supernode(i)
        wait_for_nodes(deployment, settings.nodes, node_timeout)
    except BaseException:
        deployment.stop()
        raise
    return deployment


def wait_for_nodes(deployment: Deployment, count: int, timeout: float) -> None:
    """Wait until ``flwr supernode list`` shows ``count`` nodes online."""
    deadline = time.monotonic() + timeout
    online = 0
    while time.monotonic() < deadline:
        for i, proc in enumerate(deployment.supernodes):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"SuperNode {i} exited with code {proc.returncode}; see its log in {deployment.paths()['logs']}"
                )
        done = deployment.flwr(["supernode", "list", deployment.settings.connection, "--format", "json"], check=False)
        online = _count_online(done.stdout)
        if online >= count:
            return
        time.sleep(1.0)
    raise RuntimeError(f"only {online} of {count} SuperNodes came online within {timeout:.0f} s")


def _count_online(listing: str) -> int:
    try:
        nodes = json.loads(listing).get("nodes", [])
    except (json.JSONDecodeError, AttributeError):
        return 0
    return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="number of SuperNodes (default: 2)")
    parser.add_argument("--rounds", type=int, default=0, help="num-server-rounds (default: the app's)")
    parser.add_argument("--workdir", type=Path, default=Path(".deploy"), help="certificates, keys, state, logs")
    parser.add_argument("--port", type=int, default=9500, help="the SuperLink's port (default: 9500)")
    parser.add_argument("--node-port-base", type=int, default=9601, help="SuperNode i's runtime port is this + i")
    parser.add_argument("--insecure", action="store_true", help="no TLS and no node authentication")
    parser.add_argument("--no-auth", action="store_true", help="TLS without node authentication")
    parser.add_argument("--run-config", default="", help="extra run-config overrides, as for flwr run")
    parser.add_argument("--data", default="", help="data-dir for the app (default: the app's)")
    parser.add_argument("--keep", action="store_true", help="leave the deployment running after the run")
    parser.add_argument(
        "--no-node-state", action="store_true", help="no state-dir: a restarted SuperNode is sent the full model"
    )
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error(f"--nodes must be at least 1, got {args.nodes}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Start the deployment, run the app once, stop everything; the exit code is ``flwr run``'s."""
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    overrides = [args.run_config] if args.run_config else []
    if args.rounds:
        overrides.append(f"num-server-rounds={args.rounds}")
    if args.data:
        overrides.append(f"data-dir={json.dumps(str(Path(args.data).resolve()))}")
    overrides.append(f"results-dir={json.dumps(str(workdir / 'results'))}")
    settings = DeploySettings(
        workdir=workdir,
        app_dir=Path(__file__).resolve().parent.parent,
        nodes=args.nodes,
        port=args.port,
        node_port_base=args.node_port_base,
        tls=not args.insecure,
        auth=not (args.insecure or args.no_auth),
        run_config=" ".join(overrides),
        node_state=not args.no_node_state,
    )
    deployment = start(settings)
    print(
        f"SuperLink pid {deployment.superlink.pid if deployment.superlink else '-'}, SuperNode pids "
        f"{[p.pid for p in deployment.supernodes if p]}; logs in {deployment.paths()['logs']}",
        flush=True,
    )
    try:
        done = deployment.run_app()
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
        if args.keep:
            print(
                f"--keep: still running; FLWR_HOME={deployment.env['FLWR_HOME']}. Stop them with kill -- -PID "
                "for each pid above."
            )
            return done.returncode
    finally:
        if not args.keep:
            deployment.stop()
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
