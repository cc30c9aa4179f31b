"""The torch calls `svd` makes on LeNet-5-sized matrices, each timed alone in a loop (one thread, median
microseconds): what one call costs on this CPU. A measurement script, not a test:

    python benchmarks/encode-speed-5/small_ops.py
"""

import time
from collections.abc import Callable

import torch


def median_us(work: Callable[[], object], runs: int = 2000) -> float:
    for _ in range(50):
        work()
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        work()
        times.append(time.perf_counter_ns() - start)
    times.sort()
    return times[runs // 2] / 1e3


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    a, test = torch.randn(120, 400, generator=g), torch.randn(400, 16, generator=g)
    y = torch.randn(120, 16, generator=g)
    grams = torch.randn(3, 16, 16, generator=g)
    grams = grams @ grams.transpose(1, 2)
    flat = torch.randn(48_000, generator=g)
    ops: dict[str, Callable[[], object]] = {
        "product 120 x 400 by 400 x 16": lambda: a @ test,
        "product 400 x 120 by 120 x 16": lambda: a.T @ y,
        "QR of 120 x 16": lambda: torch.linalg.qr(y),
        "eigensolver, 16 x 16": lambda: torch.linalg.eigh(grams[0]),
        "eigensolver, a batch of three 16 x 16": lambda: torch.linalg.eigh(grams),
        "Gaussian 400 x 16 from a new seeded generator": lambda: torch.randn(
            400, 16, generator=torch.Generator().manual_seed(5)
        ),
        "sum of 48,000 values": lambda: float(torch.sum(flat)),
        "isfinite(...).all() of 48,000 values": lambda: bool(torch.isfinite(flat).all()),
    }
    print("| torch call | us |\n|---|---|")
    for name, work in ops.items():
        print(f"| {name} | {median_us(work):.1f} |")


if __name__ == "__main__":
    main()
