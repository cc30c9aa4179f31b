"""The codec's share of one client round by CPU time: a benchmark script, not a test.

What a node spends on compression in one round, timed as ``client/mod.py`` times it for the
``client_encode_seconds`` column of a run (``_encode_reply``: read the error-feedback residual from
the node's state, encode ``local - received`` with the uplink codec, write the residual back),
plus the downlink decode the node also does, against one epoch of the default run's local
training (LeNet-5, 2,000 MNIST samples, batch 32, lr 0.05, momentum 0.9). All on one thread, by
CPU time, so that other processes on the machine count less than in a simulation's wall clock. Each
codec is timed twice: in a loop of rounds, and with a training epoch before each round, as on a node,
where the codec starts with caches that hold the training's data (the same work costs ~1.7x more
there; this is what a run's ``client_encode_seconds`` sees)::

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


def cpu_ms(
    fn: Callable[[int], object], repeats: int, warmup: int = 10, before: Callable[[int], object] | None = None
) -> list[float]:
    """CPU milliseconds of ``fn(i)`` for i in range(repeats), after ``warmup`` calls; ``before(i)``, untimed,
    runs before each timed call."""
    for i in range(warmup):
        fn(-1 - i)
    times = []
    for i in range(repeats):
        if before is not None:
            before(i)
        start = time.process_time()
        fn(i)
        times.append((time.process_time() - start) * 1e3)
    return times


def training_epoch(data_dir: str | None) -> Callable[[int], None]:
    """One epoch of the default run's local training (a fresh LeNet-5, seeded by its argument)."""
    from fedsqueeze.data import load_dataset
    from fedsqueeze.models import build_model
    from fedsqueeze.training import train

    data = load_dataset("mnist", data_dir)
    x, y = data.x_train[:TRAIN_SAMPLES], data.y_train[:TRAIN_SAMPLES]

    def epoch(i: int) -> None:
        train(build_model("lenet5", "mnist"), x, y, epochs=1, batch_size=32, lr=0.05, momentum=0.9, seed=i)

    return epoch


def client_round_ms(
    spec: str, delta: dict[str, torch.Tensor], rounds: int, before: Callable[[int], object] | None = None
) -> tuple[list[float], list[float]]:
    """CPU milliseconds of the uplink work per round (as ``client/mod.py`` times it) and of one downlink decode.

    ``before(i)`` runs, untimed, before each timed round and decode: with a training epoch there, they
    find the caches as a node does right after training (cold), not as a loop of encodes leaves them.
    """
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
    return cpu_ms(one_round, rounds, before=before), cpu_ms(lambda i: decode(blob), rounds, before=before)


def report(rows: list[dict[str, object]], train: list[float]) -> str:
    """The markdown table: each codec's work in a loop of rounds (warm caches) and right after a training epoch."""
    train_ms = statistics.median(train)
    lines = [
        f"One epoch of local training (LeNet-5, {TRAIN_SAMPLES:,} MNIST samples), median CPU time: "
        f"{train_ms:.0f} ms (samples: {', '.join(f'{t:.0f}' for t in train)}).",
        "",
        "Medians, CPU ms per round. *Warm*: rounds in a loop; *after training*: each right after a training "
        "epoch, as on a node (its caches hold the training's data, not the codec's). Shares are of the epoch.",
        "",
        "| uplink codec | uplink, warm | uplink, after training | share of training (after training) | "
        "downlink decode, warm | decode, after training | both, share of training (after training) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        up, down, up_cold, down_cold = (
            float(row[k])  # type: ignore[arg-type]
            for k in ("uplink_ms", "decode_ms", "uplink_after_training_ms", "decode_after_training_ms")
        )
        codec = str(row["codec"]).replace("|", "\\|")  # a pipe in a table cell, even in a code span
        lines.append(
            f"| `{codec}` | {up:.2f} | {up_cold:.2f} | {100 * up_cold / train_ms:.2f} % | {down:.2f} | "
            f"{down_cold:.2f} | {100 * (up_cold + down_cold) / train_ms:.2f} % |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedsqueeze.simulation.client_round_bench",
        description="CPU time of a node's codec work per round (uplink with error feedback, as client/mod.py "
        "times it, and the downlink decode) against one epoch of the default run's training, one thread; "
        "in a loop and right after a training epoch.",
    )
    p.add_argument("--data-dir", help="MNIST file or folder (default: $FEDSQUEEZE_DATA, else ../shared/datasets)")
    p.add_argument("--codecs", nargs="+", default=list(DEFAULT_CODECS), metavar="SPEC", help="uplink codecs")
    p.add_argument("--rounds", type=int, default=200, help="client rounds timed per codec in a loop (default: 200)")
    p.add_argument(
        "--rounds-after-training",
        type=int,
        default=15,
        help="client rounds timed per codec right after a training epoch each (default: 15)",
    )
    p.add_argument("--out", type=Path, help="folder for client_round.md and client_round.json")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)  # as each simulated node trains
    data_dir = args.data_dir or default_data_dir()
    delta = lenet5_update(data_dir)
    epoch = training_epoch(data_dir)
    train: list[float] = []

    def timed_epoch(i: int) -> None:
        train.extend(cpu_ms(lambda _: epoch(i), 1, warmup=0))

    rows: list[dict[str, object]] = []
    for spec in args.codecs:
        print(f"[client-round] {spec}", file=sys.stderr, flush=True)
        up, down = client_round_ms(spec, delta, args.rounds)
        up_cold, down_cold = client_round_ms(spec, delta, args.rounds_after_training, before=timed_epoch)
        rows.append(
            {
                "codec": spec,
                "uplink_ms": statistics.median(up),
                "decode_ms": statistics.median(down),
                "uplink_after_training_ms": statistics.median(up_cold),
                "decode_after_training_ms": statistics.median(down_cold),
            }
        )
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
