"""The finiteness check every node runs on its reply and the server on every decoded reply (`protocol.all_finite`),
element test against sum first, on LeNet-5- and McMahan-CNN-shaped updates; one thread, median microseconds.
A measurement script, not a test:

    python benchmarks/encode-speed-5/finite_check.py
"""

import statistics
import time
from collections.abc import Callable, Mapping

import torch

from fedsqueeze.models import build_model
from fedsqueeze.protocol import all_finite


def element_test(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """What `all_finite` did before: every value tested."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def median_us(check: Callable[[Mapping[str, torch.Tensor]], str | None], update: Mapping[str, torch.Tensor]) -> float:
    times = []
    for _ in range(300):
        start = time.perf_counter_ns()
        check(update)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times[50:]) / 1e3


def main() -> None:
    torch.set_num_threads(1)
    print("| update | parameters | every value tested, us | sum first, us |\n|---|---|---|---|")
    for arch in ("lenet5", "mcmahan-cnn"):
        model = build_model(arch, "mnist")
        update = {name: 1e-3 * torch.randn_like(p) for name, p in model.state_dict().items()}
        n = sum(t.numel() for t in update.values())
        print(f"| {arch} | {n:,} | {median_us(element_test, update):.0f} | {median_us(all_finite, update):.0f} |")


if __name__ == "__main__":
    main()
