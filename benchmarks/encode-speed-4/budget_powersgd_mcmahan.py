"""Payload / target of `budget(bpp=X) | powersgd(rank=32) | quantize | zstd` on the McMahan CNN delta of
tests/test_budget.py (200 training steps; the delta depends on the CPU's kernels). A measurement script:

    python benchmarks/encode-speed-4/budget_powersgd_mcmahan.py
"""

import pathlib
import sys
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
from test_budget import num_params, payload_bytes, trained_delta  # type: ignore[import-not-found]  # noqa: E402

from fedsqueeze.codecs import parse  # noqa: E402

warnings.simplefilter("ignore")  # BudgetMissWarning: the table says it
torch.set_num_threads(1)
update = trained_delta("mcmahan-cnn")
n = num_params(update)
print("| bpp | target bytes | payload bytes | payload / target |\n|---|---|---|---|")
for bpp in [0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7]:
    target = bpp * n / 8
    blob = parse(f"budget(bpp={bpp}) | powersgd(rank=32) | quantize | zstd", seed=0).encode(update)
    print(f"| {bpp} | {target:,.0f} | {payload_bytes(blob):,} | {payload_bytes(blob) / target:.3f} |")
