"""DistributedDataParallel with fedsqueeze compressing the gradient exchange (a DDP communication hook).

Two or more processes on this machine (gloo over the loopback interface) train one model with
DDP on a synthetic regression task; :func:`fedsqueeze.codecs.ddp.comm_hook` replaces DDP's
all-reduce of each gradient bucket by an all-gather of codec blobs, with error feedback per
bucket. Prints the loss and the bytes each process sent against DDP's FP32 all-reduce::

    python examples/ddp_hook.py --processes 2 --steps 200 --codec "topk(ratio=0.05) | quantize(bits=8) | zstd"
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fedsqueeze.codecs.ddp import CodecHookConfig, CodecHookState, comm_hook


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def regression_task(n: int, seed: int, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of y = tanh(x W1) W2 + noise, with fixed W1, W2 (``seed`` draws the points)."""
    w = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(dim, 32, generator=w) / dim**0.5, torch.randn(32, 4, generator=w)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return x, torch.tanh(x @ w1) @ w2 + 0.05 * torch.randn(n, 4, generator=g)


def train(rank: int, world: int, args: argparse.Namespace) -> dict[str, object]:
    """Train with DDP and the codec hook (the process group is already up); rank 0's view."""
    x, y = regression_task(512, seed=args.seed + rank)  # each process has its own data
    torch.manual_seed(args.seed)  # DDP also broadcasts rank 0's initial weights
    net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 4))
    model = DistributedDataParallel(net)
    state = CodecHookState(CodecHookConfig(args.codec or "identity", seed=args.seed))
    if args.codec:  # "" keeps DDP's own FP32 all-reduce, for comparison
        model.register_comm_hook(state, comm_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed + rank)
    losses = []
    for step in range(args.steps):
        batch = torch.randint(len(y), (64,), generator=g)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        loss.backward()  # the hook runs here, once per bucket
        optimizer.step()
        mean_loss = loss.detach().reshape(1)
        dist.all_reduce(mean_loss)  # for the printout only: the loss over all processes
        losses.append(float(mean_loss) / world)
        if rank == 0 and (step + 1) % max(1, args.steps // 5) == 0:
            print(
                f"step {step + 1}: loss {losses[-1]:.4f}; sent {state.bytes_sent:,} B, "
                f"FP32 all-reduce {state.fp32_bytes:,} B ({state.ratio:.1f}x fewer)",
                flush=True,
            )
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    return {
        "losses": losses,
        "bytes_sent": state.bytes_sent,
        "fp32_bytes": state.fp32_bytes,
        "ratio": state.ratio,
        "buckets_encoded": state.calls,
        "replicas_in_sync": all(torch.equal(c, flat) for c in copies),
        "codec": args.codec,
    }


def _process(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # several processes share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)  # MASTER_ADDR/PORT from the environment
    try:
        summary = train(rank, world, args)
        if rank == 0 and args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        # DDP's reducer holds the process group through reference cycles: free it now, not after
        # the group is destroyed (that order aborts the process now and then, at exit)
        gc.collect()
        dist.barrier()  # nobody tears the group down while another process still uses it
    finally:
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument(
        "--codec",
        default="topk(ratio=0.05) | quantize(bits=8) | zstd",
        help='codec spec for the gradient buckets; "" runs plain DDP (no hook)',
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="rank 0 writes losses and byte counts to this file")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ["MASTER_ADDR"] = "127.0.0.1"  # loopback: every process is on this machine
    os.environ["MASTER_PORT"] = str(free_port())
    mp.spawn(_process, args=(args.processes, args), nprocs=args.processes, join=True)


if __name__ == "__main__":
    main()
