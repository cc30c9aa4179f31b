"""Activation matching (FitNets-style hints): a student's intermediate features regressed onto a teacher's.

Romero et al. 2015 train a thin student to predict a teacher's intermediate feature maps
through a small regressor. Here both networks are read as chains of layers
(:func:`~fedsqueeze.server.compact.to_chain`), a hint layer is named as in the student built by
:func:`~fedsqueeze.server.compact.build_student` (the teacher's layer name with '.' -> '_'), and
where the student's feature is narrower than the teacher's (pruned filters or units) a 1x1
convolution (or a linear map for flat features) widens it. The regressors are trained with the
student and then dropped: the student's architecture does not change.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedsqueeze.server.compact import LowRankConv2d, Tucker2Conv2d, to_chain

__all__ = ["FeatureHints", "as_chain_module", "default_hint_layers"]

_EVAL_BATCH = 128
_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid)
_CONVS = (nn.Conv2d, LowRankConv2d, Tucker2Conv2d)


def as_chain_module(model: nn.Module) -> nn.Sequential:
    """``model`` as a flat ``nn.Sequential`` of its chain layers (the same module objects).

    Layer names are :func:`~fedsqueeze.server.compact.to_chain`'s with '.' -> '_', the names
    :func:`~fedsqueeze.server.compact.build_student` gives, so a student built from a teacher
    and the teacher name their corresponding layers alike.
    """
    return nn.Sequential(OrderedDict((name.replace(".", "_"), layer) for name, layer in to_chain(model)))


def default_hint_layers(model: nn.Module) -> list[str]:
    """The output of each convolution block: the activation right after each conv (or the conv itself).

    Parameters
    ----------
    model : torch.nn.Module
        A model :func:`~fedsqueeze.server.compact.to_chain` can read.

    Returns
    -------
    list of str
        Layer names in :func:`as_chain_module`'s naming; empty for a model without convolutions.
    """
    chain = list(as_chain_module(model).named_children())
    names = []
    for i, (name, layer) in enumerate(chain):
        if isinstance(layer, _CONVS):
            after = chain[i + 1] if i + 1 < len(chain) else None
            names.append(after[0] if after is not None and isinstance(after[1], _ACTIVATIONS) else name)
    return names


def _run_collecting(
    chain: nn.Sequential, x: torch.Tensor, names: set[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The chain's output on ``x`` and the outputs of the layers in ``names``."""
    features: dict[str, torch.Tensor] = {}
    for name, layer in chain.named_children():
        x = layer(x)
        if name in names:
            features[name] = x
    return x, features


def _adapter(name: str, student: torch.Size, teacher: torch.Size) -> nn.Module:
    """Identity where the shapes agree, else a 1x1 conv (maps) or linear map (flat features) to the teacher's width."""
    if student == teacher:
        return nn.Identity()
    if len(student) == len(teacher) == 3 and student[1:] == teacher[1:]:
        return nn.Conv2d(student[0], teacher[0], 1, bias=False)
    if len(student) == len(teacher) == 1:
        return nn.Linear(student[0], teacher[0], bias=False)
    raise ValueError(
        f"hint layer {name!r}: student features {tuple(student)} cannot be mapped onto teacher features "
        f"{tuple(teacher)}; expected the same spatial size (C, H, W) or flat (F,) features"
    )


class FeatureHints:
    """Teacher features at the hint layers for every proxy sample, and the student's regressors onto them.

    Parameters
    ----------
    student : torch.nn.Module
        The student being trained (read through :func:`as_chain_module`; its modules are shared).
    teacher : torch.nn.Module
        The teacher whose features are the targets; not modified.
    layers : sequence of str
        Hint layers, named in both networks as :func:`as_chain_module` names them.
    proxy_x : torch.Tensor
        The proxy inputs; the teacher's features on them are computed once here.

    Raises
    ------
    ValueError
        If no layer is given, a layer is missing in either network, or the feature shapes
        cannot be matched by a 1x1 adapter.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: Sequence[str], proxy_x: torch.Tensor) -> None:
        self.layers = list(dict.fromkeys(layers))
        if not self.layers:
            raise ValueError("activation matching needs at least one hint layer")
        self.student = as_chain_module(student)
        teacher_chain = as_chain_module(teacher)
        for label, chain in (("student", self.student), ("teacher", teacher_chain)):
            names = [n for n, _ in chain.named_children()]
            missing = [n for n in self.layers if n not in names]
            if missing:
                raise ValueError(f"hint layers {missing} are not layers of the {label}; its layers are {names}")
        self.targets = self._teacher_features(teacher, teacher_chain, proxy_x)
        # Each layer's error relative to its features' mean square, so layers of different scale weigh alike
        self.scales = {n: float(t.pow(2).mean().clamp_min(1e-12)) for n, t in self.targets.items()}
        with torch.no_grad():
            _, probe = _run_collecting(self.student, proxy_x[:1], set(self.layers))
        self.adapters = nn.ModuleDict(
            {n: _adapter(n, probe[n].shape[1:], self.targets[n].shape[1:]) for n in self.layers}
        )

    @torch.inference_mode()
    def _teacher_features(self, teacher: nn.Module, chain: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
        was_training = teacher.training
        teacher.eval()
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        for begin in range(0, len(x), _EVAL_BATCH):
            _, features = _run_collecting(chain, x[begin : begin + _EVAL_BATCH], set(self.layers))
            for name, value in features.items():
                parts[name].append(value.float().cpu())
        teacher.train(was_training)
        return {name: torch.cat(values) for name, values in parts.items()}

    def parameters(self) -> list[nn.Parameter]:
        """The regressors' parameters, to be trained with the student's."""
        return list(self.adapters.parameters())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's logits on ``x`` and its features at the hint layers."""
        return _run_collecting(self.student, x, set(self.layers))

    def loss(self, features: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """Mean over hint layers of the squared error between adapted student and teacher features.

        Each layer's mean squared error is divided by the mean square of the teacher's features
        at that layer on the proxy set, so that layers of different scale weigh alike and 1.0
        is the loss of predicting zeros.

        Parameters
        ----------
        features : dict of str to torch.Tensor
            The student's features from :meth:`forward` on ``proxy_x[idx]``.
        idx : torch.Tensor
            Indices of those samples in the proxy set.
        """
        losses = [
            F.mse_loss(self.adapters[n](features[n]), self.targets[n][idx].to(features[n].device)) / self.scales[n]
            for n in self.layers
        ]
        return torch.stack(losses).mean()
