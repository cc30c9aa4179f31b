"""Rewrite the golden blobs of the v1 wire format. Run by hand only, after a deliberate change:

    PYTHONPATH=<dir holding fedsqueeze> python tests/golden/regenerate.py

A change of the wire format must also bump its version (codecs/FORMAT.md); the golden test
then fails until the blobs are regenerated, which is the point. Each blob ``<name>.fsqz``
comes with ``<name>.npz``: what it decodes to (float32, int64 and bool arrays, no pickle).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import torch

from fedsqueeze.codecs import decode, parse, registered_stages

HERE = pathlib.Path(__file__).parent
PIPELINES = [
    "topk(ratio=0.1) | quantize(bits=4) | zstd(level=3)",
    "topk(ratio=0.2) | ternary | zstd",
    "randomk(ratio=0.25, seed=7) | fp16",
    "svd(rank=2) | quantize(bits=8, granularity=channel)",
    "powersgd(rank=2) | bf16",
    "tucker(ranks=(2, 3)) | quantize(bits=2, granularity=16)",
    "cp(rank=2, iters=3) | sign",
    "threshold(value=1.0) | quantize(bits=1, stochastic=true) | zstd",
    "budget(bpp=3.0) | topk | quantize(bits=4) | zstd",
]
# the default cut-off keeps everything here; a budget alone drops or keeps whole tensors
STAGE_SPECS = {"threshold": "threshold(value=1.0)", "budget": "budget(bpp=16.0)"}


def golden_update() -> dict[str, torch.Tensor]:
    """Small tensors that every kind of stage takes: a conv kernel, a matrix, a vector, non-floats."""
    g = torch.Generator().manual_seed(2024)
    return {
        "conv.weight": torch.randn(8, 6, 3, 3, generator=g),
        "fc.weight": torch.randn(12, 40, generator=g),
        "fc.bias": torch.randn(12, generator=g),
        "bn.num_batches_tracked": torch.tensor(5, dtype=torch.int64),
        "mask": torch.arange(10) % 3 == 0,
    }


def golden_specs() -> dict[str, str]:
    """File stem -> spec, for every registered stage alone and a few pipelines."""
    specs = [STAGE_SPECS.get(name, name) for name in sorted(registered_stages())] + PIPELINES
    return {re.sub(r"[^a-z0-9]+", "-", spec).strip("-"): spec for spec in specs}


def main() -> None:
    update = golden_update()
    manifest = {}
    for stem, spec in golden_specs().items():
        blob = parse(spec, seed=11).encode(update)
        (HERE / f"{stem}.fsqz").write_bytes(blob)
        decoded = {name: t.float().numpy() if t.is_floating_point() else t.numpy() for name, t in decode(blob).items()}
        np.savez(HERE / f"{stem}.npz", **decoded)
        manifest[stem] = spec
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(manifest)} golden blobs to {HERE}")


if __name__ == "__main__":
    main()
