"""A student built for batch-1 speed rather than derived from the teacher: few layers, strided convolutions.

At batch 1 a small CNN spends its time in a fixed cost per graph node, not in multiply-adds;
pruning and factoring a teacher keep (or add) nodes. This student has four: two strided
convolutions without padding (so the input normalisation folds exactly into the first one, see
:mod:`fedsqueeze.server.onnx_fuse`), each with a ReLU the runtime fuses into it, a flatten and one
linear layer. It starts from random weights and learns everything from the teacher by distillation.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["strided_student"]


def strided_student(
    in_channels: int,
    image_size: int,
    num_classes: int,
    widths: tuple[int, int] = (8, 16),
    kernel: int = 5,
    seed: int = 0,
) -> nn.Sequential:
    """conv(k, stride 2) + ReLU, conv(k, stride 2) + ReLU, flatten, linear to the classes.

    Parameters
    ----------
    in_channels, image_size, num_classes : int
        Input channels, square input side and classes (MNIST: 1, 28, 10).
    widths : tuple of int
        Filters of the two convolutions (default: (8, 16)).
    kernel : int
        Kernel side of both convolutions (default: 5).
    seed : int
        Seed of the initial weights; the global random state is left as it was (default: 0).

    Returns
    -------
    torch.nn.Sequential
        Layers ``conv1, relu1, conv2, relu2, flatten, fc``, in eval mode.

    Raises
    ------
    ValueError
        If the input is too small for two strided convolutions.
    """
    side1 = (image_size - kernel) // 2 + 1
    side2 = (side1 - kernel) // 2 + 1
    if min(widths) < 1 or side2 < 1:
        raise ValueError(
            f"widths must be >= 1 and the image ({image_size}) at least {3 * kernel - 2} pixels for kernel {kernel}; "
            f"got widths={widths}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = OrderedDict(
            [
                ("conv1", nn.Conv2d(in_channels, widths[0], kernel, stride=2)),
                ("relu1", nn.ReLU()),
                ("conv2", nn.Conv2d(widths[0], widths[1], kernel, stride=2)),
                ("relu2", nn.ReLU()),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(widths[1] * side2 * side2, num_classes)),
            ]
        )
    return nn.Sequential(layers).eval()
