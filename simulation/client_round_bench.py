"""The codec's share of one client round by CPU time: a benchmark script, not a test.

What a node spends on compression in one round, timed as ``client/mod.py`` times it for the
``client_encode_seconds`` column of a run (``_encode_reply``: read the error-feedback residual from
the node's state, encode ``local - received`` with the uplink codec, write the residual back),
plus the downlink decode the node also does, against one epoch of the default run's local
training (LeNet-5, 2,000 MNIST samples, batch 32, lr 0.05, momentum 0.9). All on one thread, by
CPU time, so that other processes on the machine count less than in a simulation's wall clock::

    python -m fedsqueeze.simulation.client_round_bench --data-dir ../shared/datasets --out DIR

Prints a markdown table; ``--out`` also writes ``client_round.md`` and ``client_round.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict

from fedsqueeze.client.mod import STATE_META, _encode_reply
from fedsqueeze.codecs import decode, parse
from fedsqueeze.protocol import DELTA, Downlink
from fedsqueeze.simulation.codec_bench import default_data_dir, lenet5_update

DEFAULT_CODECS = ("svd(rank=6) | quantize(bits=4) | zstd",)
TRAIN_SAMPLES = 2_000


def cpu_ms(fn: Callable[[int], object], repeats: int, warmup: int = 10) -> list[float]:
    """CPU milliseconds of ``fn(i)`` for i in range(repeats), after ``warmup`` calls."""
    for i in range(warmup):
        fn(-1 - i)
    times = []
    for i in range(repeats):
        start = time.process_time()
        fn(i)
        times.append((time.process_time() - start) * 1e3)
    return times


def train_epoch_ms(data_dir: str | None, repeats: int) -> list[float]:
    """CPU milliseconds of one epoch of the default run's local training, one per repeat."""
    from fedsqueeze.data import load_dataset
    from fedsqueeze.models import build_model
    from fedsqueeze.training import train

    data = load_dataset("mnist", data_dir)
    x, y = data.x_train[:TRAIN_SAMPLES], data.y_train[:TRAIN_SAMPLES]

    def epoch(i: int) -> None:
        train(build_model("lenet5", "mnist"), x, y, epochs=1, batch_size=32, lr=0.05, momentum=0.9, seed=i)

    return cpu_ms(epoch, repeats, warmup=1)


def client_round_ms(spec: str, delta: dict[str, torch.Tensor], rounds: int) -> tuple[list[float], list[float]]:
    """CPU milliseconds of the uplink work per round (as ``client/mod.py`` times it) and of one downlink decode."""
    received = {name: torch.randn_like(t) for name, t in delta.items()}
    state = RecordDict()

    def one_round(i: int) -> None:
        version = i + 100  # a fresh version each round, as the server's
        state[STATE_META] = ConfigRecord({"version": version, "uplink": spec, "feedback-version": version - 1})
        down = Downlink(kind=DELTA, version=version, base=version - 1, blobs=[], uplink=spec)
        # a different update each round, so that the residual carried over is a real one
        local = {name: received[name] + t * (1.0 + 0.1 * (i % 5)) for name, t in delta.items()}
        _encode_reply(local, received, parse(spec, seed=i), state, down)

    blob = parse(spec, seed=0).encode(delta)
    return cpu_ms(one_round, rounds), cpu_ms(lambda i: decode(blob), rounds)


def report(rows: list[dict[str, object]], train: list[float]) -> str:
    """The markdown table."""
    train_ms = statistics.median(train)
    lines = [
        f"One epoch of local training (LeNet-5, {TRAIN_SAMPLES:,} MNIST samples), median CPU time: "
        f"{train_ms:.0f} ms (samples: {', '.join(f'{t:.0f}' for t in train)}).",
        "",
        "| uplink codec | uplink work per round, ms (median) | share of training | downlink decode, ms | "
        "both, share of training |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        up, down = float(row["uplink_ms"]), float(row["decode_ms"])  # type: ignore[arg-type]
        lines.append(
            f"| `{row['codec']}` | {up:.2f} | {100 * up / train_ms:.2f} % | {down:.2f} | "
            f"{100 * (up + down) / train_ms:.2f} % |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedsqueeze.simulation.client_round_bench",
        description="CPU time of a node's codec work per round (uplink with error feedback, as client/mod.py "
        "times it, and the downlink decode) against one epoch of the default run's training, one thread.",
    )
    p.add_argument("--data-dir", help="MNIST file or folder (default: $FEDSQUEEZE_DATA, else ../shared/datasets)")
    p.add_argument("--codecs", nargs="+", default=list(DEFAULT_CODECS), metavar="SPEC", help="uplink codecs")
    p.add_argument("--rounds", type=int, default=200, help="client rounds timed per codec (default: 200)")
    p.add_argument("--train-repeats", type=int, default=5, help="training epochs timed (default: 5)")
    p.add_argument("--out", type=Path, help="folder for client_round.md and client_round.json")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)  # as each simulated node trains
    data_dir = args.data_dir or default_data_dir()
    delta = lenet5_update(data_dir)
    rows: list[dict[str, object]] = []
    for spec in args.codecs:
        print(f"[client-round] {spec}", file=sys.stderr, flush=True)
        up, down = client_round_ms(spec, delta, args.rounds)
        rows.append({"codec": spec, "uplink_ms": statistics.median(up), "decode_ms": statistics.median(down)})
    print("[client-round] training", file=sys.stderr, flush=True)
    train = train_epoch_ms(data_dir, args.train_repeats)
    text = report(rows, train)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "client_round.md").write_text(text)
        payload = {"train_ms": train, "rows": rows, "command": " ".join(sys.argv)}
        (args.out / "client_round.json").write_text(json.dumps(payload, indent=1))
    return text


if __name__ == "__main__":
    main()
