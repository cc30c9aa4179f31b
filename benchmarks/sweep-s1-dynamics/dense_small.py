"""Does sending LeNet-5's small tensors dense matter? Relative L2 error and bytes of round-1 client deltas.

Each of S1's 10 clients (Dirichlet 0.5, 1,000 samples, seed 0) trains one local epoch from the
seeded first model; its delta is encoded with ``topk(ratio=0.01) | quantize(bits=8) | zstd``
with and without ``dense_below``. Printed per codec: the relative L2 error of the decoded
delta (whole model, and the small tensors alone) and the blob bytes, averaged over clients.

Run: PYTHONPATH=<pkg> python benchmarks/sweep-s1-dynamics/dense_small.py /work/shared/datasets/mnist.npz
"""

from __future__ import annotations

import sys

import torch

from fedsqueeze.codecs import decode, parse
from fedsqueeze.data.partitioning import client_data
from fedsqueeze.models import build_model, first_model
from fedsqueeze.training import get_weights, set_weights, train

SPECS = {
    "topk 1% int8": "topk(ratio=0.01) | quantize(bits=8) | zstd",
    "topk 1% int8, dense_below=1000": "topk(ratio=0.01, dense_below=1000) | quantize(bits=8) | zstd",
    "topk 1% int8, dense_below=3000": "topk(ratio=0.01, dense_below=3000) | quantize(bits=8) | zstd",
}
SMALL = 1000  # entries: LeNet-5's biases and conv1's weight


def rel_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> float:
    err = sum(float(((a[n] - b[n]) ** 2).sum()) for n in names)
    ref = sum(float((b[n] ** 2).sum()) for n in names)
    return (err / ref) ** 0.5


def main(data_dir: str) -> None:
    torch.set_num_threads(1)
    start = first_model("lenet5", "mnist", 0)
    deltas = []
    for client in range(10):
        x, y = client_data("mnist", client, 10, alpha=0.5, seed=0, max_samples=1000, data_dir=data_dir)
        model = build_model("lenet5", "mnist")
        set_weights(model, start)
        train(model, x, y, epochs=1, batch_size=32, lr=0.05, momentum=0.9, seed=client)
        deltas.append({k: v - start[k] for k, v in get_weights(model).items()})
    names = list(deltas[0])
    small = [n for n in names if deltas[0][n].numel() < SMALL]
    energy = sum(
        sum(float((d[n] ** 2).sum()) for n in small) / sum(float((d[n] ** 2).sum()) for n in names) for d in deltas
    ) / len(deltas)
    print(
        f"small tensors (< {SMALL} entries): {small}, {sum(deltas[0][n].numel() for n in small)} entries, "
        f"{100 * energy:.1f} % of the delta's energy (mean over clients)"
    )
    print("| codec | rel. L2 error, whole delta | rel. L2 error, small tensors | blob bytes |")
    print("|---|---|---|---|")
    for label, spec in SPECS.items():
        codec = parse(spec)
        whole = part = size = 0.0
        for d in deltas:
            blob = codec.encode(d)
            out = decode(blob)
            whole += rel_l2(out, d, names) / len(deltas)
            part += rel_l2(out, d, small) / len(deltas)
            size += len(blob) / len(deltas)
        print(f"| {label} | {whole:.3f} | {part:.3f} | {size:,.0f} |")


if __name__ == "__main__":
    main(sys.argv[1])
