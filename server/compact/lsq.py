"""Learned-step-size quantisation (LSQ, Esser et al. 2020) of a student's weights and activations.

A quantised layer is still an ``nn.Conv2d`` / ``nn.Linear`` (a subclass), so everything that reads
chains of layers (pruning, hints, export) reads it too. Its forward fake-quantises the input
activations (8 bits, one learned step per layer; unsigned after a ReLU, else signed) and the
weights (2..8 bits, one learned step per output channel), with straight-through rounding and
LSQ's gradient scaling of the steps, so the student can be fine-tuned (by distillation) to the
integer grid it is exported on. The last weight layer also quantises its output (the logits), so
that an integer-only runtime reproduces the model exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedsqueeze.compact_arch.chain import to_chain
from fedsqueeze.compact_arch.layers import FACTORED_LAYERS

__all__ = ["LsqQuantizer", "QuantConv2d", "QuantLinear", "QUANT_LAYERS", "quantize_student", "weight_bits_of"]

_SUPPORTED_WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
_STEP_GRID = torch.linspace(0.05, 1.0, 40)  # fractions of max|x| / hi tried when initialising a step


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with an identity gradient (straight-through estimator)."""
    return (x.round() - x).detach() + x


def _grad_scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient times ``scale`` in the backward pass."""
    return (x - x * scale).detach() + x * scale


class LsqQuantizer(nn.Module):
    """Fake quantiser with a learned step: ``clamp(round(x / step), lo, hi) * step``.

    Parameters
    ----------
    bits : int
        Bits of the integer grid, 2..8.
    signed : bool
        Grid ``[-2**(bits-1), 2**(bits-1) - 1]`` if True, else ``[0, 2**bits - 1]``.
    channels : int or None
        One step per slice along dim 0 (per output channel of a weight) if given, else one step.
    """

    def __init__(self, bits: int, signed: bool, channels: int | None = None) -> None:
        super().__init__()
        if bits not in _SUPPORTED_WEIGHT_BITS:
            raise ValueError(f"bits must be one of {_SUPPORTED_WEIGHT_BITS}, got {bits!r}")
        self.bits, self.signed = int(bits), bool(signed)
        self.lo: int = -(2 ** (bits - 1)) if signed else 0
        self.hi: int = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.channels = channels
        self.step = nn.Parameter(torch.ones(channels if channels is not None else ()))

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        return self.step.view(-1, *([1] * (x.dim() - 1))) if self.channels is not None else self.step

    @torch.no_grad()
    def initialise(self, x: torch.Tensor) -> None:
        """Set the step(s) to the grid value of minimum squared quantisation error on ``x``."""
        rows = x.detach().float().reshape(x.shape[0], -1) if self.channels is not None else x.detach().reshape(1, -1)
        if self.channels is not None and rows.shape[0] != self.channels:
            raise ValueError(f"expected {self.channels} channels along dim 0, got {rows.shape[0]}")
        top = rows.abs().amax(1).clamp_min(1e-8) / self.hi
        best, best_err = top.clone(), torch.full_like(top, math.inf)
        for fraction in _STEP_GRID:
            step = (top * fraction)[:, None]
            err = ((rows / step).round().clamp(self.lo, self.hi) * step - rows).pow(2).sum(1)
            better = err < best_err
            best = torch.where(better, step[:, 0], best)
            best_err = torch.where(better, err, best_err)
        self.step.copy_(best if self.channels is not None else best[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LSQ's step gradient scale 1 / sqrt(values per step * hi): weights per channel, activations per sample
        per_step = x.numel() / self.channels if self.channels is not None else x[0].numel()
        step = _grad_scaled(self.step, 1.0 / math.sqrt(max(per_step, 1.0) * self.hi))
        if self.channels is not None:
            step = step.view(-1, *([1] * (x.dim() - 1)))
        return _round_ste(torch.clamp(x / step, self.lo, self.hi)) * step

    @torch.no_grad()
    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """The integer grid values of ``x`` (int64), as the forward pass rounds them."""
        return torch.clamp(torch.round(x / self._view(x)), self.lo, self.hi).to(torch.int64)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, channels={self.channels}"


class _QuantMixin:
    """Fake-quantised input, weight and (for the last layer) output of a conv or linear layer."""

    weight_quant: LsqQuantizer
    input_quant: LsqQuantizer
    output_quant: LsqQuantizer | None

    def _attach(self, out_channels: int, weight_bits: int, input_signed: bool, act_bits: int) -> None:
        self.weight_quant = LsqQuantizer(weight_bits, signed=True, channels=out_channels)
        self.input_quant = LsqQuantizer(act_bits, signed=input_signed)
        self.output_quant = None

    def _quantised(
        self, x: torch.Tensor, weight: torch.Tensor, run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        out = run(self.input_quant(x), self.weight_quant(weight))
        return out if self.output_quant is None else self.output_quant(out)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """An ``nn.Conv2d`` whose input, weight (and optionally output) are LSQ fake-quantised."""

    @classmethod
    def from_float(cls, layer: nn.Conv2d, weight_bits: int, input_signed: bool, act_bits: int = 8) -> QuantConv2d:
        new = cls(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,  # type: ignore[arg-type]
            layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,  # type: ignore[arg-type]
        )  # fmt: skip
        new.load_state_dict(layer.state_dict())
        new._attach(layer.out_channels, weight_bits, input_signed, act_bits)
        return new.to(layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantised(x, self.weight, lambda xq, wq: self._conv_forward(xq, wq, self.bias))


class QuantLinear(_QuantMixin, nn.Linear):
    """An ``nn.Linear`` whose input, weight (and optionally output) are LSQ fake-quantised."""

    @classmethod
    def from_float(cls, layer: nn.Linear, weight_bits: int, input_signed: bool, act_bits: int = 8) -> QuantLinear:
        new = cls(layer.in_features, layer.out_features, layer.bias is not None)
        new.load_state_dict(layer.state_dict())
        new._attach(layer.out_features, weight_bits, input_signed, act_bits)
        return new.to(layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantised(x, self.weight, lambda xq, wq: F.linear(xq, wq, self.bias))


#: The quantised layer types (subclasses of ``nn.Conv2d`` and ``nn.Linear``).
QUANT_LAYERS = (QuantConv2d, QuantLinear)

_NON_NEGATIVE_KEEPING = (nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)


def _weight_slots(student: nn.Module) -> list[tuple[str, nn.Module, str, bool]]:
    """(name, parent, attribute, input is non-negative) of every conv/linear in chain order."""
    slots: list[tuple[str, nn.Module, str, bool]] = []
    non_negative = False
    for name, layer in to_chain(student):
        if isinstance(layer, FACTORED_LAYERS):
            for sub_name in dict(layer.named_children()):
                slots.append((f"{name}.{sub_name}", layer, sub_name, non_negative))
                non_negative = False
        elif isinstance(layer, (nn.Conv2d, nn.Linear)):
            parent, attr = _parent_of(student, name)
            slots.append((name, parent, attr, non_negative))
            non_negative = False
        elif isinstance(layer, nn.ReLU):
            non_negative = True
        elif not isinstance(layer, _NON_NEGATIVE_KEEPING):
            non_negative = False
    return slots


def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _bits_for(name: str, weight_bits: int | Mapping[str, int], default: int) -> int:
    if isinstance(weight_bits, int):
        return weight_bits
    top = name.split(".")[0]
    return int(weight_bits.get(name, weight_bits.get(top, default)))


def quantize_student(
    student: nn.Module,
    calibration_x: torch.Tensor,
    weight_bits: int | Mapping[str, int] = 8,
    act_bits: int = 8,
    default_bits: int = 8,
) -> nn.Module:
    """A copy of ``student`` with every conv/linear replaced by its LSQ-quantised form, steps calibrated.

    Each layer's input step is set to minimise the squared quantisation error of its inputs on
    ``calibration_x`` (the float model's activations), each weight step likewise per output
    channel; before any fine-tuning this is post-training quantisation. The last weight layer
    also quantises its output (8 bits, signed).

    Parameters
    ----------
    student : torch.nn.Module
        A float student (an ``nn.Sequential`` from ``build_student``, or anything ``to_chain`` reads);
        not modified.
    calibration_x : torch.Tensor
        A batch of inputs ``(N, C, H, W)`` (a few hundred proxy images suffice).
    weight_bits : int or Mapping of str to int
        Weight bits for every layer, or per layer keyed by chain name (``"fc2"``, or
        ``"fc2.reduce"`` for one part of a factored layer); 2..8.
    act_bits : int
        Activation bits, 2..8 (default: 8).
    default_bits : int
        Bits of layers a mapping does not name (default: 8).

    Returns
    -------
    torch.nn.Module
        The quantised copy, in eval mode.

    Raises
    ------
    ValueError
        If a bit width is out of range or a mapping names an unknown layer.
    """
    model = copy.deepcopy(student).eval()
    slots = _weight_slots(model)
    if not slots:
        raise ValueError("the student has no conv or linear layer to quantise")
    if not isinstance(weight_bits, int):
        known = {n for n, *_ in slots} | {n.split(".")[0] for n, *_ in slots}
        unknown = sorted(set(weight_bits) - known)
        if unknown:
            raise ValueError(f"weight_bits names unknown layers {unknown}; layers are {sorted(known)}")
    inputs = _calibration_inputs(model, [getattr(p, a) for _, p, a, _ in slots], calibration_x)
    for (name, parent, attr, non_negative), x in zip(slots, inputs, strict=True):
        layer = getattr(parent, attr)
        bits = _bits_for(name, weight_bits, default_bits)
        kind = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        new = kind.from_float(layer, bits, input_signed=not non_negative, act_bits=act_bits)
        new.weight_quant.initialise(new.weight)
        new.input_quant.initialise(x)
        setattr(parent, attr, new)
    last_parent, last_attr = slots[-1][1], slots[-1][2]
    last = getattr(last_parent, last_attr)
    logits = _last_output(model, last, calibration_x)
    last.output_quant = LsqQuantizer(8, signed=True)
    last.output_quant.initialise(logits)
    return model.eval()


@torch.no_grad()
def _calibration_inputs(model: nn.Module, layers: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(layers)
    ]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[i] for i in range(len(layers))]


@torch.no_grad()
def _last_output(model: nn.Module, last: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    try:
        model(x)
    finally:
        hook.remove()
    return seen[0]


def weight_bits_of(model: nn.Module) -> dict[str, int]:
    """Weight bits of each quantised layer of ``model``, keyed by module name (empty if none is quantised)."""
    return {name: m.weight_quant.bits for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}
