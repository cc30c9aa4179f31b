"""FedAvg over torch.distributed (gloo): one process per client, updates exchanged as fedsqueeze blobs.

Every process holds the same global model, trains it for a few local SGD steps on its own
non-IID shard of a synthetic 10-class task, and encodes ``local - global`` through its own
:class:`~fedsqueeze.codecs.ErrorFeedback`. The blobs travel as uint8 tensors
(:func:`fedsqueeze.codecs.ddp.all_gather_bytes`: lengths first, then the bytes padded to the
longest; no pickle). Every process decodes all of them and applies their mean, so the replicas
stay identical without a server. Runs on one machine over the loopback interface::

    python examples/distributed_fedavg.py --processes 3 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fedsqueeze.codecs import ErrorFeedback, decode, parse
from fedsqueeze.codecs.ddp import all_gather_bytes


def synthetic_task(n: int, seed: int, dim: int = 32, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of a Gaussian-blob classification task (the class centres are fixed; ``seed`` draws points)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 0.6
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(y), (32,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()


def run_rounds(rank: int, world: int, args: argparse.Namespace) -> dict[str, object]:
    """The federated rounds as one process sees them (the process group is already up)."""
    x, y = synthetic_task(world * args.samples_per_process, seed=args.seed)
    shard = torch.argsort(y, stable=True).chunk(world)[rank]  # label-sorted: each process sees few classes
    x_test, y_test = synthetic_task(2000, seed=args.seed + 1)
    torch.manual_seed(args.seed)  # the same initial model in every process
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    uplink = ErrorFeedback(parse(args.codec, seed=args.seed + rank))
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    rounds = []
    for rnd in range(1, args.rounds + 1):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        local_sgd(model, x[shard], y[shard], args.local_steps, args.lr, seed=1000 * rnd + rank)
        blob = uplink.encode({k: v.detach() - start[k] for k, v in model.state_dict().items()})
        blobs = all_gather_bytes(blob)
        updates = [decode(b) for b in blobs]
        model.load_state_dict({k: start[k] + sum(u[k] for u in updates) / world for k in start})
        with torch.no_grad():
            acc = float((model(x_test).argmax(1) == y_test).float().mean())
        rounds.append({"round": rnd, "accuracy": acc, "bytes_sent": [len(b) for b in blobs]})
        if rank == 0:
            print(
                f"round {rnd}: accuracy {acc:.3f}; bytes sent per process {[len(b) for b in blobs]} "
                f"(FP32: {fp32_bytes:,} each)",
                flush=True,
            )
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)  # every process applied the same decoded mean: identical models
    in_sync = all(torch.equal(c, flat) for c in copies)
    return {"rounds": rounds, "fp32_bytes": fp32_bytes, "replicas_in_sync": in_sync, "codec": args.codec}


def _process(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # several processes share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)  # MASTER_ADDR/PORT from the environment
    try:
        summary = run_rounds(rank, world, args)
        if rank == 0 and args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        dist.barrier()  # nobody tears the group down while another process still uses it
    finally:
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=3, help="clients, one process each")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--samples-per-process", type=int, default=500)
    p.add_argument("--codec", default="topk(ratio=0.05) | quantize(bits=8) | zstd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="rank 0 writes the per-round numbers to this file")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ["MASTER_ADDR"] = "127.0.0.1"  # loopback: every process is on this machine
    os.environ["MASTER_PORT"] = str(free_port())
    mp.spawn(_process, args=(args.processes, args), nprocs=args.processes, join=True)


if __name__ == "__main__":
    main()
