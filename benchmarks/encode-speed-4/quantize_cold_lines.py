"""``quantize``'s batch (4 bits, the default codec) call by call, in a loop and right after a training epoch.

The steps are those of ``Quantize.encode_batch`` and ``_batch_codes`` in ``codecs/_quant.py`` as of this
commit, spelled out here so that each call can be timed (mean microseconds of 15 batches). The input is what
the batch gets in a node's round: svd's factors of the LeNet-5 update and the tensors svd declines. A
measurement script, not a test:

    python benchmarks/encode-speed-4/quantize_cold_lines.py [MNIST dir]
"""

import collections
import sys
import time

import numpy as np
import torch

from fedsqueeze.codecs import _quant, parse
from fedsqueeze.codecs._stage import EncodeContext, EncodeFurther, as_numpy
from fedsqueeze.simulation.client_round_bench import training_epoch
from fedsqueeze.simulation.codec_bench import lenet5_update

SPENT: dict[str, float] = collections.defaultdict(float)


class Clock:
    """Adds the time since the last mark to ``SPENT[label]``."""

    def __init__(self) -> None:
        self.last = time.perf_counter_ns()

    def mark(self, label: str) -> None:
        now = time.perf_counter_ns()
        SPENT[label] += now - self.last
        self.last = now


def batch(stage: _quant.Quantize, xs: list[torch.Tensor]) -> None:
    clock = Clock()
    layout = _quant._batch_layout(stage, tuple(tuple(x.shape) for x in xs))
    clock.mark("layout (cached per shapes)")
    arrays = [as_numpy(x) for x in xs]
    clock.mark("as_numpy, each part")
    values = np.concatenate(arrays, axis=None)
    clock.mark("concatenate")
    with np.errstate(over="ignore", invalid="ignore"):
        clock.mark("errstate")
        lo = np.minimum.reduceat(values, layout.starts)
        lo += np.float32(0.0)
        hi = np.maximum.reduceat(values, layout.starts)
        hi += np.float32(0.0)
        clock.mark("group minima and maxima")
        step = (np.subtract(hi, lo, dtype=np.float64) / 15).astype(np.float32)
        inv = np.zeros_like(step)
        np.divide(np.float32(1.0), step, out=inv, where=step > 0)
        np.minimum(inv, _quant.FLOAT32_MAX, out=inv)
        clock.mark("steps and inverses")
        lo_each = np.repeat(lo, layout.sizes)
        scaled = values - lo_each
        scaled *= np.repeat(inv, layout.sizes)
        codes = np.clip(np.rint(scaled, out=scaled), 0, 15, out=scaled)
        clock.mark("codes")
        decoded = codes * np.repeat(step, layout.sizes)
        decoded += lo_each
        clock.mark("decoded values")
        small = codes.astype(np.uint8)
    clock.mark("uint8 codes, errstate exit")
    packed = _quant._pack_segments(small, layout, 4)
    clock.mark("pack")
    _quant._wires(layout, packed, lo, step)
    clock.mark("wire form")
    split = torch.split_with_sizes
    split(torch.from_numpy(lo), layout.groups), split(torch.from_numpy(step), layout.groups)
    split(torch.from_numpy(packed), layout.byte_counts), split(torch.from_numpy(decoded), layout.counts)
    clock.mark("parts as tensors")


def main(data_dir: str) -> None:
    torch.set_num_threads(1)
    update = lenet5_update(data_dir)
    svd, stage = parse("svd(rank=6) | quantize(bits=4) | zstd").tensor_stages
    assert isinstance(stage, _quant.Quantize)
    parts = []
    for name, t in update.items():
        encoded = svd.encode(t.contiguous(), EncodeContext(name, {}, seed=1))
        parts += [p.tensor.contiguous() for p in encoded.parts if isinstance(p, EncodeFurther)] if encoded else [t]
    epoch = training_epoch(data_dir)
    for _ in range(30):
        batch(stage, parts)
    results = []
    for before in (None, epoch):
        SPENT.clear()
        for i in range(15):
            if before is not None:
                before(i)
            batch(stage, parts)
        results.append({k: v / 15 / 1e3 for k, v in SPENT.items()})
    warm, cold = results
    print("| step | in a loop, us | right after a training epoch, us |\n|---|---|---|")
    for label in warm:
        print(f"| {label} | {warm[label]:.1f} | {cold[label]:.1f} |")
    print(f"| **all** | {sum(warm.values()):.0f} | {sum(cold.values()):.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets")
