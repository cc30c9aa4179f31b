"""One local epoch of the SVD student of a run's final global model, at two learning rates, on three clients' data.

Reads the ``checkpoint.pt`` of a finished run of the default config (LeNet-5, 10 clients, Dirichlet 0.5,
2,000 samples each, proxy holdout 5,000) and prints, per client partition and learning rate, the mean training
loss of one epoch and the test accuracy after it, for the full model and for the student that
``broadcast-compact`` would switch to (built from the model by pruning and SVD, not distilled).
"""

from __future__ import annotations

import argparse
import copy

import torch

from fedsqueeze.compact_arch import parse_arch
from fedsqueeze.compact_arch.build import build_student
from fedsqueeze.data import client_data, load_dataset
from fedsqueeze.models import build_model
from fedsqueeze.protocol import arrays_to_tensors
from fedsqueeze.training import evaluate, set_weights, train

ARCH = "lenet5/mnist:compact(conv_rank=0,linear_rank=12,prune=0.5)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint.pt of a finished run")
    parser.add_argument("--data", required=True, help="mnist.npz")
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = torch.load(args.checkpoint, weights_only=False)  # our own file, written by the run
    teacher = build_model("lenet5")
    set_weights(teacher, arrays_to_tensors(checkpoint.arrays))
    student = build_student(teacher, parse_arch(ARCH).compact_config())
    data = load_dataset("mnist", args.data)
    print("full model: test accuracy", evaluate(teacher, data.x_test, data.y_test)[1])
    print("student (SVD, not distilled): test accuracy", evaluate(student, data.x_test, data.y_test)[1])
    print("partition lr model train_loss test_accuracy")
    for partition in (0, 3, 7):
        x, y = client_data(
            "mnist",
            partition,
            10,
            partitioner="dirichlet",
            alpha=0.5,
            seed=0,
            max_samples=2000,
            holdout=5000,
            data_dir=args.data,
        )
        for lr in (0.05, 0.02, 0.01):
            for name, model in (("full", teacher), ("student", student)):
                local = copy.deepcopy(model)
                loss = train(local, x, y, epochs=1, batch_size=32, lr=lr, momentum=0.9, seed=1)
                print(partition, lr, name, round(loss, 3), round(evaluate(local, data.x_test, data.y_test)[1], 4))


if __name__ == "__main__":
    main()
