"""Where the default codec's LeNet-5 encode goes in a loop of encodes (as the codec benchmark times it), by
phase: each function is wrapped and its wall time summed; one thread, microseconds per encode. A
measurement script, not a test:

    python benchmarks/encode-speed-5/encode_phases.py [MNIST dir]
"""

import pathlib
import sys
import time

import torch

import fedsqueeze.codecs._fused as fused
import fedsqueeze.codecs._pipeline as pipeline
from fedsqueeze.codecs import parse
from fedsqueeze.simulation.codec_bench import lenet5_update

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "encode-speed-3"))
from cold_round import PHASES, SPEC, timed  # type: ignore[import-not-found]  # noqa: E402


def main(data_dir: str, encodes: int = 500) -> None:
    torch.set_num_threads(1)
    for stage in parse(SPEC).tensor_stages:
        timed(type(stage), "encode_batch", f"stage {stage.name} (in the stages' batches)")
    timed(fused, "run_stages", "the stages' batches and their nodes")
    timed(pipeline.Codec, "_finish_pieces", "join and zstd")
    timed(fused, "node_pieces", "write the nodes")
    timed(pipeline.Codec, "_records", "check the update's names and tensors")
    update = lenet5_update(data_dir)
    codec = parse(SPEC, seed=0)
    for _ in range(100):
        codec.encode(update)
    PHASES.clear()
    start = time.perf_counter_ns()
    for _ in range(encodes):
        codec.encode(update)
    PHASES["whole encode"] = time.perf_counter_ns() - start
    print("| phase (nested phases count in their callers too) | us per encode |\n|---|---|")
    for label, ns in sorted(PHASES.items(), key=lambda item: -item[1]):
        print(f"| {label} | {ns / encodes / 1e3:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets")
