"""Server-side knowledge distillation of the global model (and optionally client models) into a student."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedsqueeze.data import holdout_split
from fedsqueeze.server.hints import FeatureHints, default_hint_layers

__all__ = ["DistillConfig", "DistillResult", "distill", "distillation_loss", "proxy_split", "teacher_logits"]

_EVAL_BATCH = 128  # larger CPU batches spend their time in malloc (shared/notes/cpu-facts.md)


@dataclass
class DistillConfig:
    """Settings of server-side distillation.

    Parameters
    ----------
    temperature : float
        Softmax temperature of the soft targets, > 0 (default: 3.0).
    epochs : int
        Passes over the proxy set per distillation (default: 10).
    lr : float
        Adam learning rate (default: 0.003).
    batch_size : int
        Proxy samples per step (default: 64).
    every_n_rounds : int
        Distil after every n-th federated round (default: 1).
    ensemble : bool
        Also use the round's client models as teachers (FedDF-style logit averaging) rather
        than the aggregated global model alone (default: False).
    proxy_size : int
        Number of server-held training images used as unlabeled proxy data (default: 10000).
    teacher_weights : list of float or None
        Weights of the teachers' logits, global model first; None averages them equally
        (default: None).
    soft_weight : float
        Weight of the soft-label loss, >= 0; 0 trains on the hints alone (default: 1.0).
    hint_weight : float
        Weight of the activation-matching (hint) loss, >= 0; 0 turns it off (default: 0.0).
    hint_layers : tuple of str or None
        Hint layers (see :func:`distill`); None takes
        :func:`~fedsqueeze.server.hints.default_hint_layers` of the student (default: None).
    """

    temperature: float = 3.0
    epochs: int = 10
    lr: float = 0.003
    batch_size: int = 64
    every_n_rounds: int = 1
    ensemble: bool = False
    proxy_size: int = 10_000
    teacher_weights: list[float] | None = field(default=None)
    soft_weight: float = 1.0
    hint_weight: float = 0.0
    hint_layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_positive("temperature", self.temperature)
        _check_positive("lr", self.lr)
        _check_loss_weights(self.soft_weight, self.hint_weight)
        for label in ("epochs", "batch_size", "every_n_rounds", "proxy_size"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")

    def kwargs(self) -> dict[str, Any]:
        """Return the keyword arguments of :func:`distill` that this config sets."""
        return {
            "temperature": self.temperature,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "weights": self.teacher_weights,
            "soft_weight": self.soft_weight,
            "hint_weight": self.hint_weight,
            "hint_layers": self.hint_layers,
        }


@dataclass(frozen=True)
class DistillResult:
    """Outcome of :func:`distill`.

    Attributes
    ----------
    losses : list of float
        Mean training loss per sample of each epoch: ``soft_weight`` times the distillation
        loss (KL * T^2) plus ``hint_weight`` times the hint loss.
    num_teachers : int
        Teachers whose logits were averaged.
    num_samples : int
        Proxy samples used.
    seconds : float
        Wall time, teacher inference included.
    """

    losses: list[float]
    num_teachers: int
    num_samples: int
    seconds: float


def _check_loss_weights(soft_weight: float, hint_weight: float) -> None:
    for label, value in (("soft_weight", soft_weight), ("hint_weight", hint_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
    if soft_weight == 0 and hint_weight == 0:
        raise ValueError("soft_weight and hint_weight are both 0: nothing to train the student on")


def _check_positive(label: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{label} must be a finite number > 0, got {value!r}")


def proxy_split(num_train: int, proxy_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split training indices into a server-held proxy set and the rest (for the clients).

    Parameters
    ----------
    num_train : int
        Number of training samples.
    proxy_size : int
        Samples the server keeps, 1..num_train - 1.
    seed : int
        Seed of the permutation (default: 0).

    Returns
    -------
    proxy_idx, client_idx : torch.Tensor
        Sorted int64 index tensors; disjoint, together all of ``range(num_train)``.

    Notes
    -----
    This is :func:`fedsqueeze.data.holdout_split`, which the clients use (through
    ``client_data(..., holdout=proxy_size)``) to leave the proxy images out of their
    partitions: the same ``(num_train, proxy_size, seed)`` give the same split on both sides.
    """
    if not 1 <= proxy_size < num_train:
        raise ValueError(
            f"proxy_size must be in 1..{num_train - 1} (fewer than the training samples), got {proxy_size}"
        )
    return holdout_split(num_train, proxy_size, seed)


def _normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"expected {count} teacher weights (one per teacher), got {len(weights)}")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"teacher weights must be finite, >= 0 and not all 0, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


@torch.inference_mode()
def teacher_logits(
    teachers: Sequence[nn.Module], x: torch.Tensor, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Weighted average of the teachers' logits on ``x`` (eval mode, batches of 128).

    Parameters
    ----------
    teachers : sequence of torch.nn.Module
        Classifiers returning logits of the same width.
    x : torch.Tensor
        Inputs ``(N, ...)``.
    weights : sequence of float or None
        One non-negative weight per teacher, normalised to sum 1; None is the plain mean
        (default: None).

    Returns
    -------
    torch.Tensor
        float32 logits ``(N, classes)`` on the CPU.
    """
    if not teachers:
        raise ValueError("at least one teacher is needed")
    norm = _normalised_weights(weights, len(teachers))
    total: torch.Tensor | None = None
    for teacher, w in zip(teachers, norm, strict=True):
        was_training = teacher.training
        teacher.eval()
        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        out = torch.cat(
            [teacher(x[i : i + _EVAL_BATCH].to(device)).float().cpu() for i in range(0, len(x), _EVAL_BATCH)]
        )
        teacher.train(was_training)
        total = out * w if total is None else total + out * w
    assert total is not None
    return total


def distillation_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton distillation loss: ``T^2 * KL(softmax(target / T) || softmax(student / T))``, batch mean.

    Parameters
    ----------
    student_logits, target_logits : torch.Tensor
        Logits ``(N, classes)``.
    temperature : float
        Softmax temperature T > 0.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_target = F.log_softmax(target_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_target, reduction="batchmean", log_target=True)
    return kl * temperature**2


def _check_training_args(proxy_x: torch.Tensor, *, temperature: float, lr: float, epochs: int, batch_size: int) -> None:
    """Raise ValueError naming the first of :func:`distill`'s arguments that is out of range."""
    if not isinstance(proxy_x, torch.Tensor) or proxy_x.dim() < 2 or len(proxy_x) == 0:
        raise ValueError(f"proxy_x must be a non-empty (N, ...) tensor, got {getattr(proxy_x, 'shape', proxy_x)!r}")
    _check_positive("temperature", temperature)
    _check_positive("lr", lr)
    for label, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")


class _Objective:
    """The per-batch training loss: ``soft_weight`` x soft-label loss + ``hint_weight`` x hint loss."""

    def __init__(
        self,
        student: nn.Module,
        teachers: list[nn.Module],
        proxy_x: torch.Tensor,
        *,
        weights: Sequence[float] | None,
        temperature: float,
        soft_weight: float,
        hint_weight: float,
        hint_layers: Sequence[str] | None,
        seed: int,
    ) -> None:
        _check_loss_weights(soft_weight, hint_weight)
        if hint_weight == 0 and hint_layers:
            raise ValueError(f"hint_layers {list(hint_layers)} given but hint_weight is 0: set hint_weight > 0")
        self.student, self.temperature = student, temperature
        self.soft_weight, self.hint_weight = float(soft_weight), float(hint_weight)
        self.targets = teacher_logits(teachers, proxy_x, weights) if soft_weight > 0 else None
        self.hints: FeatureHints | None = None
        if hint_weight > 0:
            layers = default_hint_layers(student) if hint_layers is None else hint_layers
            with torch.random.fork_rng(devices=[]):  # seeded regressors, the caller's RNG untouched
                torch.manual_seed(seed)
                # Features of the first teacher only: the global model, of which the student is a pruned copy
                self.hints = FeatureHints(student, teachers[0], layers, proxy_x)

    def parameters(self) -> list[nn.Parameter]:
        """The hint regressors' parameters (none without hints)."""
        return [] if self.hints is None else self.hints.parameters()

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        features: dict[str, torch.Tensor] = {}
        if self.hints is None:
            logits = self.student(x)
        else:
            logits, features = self.hints.forward(x)
        loss = torch.zeros((), device=logits.device)
        if self.targets is not None:
            target = self.targets[idx].to(logits.device)
            loss = loss + self.soft_weight * distillation_loss(logits, target, self.temperature)
        if self.hints is not None:
            loss = loss + self.hint_weight * self.hints.loss(features, idx)
        return loss


def distill(
    student: nn.Module,
    teachers: Sequence[nn.Module] | nn.Module,
    proxy_x: torch.Tensor,
    *,
    temperature: float = 3.0,
    epochs: int = 10,
    lr: float = 0.003,
    batch_size: int = 64,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    soft_weight: float = 1.0,
    hint_weight: float = 0.0,
    hint_layers: Sequence[str] | None = None,
) -> DistillResult:
    """Train ``student`` in place to match the teachers' soft predictions and/or intermediate features.

    Soft labels (``soft_weight`` > 0): ``T^2`` times the KL divergence between the teachers'
    and the student's softened class distributions (Hinton et al. 2015); several teachers (the
    global model plus the round's client models, FedDF-style) give the weighted mean of their
    logits. Activation matching (``hint_weight`` > 0, FitNets-style): the relative squared error
    between the student's features at ``hint_layers`` and the first teacher's, through a 1x1
    regressor where the student is narrower (:class:`~fedsqueeze.server.hints.FeatureHints`),
    trained with the student and dropped afterwards. Either loss alone, or both, weighted.

    Teacher outputs are computed once, then the student is trained with Adam on shuffled batches
    of the proxy images (:func:`proxy_split`), whose labels are never used.

    Parameters
    ----------
    student : torch.nn.Module
        Model to train (e.g. from :func:`fedsqueeze.server.compact.build_student`); left in
        eval mode.
    teachers : torch.nn.Module or sequence of torch.nn.Module
        Teacher(s) returning logits; not modified.
    proxy_x : torch.Tensor
        Unlabeled proxy inputs ``(N, C, H, W)``, normalised like the training data.
    temperature : float
        Softmax temperature T > 0 (default: 3.0).
    epochs : int
        Passes over the proxy set (default: 10).
    lr : float
        Adam learning rate, decayed to 0 by a cosine schedule (default: 0.003).
    batch_size : int
        Samples per step (default: 64).
    seed : int
        Seed of the batch order and of the hint regressors (default: 0).
    weights : sequence of float or None
        Per-teacher logit weights, normalised to sum 1; None is the plain mean (default: None).
    soft_weight : float
        Weight of the soft-label loss, >= 0 (default: 1.0).
    hint_weight : float
        Weight of the hint loss, >= 0; not both weights 0 (default: 0.0).
    hint_layers : sequence of str or None
        Hint layers, named as :func:`~fedsqueeze.server.hints.as_chain_module` names them
        (for a student from ``build_student``: its layer names); None takes
        :func:`~fedsqueeze.server.hints.default_hint_layers` (default: None).

    Returns
    -------
    DistillResult

    Raises
    ------
    ValueError
        If an argument is out of range, or a hint layer is missing or cannot be matched.
    """
    start = time.perf_counter()
    teacher_list = [teachers] if isinstance(teachers, nn.Module) else list(teachers)
    _check_training_args(proxy_x, temperature=temperature, lr=lr, epochs=epochs, batch_size=batch_size)
    objective = _Objective(
        student, teacher_list, proxy_x, weights=weights, temperature=temperature, soft_weight=soft_weight,
        hint_weight=hint_weight, hint_layers=hint_layers, seed=seed,
    )  # fmt: skip
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    losses = _train(objective, params + objective.parameters(), proxy_x, epochs, lr, batch_size, seed)
    return DistillResult(losses, len(teacher_list), len(proxy_x), time.perf_counter() - start)


def _train(
    objective: _Objective, params: list[nn.Parameter], proxy_x: torch.Tensor, epochs: int, lr: float,
    batch_size: int, seed: int,
) -> list[float]:  # fmt: skip
    """Adam with a cosine schedule on shuffled proxy batches; the mean loss of each epoch."""
    device = params[0].device
    steps_per_epoch = math.ceil(len(proxy_x) / batch_size)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    objective.student.train()
    for _ in range(epochs):
        order = torch.randperm(len(proxy_x), generator=generator)
        total = 0.0
        for begin in range(0, len(proxy_x), batch_size):
            idx = order[begin : begin + batch_size]
            loss = objective(proxy_x[idx].to(device), idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(proxy_x))
    objective.student.eval()
    return losses
