"""What a node's codec round costs after other work, and where: a measurement script, not a test.

The round is ``client/mod.py``'s ``_encode_reply`` with the default codec on the LeNet-5 delta (as
``simulation/client_round_bench.py`` times it). Two tables, wall clock, one thread:

1. the round's median after each kind of work run (untimed) before it: nothing (a loop of rounds),
   writing 64 MB (evicts the data caches, runs almost no code), a pure-Python loop, small torch
   matrix products, conv forward/backward, a training epoch; with the minor page faults per round;
2. the round by phase (functions wrapped one by one), in a loop and right after a training epoch.

    python benchmarks/encode-speed-3/cold_round.py [MNIST dir] [rounds per kind]
"""

import collections
import resource
import statistics
import sys
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

import fedsqueeze.client.mod as mod
import fedsqueeze.codecs._feedback as feedback
import fedsqueeze.codecs._fused as fused
import fedsqueeze.codecs._pipeline as pipeline
from fedsqueeze.codecs import parse
from fedsqueeze.protocol import DELTA, Downlink
from fedsqueeze.simulation.client_round_bench import training_epoch
from fedsqueeze.simulation.codec_bench import lenet5_update

SPEC = "svd(rank=6) | quantize(bits=4) | zstd"
PHASES: dict[str, int] = collections.defaultdict(int)


def timed(owner: object, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper that adds its wall time to ``PHASES[label]``."""
    fn = getattr(owner, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[label] += time.perf_counter_ns() - start

    setattr(owner, name, wrapper)


def wrap_phases() -> None:
    timed(mod, "state_tensors", "read the node state")
    timed(mod, "state_record", "write the node state")
    timed(mod, "subtract_tensors", "local - received")
    timed(feedback.ErrorFeedback, "load_state_dict", "error feedback: load (checks)")
    timed(pipeline, "encode_body", "codec: stages and body")
    timed(pipeline.Codec, "_finish_pieces", "codec: join and zstd")
    timed(pipeline, "rebuild", "codec: rebuild what decode returns")
    timed(pipeline, "_check_rebuilt", "codec: check the rebuilt")
    timed(fused, "node_pieces", "codec: write the nodes")
    for stage in parse(SPEC).tensor_stages:
        timed(type(stage), "encode_batch", f"stage {stage.name}")


def main(data_dir: str, rounds: int) -> None:
    torch.set_num_threads(1)
    delta = lenet5_update(data_dir)
    received = {n: torch.randn_like(t) for n, t in delta.items()}
    state = RecordDict()
    faults: list[int] = []

    def one_round(i: int) -> float:
        version = i + 100
        state[mod.STATE_META] = ConfigRecord({"version": version, "uplink": SPEC, "feedback-version": version - 1})
        down = Downlink(kind=DELTA, version=version, base=version - 1, blobs=[], uplink=SPEC)
        local = {n: received[n] + t * (1.0 + 0.1 * (i % 5)) for n, t in delta.items()}
        codec = parse(SPEC, seed=i)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter_ns()
        mod._encode_reply(local, received, codec, state, down)
        seconds = (time.perf_counter_ns() - start) / 1e9
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        PHASES["ROUND"] += int(seconds * 1e9)
        return seconds

    epoch = training_epoch(data_dir)
    big = np.empty(64 << 20, np.uint8)

    def python_loop(i: int) -> None:
        d = {}
        for k in range(200_000):
            d[k % 1000] = str(k)

    def small_products(i: int) -> None:
        a = torch.randn(64, 64)
        for _ in range(2000):
            a = torch.tanh(a @ a * 0.01)

    def conv_backward(i: int) -> None:
        x, conv = torch.randn(32, 6, 28, 28), torch.nn.Conv2d(6, 16, 5)
        for _ in range(60):
            conv(x).sum().backward()

    kinds = {
        "nothing (a loop of rounds)": None,
        "writing 64 MB": lambda i: big.fill(i & 255),
        "a pure-Python loop": python_loop,
        "small torch matrix products": small_products,
        "conv forward/backward": conv_backward,
        "a training epoch": epoch,
    }
    for i in range(10):
        one_round(i)
    print("| run before the round (untimed) | round, median ms | page faults per round, median |\n|---|---|---|")
    for kind, before in kinds.items():
        times, faults[:] = [], []
        for i in range(rounds):
            if before is not None:
                before(i)
            times.append(one_round(i))
        print(f"| {kind} | {statistics.median(times) * 1e3:.2f} | {statistics.median(faults):.0f} |")

    wrap_phases()
    print("\n| phase, us per round (mean) | in a loop | right after a training epoch |\n|---|---|---|")
    results = []
    for before in (None, epoch):
        PHASES.clear()
        for i in range(rounds):
            if before is not None:
                before(i)
            one_round(i)
        results.append({k: v / rounds / 1e3 for k, v in PHASES.items()})
    warm, cold = results
    for name in sorted(cold, key=lambda k: -cold[k]):
        print(f"| {name} | {warm.get(name, 0):.0f} | {cold[name]:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets", int(sys.argv[2]) if len(sys.argv) > 2 else 20)
