"""The architecture string of a compact student: what a node needs to build the student the server trains.

A student built by :func:`~fedsqueeze.compact_arch.build.build_student` with norm pruning has
shapes fixed by its teacher's architecture and three settings: pruning chooses *which* filters
to keep, never how many, and factoring depends on shapes only. So the string
``"lenet5/mnist:compact(conv_rank=0,linear_rank=12,prune=0.5)"`` names the student exactly, and
:meth:`StudentArch.build` on a node gives the same state_dict names and shapes as the server's
student. The string arrives over the network: :func:`parse_arch` accepts only the canonical
form that :meth:`StudentArch.__str__` writes, with bounded numbers and known model and dataset
names, and never evaluates anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from fedsqueeze.compact_arch.build import CompactConfig, build_student
from fedsqueeze.models import DATASET_SHAPES, MODEL_NAMES, build_model

__all__ = ["ARCH_MAX_CHARS", "MAX_RANK", "StudentArch", "parse_arch"]

#: Longest architecture string accepted (the canonical form of the largest values is shorter).
ARCH_MAX_CHARS = 128
#: Largest rank in an architecture string (ranks are capped at each layer's full rank anyway).
MAX_RANK = 4096
#: Decimals of the prune ratio that the string keeps.
_PRUNE_DECIMALS = 6
_PATTERN = re.compile(
    r"(?P<model>[a-z0-9][a-z0-9-]{0,31})/(?P<dataset>[a-z0-9]{1,16}):compact\("
    r"conv_rank=(?P<conv>0|[1-9][0-9]{0,3}),linear_rank=(?P<linear>0|[1-9][0-9]{0,3}),"
    r"prune=(?P<prune>0|0\.[0-9]{0,5}[1-9])\)"
)
_EXAMPLE = "lenet5/mnist:compact(conv_rank=0,linear_rank=12,prune=0.5)"


@dataclass(frozen=True)
class StudentArch:
    """A compact student's architecture: its teacher's model and dataset, ranks and prune ratio.

    Parameters
    ----------
    model : str
        The teacher's model name, one of :data:`fedsqueeze.models.MODEL_NAMES`.
    dataset : str
        The dataset, one of :data:`fedsqueeze.models.DATASET_SHAPES`.
    conv_rank, linear_rank : int
        Rank of the factored conv and linear layers, 0 to :data:`MAX_RANK`; 0 keeps them dense.
    prune_ratio : float
        Fraction of conv filters and linear hidden units removed, in [0, 1), at most six decimals.

    Raises
    ------
    ValueError
        If a value is unknown or out of range.
    """

    model: str
    dataset: str
    conv_rank: int = 0
    linear_rank: int = 0
    prune_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"student architecture: unknown model {self.model!r}, expected one of {MODEL_NAMES}")
        if self.dataset not in DATASET_SHAPES:
            raise ValueError(
                f"student architecture: unknown dataset {self.dataset!r}, expected one of {tuple(DATASET_SHAPES)}"
            )
        for label, rank in (("conv_rank", self.conv_rank), ("linear_rank", self.linear_rank)):
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= MAX_RANK:
                raise ValueError(f"student architecture: {label} must be an integer in [0, {MAX_RANK}], got {rank!r}")
        ratio = self.prune_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"student architecture: prune ratio must be in [0, 1), got {ratio!r}")
        if round(float(ratio), _PRUNE_DECIMALS) != ratio:
            raise ValueError(f"student architecture: prune ratio {ratio!r} has more than {_PRUNE_DECIMALS} decimals")
        object.__setattr__(self, "prune_ratio", float(ratio))

    def __str__(self) -> str:
        """The canonical string, e.g. ``lenet5/mnist:compact(conv_rank=0,linear_rank=12,prune=0.5)``."""
        prune = f"{self.prune_ratio:.{_PRUNE_DECIMALS}f}".rstrip("0").rstrip(".")
        return (
            f"{self.model}/{self.dataset}:compact(conv_rank={self.conv_rank},"
            f"linear_rank={self.linear_rank},prune={prune})"
        )

    def compact_config(self) -> CompactConfig:
        """The :class:`CompactConfig` that builds this student (norm pruning, default dense layers)."""
        return CompactConfig(
            conv_rank=self.conv_rank or None, linear_rank=self.linear_rank or None, prune_ratio=self.prune_ratio
        )

    def build(self) -> nn.Sequential:
        """An FP32 student of this architecture, in training mode, with placeholder weights.

        It is built from a teacher initialised from a fixed seed (the global random state is
        left as it was); load the real weights with :func:`fedsqueeze.training.set_weights`.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            teacher = build_model(self.model, self.dataset)
        return build_student(teacher, self.compact_config()).train()


def parse_arch(text: str) -> StudentArch:
    """Read an architecture string in the canonical form of :meth:`StudentArch.__str__`.

    Parameters
    ----------
    text : str
        E.g. ``"lenet5/mnist:compact(conv_rank=0,linear_rank=12,prune=0.5)"``.

    Returns
    -------
    StudentArch

    Raises
    ------
    ValueError
        If ``text`` is not a string, longer than :data:`ARCH_MAX_CHARS`, not of the canonical
        form, or names an unknown model or dataset.
    """
    if not isinstance(text, str):
        raise ValueError(f"a student architecture must be a string, got {type(text).__name__}")
    if len(text) > ARCH_MAX_CHARS:
        raise ValueError(f"a student architecture string has at most {ARCH_MAX_CHARS} characters, got {len(text)}")
    match = _PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"bad student architecture {text!r}: expected the form {_EXAMPLE!r}")
    arch = StudentArch(
        match["model"], match["dataset"], int(match["conv"]), int(match["linear"]), float(match["prune"])
    )
    if str(arch) != text:  # e.g. a prune ratio whose float prints otherwise
        raise ValueError(f"bad student architecture {text!r}: its canonical form is {str(arch)!r}")
    return arch
