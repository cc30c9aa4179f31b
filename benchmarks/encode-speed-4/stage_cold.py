"""The default codec's two stages as a node's round hands them the LeNet-5 update, in a loop and right after a
training epoch (one thread, median microseconds). A measurement script, not a test:

    python benchmarks/encode-speed-4/stage_cold.py [MNIST dir]
"""

import statistics
import sys
import time
from collections.abc import Callable

import torch

from fedsqueeze.codecs import parse
from fedsqueeze.codecs._stage import EncodeContext, EncodeFurther
from fedsqueeze.simulation.client_round_bench import training_epoch
from fedsqueeze.simulation.codec_bench import lenet5_update


def median_us(work: Callable[[], object], before: Callable[[int], None] | None, runs: int) -> float:
    """Median wall time of ``work``, each run after ``before`` (untimed) if given."""
    times = []
    for i in range(runs):
        if before is not None:
            before(i)
        start = time.perf_counter_ns()
        work()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return statistics.median(times)


def main(data_dir: str) -> None:
    torch.set_num_threads(1)
    update = lenet5_update(data_dir)
    svd, quantize = parse("svd(rank=6) | quantize(bits=4) | zstd").tensor_stages
    matrices = [t.contiguous() for t in update.values() if t.dim() > 1]
    svd_ctxs = [EncodeContext(f"m{i}", {}, seed=3) for i in range(len(matrices))]
    # what quantize gets in the round: svd's factors, and the tensors svd declines
    parts = []
    for name, t in update.items():
        encoded = svd.encode(t.contiguous(), EncodeContext(name, {}, seed=1))
        parts += [p.tensor.contiguous() for p in encoded.parts if isinstance(p, EncodeFurther)] if encoded else [t]
    quantize_ctxs = [EncodeContext(f"p{i}", {}, seed=0) for i in range(len(parts))]
    epoch = training_epoch(data_dir)
    print(f"svd: {len(matrices)} matrices; quantize: {len(parts)} parts, {sum(p.numel() for p in parts)} values\n")
    print("| stage batch | in a loop, us | right after a training epoch, us |\n|---|---|---|")
    for label, work in [
        ("svd", lambda: svd.encode_batch(matrices, svd_ctxs)),
        ("quantize", lambda: quantize.encode_batch(parts, quantize_ctxs)),
    ]:
        median_us(work, None, 20)
        print(f"| {label} | {median_us(work, None, 50):.0f} | {median_us(work, epoch, 15):.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets")
