"""Codec benchmark: size, error and one-thread encode/decode speed of codecs on a real and a synthetic update."""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import pstats
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import zstandard

from fedsqueeze.codecs import Codec, compression_stats, decode, parse

#: The codecs measured when ``--codecs`` is not given.
DEFAULT_CODECS: tuple[str, ...] = (
    "identity",
    "fp16",
    "bf16",
    "identity | zstd",
    "quantize(bits=8)",
    "quantize(bits=8) | zstd",
    "quantize(bits=4) | zstd",
    "quantize(bits=4, stochastic=true) | zstd",
    "quantize(bits=8, granularity=channel) | zstd",
    "topk(ratio=0.01) | quantize(bits=8) | zstd",
    "topk(ratio=0.01) | zstd",
    "topk(ratio=0.01) | ternary | zstd",
    "randomk(ratio=0.01) | quantize(bits=8) | zstd",
    "sign | zstd",
    "svd(rank=4) | quantize(bits=8) | zstd",
    "svd(rank=6) | quantize(bits=4) | zstd",
    "powersgd(rank=2) | quantize(bits=8) | zstd",
    "tucker(ranks=4) | quantize(bits=8) | zstd",
    "cp(rank=4) | quantize(bits=8)",
)

#: Speed targets (one thread, MB of FP32 input per second): spec -> (encode, decode). Specs
#: are matched in their canonical form (``parse(spec).spec``).
TARGETS: dict[str, tuple[float, float]] = {
    "quantize(bits=8) | zstd": (300.0, 600.0),
    "topk(ratio=0.01) | quantize(bits=8) | zstd": (300.0, 600.0),
}
#: The targets are checked on updates of at least this many parameters (per-tensor overheads
#: dominate smaller ones).
TARGET_MIN_PARAMS = 1_000_000
#: Issue 12's targets for small updates (LeNet-5 size), by the fused path: spec -> (encode, decode).
SMALL_TARGETS: dict[str, tuple[float, float]] = {
    "svd(rank=6) | quantize(bits=4) | zstd": (300.0, 600.0),  # the default uplink codec
    "svd(rank=4) | quantize(bits=8) | zstd": (300.0, 600.0),  # the default before it
    "topk(ratio=0.01) | quantize(bits=8) | zstd": (300.0, 600.0),
}
#: Encode paths: ``fused`` hands each stage every tensor at once, ``per-tensor`` one tensor at a time.
PATHS = ("fused", "per-tensor")

DEFAULT_SYNTHETIC_PARAMS = 10_000_000
QUICK_SYNTHETIC_PARAMS = 20_000
MIN_SYNTHETIC_PARAMS = 1_000
MEMCPY_BYTES = 40_000_000
MIN_SAMPLE_SECONDS = 0.05  # fast codecs are looped until one timing sample lasts this long
TIME_BUDGET_SECONDS = 20.0  # stop repeating a codec's timings once they add up to this

Update = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- updates
def synthetic_shapes(num_params: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a model-like update with exactly ``num_params`` parameters.

    At 10M parameters: three conv kernels (32x3x5x5, 64x32x5x5, 128x64x3x3) with biases, a
    2560x3840 fully connected matrix with its bias and a smaller head; other sizes scale
    every dimension by sqrt(num_params / 10M), and a 1-D tensor takes the rounding remainder.

    Parameters
    ----------
    num_params : int
        Total number of parameters, at least 1000.

    Returns
    -------
    dict of str to tuple of int
        Tensor name -> shape, in model order.
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < MIN_SYNTHETIC_PARAMS:
        raise ValueError(f"num_params must be an integer >= {MIN_SYNTHETIC_PARAMS}, got {num_params!r}")
    scale = math.sqrt(num_params / DEFAULT_SYNTHETIC_PARAMS)

    def dim(base: int) -> int:
        return max(1, round(base * scale))

    c1, c2, c3 = dim(32), dim(64), dim(128)
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (c1, 3, 5, 5),
        "conv1.bias": (c1,),
        "conv2.weight": (c2, c1, 5, 5),
        "conv2.bias": (c2,),
        "conv3.weight": (c3, c2, 3, 3),
        "conv3.bias": (c3,),
    }
    rows = dim(2560)
    used = sum(math.prod(s) for s in shapes.values()) + rows  # + fc1.bias
    cols = min(dim(3840), (num_params - used) // rows)
    if cols < 1:
        raise ValueError(f"num_params={num_params} is too small for the synthetic model's layout")
    shapes["fc1.weight"] = (rows, cols)
    shapes["fc1.bias"] = (rows,)
    left = num_params - used - rows * cols
    if left >= rows:
        shapes["head.weight"] = (left // rows, rows)
        left %= rows
    if left:
        shapes["head.bias"] = (left,)
    return shapes


def synthetic_update(num_params: int = DEFAULT_SYNTHETIC_PARAMS, seed: int = 0) -> Update:
    """A model-shaped float32 update: heavy-tailed values of scale ~1e-3 with per-row scales.

    Values are Student-t with 4 degrees of freedom scaled to a standard deviation of 1e-3
    (heavy tails: at 10M parameters the largest is ~50-100 standard deviations out, as in
    real weight deltas), times a per-row scale (log-normal, sigma 0.3, one per slice along
    dim 0) so that rows differ in range as in trained layers. The same ``num_params`` and
    ``seed`` give the same update.

    Parameters
    ----------
    num_params : int
        Total number of parameters, at least 1000 (default: 10_000_000).
    seed : int
        Seed of the generator (default: 0).

    Returns
    -------
    dict of str to torch.Tensor
        Tensor name -> float32 tensor, shaped by :func:`synthetic_shapes`.
    """
    rng = np.random.default_rng(seed)
    update: Update = {}
    for name, shape in synthetic_shapes(num_params).items():
        x = rng.standard_t(4, size=shape).astype(np.float32) * np.float32(1e-3 / math.sqrt(2.0))
        rows = np.exp(0.3 * rng.standard_normal(shape[0])).astype(np.float32)
        x *= rows.reshape((-1,) + (1,) * (len(shape) - 1))
        update[name] = torch.from_numpy(x)
    return update


def lenet5_update(data_dir: str | None, seed: int = 0) -> Update:
    """Weight delta (trained - initial) of the project's LeNet-5 after one epoch on MNIST.

    Parameters
    ----------
    data_dir : str or None
        Where MNIST lives (see :func:`fedsqueeze.data.load_dataset`); None uses
        ``FEDSQUEEZE_DATA`` or the download cache.
    seed : int
        Seed of the initialization and of the shuffling (default: 0).

    Returns
    -------
    dict of str to torch.Tensor
        Parameter name -> float32 delta, 61,706 parameters.
    """
    from fedsqueeze.data import load_dataset
    from fedsqueeze.models import build_model
    from fedsqueeze.training import get_weights, train

    data = load_dataset("mnist", data_dir)
    torch.manual_seed(seed)
    model = build_model("lenet5", "mnist")
    initial = get_weights(model)
    train(model, data.x_train, data.y_train, epochs=1, seed=seed)
    trained = get_weights(model)
    return {name: trained[name] - initial[name] for name in initial if initial[name].is_floating_point()}


def mcmahan_update(data_dir: str | None, seed: int = 0, steps: int = 300) -> Update:
    """Weight delta (trained - initial) of the McMahan CNN after ``steps`` SGD steps (batch 32) on MNIST.

    Parameters
    ----------
    data_dir : str or None
        Where MNIST lives (see :func:`fedsqueeze.data.load_dataset`).
    seed : int
        Seed of the initialization and of the shuffling (default: 0).
    steps : int
        Mini-batches of 32 trained on, the first ``32 * steps`` training samples (default: 300).

    Returns
    -------
    dict of str to torch.Tensor
        Parameter name -> float32 delta, about 1.66 million parameters.
    """
    from fedsqueeze.data import load_dataset
    from fedsqueeze.models import build_model
    from fedsqueeze.training import get_weights, train

    data = load_dataset("mnist", data_dir)
    torch.manual_seed(seed)
    model = build_model("mcmahan-cnn", "mnist")
    initial = get_weights(model)
    train(model, data.x_train[: 32 * steps], data.y_train[: 32 * steps], epochs=1, seed=seed)
    trained = get_weights(model)
    return {name: trained[name] - initial[name] for name in initial if initial[name].is_floating_point()}


def default_data_dir() -> str | None:
    """``$FEDSQUEEZE_DATA``, else ``<repo root>/../shared/datasets`` if it exists, else None."""
    env = os.environ.get("FEDSQUEEZE_DATA")
    if env:
        return env
    shared = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    return str(shared) if shared.is_dir() else None


# ----------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Median seconds per call, by the wall clock and in CPU time of this process."""

    wall: float
    cpu: float
    samples: int


def median_time(fn: Callable[[], object], repeats: int, first_seconds: float) -> Timing:
    """Time ``fn`` (already warmed up) over up to ``repeats`` samples.

    Calls that take less than MIN_SAMPLE_SECONDS are looped inside one sample, guessed from
    ``first_seconds`` (the warm-up's time); sampling stops early once the samples add up to
    TIME_BUDGET_SECONDS. CPU time (``time.process_time``) is what one thread spent, so it
    is less disturbed than the wall clock when other processes share the cores.
    """
    inner = max(1, min(1000, math.ceil(MIN_SAMPLE_SECONDS / max(first_seconds, 1e-6))))
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(inner):
            fn()
        wall.append((time.perf_counter() - start) / inner)
        cpu.append((time.process_time() - start_cpu) / inner)
        if sum(wall) * inner > TIME_BUDGET_SECONDS:
            break
    return Timing(statistics.median(wall), statistics.median(cpu), len(wall))


def _encode_in_child(codec: Codec, update: Update, conn: multiprocessing.connection.Connection) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    blob = codec.encode(update)
    conn.send((time.perf_counter() - start, blob))
    conn.close()


def first_encode(codec: Codec, update: Update, limit_seconds: float) -> tuple[bytes | None, float]:
    """Encode once, giving up after ``limit_seconds`` (a forked child does it, on Linux).

    Returns (blob, seconds), or (None, limit_seconds) when the encode took too long. With
    ``limit_seconds <= 0`` or where ``fork`` is not the safe default, it encodes in-process.
    """
    if limit_seconds <= 0 or not sys.platform.startswith("linux"):
        start = time.perf_counter()
        blob = codec.encode(update)
        return blob, time.perf_counter() - start
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_encode_in_child, args=(codec, update, sender), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(limit_seconds):
            child.terminate()
            return None, limit_seconds
        seconds, blob = receiver.recv()
        # The child may finish before the parent polls (a loaded machine): its own timing decides
        return (None, limit_seconds) if seconds > limit_seconds else (blob, seconds)
    except EOFError:  # the child died without answering
        raise RuntimeError(
            f"encoding with {codec.spec!r} crashed its worker process (exit code {child.exitcode})"
        ) from None
    finally:
        receiver.close()
        child.join()


def memcpy_reference(nbytes: int = MEMCPY_BYTES, repeats: int = 9) -> dict[str, Timing]:
    """One-thread copy time of ``nbytes`` (see :func:`median_time`), for three ways of copying.

    ``numpy_copyto`` and ``torch_copy_`` copy into a preallocated buffer;
    ``numpy_copy_alloc`` allocates its destination each time (first-touch page faults
    included), which is what a decoder that returns fresh tensors pays.
    """
    n = max(1, nbytes // 4)
    src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    tsrc, tdst = torch.from_numpy(src), torch.empty(n)
    cases: dict[str, Callable[[], object]] = {
        "numpy_copyto": lambda: np.copyto(dst, src),
        "torch_copy_": lambda: tdst.copy_(tsrc),
        "numpy_copy_alloc": lambda: src.copy(),
    }
    out = {}
    for name, fn in cases.items():
        start = time.perf_counter()
        fn()
        out[name] = median_time(fn, repeats, time.perf_counter() - start)
    return out


def _gb_s(nbytes: int, t: Timing) -> str:
    return f"{nbytes / t.wall / 1e9:.1f} GB/s ({nbytes / t.cpu / 1e9:.1f} by CPU time)"


# ----------------------------------------------------------------------------- measuring
@dataclass
class Row:
    """One measurement: a codec on an update (``status`` is "ok" or why it was skipped)."""

    update: str
    codec: str
    canonical_spec: str
    status: str
    path: str
    num_params: int
    fp32_bytes: int
    bytes: int | None = None
    ratio: float | None = None
    bits_per_param: float | None = None
    rel_l2_error: float | None = None
    encode_mb_s: float | None = None
    decode_mb_s: float | None = None
    encode_cpu_mb_s: float | None = None
    decode_cpu_mb_s: float | None = None
    encode_ms: float | None = None
    decode_ms: float | None = None
    encode_cpu_ms: float | None = None
    decode_cpu_ms: float | None = None
    timing_samples: int = 0


def relative_l2_error(original: Mapping[str, torch.Tensor], restored: Mapping[str, torch.Tensor]) -> float:
    """||x - y|| / ||x|| over all tensors together (0.0 when x is all zeros and y equals it)."""
    num = den = 0.0
    for name, x in original.items():
        x = x.to(torch.float32)
        num += float((x - restored[name].to(torch.float32)).pow(2).sum(dtype=torch.float64))
        den += float(x.pow(2).sum(dtype=torch.float64))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def measure(
    update_name: str,
    update: Update,
    spec: str,
    *,
    repeats: int,
    seed: int,
    max_encode_seconds: float,
    path: str = "fused",
) -> Row:
    """Size, error and one-thread encode/decode speed of codec ``spec`` on ``update``, encoding by ``path``."""
    codec = parse(spec, seed=seed)
    fused = path == "fused"
    n = sum(t.numel() for t in update.values())
    row = Row(
        update=update_name,
        codec=spec,
        canonical_spec=codec.spec,
        status="ok",
        path=path,
        num_params=n,
        fp32_bytes=4 * n,
    )
    blob, first_seconds = first_encode(codec, update, max_encode_seconds)
    if blob is None:
        row.status = f"skipped: one encode takes over {max_encode_seconds:g} s"
        return row
    stats = compression_stats(update, blob)
    row.bytes, row.ratio, row.bits_per_param = stats.blob_bytes, stats.ratio, stats.bits_per_param
    start = time.perf_counter()
    restored = decode(blob)
    first_decode = time.perf_counter() - start
    row.rel_l2_error = relative_l2_error(update, restored)
    del restored
    if first_seconds < 2.0:  # the forked child's encode did not warm this process up
        start = time.perf_counter()
        codec.encode(update, fused=fused)
        first_seconds = time.perf_counter() - start
    enc = median_time(lambda: codec.encode(update, fused=fused), repeats, first_seconds)
    dec = median_time(lambda: decode(blob), repeats, first_decode)
    row.encode_ms, row.decode_ms = 1e3 * enc.wall, 1e3 * dec.wall
    row.encode_cpu_ms, row.decode_cpu_ms = 1e3 * enc.cpu, 1e3 * dec.cpu
    mb = row.fp32_bytes / 1e6
    row.encode_mb_s, row.decode_mb_s = mb / enc.wall, mb / dec.wall
    row.encode_cpu_mb_s, row.decode_cpu_mb_s = mb / max(enc.cpu, 1e-9), mb / max(dec.cpu, 1e-9)
    row.timing_samples = min(enc.samples, dec.samples)
    return row


def uniform_at_bytes(update: Update, nbytes: int, tail: str, *, seed: int) -> tuple[str, int, float]:
    """The uniform ``topk(ratio=r) | tail`` with the fewest bytes >= ``nbytes``: (spec, bytes, error).

    ``r`` is bisected (30 steps, geometric, over 1e-5..1).
    """
    lo, hi = 1e-5, 1.0
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        if len(parse(f"topk(ratio={mid:.6g}) | {tail}", seed=seed).encode(update)) >= nbytes:
            hi = mid
        else:
            lo = mid
    spec = f"topk(ratio={hi:.6g}) | {tail}"
    blob = parse(spec, seed=seed).encode(update)
    return spec, len(blob), relative_l2_error(update, decode(blob))


def budget_comparison(updates: Mapping[str, Update], bpps: Sequence[float], *, seed: int) -> str:
    """Markdown table: ``budget(bpp) | topk | quantize(bits=b) | zstd`` against uniform top-k at equal bytes."""
    lines = [
        (
            "| update | bpp | quantizer | budget bytes | target bytes | budget error | uniform at >= bytes | "
            "uniform bytes | uniform error |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, update in updates.items():
        n = sum(t.numel() for t in update.values())
        for bpp in bpps:
            for bits in (4, 8):
                tail = f"quantize(bits={bits}) | zstd"
                codec = parse(f"budget(bpp={bpp}) | topk | {tail}", seed=seed)
                blob = codec.encode(update)
                error = relative_l2_error(update, decode(blob))
                spec, ubytes, uerror = uniform_at_bytes(update, len(blob), tail, seed=seed)
                lines.append(
                    f"| {name} | {bpp:g} | {bits} bits | {len(blob):,} | {bpp * n / 8:,.0f} "
                    f"(+header) | {error:.4f} | `{spec}` | {ubytes:,} | {uerror:.4f} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def budget_precision(updates: Mapping[str, Update], bpps: Sequence[float], tails: Sequence[str], *, seed: int) -> str:
    """Markdown table: payload / target of ``budget(bpp) | tail`` (payload: the blob less its header)."""
    from fedsqueeze.codecs._pipeline import read_header

    lines = [
        "| update | pipeline after budget | bpp | target payload | payload | payload / target | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, update in updates.items():
        n = sum(t.numel() for t in update.values())
        for tail in tails:
            for bpp in bpps:
                blob = parse(f"budget(bpp={bpp}) | {tail}", seed=seed).encode(update)
                payload = len(blob) - read_header(blob)[2].pos
                target = bpp * n / 8
                error = relative_l2_error(update, decode(blob))
                cells = [name, f"`{tail.replace('|', chr(92) + '|')}`", f"{bpp:g}", f"{target:,.0f}", f"{payload:,}"]
                cells += [f"{payload / target:.3f}", f"{error:.4f}"]
                lines.append("| " + " | ".join(cells) + " |")
                print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def _zero_aligned(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric grid through zero: 2**(bits-1) - 1 steps of max|x| / (2**(bits-1) - 1) each side."""
    levels = (1 << (bits - 1)) - 1
    scale = float(x.abs().max()) / levels or 1.0
    return torch.clamp(torch.round(x / scale), -levels, levels) * scale


def small_width_table(updates: Mapping[str, Update]) -> str:
    """Markdown table: relative L2 error (and bits per parameter after zstd) of 2- and 4-bit grids on each update.

    The measurement behind ``quantize``'s ``outlier_block`` default: one range per tensor, a
    zero-aligned symmetric grid (error only; not a codec), and per-block ranges.
    """
    blocks = (0, 64, 256, 1024)
    names = ["one range (outlier_block=0)", "zero-aligned grid"] + [f"blocks of {b}" for b in blocks[1:]]
    lines = ["| update | bits | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for name, update in updates.items():
        n = sum(t.numel() for t in update.values())
        for bits in (2, 4):
            cells = []
            for block in blocks:
                blob = parse(f"quantize(bits={bits}, outlier_block={block}) | zstd").encode(update)
                cells.append(f"{relative_l2_error(update, decode(blob)):.3f} ({8 * len(blob) / n:.2f} b)")
            zero = relative_l2_error(update, {k: _zero_aligned(v, bits) for k, v in update.items()})
            cells.insert(1, f"{zero:.3f}")
            lines.append(f"| {name} | {bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _issue12_sections(args: argparse.Namespace, updates: Mapping[str, Update]) -> str:
    """The optional report sections: 2/4-bit grids (--small-bits), budget against uniform (--budget-bpp)."""
    text = ""
    if args.small_bits:
        text += "\n## Quantization at 2 and 4 bits: relative L2 error by grid\n\n" + small_width_table(updates)
    if args.budget_bpp:
        text += "\n## Budget against uniform top-k at equal bytes (relative L2 error)\n\n"
        text += budget_comparison(updates, args.budget_bpp, seed=args.seed)
    if args.budget_tails:
        text += "\n## How close the budget comes to its target\n\n"
        text += budget_precision(updates, args.budget_bpp or [0.05, 0.2, 1.0], args.budget_tails, seed=args.seed)
    return text


def profile_codec(update: Update, spec: str, *, seed: int, top: int = 15) -> str:
    """cProfile of one encode and one decode (after a warm-up), top functions by own time."""
    codec = parse(spec, seed=seed)
    blob = codec.encode(update)
    decode(blob)
    text = []
    for what, fn in (("encode", lambda: codec.encode(update)), ("decode", lambda: decode(blob))):
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.runcall(fn)
        wall = time.perf_counter() - start
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
        body = stream.getvalue()
        body = body[body.find("   ncalls") :] if "   ncalls" in body else body
        text.append(f"### {what} {spec!r}: {1e3 * wall:.1f} ms under the profiler\n\n```\n{body.rstrip()}\n```\n")
    return "\n".join(text)


# ----------------------------------------------------------------------------- output
def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _fmt_error(value: float | None) -> str:
    return "" if value is None else f"{value:.2e}"


def markdown_table(rows: Sequence[Row]) -> str:
    """Markdown table of the rows of one update."""
    head = (
        "| codec | path | bytes | ratio vs FP32 | bits/param | rel. L2 error | encode MB/s | decode MB/s "
        "| encode MB/s by CPU time | decode MB/s by CPU time | note |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        note = "" if r.status == "ok" else r.status
        if r.status == "ok" and r.timing_samples < 3:
            note = f"{r.timing_samples} timing sample(s)"
        lines.append(
            f"| `{r.codec.replace('|', chr(92) + '|')}` | {r.path} | {'' if r.bytes is None else f'{r.bytes:,}'} | "
            f"{_fmt(r.ratio, 1)} | "
            f"{_fmt(r.bits_per_param, 3)} | {_fmt_error(r.rel_l2_error)} | {_fmt(r.encode_mb_s, 0)} | "
            f"{_fmt(r.decode_mb_s, 0)} | {_fmt(r.encode_cpu_mb_s, 0)} | {_fmt(r.decode_cpu_mb_s, 0)} | {note} |"
        )
    return "\n".join(lines)


def target_lines(rows: Sequence[Row]) -> list[str]:
    """Lines comparing the fused path's speeds with TARGETS (updates of >= TARGET_MIN_PARAMS) and
    SMALL_TARGETS (smaller updates)."""
    large = {parse(spec).spec: goals for spec, goals in TARGETS.items()}
    small = {parse(spec).spec: goals for spec, goals in SMALL_TARGETS.items()}
    out = []
    for r in rows:
        targets = large if r.num_params >= TARGET_MIN_PARAMS else small
        if r.canonical_spec not in targets or r.path != "fused":
            continue
        enc_goal, dec_goal = targets[r.canonical_spec]
        if r.status != "ok":
            out.append(f"- {r.update}, `{r.codec}`: {r.status}")
            continue
        for label, enc, dec in (
            ("wall clock", r.encode_mb_s, r.decode_mb_s),
            ("CPU time", r.encode_cpu_mb_s, r.decode_cpu_mb_s),
        ):
            if enc is None or dec is None:  # no timing for this row: nothing to compare
                continue
            verdict = "meets" if enc >= enc_goal and dec >= dec_goal else "MISSES"
            out.append(
                f"- {r.update}, `{r.codec}`, by {label}: encode {enc:,.0f} MB/s (target {enc_goal:g}), "
                f"decode {dec:,.0f} MB/s (target {dec_goal:g}): {verdict} the targets"
            )
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(
    command: str,
    rows: Sequence[Row],
    memcpy: Mapping[str, Timing],
    memcpy_bytes: int,
    notes: Sequence[str],
    load: tuple[float, float],
) -> str:
    """The whole markdown report: header (command, machine, memcpy reference), tables, targets."""
    lines = [
        "# Codec benchmark",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} CPUs ({_cpu_model()}), {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"zstandard {zstandard.__version__}",
        "- one thread (`torch.set_num_threads(1)`); speeds are MB (1e6 bytes) of FP32 input per second, "
        "median of the timing samples after a warm-up, by the wall clock and by the CPU time of this process",
        f"- memcpy reference, same run, one thread, {memcpy_bytes / 1e6:g} MB: "
        f"`np.copyto` {_gb_s(memcpy_bytes, memcpy['numpy_copyto'])}, "
        f"torch `copy_` {_gb_s(memcpy_bytes, memcpy['torch_copy_'])}, "
        f"`ndarray.copy()` into fresh memory {_gb_s(memcpy_bytes, memcpy['numpy_copy_alloc'])}",
        f"- load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f}; other processes share "
        "these CPUs, so timings are noisy",
    ]
    lines += [f"- {note}" for note in notes]
    for update in dict.fromkeys(r.update for r in rows):
        these = [r for r in rows if r.update == update]
        lines += ["", f"## {update} ({these[0].num_params:,} parameters, {these[0].fp32_bytes / 1e6:.2f} MB FP32)", ""]
        lines.append(markdown_table(these))
    if len({r.path for r in rows}) > 1:
        lines += ["", "## Fused against per-tensor (MB/s by CPU time, one thread)", "", path_comparison(rows, memcpy)]
    targets = target_lines(rows)
    if targets:
        lines += [
            "",
            f"## Speed targets (one thread, fused path; updates of >= {TARGET_MIN_PARAMS:,} parameters: "
            "TARGETS, smaller ones: SMALL_TARGETS)",
            "",
        ] + targets
    return "\n".join(lines) + "\n"


def path_comparison(rows: Sequence[Row], memcpy: Mapping[str, Timing]) -> str:
    """Markdown table: encode MB/s by CPU time of each codec on each update, fused and per-tensor, and decode MB/s
    (one decoder: the rows of both paths time the same code)."""
    copy = memcpy["numpy_copyto"]
    lines = [
        f"memcpy (`np.copyto`, 40 MB, same run): {MEMCPY_BYTES / copy.cpu / 1e6:,.0f} MB/s by CPU time, "
        f"{MEMCPY_BYTES / copy.wall / 1e6:,.0f} MB/s by the wall clock.",
        "",
        "| update | parameters | codec | encode fused | encode per-tensor | encode speed-up | decode |",
        "|" + "---|" * 7,
    ]
    ok = [r for r in rows if r.status == "ok" and r.encode_cpu_mb_s and r.decode_cpu_mb_s]
    for r in ok:
        other = next((o for o in ok if o.path == "per-tensor" and (o.update, o.codec) == (r.update, r.codec)), None)
        if r.path != "fused" or other is None:
            continue
        enc, enc_other = r.encode_cpu_mb_s or 0.0, other.encode_cpu_mb_s or 1.0
        lines.append(
            f"| {r.update} | {r.num_params:,} | `{r.codec.replace('|', chr(92) + '|')}` | {enc:,.0f} "
            f"| {enc_other:,.0f} | {enc / enc_other:.2f}x | {r.decode_cpu_mb_s or 0.0:,.0f} |"
        )
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """One line per row, columns as in :class:`Row`."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


# ----------------------------------------------------------------------------- CLI
def _codec_spec(text: str) -> str:
    try:
        parse(text)
        return " ".join(text.split())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m fedsqueeze.simulation.codec_bench",
        description="Measure size, error and one-thread encode/decode speed of codecs on a real "
        "LeNet-5 update (one epoch of MNIST) and a synthetic model-shaped update. Prints a markdown "
        "table; --out DIR also writes DIR/codec_bench.md and DIR/codec_bench.csv (one row per update "
        "and codec). The full run takes a few minutes; --quick is a seconds-long smoke run.",
    )
    p.add_argument(
        "--data-dir",
        help="MNIST file or folder (default: $FEDSQUEEZE_DATA, else ../shared/datasets next to the repository)",
    )
    p.add_argument("--out", type=Path, help="folder to write codec_bench.csv and codec_bench.md into")
    p.add_argument(
        "--codecs",
        nargs="+",
        type=_codec_spec,
        metavar="SPEC",
        help=f"codec specs to measure, each one quoted (default: the built-in list of {len(DEFAULT_CODECS)})",
    )
    p.add_argument(
        "--synthetic-params",
        type=_positive_int,
        nargs="+",
        default=None,
        help=f"parameters of the synthetic update, or several sizes for several updates (default: "
        f"{DEFAULT_SYNTHETIC_PARAMS:_}; {QUICK_SYNTHETIC_PARAMS:_} with --quick)",
    )
    p.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=["fused"],
        help="encode paths to time: fused (each stage sees all tensors at once, the default of "
        "Codec.encode) and/or per-tensor; decoding is the same for both (default: fused)",
    )
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help="timing samples per codec, after a warm-up (default: 5; 1 with --quick)",
    )
    p.add_argument(
        "--max-encode-seconds",
        type=float,
        default=30.0,
        help="skip a codec whose first encode takes longer; 0 waits forever (default: 30)",
    )
    p.add_argument("--no-real", action="store_true", help="skip the real LeNet-5 update (no MNIST needed)")
    p.add_argument(
        "--mcmahan",
        action="store_true",
        help="also measure a real McMahan CNN update (300 SGD steps on MNIST; 1.66M parameters)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile one encode and one decode of the target codecs on the synthetic update",
    )
    p.add_argument(
        "--budget-bpp",
        nargs="+",
        type=float,
        default=None,
        metavar="BPP",
        help="also compare budget(bpp) | topk | quantize | zstd with uniform top-k at equal bytes "
        "on every update, for each BPP",
    )
    p.add_argument(
        "--budget-tails",
        nargs="+",
        default=None,
        metavar="TAIL",
        help="also report payload / target of budget(bpp) | TAIL on every update, for each --budget-bpp "
        "(default bpps: 0.05 0.2 1), e.g. 'svd | quantize | zstd'",
    )
    p.add_argument(
        "--small-bits",
        action="store_true",
        help="also measure 2- and 4-bit grids (one range, zero-aligned, blocks) on every update",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the updates and of the codecs (default: 0)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run in seconds: tiny synthetic update, no real update, one timing sample",
    )
    return p


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark; print progress to stderr and the markdown report to stdout.

    Returns
    -------
    list of Row
        The measurements, in the order of the table.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    sizes = args.synthetic_params or [QUICK_SYNTHETIC_PARAMS if args.quick else DEFAULT_SYNTHETIC_PARAMS]
    for num_params in sizes:
        if num_params < MIN_SYNTHETIC_PARAMS:
            build_parser().error(f"--synthetic-params must be at least {MIN_SYNTHETIC_PARAMS}, got {num_params}")
    repeats = args.repeats or (1 if args.quick else 5)
    specs = list(dict.fromkeys(args.codecs or DEFAULT_CODECS))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_start = os.getloadavg()[0]
        notes: list[str] = []
        memcpy_bytes = MEMCPY_BYTES // 100 if args.quick else MEMCPY_BYTES
        memcpy = memcpy_reference(memcpy_bytes, 3 if args.quick else 9)
        print(
            f"memcpy one thread: np.copyto {_gb_s(memcpy_bytes, memcpy['numpy_copyto'])}, torch copy_ "
            f"{_gb_s(memcpy_bytes, memcpy['torch_copy_'])}",
            file=sys.stderr,
            flush=True,
        )
        updates: dict[str, Update] = {}
        if args.quick or args.no_real:
            notes.append("real LeNet-5 update: not measured (--quick or --no-real)")
        else:
            data_dir = args.data_dir or default_data_dir()
            print(
                f"training LeNet-5 for one epoch on MNIST ({data_dir or 'default location'}) ...",
                file=sys.stderr,
                flush=True,
            )
            start = time.perf_counter()
            try:
                updates["lenet5-mnist"] = lenet5_update(data_dir, args.seed)
                notes.append(
                    f"real update: LeNet-5 weight delta after one epoch of MNIST (seed {args.seed}, "
                    f"trained in {time.perf_counter() - start:.1f} s, data from {data_dir})"
                )
            except FileNotFoundError as exc:
                notes.append(f"real LeNet-5 update: skipped, MNIST not found ({str(exc).splitlines()[0]})")
                print(f"MNIST not found, skipping the real update: {exc}", file=sys.stderr, flush=True)
            if args.mcmahan and "lenet5-mnist" in updates:
                updates["mcmahan-mnist"] = mcmahan_update(data_dir, args.seed)
                notes.append(
                    f"real update: McMahan CNN weight delta after 300 SGD steps of 32 MNIST images (seed {args.seed})"
                )
        for num_params in dict.fromkeys(sizes):
            synthetic_name = (
                f"synthetic-{num_params / 1e6:g}M" if num_params >= 1_000_000 else f"synthetic-{num_params}"
            )
            updates[synthetic_name] = synthetic_update(num_params, args.seed)
            notes.append(
                f"synthetic update {synthetic_name}: {len(updates[synthetic_name])} model-shaped tensors, Student-t "
                f"(4 degrees of freedom) values of standard deviation 1e-3 times per-row log-normal scales, "
                f"seed {args.seed}"
            )

        rows: list[Row] = []
        paths = list(dict.fromkeys(args.paths))
        total = len(updates) * len(specs) * len(paths)
        for update_name, update in updates.items():
            for spec, path in ((spec, path) for spec in specs for path in paths):
                start = time.perf_counter()
                row = measure(
                    update_name,
                    update,
                    spec,
                    repeats=repeats,
                    seed=args.seed,
                    max_encode_seconds=args.max_encode_seconds,
                    path=path,
                )
                rows.append(row)
                done = (
                    f"{row.ratio:8.1f}x  err {row.rel_l2_error:.2e}  enc {row.encode_mb_s:6,.0f} "
                    f"({row.encode_cpu_mb_s:6,.0f} CPU) MB/s  dec {row.decode_mb_s:6,.0f} "
                    f"({row.decode_cpu_mb_s:6,.0f} CPU) MB/s"
                    if row.status == "ok"
                    else row.status
                )
                print(
                    f"[{len(rows):2d}/{total}] {update_name:14s} {spec:46s} {path:10s} {done}  "
                    f"({time.perf_counter() - start:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )

        command = "python -m fedsqueeze.simulation.codec_bench" + (" " + shlex.join(argv) if argv else "")
        text = report(command, rows, memcpy, memcpy_bytes, notes, (load_start, os.getloadavg()[0]))
        text += _issue12_sections(args, updates)
        if args.profile:
            targets = {parse(spec).spec for spec in (*TARGETS, *SMALL_TARGETS)}
            profiled = [s for s in specs if parse(s).spec in targets]
            text += "\n## Profiles (synthetic update, one thread)\n\n"
            text += "\n".join(profile_codec(updates[synthetic_name], s, seed=args.seed) for s in profiled)
        print(text)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "codec_bench.md").write_text(text)
            write_csv(args.out / "codec_bench.csv", rows)
            print(f"wrote {args.out / 'codec_bench.md'} and {args.out / 'codec_bench.csv'}", file=sys.stderr)
        return rows
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
