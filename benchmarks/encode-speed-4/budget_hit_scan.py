"""Payload / target of `budget(bpp=X) | <pipeline>` on the three updates of tests/test_budget.py (a synthetic
heavy-tailed one, and LeNet-5 and McMahan CNN deltas from 200 training steps, which depend on the CPU).
``!`` marks a miss beyond the stated tolerance (3 %; with svd or powersgd, 10 % under 2 kB). A measurement
script, not a test:

    python benchmarks/encode-speed-4/budget_hit_scan.py
"""

import pathlib
import sys
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
from test_budget import num_params, payload_bytes, update_of  # type: ignore[import-not-found]  # noqa: E402

from fedsqueeze.codecs import parse  # noqa: E402

PIPELINES = [
    "topk | quantize | zstd",
    "topk | quantize(bits=4) | zstd",
    "topk | zstd",
    "svd | quantize | zstd",
    "svd | quantize(bits=4) | zstd",
    "powersgd(rank=32) | quantize | zstd",
]
BPP = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0]


def main() -> None:
    warnings.simplefilter("ignore")  # BudgetMissWarning: the table marks misses
    torch.set_num_threads(1)
    print("| update | pipeline | " + " | ".join(f"{b} bpp" for b in BPP) + " |")
    print("|---|---|" + "---|" * len(BPP))
    for model in ["synthetic", "lenet5", "mcmahan-cnn"]:
        update = update_of(model)
        n = num_params(update)
        for tail in PIPELINES:
            cells = []
            for bpp in BPP:
                target = bpp * n / 8
                ratio = payload_bytes(parse(f"budget(bpp={bpp}) | {tail}", seed=0).encode(update)) / target
                allowed = 0.03 if target >= 2048 or "topk" in tail else 0.10
                cells.append(f"{ratio:.3f}{' !' if abs(ratio - 1) > allowed else ''}")
            pipeline = tail.replace("|", "\\|")  # a table cell: its pipes escaped
            print(f"| {model} | `{pipeline}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
