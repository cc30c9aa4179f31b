"""FedAvg in plain PyTorch with fedsqueeze codecs: no Flower, every client and the server in one process.

Each round the server sends the change of the global model since what the clients hold (downlink
codec), every client trains on its own non-IID shard of a synthetic 10-class task and sends
``local - received`` through its own :class:`~fedsqueeze.codecs.ErrorFeedback` (uplink codec),
and the server averages the decoded updates. What the lossy downlink left out stays in
``global - held`` and goes out with the next round's delta. Prints accuracy and bytes per round
against what FP32 would have sent::

    python examples/plain_fedavg.py --rounds 10 --uplink "topk(ratio=0.05) | quantize(bits=8) | zstd"
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fedsqueeze.codecs import ErrorFeedback, decode, parse

Weights = dict[str, torch.Tensor]


def synthetic_task(n: int, seed: int, dim: int = 32, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of a Gaussian-blob classification task (the class centres are fixed; ``seed`` draws points)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 0.6
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def label_sorted_shards(y: torch.Tensor, clients: int) -> list[torch.Tensor]:
    """Non-IID split: indices sorted by label, cut into ``2 * clients`` shards, two per client."""
    shards = torch.argsort(y, stable=True).chunk(2 * clients)
    return [torch.cat([shards[i], shards[-1 - i]]) for i in range(clients)]


def make_model(dim: int = 32, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, classes))


def train_locally(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=g).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()


def accuracy(model: nn.Module, weights: Weights, x: torch.Tensor, y: torch.Tensor) -> float:
    model.load_state_dict(weights)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--samples-per-client", type=int, default=400)
    p.add_argument("--uplink", default="topk(ratio=0.05) | quantize(bits=8) | zstd")
    p.add_argument("--downlink", default="quantize(bits=8) | zstd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the per-round numbers to this file")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    x, y = synthetic_task(args.clients * args.samples_per_client, seed=args.seed)
    x_test, y_test = synthetic_task(2000, seed=args.seed + 1)
    shards = label_sorted_shards(y, args.clients)
    model = make_model()
    held: Weights = {k: v.clone() for k, v in model.state_dict().items()}  # what every client holds
    global_weights: Weights = {k: v.clone() for k, v in held.items()}
    fp32_bytes = 4 * sum(v.numel() for v in held.values())  # one model as plain float32
    downlink = parse(args.downlink)
    uplinks = [ErrorFeedback(parse(args.uplink, seed=args.seed + i)) for i in range(args.clients)]
    rounds = []
    initial = accuracy(model, global_weights, x_test, y_test)
    print(f"round 0: accuracy {initial:.3f}; one model in FP32 is {fp32_bytes:,} bytes")
    for rnd in range(1, args.rounds + 1):
        down_blob = downlink.encode({k: global_weights[k] - held[k] for k in held})
        held = {k: held[k] + v for k, v in decode(down_blob).items()}
        updates, up_bytes = [], 0
        for i, shard in enumerate(shards):
            model.load_state_dict(held)
            train_locally(model, x[shard], y[shard], args.local_epochs, args.lr, seed=1000 * rnd + i)
            blob = uplinks[i].encode({k: v.detach() - held[k] for k, v in model.state_dict().items()})
            up_bytes += len(blob)
            updates.append(decode(blob))  # the server sees only the bytes
        sizes = torch.tensor([float(len(s)) for s in shards])
        weights = sizes / sizes.sum()
        global_weights = {k: held[k] + sum(w * u[k] for w, u in zip(weights, updates, strict=True)) for k in held}
        acc = accuracy(model, global_weights, x_test, y_test)
        row = {
            "round": rnd,
            "accuracy": acc,
            "uplink_bytes": up_bytes,
            "downlink_bytes": len(down_blob) * args.clients,
            "fp32_bytes_each_way": fp32_bytes * args.clients,
        }
        rounds.append(row)
        print(
            f"round {rnd}: accuracy {acc:.3f}; uplink {up_bytes:,} B, downlink {row['downlink_bytes']:,} B "
            f"(FP32: {row['fp32_bytes_each_way']:,} B each way)"
        )
    summary: dict[str, object] = {
        "initial_accuracy": initial,
        "rounds": rounds,
        "uplink": args.uplink,
        "downlink": args.downlink,
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
