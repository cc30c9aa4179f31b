"""Export of a (compact) CNN for edge devices: self-contained TorchScript plus safetensors, int8 or fp32."""

from __future__ import annotations

import io
import json
import os
import statistics
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fedsqueeze.server.compact import FACTORED_LAYERS, count_parameters, to_chain
from fedsqueeze.server.compact.lsq import QUANT_LAYERS, LsqQuantizer

__all__ = [
    "ExportInfo",
    "FORMAT",
    "LATENCY_KEY",
    "LATENCY_NO_ONEDNN_KEY",
    "ONNX_LATENCY_KEY",
    "ONNX_PACKED_LATENCY_KEY",
    "batch1_latencies",
    "channel_normalisation",
    "export_and_measure",
    "export_compact",
    "file_accuracy",
    "flatten_ops",
    "latencies_us",
    "load_exported",
    "load_safetensors",
    "pack_bits",
    "quantize_per_channel",
    "raw_pixels",
    "unpack_bits",
]

#: Value of the ``format`` metadata key of exported safetensors files.
FORMAT = "fedsqueeze-compact/1"

#: Row keys of :func:`export_and_measure`: median batch-1 one-thread latency in microseconds,
#: with oneDNN (torch's default CPU convolutions) and with torch's native kernels.
LATENCY_KEY = "latency_us_batch1_1thread"
LATENCY_NO_ONEDNN_KEY = "latency_us_batch1_1thread_no_onednn"
#: Row key of the ONNX file's batch-1 latency in onnxruntime (one intra-op thread).
ONNX_LATENCY_KEY = "onnx_latency_us_batch1_1thread"
#: Row key of the packed ONNX file's batch-1 latency in onnxruntime (one intra-op thread).
ONNX_PACKED_LATENCY_KEY = "onnx_packed_latency_us_batch1_1thread"

_SUPPORTED_BITS = (8, 32)


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`export_compact` wrote.

    Attributes
    ----------
    name : str
        Stem of the files.
    bits : int
        Weight bits: 8 (int8 + per-output-channel fp32 scale) or 32 (fp32).
    num_parameters : int
        Parameters of the exported model (weights and biases).
    torchscript_path, safetensors_path : pathlib.Path
        The two files.
    torchscript_bytes, safetensors_bytes : int
        Their sizes in bytes.
    raw_torchscript_bytes : int
        Size that plain ``torch.jit.save`` gave before the archive was repacked (equal to
        ``torchscript_bytes`` when ``repack=False``).
    """

    name: str
    bits: int
    num_parameters: int
    torchscript_path: Path
    torchscript_bytes: int
    safetensors_path: Path
    safetensors_bytes: int
    raw_torchscript_bytes: int

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-ready values (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


# ----------------------------------------------------------------------------------------------
# Model -> flat list of primitive ops
# ----------------------------------------------------------------------------------------------


def _grid(quantizer: LsqQuantizer) -> list[float]:
    """``[step, lo, hi]`` of a per-tensor (activation) quantiser."""
    return [float(quantizer.step.detach()), float(quantizer.lo), float(quantizer.hi)]


def _quant_info(layer: nn.Module) -> dict[str, Any] | None:
    """Weight bits and learned steps of an LSQ layer (None for a float layer)."""
    if not isinstance(layer, QUANT_LAYERS):
        return None
    output = layer.output_quant
    return {
        "bits": layer.weight_quant.bits,
        "step": layer.weight_quant.step.detach().float().clone(),
        "input": _grid(layer.input_quant),
        "output": None if output is None else _grid(output),
    }


def _weight_op(layer: nn.Conv2d | nn.Linear) -> dict[str, Any]:
    weight = layer.weight.detach().float()
    bias = None if layer.bias is None else layer.bias.detach().float()
    quant = _quant_info(layer)
    if isinstance(layer, nn.Linear):
        return {"op": "linear", "weight": weight, "bias": bias, "quant": quant}
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        raise ValueError(
            f"only numeric zero padding can be exported, got padding={layer.padding!r}, mode={layer.padding_mode!r}"
        )
    return {
        "op": "conv2d",
        "weight": weight,
        "bias": bias,
        "stride": list(layer.stride),
        "padding": list(layer.padding),
        "dilation": list(layer.dilation),
        "groups": layer.groups,
        "quant": quant,
    }


def _fold_batchnorm(op: dict[str, Any], bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold an eval-mode batch norm into the preceding conv/linear op in place."""
    if op.get("quant") is not None:
        raise ValueError("a batch norm after a quantised layer cannot be folded: fold it before quantising")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a batch norm without running statistics cannot be folded for export")
    scale = (bn.running_var.detach().float() + bn.eps).rsqrt()
    shift = -bn.running_mean.detach().float() * scale
    if bn.affine:
        scale = scale * bn.weight.detach().float()
        shift = shift * bn.weight.detach().float() + bn.bias.detach().float()
    weight = op["weight"]
    op["weight"] = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    bias = op["bias"] if op["bias"] is not None else torch.zeros_like(scale)
    op["bias"] = bias * scale + shift


def flatten_ops(model: nn.Module) -> list[dict[str, Any]]:
    """Describe ``model`` as a list of primitive ops (conv2d, linear, relu, pools, flatten, ...).

    Factored layers become their dense parts, batch norms are folded into the preceding
    conv/linear, dropout and identity are dropped.

    Parameters
    ----------
    model : torch.nn.Module
        A model :func:`fedsqueeze.server.compact.to_chain` can read.

    Returns
    -------
    list of dict
        One dict per op with key ``"op"``; weight ops carry fp32 ``"weight"`` and ``"bias"``.
    """
    ops: list[dict[str, Any]] = []
    for name, layer in to_chain(model):
        if isinstance(layer, FACTORED_LAYERS):
            ops.extend(_weight_op(cast(nn.Conv2d | nn.Linear, sub)) for sub in layer.children())
        elif isinstance(layer, (nn.Conv2d, nn.Linear)):
            ops.append(_weight_op(layer))
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            if not ops or ops[-1]["op"] not in ("conv2d", "linear"):
                raise ValueError(f"batch norm {name} must directly follow a conv or linear layer to be exported")
            _fold_batchnorm(ops[-1], layer)
        elif isinstance(layer, (nn.ReLU, nn.Tanh, nn.Sigmoid)):
            ops.append({"op": type(layer).__name__.lower()})
        elif isinstance(layer, nn.MaxPool2d):
            if layer.return_indices:
                raise ValueError(f"max pool {name} returns indices; it cannot be exported")
            ops.append(
                {
                    "op": "max_pool2d",
                    "kernel_size": _pair(layer.kernel_size),
                    "stride": _pair(layer.stride or layer.kernel_size),
                    "padding": _pair(layer.padding),
                    "dilation": _pair(layer.dilation),
                    "ceil_mode": bool(layer.ceil_mode),
                }
            )
        elif isinstance(layer, nn.AvgPool2d):
            if layer.divisor_override is not None:
                raise ValueError(f"avg pool {name} with divisor_override cannot be exported")
            ops.append(
                {
                    "op": "avg_pool2d",
                    "kernel_size": _pair(layer.kernel_size),
                    "stride": _pair(layer.stride or layer.kernel_size),
                    "padding": _pair(layer.padding),
                    "ceil_mode": bool(layer.ceil_mode),
                    "count_include_pad": bool(layer.count_include_pad),
                }
            )
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                raise ValueError(f"flatten {name} must flatten dims 1..-1, got {layer.start_dim}..{layer.end_dim}")
            ops.append({"op": "flatten"})
        elif isinstance(layer, (nn.LogSoftmax, nn.Softmax)):
            ops.append({"op": "log_softmax" if isinstance(layer, nn.LogSoftmax) else "softmax", "dim": layer.dim})
        elif isinstance(layer, (nn.Dropout, nn.Identity)):
            continue
        else:
            raise ValueError(
                f"layer {name} ({type(layer).__name__}) cannot be exported; supported: Conv2d, Linear, the "
                "factored layers, BatchNorm after them, ReLU/Tanh/Sigmoid, Max/AvgPool2d, Flatten, (Log)Softmax, "
                "Dropout"
            )
    return ops


def _pair(value: int | Sequence[int]) -> list[int]:
    return [value, value] if isinstance(value, int) else [int(v) for v in value]


# ----------------------------------------------------------------------------------------------
# Quantisation and the self-contained module
# ----------------------------------------------------------------------------------------------


def quantize_per_channel(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantisation: ``weight ~= q * scale[:, None, ...]``.

    Parameters
    ----------
    weight : torch.Tensor
        Float weight whose first dimension is the output channel.
    bits : int
        Bits per value, 2..8 (default: 8); values lie in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``.

    Returns
    -------
    q : torch.Tensor
        int8 tensor of the weight's shape.
    scale : torch.Tensor
        float32 tensor of shape ``(out,)``.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 for integer quantisation, got {bits}")
    levels = 2 ** (bits - 1) - 1
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    scale = rows.abs().amax(1) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / scale[:, None]).clamp_(-levels, levels).to(torch.int8)
    return q.reshape(weight.shape), scale


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers of ``bits`` bits (2 or 4) into bytes, lowest bits first.

    Parameters
    ----------
    values : torch.Tensor
        Integers in ``[0, 2**bits - 1]``, any shape (read flat).
    bits : int
        2 or 4: four or two values per byte.

    Returns
    -------
    torch.Tensor
        uint8 ``(ceil(values.numel() * bits / 8),)``; padding values are 0.
    """
    if bits not in (2, 4):
        raise ValueError(f"only 2- and 4-bit values are packed, got bits={bits}")
    flat = values.reshape(-1).to(torch.int64)
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        found = f"{int(flat.min())}..{int(flat.max())}"
        raise ValueError(f"values must lie in [0, {2**bits - 1}] for {bits} bits, got {found}")
    per_byte = 8 // bits
    padded = F.pad(flat, (0, (-len(flat)) % per_byte)).view(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    return (padded << shifts).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values, as uint8."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return ((packed[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:count]


class _FlatNet(nn.Module):
    """A chain of primitive ops whose weights live in three packed buffers.

    ``q`` (int8, if used) holds the 8-bit weights, ``p`` (uint8, if used) the 2- and 4-bit weights
    packed two or four to a byte, ``f`` (float32) scales, activation steps, biases, fp32 weights and the input
    normalisation; ``forward`` slices them with constant offsets, so a traced copy is one module
    with one short ``code`` file and three tensors. Layers from LSQ training quantise their
    input (and the last its output) to the learned grid, as in training.
    """

    q: torch.Tensor
    p: torch.Tensor
    f: torch.Tensor

    def __init__(
        self, ops: list[dict[str, Any]], buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor], norm_ref: list[int]
    ) -> None:
        super().__init__()
        self.ops = ops
        self.norm_ref = norm_ref  # [offset, channels]: mean at offset, 1/std after it
        q, p, f = buffers
        # Only the integer buffers a model uses: an empty one would still cost a record in the archive
        if q.numel():
            self.register_buffer("q", q)
        if p.numel():
            self.register_buffer("p", p)
        self.register_buffer("f", f)

    def _floats(self, offset: int, count: int) -> torch.Tensor:
        return self.f[offset : offset + count]

    def _weight(self, ref: dict[str, Any]) -> torch.Tensor:
        shape, count = ref["shape"], ref["count"]
        if "scale" not in ref:
            return self._floats(ref["offset"], count).view(shape)
        if "packed_bits" in ref:
            bits = ref["packed_bits"]
            raw = self.p[ref["offset"] : ref["offset"] + ref["nbytes"]]
            values = (unpack_bits(raw, bits, count).to(torch.float32) - 2 ** (bits - 1)).view(shape)
        else:
            values = self.q[ref["offset"] : ref["offset"] + count].to(torch.float32).view(shape)
        scale = self._floats(ref["scale"], shape[0]).view([shape[0]] + [1] * (len(shape) - 1))
        return values * scale

    def _on_grid(self, x: torch.Tensor, grid: list[Any] | None) -> torch.Tensor:
        if grid is None:
            return x
        step = self._floats(grid[0], 1)
        return torch.clamp(torch.round(x / step), grid[1], grid[2]) * step

    def _weight_layer(self, x: torch.Tensor, op: dict[str, Any]) -> torch.Tensor:
        weight = self._weight(op["weight"])
        bias = None if op["bias"] is None else self._floats(op["bias"][0], op["bias"][1])
        x = self._on_grid(x, op.get("input"))
        if op["op"] == "linear":
            x = F.linear(x, weight, bias)
        else:
            x = F.conv2d(x, weight, bias, op["stride"], op["padding"], op["dilation"], op["groups"])
        return self._on_grid(x, op.get("output"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, channels = self.norm_ref
        mean = self._floats(offset, channels).view(1, channels, 1, 1)
        inv_std = self._floats(offset + channels, channels).view(1, channels, 1, 1)
        x = (x.to(torch.float32) / 255.0 - mean) * inv_std
        for op in self.ops:
            kind = op["op"]
            if kind in ("conv2d", "linear"):
                x = self._weight_layer(x, op)
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "tanh":
                x = torch.tanh(x)
            elif kind == "sigmoid":
                x = torch.sigmoid(x)
            elif kind == "max_pool2d":
                x = F.max_pool2d(x, op["kernel_size"], op["stride"], op["padding"], op["dilation"], op["ceil_mode"])
            elif kind == "avg_pool2d":
                x = F.avg_pool2d(
                    x, op["kernel_size"], op["stride"], op["padding"], op["ceil_mode"], op["count_include_pad"]
                )
            elif kind == "flatten":
                x = torch.flatten(x, 1)
            elif kind == "log_softmax":
                x = F.log_softmax(x, op["dim"])
            elif kind == "softmax":
                x = F.softmax(x, op["dim"])
            else:  # pragma: no cover - flatten_ops only emits the kinds above
                raise ValueError(f"unknown op {kind!r}")
        return x


def _as_channels(value: float | Sequence[float], label: str) -> list[float]:
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if not values:
        raise ValueError(f"{label} must be a number or a non-empty sequence of numbers")
    return values


class _Buffers:
    """The growing int8, packed uint8 and float32 buffers of :func:`_pack`."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {"q": [], "p": [], "f": []}
        self.sizes = {"q": 0, "p": 0, "f": 0}

    def put(self, kind: str, tensor: torch.Tensor) -> int:
        flat = tensor.reshape(-1)
        self.parts[kind].append(flat)
        offset = self.sizes[kind]
        self.sizes[kind] += flat.numel()
        return offset

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = torch.cat(self.parts["q"]) if self.parts["q"] else torch.zeros(0, dtype=torch.int8)
        p = torch.cat(self.parts["p"]) if self.parts["p"] else torch.zeros(0, dtype=torch.uint8)
        return q, p, torch.cat([t.float() for t in self.parts["f"]])


def _learned_weight(
    buffers: _Buffers, weight: torch.Tensor, quant: dict[str, Any], layer: int, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Store an LSQ layer's weight on its learned grid: packed at 2 and 4 bits, int8 otherwise."""
    bits, step = quant["bits"], quant["step"]
    half = 2 ** (bits - 1)
    q = torch.round(weight / step.view(-1, *([1] * (weight.dim() - 1)))).clamp_(-half, half - 1).to(torch.int64)
    ref: dict[str, Any] = {"count": q.numel(), "shape": list(weight.shape), "scale": buffers.put("f", step)}
    if bits in (2, 4):
        packed = pack_bits(q + half, bits)
        ref.update({"offset": buffers.put("p", packed), "packed_bits": bits, "nbytes": packed.numel()})
        tensors[f"{layer}.weight"] = packed
    else:
        ref["offset"] = buffers.put("q", q.to(torch.int8))
        tensors[f"{layer}.weight"] = q.to(torch.int8).contiguous()
    tensors[f"{layer}.scale"] = step.contiguous()
    return ref


def _pack(
    ops: list[dict[str, Any]], bits: int, mean: list[float], std: list[float]
) -> tuple[_FlatNet, dict[str, torch.Tensor]]:
    """Quantise and pack the op weights; return the flat module and per-layer tensors for safetensors.

    Ops of LSQ layers (with a ``"quant"`` entry) keep their learned grids whatever ``bits`` is.
    """
    buffers = _Buffers()
    tensors: dict[str, torch.Tensor] = {}
    norm_ref = [buffers.put("f", torch.tensor(mean)), len(mean)]
    buffers.put("f", 1.0 / torch.tensor(std))
    packed_ops: list[dict[str, Any]] = []
    layer = 0
    for op in ops:
        op = dict(op)
        if op["op"] in ("conv2d", "linear"):
            weight, bias, quant = op["weight"], op["bias"], op.pop("quant", None)
            shape = list(weight.shape)
            if quant is not None:
                op["weight"] = _learned_weight(buffers, weight, quant, layer, tensors)
                for key in ("input", "output"):
                    if quant[key] is not None:
                        step, lo, hi = quant[key]
                        op[key] = [buffers.put("f", torch.tensor([step])), lo, hi]
                        tensors[f"{layer}.{key}_step"] = torch.tensor([step], dtype=torch.float32)
            elif bits == 8:
                q, scale = quantize_per_channel(weight, 8)
                op["weight"] = {"offset": buffers.put("q", q), "count": q.numel(), "shape": shape}
                op["weight"]["scale"] = buffers.put("f", scale)
                tensors[f"{layer}.weight"] = q.contiguous()
                tensors[f"{layer}.scale"] = scale.contiguous()
            else:
                op["weight"] = {"offset": buffers.put("f", weight), "count": weight.numel(), "shape": shape}
                tensors[f"{layer}.weight"] = weight.contiguous()
            if bias is not None:
                op["bias"] = [buffers.put("f", bias), bias.numel()]
                tensors[f"{layer}.bias"] = bias.contiguous()
            op["layer"] = layer
            layer += 1
        packed_ops.append(op)
    return _FlatNet(packed_ops, buffers.tensors(), norm_ref), tensors


#: Records of a TorchScript archive that loading does not need: debug source ranges, and an id for
#: the serialiser's own bookkeeping.
_DROPPED_RECORDS = (".debug_pkl", ".data/serialization_id")


def _repack_zip(data: bytes) -> bytes:
    """Rewrite a TorchScript archive smaller: no debug records, one-letter root folder, deflate, no empty tensor.

    ``torch.jit.load`` reads such archives (checked by the tests); debug records only hold
    source ranges for error messages, and the root folder name (the file stem by default) is
    repeated in every record's local and central zip header, so a short one saves bytes on
    small models.
    """
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as zin,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout,
    ):
        for info in zin.infolist():
            if info.filename.endswith(_DROPPED_RECORDS):
                continue
            _, _, rest = info.filename.partition("/")
            zout.writestr(f"m/{rest}", zin.read(info.filename))
    return out.getvalue()


def _structure(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ops without tensors or offsets, for the safetensors metadata."""
    rows = []
    layer = 0
    for op in ops:
        row = {k: v for k, v in op.items() if k not in ("weight", "bias", "quant")}
        if op["op"] in ("conv2d", "linear"):
            row["layer"] = layer
            row["has_bias"] = op["bias"] is not None
            quant = op.get("quant")
            if quant is not None:  # the learned grid; its steps are the tensor "{layer}.scale"
                row["quant"] = {
                    "bits": quant["bits"], "shape": list(op["weight"].shape),
                    "input": quant["input"], "output": quant["output"],
                }  # fmt: skip
            layer += 1
        rows.append(row)
    return rows


def channel_normalisation(
    mean: float | Sequence[float], std: float | Sequence[float], channels: int
) -> tuple[list[float], list[float]]:
    """The normalisation as one mean and one std per input channel (a single value is repeated).

    Raises
    ------
    ValueError
        If the counts do not fit ``channels`` or a std is not positive.
    """
    mean_c, std_c = _as_channels(mean, "mean"), _as_channels(std, "std")
    if len(mean_c) != len(std_c) or len(mean_c) not in (1, channels):
        raise ValueError(f"mean and std need one value per input channel ({channels}), got {mean_c} and {std_c}")
    if any(s <= 0 for s in std_c):
        raise ValueError(f"std values must be positive, got {std_c}")
    return mean_c * (channels // len(mean_c)), std_c * (channels // len(std_c))


def _traced_archive(flat: nn.Module, example_input: torch.Tensor) -> bytes:
    """``torch.jit.save`` of ``flat`` traced on ``example_input``, as bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.x but works
        traced = torch.jit.trace(flat.eval(), example_input.to(torch.float32), check_trace=False, _store_inputs=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _write_safetensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    ops: list[dict[str, Any]],
    bits: int,
    mean: list[float],
    std: list[float],
) -> None:
    """The per-layer tensors, with the op structure, bits and normalisation as metadata."""
    metadata = {
        "format": FORMAT,
        "bits": str(bits),
        "ops": json.dumps(_structure(ops), separators=(",", ":")),  # compact: the header counts on small models
        "mean": json.dumps(mean),
        "std": json.dumps(std),
    }
    save_file(tensors, str(path), metadata=metadata)


def export_compact(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    bits: int = 8,
    example_input: torch.Tensor,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    name: str = "compact",
    repack: bool = True,
) -> ExportInfo:
    """Write ``model`` as a self-contained TorchScript file and as safetensors.

    The TorchScript module takes raw pixel values in [0, 255] (any dtype), shape
    ``(N, C, H, W)``, applies the training normalisation ``(x / 255 - mean) / std`` itself and
    returns logits; it is loaded with ``torch.jit.load`` alone (no fedsqueeze needed). With
    ``bits=8`` every conv/linear weight is stored as int8 with a float32 scale per output
    channel and dequantised in ``forward``; biases stay float32. All weights are packed into
    one int8 and one float32 tensor to keep the archive small, and with ``repack`` the archive
    is rewritten without debug records and with deflate compression.

    The safetensors file holds per-layer tensors ``"{i}.weight"`` (int8 or float32),
    ``"{i}.scale"`` (8-bit only) and ``"{i}.bias"``, with the op structure, normalisation and
    bits in its metadata; :func:`load_safetensors` rebuilds the model from it.

    Parameters
    ----------
    model : torch.nn.Module
        Student from :func:`~fedsqueeze.server.compact.build_student` or any model
        :func:`~fedsqueeze.server.compact.to_chain` can read (e.g. the FP32 teacher).
    out_dir : str or os.PathLike
        Folder for ``{name}.pt`` and ``{name}.safetensors`` (created if missing).
    bits : int
        8 (int8 weights) or 32 (fp32 weights) (default: 8).
    example_input : torch.Tensor
        Raw-pixel example batch ``(N, C, H, W)`` used for tracing (its values do not matter).
    mean, std : float or sequence of float
        Per-channel normalisation of the [0, 1]-scaled pixels used in training.
    name : str
        File stem (default: "compact").
    repack : bool
        Drop debug records and deflate the TorchScript archive (default: True).

    Returns
    -------
    ExportInfo
    """
    if bits not in _SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {_SUPPORTED_BITS}, got {bits}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise ValueError(
            f"example_input must be a (N, C, H, W) tensor, got {getattr(example_input, 'shape', example_input)!r}"
        )
    mean_c, std_c = channel_normalisation(mean, std, example_input.shape[1])
    ops = flatten_ops(model)
    flat, tensors = _pack(ops, bits, mean_c, std_c)
    raw = _traced_archive(flat, example_input)
    data = _repack_zip(raw) if repack else raw

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ts_path = out / f"{name}.pt"
    ts_path.write_bytes(data)
    st_path = out / f"{name}.safetensors"
    _write_safetensors(st_path, tensors, ops, bits, mean_c, std_c)
    return ExportInfo(
        name=name,
        bits=bits,
        num_parameters=count_parameters(model),
        torchscript_path=ts_path,
        torchscript_bytes=ts_path.stat().st_size,
        safetensors_path=st_path,
        safetensors_bytes=st_path.stat().st_size,
        raw_torchscript_bytes=len(raw),
    )


def load_safetensors(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the exported model from its safetensors file (server side; needs fedsqueeze).

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`export_compact`.

    Returns
    -------
    torch.nn.Module
        A module with the TorchScript file's forward: raw pixels in, logits out.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format={metadata.get('format')!r})")
    tensors = load_file(str(path))
    bits = int(metadata["bits"])
    ops: list[dict[str, Any]] = []
    for row in json.loads(metadata["ops"]):
        op = {k: v for k, v in row.items() if k not in ("layer", "has_bias")}
        if row["op"] in ("conv2d", "linear"):
            i = row["layer"]
            weight = tensors[f"{i}.weight"]
            if "quant" in row:
                op["quant"] = _learned_grid(row["quant"], tensors[f"{i}.scale"])
                values = _learned_values(row["quant"], weight)
                weight = values * op["quant"]["step"].view(-1, *([1] * (values.dim() - 1)))
            elif bits == 8:
                weight = weight.float() * tensors[f"{i}.scale"].view(-1, *([1] * (weight.dim() - 1)))
            op["weight"] = weight
            op["bias"] = tensors[f"{i}.bias"] if row["has_bias"] else None
        ops.append(op)
    flat, _ = _pack(ops, 32, json.loads(metadata["mean"]), json.loads(metadata["std"]))
    return flat.eval()


def _learned_grid(row: dict[str, Any], steps: torch.Tensor) -> dict[str, Any]:
    return {"bits": int(row["bits"]), "step": steps.float(), "input": row["input"], "output": row["output"]}


def _learned_values(row: dict[str, Any], stored: torch.Tensor) -> torch.Tensor:
    """The signed integer weights of an LSQ layer as float32, unpacked if 2- or 4-bit."""
    bits, shape = int(row["bits"]), [int(d) for d in row["shape"]]
    if bits in (2, 4):
        count = int(torch.tensor(shape).prod())
        return (unpack_bits(stored, bits, count).to(torch.float32) - 2 ** (bits - 1)).view(shape)
    return stored.to(torch.float32).view(shape)


# ----------------------------------------------------------------------------------------------
# Measuring exported files
# ----------------------------------------------------------------------------------------------


def raw_pixels(x: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]) -> torch.Tensor:
    """Undo the training normalisation: normalised images back to the uint8 pixels 0..255.

    Parameters
    ----------
    x : torch.Tensor
        Images ``(N, C, H, W)`` normalised as ``(pixels / 255 - mean) / std`` per channel.
    mean, std : float or sequence of float
        The normalisation, one value or one per channel.

    Returns
    -------
    torch.Tensor
        uint8 ``(N, C, H, W)``, the input an exported model takes.

    Raises
    ------
    ValueError
        If ``x`` is not ``(N, C, H, W)`` or the values are not integer pixels under this
        normalisation (wrong ``mean``/``std``).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (N, C, H, W) tensor, got {getattr(x, 'shape', x)!r}")
    channels = x.shape[1]
    mean_c, std_c = _as_channels(mean, "mean"), _as_channels(std, "std")
    if len(mean_c) not in (1, channels) or len(std_c) != len(mean_c):
        raise ValueError(f"mean and std need one value per channel ({channels}), got {mean_c} and {std_c}")
    m = torch.tensor(mean_c, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std_c, dtype=torch.float32).view(1, -1, 1, 1)
    raw = (x.float() * s + m) * 255.0
    rounded = raw.round()
    if len(raw) and float((raw - rounded).abs().max()) > 1e-3:
        raise ValueError("x does not hold integer pixels under this mean/std: it was normalised differently")
    return rounded.clamp_(0, 255).to(torch.uint8)


def load_exported(path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    """Load an exported TorchScript file on the CPU, in eval mode (``torch.jit``'s deprecation notice muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.x but works
        model = torch.jit.load(str(path), map_location="cpu")
    return model.eval()


@torch.inference_mode()
def file_accuracy(
    model: Callable[[torch.Tensor], torch.Tensor], raw_x: torch.Tensor, y: torch.Tensor, batch_size: int = 128
) -> float:
    """Accuracy of an exported model (raw pixels in, logits out) on ``raw_x``.

    Parameters
    ----------
    model : callable
        A loaded exported file (see :func:`load_exported`, or
        :class:`~fedsqueeze.server.onnx_export.OnnxRuntimeModel`) or anything with its forward.
    raw_x : torch.Tensor
        Raw pixels ``(N, C, H, W)``, e.g. from :func:`raw_pixels`.
    y : torch.Tensor
        Labels ``(N,)``.
    batch_size : int
        Images per forward pass; CPU batches above 128 spend their time in malloc (default: 128).

    Returns
    -------
    float
        Fraction of correct predictions (0.0 for no images).
    """
    if len(raw_x) != len(y):
        raise ValueError(f"{len(raw_x)} images but {len(y)} labels")
    correct = 0
    for i in range(0, len(raw_x), batch_size):
        correct += int((model(raw_x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, len(raw_x))


@torch.inference_mode()
def latencies_us(
    models: Mapping[str, tuple[nn.Module, torch.Tensor]], runs: int = 1000, block: int = 50
) -> dict[str, float]:
    """Median wall time of one forward pass per model, in microseconds (in the current thread setting).

    Models are timed in interleaved blocks of ``block`` single calls after a warm-up block
    each (which also lets the TorchScript profiling executor settle), so that load from
    other processes on a shared machine hits all of them alike. Call
    ``torch.set_num_threads(1)`` first for one-thread numbers.

    Parameters
    ----------
    models : Mapping of str to (torch.nn.Module, torch.Tensor)
        Name -> (model, its example input, e.g. one image for batch-1 latency).
    runs : int
        Timed calls per model, rounded down to whole blocks, at least one block (default: 1000).
    block : int
        Consecutive calls of one model (default: 50).

    Returns
    -------
    dict of str to float
        Name -> median microseconds per call.
    """
    if block < 1 or runs < 1:
        raise ValueError(f"runs and block must be >= 1, got runs={runs}, block={block}")
    times: dict[str, list[int]] = {key: [] for key in models}
    for model, example in models.values():
        for _ in range(block):
            model(example)
    for _ in range(max(1, runs // block)):
        for key, (model, example) in models.items():
            for _ in range(block):
                start = time.perf_counter_ns()
                model(example)
                times[key].append(time.perf_counter_ns() - start)
    return {key: statistics.median(values) / 1000.0 for key, values in times.items()}


def batch1_latencies(models: Mapping[str, tuple[nn.Module, torch.Tensor]], runs: int) -> dict[str, dict[str, float]]:
    """One-thread latency of each model, with oneDNN and with torch's native CPU kernels.

    oneDNN (mkldnn) convolutions can carry a fixed cost per call that dominates at batch 1,
    so both are timed (each with :func:`latencies_us`, all models interleaved). The torch
    thread count is set to 1 while timing and restored afterwards.

    Parameters
    ----------
    models : Mapping of str to (torch.nn.Module, torch.Tensor)
        Name -> (model, its example input: one image for batch-1 latency).
    runs : int
        Timed calls per model and setting, >= 1.

    Returns
    -------
    dict of str to dict
        Name -> ``{LATENCY_KEY: us, LATENCY_NO_ONEDNN_KEY: us}``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        default = latencies_us(models, runs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "TF32 acceleration on top of oneDNN ..." notice
            with torch.backends.mkldnn.flags(enabled=False):
                native = latencies_us(models, runs)
    finally:
        torch.set_num_threads(threads)
    return {key: {LATENCY_KEY: default[key], LATENCY_NO_ONEDNN_KEY: native[key]} for key in models}


def export_and_measure(
    models: Mapping[str, tuple[nn.Module, int]],
    out_dir: str | os.PathLike[str],
    *,
    raw_x: torch.Tensor,
    y: torch.Tensor,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    latency_runs: int = 0,
    also_timed: Mapping[str, tuple[nn.Module, torch.Tensor]] | None = None,
    onnx: bool = False,
) -> dict[str, dict[str, Any]]:
    """Export each model with :func:`export_compact`, load the TorchScript file back and measure it.

    Every file's test accuracy is measured on ``raw_x``; its batch-1 latency only when
    ``latency_runs`` > 0 (:func:`batch1_latencies`, on ``raw_x[:1]``), else nothing is timed
    and the latency fields are None. With ``onnx`` each model is also written as two ONNX files
    (:func:`~fedsqueeze.server.onnx_export.export_onnx`): ``{stem}.onnx`` (int8 weights in Q/DQ form,
    activation Q/DQ pairs for LSQ layers) and ``{stem}_packed.onnx`` (``fuse=True, packed=True``:
    weight-only, packed at each layer's bit width), each measured in onnxruntime (one thread),
    timed interleaved with the TorchScript files.

    Parameters
    ----------
    models : Mapping of str to (torch.nn.Module, int)
        File stem -> (model, weight bits 8 or 32).
    out_dir : str or os.PathLike
        Folder for the files.
    raw_x, y : torch.Tensor
        Raw test pixels ``(N, C, H, W)`` (see :func:`raw_pixels`) and their labels; ``raw_x[:1]``
        is also the example input for tracing and timing.
    mean, std : float or sequence of float
        The training normalisation, built into the files.
    latency_runs : int
        Timed calls per file and setting; 0 times nothing (default: 0).
    also_timed : Mapping of str to (torch.nn.Module, torch.Tensor) or None
        More models (e.g. the in-memory ones) timed interleaved with the files, so that load
        from other processes hits all alike (default: None).
    onnx : bool
        Also export and measure ONNX files; needs the ``onnx`` extra (default: False).

    Returns
    -------
    dict of str to dict
        File stem -> :meth:`ExportInfo.as_dict` plus ``file_test_accuracy``, :data:`LATENCY_KEY`
        and :data:`LATENCY_NO_ONEDNN_KEY`, with ``onnx`` also ``onnx_path``, ``onnx_bytes``,
        ``onnx_test_accuracy`` and :data:`ONNX_LATENCY_KEY`, and the same four ``onnx_packed_*``
        (:data:`ONNX_PACKED_LATENCY_KEY`) for the packed file; each ``also_timed`` name
        -> the two latency keys.
    """
    if latency_runs < 0:
        raise ValueError(f"latency_runs must be >= 0 (0 times nothing), got {latency_runs}")
    example = raw_x[:1].float()
    loaded: dict[str, nn.Module] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, (model, bits) in models.items():
        info = export_compact(model, out_dir, bits=bits, name=name, example_input=example, mean=mean, std=std)
        loaded[name] = load_exported(info.torchscript_path)
        rows[name] = {**info.as_dict(), "file_test_accuracy": file_accuracy(loaded[name], raw_x, y)}
    timed: dict[str, tuple[Any, Any]] = {name: (model, example) for name, model in loaded.items()}
    timed.update(also_timed or {})
    if onnx:
        timed.update(_export_onnx_files(models, out_dir, raw_x, y, mean, std, rows))
    latency: Mapping[str, Mapping[str, float | None]]
    if latency_runs:
        latency = batch1_latencies(timed, latency_runs)
    else:
        latency = {name: {LATENCY_KEY: None, LATENCY_NO_ONEDNN_KEY: None} for name in timed}
    for name in timed:
        stem, _, suffix = name.rpartition("#")
        if stem and suffix in _ONNX_LATENCY_KEYS:  # onnxruntime ignores the oneDNN switch: one figure
            rows[stem][_ONNX_LATENCY_KEYS[suffix]] = latency[name][LATENCY_KEY]
        else:
            rows.setdefault(name, {}).update(latency[name])
    return rows


# Timed ONNX runtimes are keyed "stem#onnx" and "stem#onnx_packed"; the part after "#" names the latency key
_ONNX_LATENCY_KEYS = {"onnx": ONNX_LATENCY_KEY, "onnx_packed": ONNX_PACKED_LATENCY_KEY}


def _export_onnx_files(
    models: Mapping[str, tuple[nn.Module, int]],
    out_dir: str | os.PathLike[str],
    raw_x: torch.Tensor,
    y: torch.Tensor,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    rows: dict[str, dict[str, Any]],
) -> dict[str, tuple[Any, np.ndarray]]:
    """Write and measure the Q/DQ and packed ONNX files into ``rows``; return them for timing, keyed ``stem#kind``."""
    # onnx_export builds on this module (flatten_ops, quantize_per_channel), so it is imported here
    from fedsqueeze.server.onnx_export import OnnxRuntimeModel, export_onnx

    timed: dict[str, tuple[Any, np.ndarray]] = {}
    shape = tuple(raw_x.shape[1:])
    for name, (model, bits) in models.items():
        for kind, options in (("onnx", {}), ("onnx_packed", {"fuse": True, "packed": True})):
            stem = name if kind == "onnx" else f"{name}_packed"
            info = export_onnx(model, out_dir, bits=bits, input_shape=shape, mean=mean, std=std, name=stem, **options)
            runtime = OnnxRuntimeModel(info.onnx_path)
            rows[name].update(
                {
                    f"{kind}_path": str(info.onnx_path),
                    f"{kind}_bytes": info.onnx_bytes,
                    f"{kind}_test_accuracy": file_accuracy(runtime, raw_x, y),
                    _ONNX_LATENCY_KEYS[kind]: None,
                }
            )
            timed[f"{name}#{kind}"] = (runtime, raw_x[:1].float().numpy())
    return timed
