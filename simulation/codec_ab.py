"""Codec speed of this checkout against another, interleaved in one process: a benchmark script.

On a shared machine the speed of one run drifts by 2x from minute to minute, more than most
changes a comparison is meant to show. Here the ``codecs`` package of another checkout (e.g. a
``git worktree`` of the commit before) is loaded beside this one under another name, and the
two encode and decode the same update in turns, call by call, so that both see the same
machine::

    git worktree add /tmp/before HEAD~3
    python -m fedsqueeze.simulation.codec_ab /tmp/before --data-dir ../shared/datasets

Prints median CPU milliseconds and MB/s of FP32 input for each side (one thread), and the ratio.
``codecs/`` imports nothing else of the project, so any checkout's copy loads on its own.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch

import fedsqueeze.codecs as this_codecs
from fedsqueeze.simulation.codec_bench import default_data_dir, lenet5_update, synthetic_update

DEFAULT_SPEC = "svd(rank=6) | quantize(bits=4) | zstd"


def load_codecs(checkout: Path, name: str = "codecs_before") -> ModuleType:
    """The ``codecs`` package of ``checkout`` (a repository root), imported as ``name``."""
    init = checkout / "codecs" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"{checkout} holds no codecs/__init__.py; expected the root of a fedsqueeze checkout")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its relative imports resolve under this name
    spec.loader.exec_module(module)
    return module


def interleaved_ms(calls: Sequence[Callable[[], object]], repeats: int) -> list[list[float]]:
    """CPU milliseconds of each call, ``repeats`` times, the calls taking turns."""
    for call in calls:
        for _ in range(10):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.process_time_ns()
            call()
            times[i].append((time.process_time_ns() - start) / 1e6)
    return times


def compare(before: ModuleType, update: dict[str, torch.Tensor], spec: str, repeats: int) -> str:
    """A markdown table: encode and decode of ``update`` with ``spec`` by both packages."""
    sides = {"before": before, "this checkout": this_codecs}
    codecs = {name: mod.parse(spec, seed=0) for name, mod in sides.items()}
    blobs = {name: codec.encode(update) for name, codec in codecs.items()}
    calls: list[Callable[[], object]] = []
    for name, mod in sides.items():
        calls.append(functools.partial(codecs[name].encode, update))
        calls.append(functools.partial(mod.decode, blobs[name]))
    times = interleaved_ms(calls, repeats)
    nbytes = sum(t.numel() for t in update.values()) * 4
    lines = [
        f"`{spec}`, {nbytes // 4:,} parameters, {repeats} interleaved calls each, median CPU time (one thread)",
        "",
        "| side | blob bytes | encode ms | encode MB/s | decode ms | decode MB/s |",
        "|---|---|---|---|---|---|",
    ]
    medians = {}
    for i, name in enumerate(sides):
        enc, dec = statistics.median(times[2 * i]), statistics.median(times[2 * i + 1])
        medians[name] = (enc, dec)
        lines.append(
            f"| {name} | {len(blobs[name]):,} | {enc:.3f} | {nbytes / enc / 1e3:,.0f} | {dec:.3f} | "
            f"{nbytes / dec / 1e3:,.0f} |"
        )
    (enc0, dec0), (enc1, dec1) = medians.values()
    lines.append(f"\nthis checkout / before: encode time {enc1 / enc0:.2f}x, decode time {dec1 / dec0:.2f}x")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedsqueeze.simulation.codec_ab",
        description="Encode/decode speed of this checkout's codecs against another checkout's, interleaved "
        "call by call in one process (robust to a shared machine's drift).",
    )
    p.add_argument("before", type=Path, help="root of the other checkout (e.g. a git worktree)")
    p.add_argument("--spec", default=DEFAULT_SPEC, help=f"codec spec (default: {DEFAULT_SPEC!r})")
    p.add_argument("--data-dir", help="MNIST for the LeNet-5 update (default: $FEDSQUEEZE_DATA, ../shared/datasets)")
    p.add_argument("--synthetic-params", type=int, help="time a synthetic update of this size instead of LeNet-5's")
    p.add_argument("--repeats", type=int, default=400, help="calls per side and direction (default: 400)")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    before = load_codecs(args.before)
    if args.synthetic_params:
        update = synthetic_update(args.synthetic_params)
    else:
        update = lenet5_update(args.data_dir or default_data_dir())
    text = compare(before, update, args.spec, args.repeats)
    print(text)
    return text


if __name__ == "__main__":
    main()
