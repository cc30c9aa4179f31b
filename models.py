"""Small image classifiers shared by clients, server and simulation (LeNet-5, McMahan CNN, CIFAR CNN)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MODEL_NAMES", "DATASET_SHAPES", "LeNet5", "McMahanCNN", "CifarCNN", "build_model"]

#: Input shape and class count per dataset: ``name -> (channels, image_size, num_classes)``.
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
}


def _check_dims(in_channels: int, num_classes: int, image_size: int, min_size: int) -> None:
    """Raise ValueError unless the constructor arguments describe a usable input."""
    for label, value, low in (
        ("in_channels", in_channels, 1),
        ("num_classes", num_classes, 2),
        ("image_size", image_size, min_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")


class LeNet5(nn.Module):
    """LeNet-5 as commonly used in federated-learning papers (ReLU and max pooling).

    conv 6@5x5 (padding 2), ReLU, max-pool 2; conv 16@5x5, ReLU, max-pool 2;
    fully connected 120, 84, ``num_classes``. 61,706 parameters on MNIST (1x28x28,
    10 classes), 83,126 on CIFAR-10 (3x32x32).

    Parameters
    ----------
    in_channels : int
        Channels of the input images (default: 1).
    num_classes : int
        Number of output classes (default: 10).
    image_size : int
        Height and width of the square input images, at least 12 (default: 28).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        _check_dims(in_channels, num_classes, image_size, min_size=12)
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        side = (image_size // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(batch, num_classes)`` for images ``(batch, C, H, W)``."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class _TwoConvNet(nn.Module):
    """conv (32, k x k, 'same'), ReLU, max-pool 2; conv (64, k x k, 'same'), ReLU, max-pool 2;
    FC hidden, ReLU; FC classes."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, *, kernel_size: int, hidden: int) -> None:
        super().__init__()
        _check_dims(in_channels, num_classes, image_size, min_size=4)
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=kernel_size, padding=kernel_size // 2)
        side = image_size // 4
        self.fc1 = nn.Linear(64 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(batch, num_classes)`` for images ``(batch, C, H, W)``."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class McMahanCNN(_TwoConvNet):
    """The CNN of McMahan et al. 2017 ("Communication-Efficient Learning of Deep Networks
    from Decentralized Data"), the "CNN" of its MNIST experiments.

    conv 32@5x5 ('same' padding), ReLU, max-pool 2; conv 64@5x5 ('same'), ReLU, max-pool 2;
    fully connected 512 with ReLU; fully connected ``num_classes``. 1,663,370 parameters on
    MNIST, 2,156,490 on CIFAR-10.

    Parameters
    ----------
    in_channels : int
        Channels of the input images (default: 1).
    num_classes : int
        Number of output classes (default: 10).
    image_size : int
        Height and width of the square input images, at least 4 (default: 28).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__(in_channels, num_classes, image_size, kernel_size=5, hidden=512)


class CifarCNN(_TwoConvNet):
    """A small CNN for CIFAR-10: two 3x3 convolutions and two fully connected layers.

    conv 32@3x3 (padding 1), ReLU, max-pool 2; conv 64@3x3 (padding 1), ReLU, max-pool 2;
    fully connected 128 with ReLU; fully connected ``num_classes``. 545,098 parameters on
    CIFAR-10 (3x32x32, 10 classes), 421,642 on MNIST (measured with
    ``sum(p.numel() for p in model.parameters())``).

    Parameters
    ----------
    in_channels : int
        Channels of the input images (default: 3).
    num_classes : int
        Number of output classes (default: 10).
    image_size : int
        Height and width of the square input images, at least 4 (default: 32).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__(in_channels, num_classes, image_size, kernel_size=3, hidden=128)


_MODELS: dict[str, type[nn.Module]] = {
    "lenet5": LeNet5,
    "mcmahan-cnn": McMahanCNN,
    "cifar-cnn": CifarCNN,
}

#: Names accepted by :func:`build_model`.
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


def build_model(name: str, dataset: str = "mnist") -> nn.Module:
    """Build a freshly initialised model for a dataset.

    Initialisation uses torch's global generator: call ``torch.manual_seed`` first for
    reproducible weights.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`: ``"lenet5"``, ``"mcmahan-cnn"``, ``"cifar-cnn"``.
    dataset : str
        Dataset whose input shape and class count the model takes, one of
        :data:`DATASET_SHAPES`: ``"mnist"`` (1x28x28) or ``"cifar10"`` (3x32x32)
        (default: ``"mnist"``).

    Returns
    -------
    torch.nn.Module
        The model, on the CPU, in training mode.

    Raises
    ------
    ValueError
        If ``name`` or ``dataset`` is unknown.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    if dataset not in DATASET_SHAPES:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASET_SHAPES)}")
    channels, image_size, num_classes = DATASET_SHAPES[dataset]
    return _MODELS[name](in_channels=channels, num_classes=num_classes, image_size=image_size)


def first_model(name: str, dataset: str, seed: int) -> dict[str, torch.Tensor]:
    """The weights of the run's first model: :func:`build_model` initialised from ``seed`` alone.

    Server and nodes call it with the run config's values and get bit-identical weights (same
    torch build), so the server need not send the first model; it checks a digest instead.
    The global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(name, dataset)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
