"""Fuzzing campaign for the codec decoder and the spec parser (a script, not a test).

``decode`` must raise only ``CodecError`` and ``parse`` only ``ValueError``, in bounded time and
memory, whatever they are given. Three kinds of input:

- **structure**: valid blobs of many pipelines are parsed into their records and nodes (see
  codecs/FORMAT.md), then mutated where it matters (header spec and its parameters, varints,
  shapes, dtypes, stage tags and headers, part lists, body lengths, records) and spliced with
  nodes of other blobs before they are serialized again (and recompressed when the spec says
  zstd);
- **bytes**: bit flips, byte edits, insertions, deletions, truncations and random bytes;
- **atheris**: coverage-guided fuzzing with atheris (libFuzzer), when it is installed.

``--mode encode`` fuzzes the encoder instead: seeded random specs (every stage alone, fixed and
random pipelines, ``budget`` among them) on small updates of hostile but finite values (float32's
extremes, subnormals, signed zeros, constants, one huge value among zeros, other dtypes), now and
then with NaN or infinity. Each input must either encode (fused and per-tensor blobs equal, the
blob decodes to the update's names, dtypes and shapes, ``encode_rebuilt``'s tensors equal the
decoded ones bit for bit, two rounds of ``ErrorFeedback`` encode and decode to the update's
names, dtypes and shapes) or be refused, on both paths, with a ``ValueError`` or ``TypeError``
that says why; warnings other than ``BudgetMissWarning`` are errors. A finite update whose blob
from :meth:`Codec.encode` decodes to NaN or infinity is counted apart (``encode`` does not decode
what it wrote; receivers refuse such a blob); ``encode_rebuilt`` and error feedback must refuse it.

Run::

    python -m fedsqueeze.simulation.fuzz_codecs --inputs 1000000 --out fuzz-out
    python -m fedsqueeze.simulation.fuzz_codecs --mode encode --inputs 30000 --out fuzz-encode

The report (``DIR/report.json``, rewritten as the run goes) holds the inputs run, the outcomes
per target and exception type, the slowest decodes and the largest growths of peak resident
memory; inputs that raised anything else are saved under ``DIR/failures/`` (in encode mode a
``.pt`` file with the spec, the codec seed and the update, replayed by :func:`check_encode`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import re
import resource
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zstandard

from fedsqueeze.codecs import (
    BudgetMissWarning,
    CodecError,
    DecodeLimits,
    ErrorFeedback,
    decode,
    parse,
    registered_stages,
)

SEED_SPECS = [
    "identity",
    "fp16",
    "bf16",
    "zstd",
    "topk(ratio=0.1) | quantize(bits=8) | zstd",
    "topk(ratio=0.2) | ternary",
    "randomk(ratio=0.1, seed=1) | quantize(bits=4)",
    "svd(rank=2) | quantize(bits=2, granularity=8)",
    "powersgd(rank=1) | sign",
    "tucker(ranks=2) | bf16 | zstd",
    "tucker(ranks=(2, 3), iters=0) | topk(ratio=0.5) | quantize(granularity=channel)",
    "cp(rank=2, iters=3) | fp16",
    "threshold(value=0.5) | quantize(bits=1, stochastic=true)",
    "svd(rank=0.9) | randomk(ratio=0.5) | ternary(delta=0.5) | zstd(level=5)",
    "quantize(bits=4, granularity=channel) | zstd",
    "budget(bpp=4) | topk | quantize(bits=4) | zstd",
    "budget(bpp=8) | svd | quantize(granularity=8)",
]
INTERESTING = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    15,
    16,
    31,
    127,
    128,
    255,
    256,
    1000,
    2**16,
    2**20,
    2**24,
    2**27,
    2**28,
    2**28 + 1,
    2**31 - 1,
    2**32,
    2**40,
    2**62,
    2**63 - 1,
    2**64 - 1,
    2**70,
]
LITERALS = [
    "0",
    "-1",
    "1",
    "2",
    "0.5",
    "1e308",
    "-1e308",
    "1e-320",
    "inf",
    "nan",
    "true",
    "false",
    "()",
    "(1,)",
    "(0, 0)",
    "(1, 2, 3)",
    '"tensor"',
    "channel",
    "x",
    "9" * 40,
    "2**8",
    "[1, [2]]",
    "'a'",
    '"',
]
TIMEOUT_S = 20.0
MAX_GENERATED_SPEC = 3000  # three times what parse accepts: long enough to test the cap, no longer


# ------------------------------------------------------------------------------- blob model
@dataclass
class Raw:
    dtype: int
    shape: list[int]
    data: bytes


@dataclass
class Staged:
    tag: int
    shape: list[int]
    meta: bytes
    parts: list[Raw | Staged]


Node = Raw | Staged


@dataclass
class Record:
    name: bytes
    dtype: int
    node: Node


@dataclass
class Blob:
    spec: str
    records: list[Record]
    compressed: bool
    body_len: int | None = None  # None: the true length
    count: int | None = None  # None: the number of records
    extra: bytes = b""


ITEMSIZE = {1: 4, 2: 2, 3: 2, 4: 8, 5: 1, 6: 1, 7: 2, 8: 4, 9: 8, 10: 1}


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def shape(self) -> list[int]:
        return [self.varint() for _ in range(self.u8())]


def _read_node(r: _Bytes) -> Node:
    tag = r.u8()
    if tag == 0:
        dtype = r.u8()
        shape = r.shape()
        n = 1
        for d in shape:
            n *= d
        return Raw(dtype, shape, r.take(n * ITEMSIZE[dtype]))
    shape = r.shape()
    meta = r.take(r.varint())
    return Staged(tag, shape, meta, [_read_node(r) for _ in range(r.u8())])


def parse_blob(blob: bytes) -> Blob:
    """Split a valid blob into its model (the inverse of :func:`serialize`)."""
    r = _Bytes(blob)
    r.take(5)
    spec = r.take(r.varint()).decode()
    r.varint()
    payload = blob[r.pos :]
    compressed = "zstd" in spec
    body = _Bytes(zstandard.ZstdDecompressor().decompress(payload) if compressed else payload)
    records = []
    for _ in range(body.varint()):
        name = body.take(body.varint())
        dtype = body.u8()
        records.append(Record(name, dtype, _read_node(body)))
    return Blob(spec, records, compressed)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _write_node(node: Node, out: bytearray) -> None:
    if isinstance(node, Raw):
        out += b"\x00" + bytes([node.dtype & 0xFF, len(node.shape) & 0xFF])
        out += b"".join(varint(d) for d in node.shape) + node.data
        return
    out += bytes([node.tag & 0xFF, len(node.shape) & 0xFF]) + b"".join(varint(d) for d in node.shape)
    out += varint(len(node.meta)) + node.meta + bytes([len(node.parts) & 0xFF])
    for part in node.parts:
        _write_node(part, out)


def serialize(blob: Blob) -> bytes:
    body = bytearray(varint(len(blob.records) if blob.count is None else blob.count))
    for rec in blob.records:
        body += varint(len(rec.name)) + rec.name + bytes([rec.dtype & 0xFF])
        _write_node(rec.node, body)
    spec = blob.spec.encode("utf-8", "surrogatepass")
    header = b"FSQZ\x01" + varint(len(spec)) + spec + varint(len(body) if blob.body_len is None else blob.body_len)
    payload = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(body)) if blob.compressed else body
    return header + bytes(payload) + blob.extra


# ------------------------------------------------------------------------------- structure mutations
def _nodes(blob: Blob) -> list[Node]:
    out: list[Node] = []
    stack: list[Node] = [rec.node for rec in blob.records]
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, Staged):
            stack.extend(node.parts)
    return out


def _number(rng: random.Random) -> int:
    if rng.random() < 0.7:
        return rng.choice(INTERESTING)
    return rng.randrange(0, 1 << rng.choice([4, 8, 16, 32, 64]))


def _mutate_shape(rng: random.Random, blob: Blob, pool: list[Blob]) -> None:
    node = rng.choice(_nodes(blob))
    roll = rng.random()
    if roll < 0.6 and node.shape:
        node.shape[rng.randrange(len(node.shape))] = _number(rng)
    elif roll < 0.8:
        node.shape.insert(rng.randrange(len(node.shape) + 1), _number(rng))
    elif node.shape:
        node.shape.pop(rng.randrange(len(node.shape)))
    else:
        node.shape = [_number(rng) for _ in range(rng.randrange(10))]


def _mutate_dtype(rng: random.Random, blob: Blob, pool: list[Blob]) -> None:
    raws = [n for n in _nodes(blob) if isinstance(n, Raw)]
    if raws and rng.random() < 0.7:
        node = rng.choice(raws)
        node.dtype = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 255])
        if node.dtype == 10 and node.data and rng.random() < 0.5:
            node.data = bytes([rng.choice([0, 1, 2, 255]) for _ in node.data])
    else:
        rng.choice(blob.records).dtype = rng.randrange(12)


def _mutate_data(rng: random.Random, blob: Blob, pool: list[Blob]) -> None:
    raws = [n for n in _nodes(blob) if isinstance(n, Raw)]
    if not raws:
        return
    node = rng.choice(raws)
    roll = rng.random()
    if roll < 0.3:
        node.data = node.data[: rng.randrange(len(node.data) + 1)]
    elif roll < 0.5:
        node.data += os.urandom(rng.randrange(1, 16))
    elif node.data:
        data = bytearray(node.data)
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.choice([0, 1, 2, 3, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        node.data = bytes(data)


def _mutate_meta(rng: random.Random, blob: Blob, pool: list[Blob]) -> None:
    staged = [n for n in _nodes(blob) if isinstance(n, Staged)]
    if not staged:
        return
    node = rng.choice(staged)
    roll = rng.random()
    if roll < 0.4 and node.meta:  # keep the leading mode/seed bytes, replace the varint k
        keep = 8 if len(node.meta) > 8 else 1
        node.meta = node.meta[:keep] + varint(_number(rng))
    elif roll < 0.6 and node.meta:
        meta = bytearray(node.meta)
        meta[rng.randrange(len(meta))] = rng.randrange(256)
        node.meta = bytes(meta)
    elif roll < 0.8:
        node.meta = os.urandom(rng.randrange(0, 12))
    else:
        node.meta = node.meta + os.urandom(rng.randrange(1, 4))


def _mutate_tag(rng: random.Random, blob: Blob, pool: list[Blob]) -> None:
    staged = [n for n in _nodes(blob) if isinstance(n, Staged)]
    if staged and rng.random() < 0.6:
        node = rng.choice(staged)
        node.tag = rng.choice([0, 1, 2, 3, 4, 5, 8, 9, 17, 255, node.tag + 1, max(node.tag - 1, 1)])
    else:  # wrap a record's node in a node of some stage
        rec = rng.choice(blob.records)
        meta = rng.choice([b"", b"\x00", b"\x01", b"\x00\x00", os.urandom(9)])
        rec.node = Staged(rng.randrange(1, 9), list(rec.node.shape), meta, [rec.node])


def _mutate_parts(rng: random.Random, blob: Blob, pool: list[Blob]) -> None:
    staged = [n for n in _nodes(blob) if isinstance(n, Staged)]
    if not staged:
        return
    node = rng.choice(staged)
    roll = rng.random()
    if roll < 0.25 and node.parts:
        node.parts.pop(rng.randrange(len(node.parts)))
    elif roll < 0.5 and node.parts:
        node.parts.insert(rng.randrange(len(node.parts) + 1), rng.choice(node.parts))
    elif roll < 0.7 and len(node.parts) > 1:
        i, j = rng.sample(range(len(node.parts)), 2)
        node.parts[i], node.parts[j] = node.parts[j], node.parts[i]
    else:
        donor = rng.choice(_nodes(rng.choice(pool)))
        if node.parts:
            node.parts[rng.randrange(len(node.parts))] = _copy_node(donor)
        else:
            node.parts.append(_copy_node(donor))


def _copy_node(node: Node) -> Node:
    if isinstance(node, Raw):
        return Raw(node.dtype, list(node.shape), node.data)
    return Staged(node.tag, list(node.shape), node.meta, [_copy_node(p) for p in node.parts])


def _splice_node(rng: random.Random, blob: Blob, pool: list[Blob]) -> None:
    """Replace a record's node by a node of another blob (its stage indices may mean other stages here)."""
    rec = rng.choice(blob.records)
    rec.node = _copy_node(rng.choice(_nodes(rng.choice(pool))))


def _mutate_records(rng: random.Random, blob: Blob, pool: list[Blob]) -> None:
    roll = rng.random()
    if roll < 0.25:
        blob.records.append(Record(rng.choice(blob.records).name, 1, Raw(1, [1], b"\x00" * 4)))
    elif roll < 0.45 and blob.records:
        blob.records.pop(rng.randrange(len(blob.records)))
    elif roll < 0.6:
        rng.choice(blob.records).name = rng.choice([b"", b"\xff\xfe", b"a" * 1025, os.urandom(4)])
    elif roll < 0.8:
        blob.count = _number(rng)
    else:
        blob.records = [Record(f"t{i}".encode(), 1, Raw(1, [0], b"")) for i in range(rng.choice([1000, 5000]))]


def _mutate_header(rng: random.Random, blob: Blob, pool: list[Blob]) -> None:
    roll = rng.random()
    if roll < 0.3:
        blob.body_len = _number(rng)
    elif roll < 0.5:
        blob.compressed = not blob.compressed
    elif roll < 0.7:
        blob.extra = rng.choice([b"JUNK", b"\x00", os.urandom(rng.randrange(1, 64))])
    else:
        blob.spec = rng.choice(pool).spec  # another pipeline: stage indices now point elsewhere


def mutate_spec(rng: random.Random, spec: str) -> str:
    """A spec with one stage, parameter or character changed."""
    roll = rng.random()
    stages = [s.strip() for s in spec.split("|")]
    if roll < 0.35:
        name = rng.choice(
            ["topk", "randomk", "quantize", "svd", "tucker", "cp", "powersgd", "zstd", "ternary", "threshold"]
        )
        param = rng.choice(
            ["ratio", "bits", "granularity", "rank", "ranks", "iters", "level", "seed", "delta", "value", "x"]
        )
        stages[rng.randrange(len(stages))] = f"{name}({param}={rng.choice(LITERALS)})"
    elif roll < 0.5:
        stages.insert(rng.randrange(len(stages) + 1), rng.choice(stages))
    elif roll < 0.6 and len(stages) > 1:
        stages.pop(rng.randrange(len(stages)))
    elif roll < 0.7:
        stages = stages * rng.choice([2, 9, 142])
    else:
        i = rng.randrange(len(spec) + 1)
        junk = rng.choice(["(", ")", "|", ",", "=", "~", "<", "'", '"', "\\", "\x00", "é", "((((((((", "1+1", " "])
        return spec[:i] + junk * rng.choice([1, 1, 2, 50, 400]) + spec[i:]
    return " | ".join(stages)


def _mutate_spec_field(rng: random.Random, blob: Blob, pool: list[Blob]) -> None:
    blob.spec = mutate_spec(rng, blob.spec)[:MAX_GENERATED_SPEC]


STRUCTURE_MUTATIONS: list[Callable[[random.Random, Blob, list[Blob]], None]] = [
    _mutate_shape,
    _mutate_shape,
    _mutate_dtype,
    _mutate_data,
    _mutate_meta,
    _mutate_meta,
    _mutate_tag,
    _mutate_parts,
    _splice_node,
    _mutate_records,
    _mutate_header,
    _mutate_spec_field,
]


def structure_input(rng: random.Random, seeds: list[bytes], pool: list[Blob]) -> bytes:
    blob = parse_blob(rng.choice(seeds))  # a fresh copy to mutate
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not blob.records:
            break
        rng.choice(STRUCTURE_MUTATIONS)(rng, blob, pool)
    data = serialize(blob)
    return byte_mutation(rng, data, seeds) if rng.random() < 0.1 else data


# ------------------------------------------------------------------------------- byte mutations
def byte_mutation(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    out = bytearray(data)
    roll = rng.random()
    if roll < 0.35 and out:
        for _ in range(rng.randrange(1, 5)):
            bit = rng.randrange(len(out) * 8)
            out[bit // 8] ^= 1 << (bit % 8)
    elif roll < 0.5 and out:
        out[rng.randrange(len(out))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif roll < 0.6:
        i = rng.randrange(len(out) + 1)
        out[i:i] = os.urandom(rng.randrange(1, 16))
    elif roll < 0.7 and out:
        i = rng.randrange(len(out))
        del out[i : i + rng.randrange(1, 16)]
    elif roll < 0.8:
        out = out[: rng.randrange(len(out) + 1)]
    elif roll < 0.9:
        other = rng.choice(seeds)
        out = out[: rng.randrange(len(out) + 1)] + other[rng.randrange(len(other) + 1) :]
    else:
        out = bytearray(rng.choice([b"", b"FSQZ\x01"]) + os.urandom(rng.randrange(0, 64)))
    return bytes(out)


def bytes_input(rng: random.Random, seeds: list[bytes], pool: list[Blob]) -> bytes:
    return byte_mutation(rng, rng.choice(seeds), seeds)


# ------------------------------------------------------------------------------- running and reporting
class DecodeTimeout(Exception):
    """Raised by the alarm when one input runs longer than TIMEOUT_S."""


def _on_alarm(signum: int, frame: object) -> None:
    raise DecodeTimeout(f"no result within {TIMEOUT_S} s")


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1])
    return 0


class MemoryProbe:
    """Growth of peak resident memory around one call (Linux; zero where /proc is missing)."""

    def __init__(self) -> None:
        self.enabled = Path("/proc/self/clear_refs").exists()
        if self.enabled:
            # large blocks always from mmap, so that freed memory leaves RSS and reuse cannot hide growth
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD

    def start(self) -> int:
        if not self.enabled:
            return 0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS")

    def growth_kib(self, before: int) -> int:
        return _status_kib("VmHWM") - before if self.enabled else 0


@dataclass
class Report:
    """What the campaign saw; written as JSON."""

    command: str
    limits: dict[str, int]
    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    slowest: list[dict[str, Any]] = field(default_factory=list)
    largest_growth: list[dict[str, Any]] = field(default_factory=list)
    failures: int = 0
    wall_s_max: float = 0.0
    started: float = field(default_factory=time.time)

    def note(self, kind: str, key: str, value: float, data: bytes | str, outcome: str, keep: int = 5) -> None:
        """Keep the input on the board of ``kind`` if it is among the ``keep`` largest by ``key``.

        ``data`` is the input's bytes, or a description of it (encode mode).
        """
        board = self.slowest if kind == "slowest" else self.largest_growth
        if len(board) < keep or value > board[-1][key]:
            shown = {"input": data} if isinstance(data, str) else {"size": len(data), "input_hex": data[:200].hex()}
            board.append({key: value, "outcome": outcome, **shown})
            board.sort(key=lambda e: -e[key])
            del board[keep:]

    def to_json(self, finished: bool) -> dict[str, Any]:
        elapsed = time.time() - self.started
        return {
            "command": self.command,
            "finished": finished,
            "inputs": self.inputs,
            "elapsed_s": round(elapsed, 1),
            "inputs_per_s": round(self.inputs / max(elapsed, 1e-9), 1),
            "decode_limits": self.limits,
            "outcomes": dict(sorted(self.outcomes.items())),
            "non_codec_error_outcomes": self.failures,
            "slowest_by_cpu_time": self.slowest,
            "slowest_wall_s": round(self.wall_s_max, 4),
            "largest_peak_rss_growth": self.largest_growth,
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }


def seed_blobs() -> list[bytes]:
    """Valid blobs of SEED_SPECS over small updates of every tensor kind."""
    g = torch.Generator().manual_seed(0)
    update = {
        "conv": torch.randn(8, 4, 3, 3, generator=g),
        "fc": torch.randn(20, 30, generator=g),
        "bias": torch.randn(20, generator=g),
        "half": torch.randn(6, 5, generator=g).half(),
        "steps": torch.tensor([3], dtype=torch.int64),
        "mask": torch.arange(9) % 2 == 0,
        "empty": torch.zeros(0, 3),
    }
    return [parse(spec, seed=i).encode(update) for i, spec in enumerate(SEED_SPECS)]


def run_one(target: str, data: bytes | str, limits: DecodeLimits) -> str:
    """Run one input; return its outcome: 'ok' or the expected error type (others propagate).

    Warnings are raised as errors: where a user runs with warnings as errors, a warning that
    bad input provokes (numpy's overflow, say) escapes as an exception other than CodecError.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if isinstance(data, str):
                parse(data)
            else:
                decode(data, limits=limits)
    except CodecError:
        return "CodecError"
    except ValueError:
        return "ValueError" if target == "parse" else "ValueError (not CodecError)"
    return "ok"


def _record_failure(out: Path, report: Report, target: str, data: bytes, exc: BaseException) -> str:
    name = type(exc).__name__
    report.failures += 1
    folder = out / "failures"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{target}-{name}-{report.inputs}"
    (folder / f"{stem}.bin").write_bytes(data)
    (folder / f"{stem}.txt").write_text("".join(traceback.format_exception(exc)))
    return name


def measured_run(target: str, data: bytes, limits: DecodeLimits, report: Report, probe: MemoryProbe, out: Path) -> None:
    """Run one input under the alarm, timing it and measuring its memory; tally the outcome."""
    argument = data.decode("utf-8", "replace") if target == "parse" else data  # made before measuring
    before = probe.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT_S)
    try:
        outcome = run_one(target, argument, limits)
        if outcome == "ValueError (not CodecError)":
            report.failures += 1
    except Exception as exc:  # noqa: BLE001 - the point of the campaign: record whatever else escapes
        outcome = _record_failure(out, report, target, data, exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    cpu_seconds, seconds = time.process_time() - cpu_start, time.perf_counter() - start
    growth = probe.growth_kib(before)
    report.inputs += 1
    report.outcomes[f"{target}: {outcome}"] += 1
    report.wall_s_max = max(report.wall_s_max, seconds)
    # CPU time, not wall time: the campaign runs niced on a shared machine
    report.note("slowest", "cpu_seconds", round(cpu_seconds, 4), data, f"{target}: {outcome}")
    report.note("growth", "kib", growth, data, f"{target}: {outcome}")


def inputs(rng: random.Random, seeds: list[bytes]) -> Iterator[tuple[str, bytes]]:
    """An endless mix: 55 % structure-aware blobs, 35 % byte-mutated blobs, 10 % specs for parse."""
    pool = [parse_blob(s) for s in seeds]
    while True:
        roll = rng.random()
        if roll < 0.55:
            yield "decode", structure_input(rng, seeds, pool)
        elif roll < 0.9:
            yield "decode", bytes_input(rng, seeds, pool)
        else:
            spec = rng.choice(SEED_SPECS)
            for _ in range(rng.choice([1, 1, 2, 4])):
                spec = mutate_spec(rng, spec)[:MAX_GENERATED_SPEC]
            yield "parse", spec.encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------------------- encoder campaign
PIPELINES = [
    # one of each kind of pipeline; tests/test_codecs_fused.py runs its bit-for-bit checks on them too
    "topk(ratio=0.01) | quantize(bits=8) | zstd",
    "topk(ratio=0.01, dense_below=1000) | quantize(bits=8) | zstd",
    "svd(rank=4) | quantize(bits=8) | zstd",
    "svd(rank=6) | quantize(bits=4) | zstd",  # the default codecs: factors in 256-value blocks
    "topk(ratio=0.3) | quantize(bits=2) | zstd",
    "topk(ratio=0.05) | ternary | zstd",
    "randomk(ratio=0.1, seed=3) | fp16",
    "svd(rank=0.9) | quantize(bits=4, outlier_block=16) | zstd",
    "powersgd(rank=2, iters=2) | quantize | zstd",
    "tucker(ranks=(2, 3)) | quantize(bits=8, granularity=channel)",
    "cp(rank=2, iters=5) | fp16 | zstd",
    "threshold(value=0.5) | sign",
    "quantize(bits=2, stochastic=true, granularity=64) | zstd",
    "quantize(bits=4, granularity=channel) | zstd",
    "identity | zstd",
]
ENCODE_PIPELINES = [
    *PIPELINES,
    # the planner
    "budget(bpp=0.5) | svd | quantize(bits=4) | zstd",
    "budget(bpp=0.2) | topk | quantize(bits=4) | zstd",
    "budget(bpp=1) | powersgd(rank=8) | quantize | zstd",
    "budget(bpp=4) | topk | quantize(bits=4) | zstd",
    "budget(bpp=2) | tucker | fp16 | zstd",
]
PARAM_CHOICES: dict[str, dict[str, list[Any]]] = {
    "topk": {"ratio": [0.001, 0.01, 0.1, 0.5, 1], "dense_below": [0, 16, 1000]},
    "randomk": {"ratio": [0.01, 0.1, 0.5, 1], "seed": [0, 1, 2**62]},
    "threshold": {"value": [0, 1e-40, 1e-3, 0.5, 1e30, 1e38]},
    "svd": {"rank": [1, 2, 4, 8, 0.5, 0.9, 0.999, 1.0]},
    "powersgd": {"rank": [1, 2, 4, 8], "iters": [1, 2, 3]},
    "tucker": {"ranks": [1, 2, 4, 0.5, (1, 3), (2, 0.9)], "iters": [0, 1, 2]},
    "cp": {"rank": [1, 2, 3], "iters": [1, 3, 10]},
    "quantize": {
        "bits": [1, 2, 4, 8],
        "stochastic": ["true", "false"],
        "granularity": ["tensor", "channel", 8, 64],
        "outlier_block": [0, 8, 16, 256],
    },
    "ternary": {"delta": [0, 0.5, 1, 10]},
    "zstd": {"level": [1, 3, 10, 19]},
    "budget": {"bpp": [0.05, 0.2, 0.5, 1, 2, 8, 32], "passes": [1, 2, 6]},
}
REDUCERS = ["topk", "randomk", "threshold", "svd", "powersgd", "tucker", "cp"]
CODERS = ["quantize", "ternary", "sign", "fp16", "bf16", "identity"]
HOSTILE = [3.4e38, -3.4e38, 1e38, -1e38, 1e-45, -1e-45, 1e-40, -1e-40, 0.0, -0.0, 65504.0, 6e-8]
BEYOND_FLOAT32 = [1e300, -1e300, 5e-324]  # float64 only
NON_FINITE = [math.nan, math.inf, -math.inf]
ENCODE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]
DTYPE_WEIGHTS = [70, 8, 8, 8, 4, 2]
MAX_TENSOR_ELEMENTS = 5000  # enough for svd's randomized path (>= 65 a side), small enough to be quick
NON_FINITE_RATE = 0.04


@dataclass
class EncodeCase:
    """One encoder input: a spec, the codec seed and the update (``finite``: no NaN or infinity in it)."""

    spec: str
    seed: int
    update: dict[str, torch.Tensor]
    finite: bool = True


class EncodeCheckError(AssertionError):
    """A broken encoder promise: blobs that differ, a rebuilt tensor unlike the decoded one, ..."""


def _stage_text(rng: random.Random, name: str) -> str:
    """``name`` with each of its parameters (in PARAM_CHOICES) set at random half the time."""
    params = [f"{k}={rng.choice(v)}" for k, v in PARAM_CHOICES.get(name, {}).items() if rng.random() < 0.5]
    return f"{name}({', '.join(params)})" if params else name


def random_pipeline(rng: random.Random) -> str:
    """An optional budget, 0-2 reducers, 0-2 value coders and an optional zstd, with random parameters."""
    names = ["budget"] if rng.random() < 0.25 else []
    names += rng.sample(REDUCERS, rng.choice([0, 1, 1, 1, 2]))
    names += rng.sample(CODERS, rng.choice([0, 1, 1, 1, 2]))
    names += ["zstd"] if rng.random() < 0.6 else []
    return " | ".join(_stage_text(rng, n) for n in names or ["identity"])


def random_spec(rng: random.Random) -> str:
    """Every registered stage alone, the fixed pipelines, or a random pipeline."""
    roll = rng.random()
    if roll < 0.25:
        return _stage_text(rng, rng.choice(sorted(registered_stages())))
    if roll < 0.6:
        return rng.choice(ENCODE_PIPELINES)
    return random_pipeline(rng)


def random_shape(rng: random.Random) -> tuple[int, ...]:
    """1-D to 4-D (now and then 0-D), at most MAX_TENSOR_ELEMENTS; some dimensions 1, a few 0."""
    ndim = rng.choice([0, 1, 1, 2, 2, 2, 3, 4])
    shape = [rng.choice([0] + [1] * 6 + [rng.randint(2, 8)] * 6 + [rng.randint(2, 80)] * 12) for _ in range(ndim)]
    while math.prod(shape) > MAX_TENSOR_ELEMENTS:
        i = shape.index(max(shape))
        shape[i] = max(1, shape[i] // 2)
    return tuple(shape)


def hostile_values(
    rng: random.Random, g: torch.Generator, shape: tuple[int, ...], extremes: list[float]
) -> torch.Tensor:
    """Finite float64 values of one of several hostile patterns, in ``shape``."""
    n = math.prod(shape)
    pool = torch.tensor(extremes, dtype=torch.float64)
    scaled = torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** rng.uniform(-40, 37)
    pattern = rng.choice(["extremes", "scaled", "constant", "spike", "mixed", "zeros", "rank1", "plain"])
    if pattern == "extremes":
        values = pool[torch.randint(len(extremes), (n,), generator=g)]
    elif pattern == "scaled":
        values = scaled
    elif pattern == "constant":
        values = torch.full((n,), rng.choice([*extremes, 1.0, -2.5]), dtype=torch.float64)
    elif pattern == "spike":
        values = torch.full((n,), rng.choice([0.0, -0.0]), dtype=torch.float64)
        if n:
            values[rng.randrange(n)] = rng.choice([3.4e38, -3.4e38, 1e38, -1e38, 1e-45])
    elif pattern == "mixed":
        picks = pool[torch.randint(len(extremes), (n,), generator=g)]
        values = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.1, picks, scaled)
    elif pattern == "zeros":
        values = torch.where(torch.rand(n, generator=g) < 0.5, 0.0, -0.0).to(torch.float64)
    elif pattern == "rank1" and len(shape) >= 2:
        u = torch.randn(shape[0], 1, generator=g, dtype=torch.float64)
        values = (u @ scaled[: n // shape[0]].reshape(1, -1)).reshape(-1) if shape[0] else scaled
    else:
        values = torch.randn(n, generator=g, dtype=torch.float64) * 1e-3
    return values.reshape(shape)


def hostile_tensor(rng: random.Random, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor of ``dtype`` with hostile but finite contents."""
    shape = random_shape(rng)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype == torch.int64:
        pool = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 2**31], dtype=torch.int64)
        picks = pool[torch.randint(len(pool), shape, generator=g)]
        return torch.where(torch.rand(shape, generator=g) < 0.5, picks, torch.randint(-1000, 1000, shape, generator=g))
    extremes = HOSTILE + (BEYOND_FLOAT32 if dtype == torch.float64 and rng.random() < 0.3 else [])
    t = hostile_values(rng, g, shape, extremes).to(dtype)
    largest = torch.full_like(t, torch.finfo(dtype).max)
    return torch.where(torch.isfinite(t), t, torch.copysign(largest, t))  # what overflowed: the dtype's largest


def _poison(rng: random.Random, update: dict[str, torch.Tensor]) -> bool:
    """Put NaN or an infinity into one non-empty float tensor; False when there is none."""
    floats = [t for t in update.values() if t.is_floating_point() and t.numel()]
    if not floats:
        return False
    t = rng.choice(floats)
    t.view(-1)[rng.randrange(t.numel())] = rng.choice(NON_FINITE)
    return True


def encode_case(campaign_seed: int, index: int) -> EncodeCase:
    """Input ``index`` of the encoder campaign with ``--seed campaign_seed`` (the same every time)."""
    rng = random.Random(f"encode/{campaign_seed}/{index}")
    g = torch.Generator().manual_seed(rng.getrandbits(63))
    spec = random_spec(rng)
    dtypes = rng.choices(ENCODE_DTYPES, weights=DTYPE_WEIGHTS, k=rng.randint(1, 4))
    update = {f"t{i}": hostile_tensor(rng, g, dtype) for i, dtype in enumerate(dtypes)}
    finite = not (rng.random() < NON_FINITE_RATE and _poison(rng, update))
    return EncodeCase(spec, rng.randrange(2**32), update, finite)


def _refusal(exc: ValueError | TypeError) -> str:
    """The outcome of a refused encode: its type and message's start, tensor names and numbers masked."""
    message = str(exc)
    if isinstance(exc, CodecError):  # the encoder's own blob refused by decode (error feedback decodes it)
        raise EncodeCheckError(f"encoding raised CodecError: {message}") from exc
    if not message.strip():
        raise EncodeCheckError(f"{type(exc).__name__} without a message") from exc
    message = re.sub(r"update\[[^\]]*\]", "update[...]", message)
    message = re.sub(r"(?<![\w.])[-+]?\d[\d.]*(e[-+]?\d+)?", "#", message)
    return f"{type(exc).__name__}: {message[:60]}"


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise EncodeCheckError(what)


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``'s values (a fresh 1-D copy: a 0-D tensor's view has stride 0)."""
    return torch.empty(t.numel(), dtype=t.dtype).copy_(t.detach().reshape(-1)).view(torch.uint8)


def _expect_layout(
    update: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor], what: str, dtypes: bool = True
) -> None:
    """``decoded`` has the update's names (in order), shapes and (with ``dtypes``) dtypes."""
    _expect(list(decoded) == list(update), f"{what}: names {list(decoded)} instead of {list(update)}")
    for name, t in update.items():
        got = decoded[name]
        same = got.shape == t.shape and (got.dtype == t.dtype or not dtypes)
        _expect(same, f"{what}: {name} is {got.dtype} {tuple(got.shape)}, given {t.dtype} {tuple(t.shape)}")


def _all_finite(decoded: dict[str, torch.Tensor]) -> bool:
    """Whether the decoded float tensors are finite.

    Not a promise of :meth:`Codec.encode`: a finite update whose reconstruction overflows (a
    quantize range wider than float32's, a low-rank product, float16's range) decodes to infinity,
    and the receiver's finiteness check refuses it. ``encode_rebuilt`` (error feedback's path)
    refuses it itself. Counted as its own outcome.
    """
    return all(bool(torch.isfinite(t).all()) for t in decoded.values() if t.is_floating_point())


def _expect_bitwise(rebuilt: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor]) -> None:
    """``rebuilt`` holds the decoded tensors bit for bit (-0.0 included)."""
    _expect(list(rebuilt) == list(decoded), f"rebuilt names {list(rebuilt)}, decoded {list(decoded)}")
    for name, t in decoded.items():
        got = rebuilt[name]
        same = got.dtype == t.dtype and got.shape == t.shape and torch.equal(_raw_bytes(got), _raw_bytes(t))
        _expect(same, f"rebuilt {name} differs from the decoded one")


def _check_plain(case: EncodeCase) -> str:
    """Fused encode, per-tensor encode and decode agree, or both encodes refuse; ``encode_rebuilt``
    gives decode's tensors bit for bit, or refuses exactly when they are not finite."""
    try:
        blob = parse(case.spec, seed=case.seed).encode(case.update)
    except (ValueError, TypeError) as exc:
        outcome = _refusal(exc)
        try:
            parse(case.spec, seed=case.seed).encode(case.update, fused=False)
        except (ValueError, TypeError):
            return outcome
        raise EncodeCheckError(f"the fused encode refused ({outcome}), the per-tensor one did not") from exc
    _expect(case.finite, "encoded an update holding NaN or infinity")
    try:
        per_tensor = parse(case.spec, seed=case.seed).encode(case.update, fused=False)
    except (ValueError, TypeError) as exc:
        raise EncodeCheckError(f"the fused encode succeeded, the per-tensor one refused: {exc}") from exc
    _expect(per_tensor == blob, "the fused and per-tensor blobs differ")
    decoded = decode(blob)
    _expect_layout(case.update, decoded, "decode")
    finite = _all_finite(decoded)
    try:
        rebuilt_blob, rebuilt = parse(case.spec, seed=case.seed).encode_rebuilt(case.update)
    except ValueError as exc:
        _expect(not finite and "rebuilds from the blob" in str(exc), f"encode_rebuilt refused: {exc}")
        return "ok, decodes to NaN or infinity, encode_rebuilt refuses"
    _expect(finite, "encode_rebuilt returned a blob that decodes to NaN or infinity")
    _expect(rebuilt_blob == blob, "encode and encode_rebuilt wrote different blobs")
    _expect_bitwise(rebuilt, decoded)
    return "ok"


def _check_feedback(case: EncodeCase) -> str:
    """Two rounds of ErrorFeedback: each blob decodes to the update's names, dtypes and shapes, or refuses.

    Every blob sent decodes to finite values: one that would not is refused. Told apart in the
    outcome, not counted as failures: a refusal in round 2 (the update plus the residual overflowed)
    and a residual left non-finite (a finite update minus its finite reconstruction can overflow).
    """
    feedback = ErrorFeedback(parse(case.spec, seed=case.seed))
    for round_ in (1, 2):
        try:
            blob = feedback.encode(case.update)
        except (ValueError, TypeError) as exc:
            return f"round {round_}: {_refusal(exc)}" if round_ > 1 else _refusal(exc)
        _expect(case.finite, "error feedback encoded an update holding NaN or infinity")
        decoded = decode(blob)
        _expect_layout(case.update, decoded, f"error feedback round {round_}")
        _expect(_all_finite(decoded), f"error feedback round {round_} sent a blob that decodes to NaN or infinity")
    finite = all(bool(torch.isfinite(r).all()) for r in feedback.residual.values())
    return "ok" if finite else "ok, residual not finite"


def check_encode(case: EncodeCase) -> tuple[str, str]:
    """Run every encoder check on ``case``; return the outcomes of the plain and error-feedback encodes.

    Warnings are errors, except ``BudgetMissWarning`` (``budget`` warns on purpose). Raises
    :class:`EncodeCheckError` for a broken promise; any exception other than a ``ValueError`` or
    ``TypeError`` from an encode escapes as it is.

    Examples
    --------
    Replay a saved failure::

        case = EncodeCase(**torch.load("fuzz-encode/failures/encode-EncodeCheckError-17.pt"))
        check_encode(case)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", BudgetMissWarning)
        return _check_plain(case), _check_feedback(case)


def _record_encode_failure(out: Path, report: Report, case: EncodeCase, exc: BaseException) -> str:
    """Save ``case`` (``.pt``) and the traceback (``.txt``) under ``out/failures``; return the exception's name."""
    name = type(exc).__name__
    report.failures += 1
    folder = out / "failures"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"encode-{name}-{report.inputs}"
    torch.save({"spec": case.spec, "seed": case.seed, "update": case.update, "finite": case.finite}, f"{stem}.pt")
    replay = f"check_encode(EncodeCase(**torch.load({str(stem) + '.pt'!r})))"
    head = f"spec: {case.spec}\ncodec seed: {case.seed}\nreplay: {replay}\n\n"
    Path(f"{stem}.txt").write_text(head + "".join(traceback.format_exception(exc)))
    return name


def measured_encode(case: EncodeCase, report: Report, out: Path) -> None:
    """Check one encoder input under the alarm, timing it; tally its outcomes."""
    target = "encode" if case.finite else "encode non-finite"
    start, cpu_start = time.perf_counter(), time.process_time()
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT_S)
    try:
        plain, feedback = check_encode(case)
        outcomes = [f"{target}: {plain}", f"{target} error feedback: {feedback}"]
    except Exception as exc:  # noqa: BLE001 - the point of the campaign: record whatever else escapes
        outcomes = [f"{target}: failure: {_record_encode_failure(out, report, case, exc)}"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    cpu_seconds, seconds = time.process_time() - cpu_start, time.perf_counter() - start
    about = f"input {report.inputs}: {case.spec} (codec seed {case.seed})"
    report.inputs += 1
    report.outcomes.update(outcomes)
    report.wall_s_max = max(report.wall_s_max, seconds)
    report.note("slowest", "cpu_seconds", round(cpu_seconds, 4), about, outcomes[0])


class Campaign:
    """Runs inputs one at a time in this process, with progress lines and a report file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.limits = DecodeLimits(max_elements=args.max_elements, max_body_bytes=4 * args.max_elements)
        limits = {k: getattr(self.limits, k) for k in self.limits.__dataclass_fields__}
        self.report = Report(
            command=" ".join([Path(sys.executable).name, "-m", __spec__.name if __spec__ else __file__, *sys.argv[1:]]),
            limits=limits,
        )
        self.probe = MemoryProbe()
        signal.signal(signal.SIGALRM, _on_alarm)

    def step(self, target: str, data: bytes) -> None:
        measured_run(target, data, self.limits, self.report, self.probe, self.out)
        self.progress()

    def progress(self) -> None:
        """Every ``--progress`` inputs: rewrite the report and print a line."""
        if self.report.inputs % self.args.progress == 0:
            self.write(finished=False)
            r = self.report.to_json(False)
            print(
                f"[fuzz] {r['inputs']} inputs, {r['inputs_per_s']}/s, {r['non_codec_error_outcomes']} unexpected, "
                f"slowest {self.report.slowest[0]['cpu_seconds'] if self.report.slowest else 0} s CPU",
                file=sys.stderr,
                flush=True,
            )

    def write(self, finished: bool) -> None:
        tmp = self.out / "report.json.tmp"
        tmp.write_text(json.dumps(self.report.to_json(finished), indent=1) + "\n")
        tmp.replace(self.out / "report.json")

    def run_mixed(self) -> None:
        rng = random.Random(self.args.seed)
        for target, data in inputs(rng, seed_blobs()):
            if self.report.inputs >= self.args.inputs:
                break
            self.step(target, data)
        self.write(finished=True)

    def run_encode(self) -> None:
        """The encoder campaign: input ``i`` is ``encode_case(--seed, i)``."""
        for index in range(self.args.inputs):
            measured_encode(encode_case(self.args.seed, index), self.report, self.out)
            self.progress()
        self.write(finished=True)

    def run_atheris(self) -> None:
        try:
            import atheris
        except ImportError:
            print("atheris is not installed: the coverage-guided mode needs `pip install atheris`", file=sys.stderr)
            raise SystemExit(2) from None
        corpus = self.out / "atheris-corpus"
        corpus.mkdir(exist_ok=True)
        for i, blob in enumerate(seed_blobs()):
            (corpus / f"seed-{i}").write_bytes(b"\x00" + blob)
        for i, spec in enumerate(SEED_SPECS):
            (corpus / f"spec-{i}").write_bytes(b"\x01" + spec.encode())

        def one_input(data: bytes) -> None:
            # the first byte picks the target, the rest is the input
            self.step("parse" if data[:1] == b"\x01" else "decode", data[1:])
            if self.report.inputs >= self.args.inputs:
                self.write(finished=True)

        _instrument_codecs(atheris)
        argv = [
            sys.argv[0],
            str(corpus),
            f"-runs={self.args.inputs}",
            "-max_len=16384",
            "-rss_limit_mb=8192",
            f"-timeout={int(TIMEOUT_S) + 10}",
            f"-seed={self.args.seed or 1}",
            "-print_final_stats=1",
        ]
        atheris.Setup(argv, one_input)
        atheris.Fuzz()


def _instrument_codecs(atheris: Any) -> None:
    """Coverage instrumentation for the functions of fedsqueeze.codecs only (all of torch takes minutes)."""
    import gc
    import types

    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and (obj.__module__ or "").startswith("fedsqueeze.codecs"):
            atheris.instrument_func(obj)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs to run (default: 100000)")
    parser.add_argument("--out", required=True, help="folder for report.json and failing inputs")
    parser.add_argument(
        "--mode",
        choices=["mixed", "atheris", "encode"],
        default="mixed",
        help="mixed: structure-aware + byte mutations + specs; atheris: coverage-guided; "
        "encode: the encoder on hostile updates (default: mixed)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the mutations (default: 0)")
    parser.add_argument(
        "--max-elements",
        type=int,
        default=2**22,
        help="DecodeLimits.max_elements for the decodes; the memory bound scales with it (default: 2**22)",
    )
    parser.add_argument(
        "--progress", type=int, default=10_000, help="print a line and rewrite the report every N inputs"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    campaign = Campaign(args)
    if args.mode == "atheris":
        campaign.run_atheris()
    elif args.mode == "encode":
        campaign.run_encode()
    else:
        campaign.run_mixed()
    report = campaign.report.to_json(True)
    print(json.dumps({k: report[k] for k in ("inputs", "elapsed_s", "outcomes", "non_codec_error_outcomes")}, indent=1))
    return 1 if report["non_codec_error_outcomes"] else 0


if __name__ == "__main__":
    sys.exit(main())
