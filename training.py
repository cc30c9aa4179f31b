"""Local training, evaluation and weight exchange helpers for the shared models (plain SGD, FedProx)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["train", "evaluate", "get_weights", "set_weights", "MAX_CPU_EVAL_BATCH"]

#: Largest evaluation batch used on the CPU: bigger batches spend much of their time in
#: glibc's malloc/free of large buffers (see ``shared/notes/cpu-facts.md``).
MAX_CPU_EVAL_BATCH = 128


def _check_data(x: torch.Tensor, y: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` and ``y`` are non-empty tensors of the same length."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim == 0 or y.ndim != 1:
        raise ValueError(
            f"expected x of shape (N, ...) and labels y of shape (N,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} samples vs {len(y)} labels")
    if len(x) == 0:
        raise ValueError("no samples: x and y are empty")


def _check_positive_int(label: str, value: int) -> None:
    """Raise ValueError unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{label} must be an integer >= 1, got {value!r}")


def _check_real(
    label: str,
    value: float,
    *,
    low: float,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ValueError unless ``value`` is a finite real number in the given range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= low if low_inclusive else value > low) and (value <= high if high_inclusive else value < high)
    if not ok:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive and high != math.inf else ")"
        raise ValueError(f"{label} must be a number in {left}{low}, {high}{right}, got {value!r}")


def _model_device(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter (the CPU for a parameterless model)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _check_train_arguments(
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    proximal_mu: float,
    seed: int,
) -> None:
    _check_data(x, y)
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    _check_real("lr", lr, low=0.0, low_inclusive=False)
    _check_real("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    _check_real("weight_decay", weight_decay, low=0.0)
    _check_real("proximal_mu", proximal_mu, low=0.0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    proximal_mu: float = 0.0,
) -> float:
    """Train ``model`` in place with mini-batch SGD on ``(x, y)``.

    Batches are slices of a seeded random permutation of the samples (a fresh one per
    epoch), taken directly from the tensors: no DataLoader, no worker processes. The same
    model, data and seed give the same result.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits; trained where its parameters live.
    x : torch.Tensor
        Inputs, shape ``(N, ...)``.
    y : torch.Tensor
        Integer class labels, shape ``(N,)``.
    epochs : int
        Passes over the data (default: 1).
    batch_size : int
        Samples per step; the last batch of an epoch may be smaller (default: 32).
    lr : float
        Learning rate (default: 0.05).
    momentum : float
        SGD momentum, in [0, 1) (default: 0.9).
    weight_decay : float
        L2 penalty of SGD (default: 0.0).
    seed : int
        Seed of the shuffling generator (default: 0).
    proximal_mu : float
        FedProx coefficient: when positive, adds ``mu / 2 * ||w - w_start||^2`` to the loss,
        where ``w_start`` are the weights at the start of this call (default: 0.0).

    Returns
    -------
    float
        Mean cross-entropy per sample over the last epoch, without the proximal term.

    Raises
    ------
    ValueError
        If the data or a hyper-parameter is invalid.
    """
    _check_train_arguments(x, y, epochs, batch_size, lr, momentum, weight_decay, proximal_mu, seed)
    device = _model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    start = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    generator = torch.Generator().manual_seed(seed)
    n = len(x)

    model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total.zero_()
        for begin in range(0, n, batch_size):
            idx = order[begin : begin + batch_size]
            xb = x[idx].to(device, non_blocking=True)
            yb = y[idx].to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            objective = loss
            if start:
                sq = sum((p - p0).pow(2).sum() for p, p0 in zip(params, start, strict=True))
                objective = loss + 0.5 * proximal_mu * sq
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            total += loss.detach() * len(idx)
    return float(total) / n


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 128) -> tuple[float, float]:
    """Compute the mean cross-entropy and the accuracy of ``model`` on ``(x, y)``.

    Runs in evaluation mode under :func:`torch.inference_mode`; the model's training flag
    is restored afterwards. On the CPU batches are capped at :data:`MAX_CPU_EVAL_BATCH`
    (128), which only affects speed.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits.
    x : torch.Tensor
        Inputs, shape ``(N, ...)``.
    y : torch.Tensor
        Integer class labels, shape ``(N,)``.
    batch_size : int
        Samples per forward pass (default: 128).

    Returns
    -------
    tuple of (float, float)
        Mean loss per sample and accuracy in [0, 1].

    Raises
    ------
    ValueError
        If the data is empty or mismatched, or ``batch_size`` is not a positive integer.
    """
    _check_data(x, y)
    _check_positive_int("batch_size", batch_size)
    device = _model_device(model)
    if device.type == "cpu":
        batch_size = min(batch_size, MAX_CPU_EVAL_BATCH)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.inference_mode():
            for begin in range(0, len(x), batch_size):
                xb = x[begin : begin + batch_size].to(device, non_blocking=True)
                yb = y[begin : begin + batch_size].to(device, non_blocking=True)
                logits = model(xb)
                loss_sum += F.cross_entropy(logits, yb, reduction="sum")
                correct += (logits.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    n = len(x)
    return float(loss_sum) / n, int(correct) / n


def get_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return detached CPU copies of the model's ``state_dict`` (parameters and buffers).

    Parameters
    ----------
    model : torch.nn.Module
        Any module.

    Returns
    -------
    dict of str to torch.Tensor
        Name to tensor, in ``state_dict`` order; changing them leaves the model untouched.
    """
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Mapping[str, torch.Tensor | np.ndarray]) -> None:
    """Copy ``weights`` into the model after checking that names and shapes match exactly.

    Parameters
    ----------
    model : torch.nn.Module
        Model to update in place.
    weights : Mapping of str to torch.Tensor or numpy.ndarray
        One tensor per ``state_dict`` entry of the model, for instance from
        :func:`get_weights`; values are cast to the model's dtypes and devices.

    Raises
    ------
    ValueError
        Naming the first mismatch: a tensor the model expects but ``weights`` lacks, a name
        the model does not have, or a shape that differs (expected vs found). The model is
        left unchanged in that case.
    """
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a mapping of name to tensor, got {type(weights).__name__}")
    expected = model.state_dict()
    for name in expected:
        if name not in weights:
            raise ValueError(
                f"weights lack {name!r}: expected the {len(expected)} names of the model's "
                f"state_dict, found {len(weights)} names"
            )
    for name in weights:
        if name not in expected:
            raise ValueError(
                f"weights hold {name!r}, which the model does not have; expected names: {', '.join(expected)}"
            )
    tensors: dict[str, torch.Tensor] = {}
    for name, target in expected.items():
        value = weights[name]
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"weights[{name!r}]: expected a torch.Tensor or numpy.ndarray, found {type(value).__name__}"
            )
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"weights[{name!r}]: expected shape {tuple(target.shape)}, found {tuple(value.shape)}")
        tensors[name] = value
    model.load_state_dict(tensors, strict=True)
