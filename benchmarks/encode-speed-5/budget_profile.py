"""CPU time of one `budget` encode of the LeNet-5 delta of tests/test_budget.py, and its cProfile by cumulative
time (the planner's menus, plans and encodes). A measurement script, not a test:

    python benchmarks/encode-speed-5/budget_profile.py ['budget(bpp=0.2) | svd | quantize | zstd']
"""

import cProfile
import pathlib
import pstats
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
from test_budget import update_of  # type: ignore[import-not-found]  # noqa: E402

from fedsqueeze.codecs import parse  # noqa: E402


def main(spec: str) -> None:
    warnings.simplefilter("ignore")  # BudgetMissWarning
    torch.set_num_threads(1)
    update = update_of("lenet5")
    codec = parse(spec, seed=0)
    for _ in range(3):
        codec.encode(update)
    start = time.process_time()
    for _ in range(20):
        codec.encode(update)
    print(f"{spec}: {(time.process_time() - start) / 20 * 1e3:.1f} ms of CPU per encode (LeNet-5 delta, 1 thread)")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(10):
        codec.encode(update)
    profile.disable()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(12)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "budget(bpp=0.2) | svd | quantize | zstd")
