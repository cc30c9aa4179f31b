"""One node round by CPU time: 50 rounds in a loop, then 12 each right after a training epoch.

The round is ``client/mod.py``'s ``_encode_reply`` with the default codec on the LeNet-5 delta, as
``simulation/client_round_bench.py`` times it; the session's first commit (a77e27b) lacks that
script's after-training mode, hence this one, run once per checkout, alternating::

    PYTHONPATH=<folder whose fedsqueeze links to a checkout> python client_round_alternating.py [MNIST dir]
"""

import statistics
import sys
import time

import torch
from flwr.app import ConfigRecord, RecordDict

from fedsqueeze.client.mod import STATE_META, _encode_reply
from fedsqueeze.codecs import parse
from fedsqueeze.data import load_dataset
from fedsqueeze.models import build_model
from fedsqueeze.protocol import DELTA, Downlink
from fedsqueeze.simulation.codec_bench import lenet5_update
from fedsqueeze.training import train

SPEC = "svd(rank=6) | quantize(bits=4) | zstd"


def main(data_dir: str) -> None:
    torch.set_num_threads(1)
    delta = lenet5_update(data_dir)
    data = load_dataset("mnist", data_dir)
    x, y = data.x_train[:2000], data.y_train[:2000]
    received = {n: torch.randn_like(t) for n, t in delta.items()}
    state = RecordDict()

    def one_round(i: int) -> float:
        version = i + 100
        state[STATE_META] = ConfigRecord({"version": version, "uplink": SPEC, "feedback-version": version - 1})
        down = Downlink(kind=DELTA, version=version, base=version - 1, blobs=[], uplink=SPEC)
        local = {n: received[n] + t * (1.0 + 0.1 * (i % 5)) for n, t in delta.items()}
        codec = parse(SPEC, seed=i)
        start = time.process_time()
        _encode_reply(local, received, codec, state, down)
        return (time.process_time() - start) * 1e3

    for i in range(20):
        one_round(i)
    warm = [one_round(i) for i in range(50)]
    after_training = []
    for i in range(12):
        train(build_model("lenet5", "mnist"), x, y, epochs=1, batch_size=32, lr=0.05, momentum=0.9, seed=i)
        after_training.append(one_round(1000 + i))
    print(f"warm cpu ms {statistics.median(warm):.2f}")
    print(f"after training cpu ms {statistics.median(after_training):.2f} {[round(t, 2) for t in after_training]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets")
