"""ONNX export of a (compact) CNN for edge runtimes: int8 weights in QDQ form, run by onnxruntime.

The graph is written op by op from :func:`~fedsqueeze.server.export.flatten_ops`, the same op
list the TorchScript export packs, so both files compute the same function: raw pixels in,
``(x / 255 - mean) / std`` inside, logits out. With 8 bits every conv/linear weight is stored
as an int8 initializer with one float32 scale per output channel and dequantised by a
``DequantizeLinear`` node (ONNX's QDQ form, which ONNX Runtime and TensorRT read); biases
stay float32. Needs the optional ``onnx`` package (``pip install fedsqueeze[onnx]``).

With ``packed=True`` the file is written for size and batch-1 speed instead: weights only are
quantised (an LSQ layer's activation grids are dropped), each weight is stored at its bit width
(2-bit values four to a byte, 3- and 4-bit two to a byte, 5..8-bit one per byte) and rebuilt by
plain ONNX ops whose inputs are all initializers (BitShift, Mod, Cast, Sub, Reshape, Mul), which
onnxruntime folds into float32 constants when the session loads under its default options; names
are short and nothing but the graph is stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsqueeze.server.compact import count_parameters
from fedsqueeze.server.export import FORMAT, channel_normalisation, flatten_ops, pack_bits, quantize_per_channel
from fedsqueeze.server.onnx_fuse import fold_input_normalisation, merge_factored

__all__ = ["INPUT_NAME", "OPSET", "OUTPUT_NAME", "OnnxExportInfo", "OnnxRuntimeModel", "export_onnx"]

#: ONNX operator set of the exported graphs (per-axis DequantizeLinear needs >= 13).
OPSET = 13
#: Name of the graph's input, float32 raw pixels ``(N, C, H, W)`` in [0, 255].
INPUT_NAME = "pixels"
#: Name of the graph's output, the logits ``(N, classes)``.
OUTPUT_NAME = "logits"

_SUPPORTED_BITS = (8, 32)
_FLOAT = 1  # onnx.TensorProto.FLOAT, the ``to`` of a Cast
_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


@dataclass(frozen=True)
class OnnxExportInfo:
    """What :func:`export_onnx` wrote.

    Attributes
    ----------
    name : str
        Stem of the file.
    bits : int
        Weight bits: 8 (int8 + per-output-channel float32 scale, QDQ) or 32 (float32).
    num_parameters : int
        Parameters of the exported model.
    onnx_path : pathlib.Path
        The file.
    onnx_bytes : int
        Its size in bytes.
    """

    name: str
    bits: int
    num_parameters: int
    onnx_path: Path
    onnx_bytes: int


class _Graph:
    """Collects ONNX nodes and initializers; every node gets one fresh output name.

    With ``packed`` the weights are stored packed (see :func:`_packed_weight`) and every name is
    a short counter instead of a readable one (nodes then have no name at all): fewer bytes.
    """

    def __init__(self, packed: bool = False) -> None:
        from onnx import helper, numpy_helper  # the optional dependency, imported on use

        self.helper, self.numpy_helper = helper, numpy_helper
        self.packed = packed
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._shared: dict[str, str] = {}

    def _short_name(self) -> str:
        return np.base_repr(len(self.nodes) + len(self.initializers), 36).lower()

    def const(self, name: str, array: np.ndarray) -> str:
        name = self._short_name() if self.packed else name
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def shared_const(self, key: str, array: np.ndarray) -> str:
        """One initializer per ``key``, however often it is asked for."""
        if key not in self._shared:
            self._shared[key] = self.const(key, array)
        return self._shared[key]

    def node(self, op_type: str, inputs: Sequence[str], **attributes: Any) -> str:
        if self.packed:
            output = self._short_name()
            self.nodes.append(self.helper.make_node(op_type, list(inputs), [output], **attributes))
            return output
        output = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [output], name=output, **attributes))
        return output


def _weight(graph: _Graph, layer: int, op: dict[str, Any], bits: int) -> str:
    """The weight as a float32 initializer, or as int8 + scale behind a DequantizeLinear.

    An LSQ layer's weight is stored on its learned grid (values of 2..8 bits in int8), whatever ``bits`` is.
    """
    weight, quant = op["weight"], op.get("quant")
    if quant is None and bits == 32:
        return graph.const(f"layer{layer}.weight", weight.numpy().astype(np.float32))
    if quant is None:
        q, scale = quantize_per_channel(weight, 8)
    else:
        scale = quant["step"].float()
        half = 2 ** (quant["bits"] - 1)
        q = torch.round(weight / scale.view(-1, *([1] * (weight.dim() - 1)))).clamp(-half, half - 1).to(torch.int8)
    inputs = [
        graph.const(f"layer{layer}.weight_int8", q.numpy()),
        graph.const(f"layer{layer}.scale", scale.numpy().astype(np.float32)),
        graph.const(f"layer{layer}.zero_point", np.zeros(q.shape[0], dtype=np.int8)),
    ]
    return graph.node("DequantizeLinear", inputs, axis=0)


def _weight_only(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LSQ ops as float ops that remember their weight grid (``"grid"``); activation grids dropped.

    ``"grid"`` holds the integer ``codes`` (int64, the weight's shape), the ``scale`` (float32,
    broadcastable to the weight: one step per output channel) and the ``bits``; ``"weight"``
    becomes ``codes * scale``, the weight the LSQ layer computes with.
    """
    out: list[dict[str, Any]] = []
    for op in ops:
        quant = op.get("quant")
        if quant is None:
            out.append(op)
            continue
        weight = op["weight"]
        scale = quant["step"].float().view(-1, *([1] * (weight.dim() - 1)))
        half = 2 ** (quant["bits"] - 1)
        codes = torch.round(weight / scale).clamp(-half, half - 1).to(torch.int64)
        grid = {"codes": codes, "scale": scale, "bits": int(quant["bits"])}
        out.append({**op, "quant": None, "weight": codes * scale, "grid": grid})
    return out


def _unpacked(graph: _Graph, codes: torch.Tensor, bits: int) -> str:
    """Signed ``bits``-bit (2 or 4) codes stored packed in uint8, rebuilt as float32 in their shape."""
    half, per_byte = 2 ** (bits - 1), 8 // bits
    packed = pack_bits(codes + half, bits).numpy().reshape(-1, 1)
    shifts = graph.shared_const(f"shifts{bits}", np.arange(per_byte, dtype=np.uint8) * bits)
    x = graph.node("BitShift", [graph.const("packed", packed), shifts], direction="RIGHT")  # (bytes, per_byte)
    x = graph.node("Mod", [x, graph.shared_const(f"mod{bits}", np.array(2**bits, dtype=np.uint8))])
    x = graph.node("Cast", [x], to=_FLOAT)
    x = graph.node("Sub", [x, graph.shared_const(f"half{bits}", np.array(half, dtype=np.float32))])
    if packed.size * per_byte != codes.numel():  # the last byte holds padding: drop it
        x = graph.node("Reshape", [x, graph.shared_const("flat", np.array([-1], dtype=np.int64))])
        ends = graph.const("ends", np.array([codes.numel()], dtype=np.int64))
        x = graph.node("Slice", [x, graph.shared_const("zero", np.array([0], dtype=np.int64)), ends])
    return graph.node("Reshape", [x, graph.const("shape", np.array(codes.shape, dtype=np.int64))])


def _packed_weight(graph: _Graph, op: dict[str, Any], bits: int) -> str:
    """The weight at its bit width, dequantised by constant ops (folded by onnxruntime at load).

    LSQ layers keep their learned grid (``"grid"`` from :func:`_weight_only`); float layers are
    quantised per output channel to int8 if ``bits`` is 8 and stored as float32 if it is 32.
    """
    grid = op.get("grid")
    if grid is None and bits == 32:
        return graph.const("weight", op["weight"].numpy().astype(np.float32))
    if grid is None:
        q, scale = quantize_per_channel(op["weight"], 8)
        shape = (-1, *([1] * (q.dim() - 1)))
        grid = {"codes": q.to(torch.int64), "scale": scale.float().reshape(shape), "bits": 8}
    codes, grid_bits = grid["codes"], grid["bits"]
    if grid_bits > 4:
        x = graph.const("int8", codes.to(torch.int8).numpy())
        x = graph.node("Cast", [x], to=_FLOAT)
    else:
        x = _unpacked(graph, codes, 2 if grid_bits <= 2 else 4)
    return graph.node("Mul", [x, graph.const("scale", grid["scale"].numpy().astype(np.float32))])


def _on_grid(graph: _Graph, x: str, grid: list[float] | None, name: str) -> str:
    """QuantizeLinear + DequantizeLinear of an activation onto an LSQ layer's 8-bit grid (QDQ form)."""
    if grid is None:
        return x
    step, lo, hi = grid
    if (lo, hi) not in ((-128, 127), (0, 255)):
        raise ValueError(f"{name}: ONNX QDQ activations must be 8-bit (grid -128..127 or 0..255), got {lo}..{hi}")
    zero = np.array(0, dtype=np.int8 if lo < 0 else np.uint8)
    scale = graph.const(f"{name}.step", np.array(step, dtype=np.float32))
    zero_point = graph.const(f"{name}.zero_point", zero)
    quantised = graph.node("QuantizeLinear", [x, scale, zero_point])
    return graph.node("DequantizeLinear", [quantised, scale, zero_point])


def _weight_node(graph: _Graph, x: str, op: dict[str, Any], layer: int, bits: int) -> str:
    quant = op.get("quant")
    if quant is not None:
        x = _on_grid(graph, x, quant["input"], f"layer{layer}.input")
    weight = _packed_weight(graph, op, bits) if graph.packed else _weight(graph, layer, op, bits)
    inputs = [x, weight]
    if op["bias"] is not None:
        inputs.append(graph.const(f"layer{layer}.bias", op["bias"].numpy().astype(np.float32)))
    if op["op"] == "linear":
        out = graph.node("Gemm", inputs, transB=1)
    else:
        pads = list(op["padding"]) * 2  # ONNX: begins of both axes, then ends
        kwargs = {"strides": op["stride"], "pads": pads, "dilations": op["dilation"], "group": op["groups"]}
        out = graph.node("Conv", inputs, **kwargs)
    return out if quant is None else _on_grid(graph, out, quant["output"], f"layer{layer}.output")


def _pool_node(graph: _Graph, x: str, op: dict[str, Any]) -> str:
    common = {
        "kernel_shape": op["kernel_size"],
        "strides": op["stride"],
        "pads": list(op["padding"]) * 2,
        "ceil_mode": int(op["ceil_mode"]),
    }
    if op["op"] == "max_pool2d":
        return graph.node("MaxPool", [x], dilations=op["dilation"], **common)
    return graph.node("AveragePool", [x], count_include_pad=int(op["count_include_pad"]), **common)


def _op_node(graph: _Graph, x: str, op: dict[str, Any], layer: int, bits: int) -> str:
    kind = op["op"]
    if kind in ("conv2d", "linear"):
        return _weight_node(graph, x, op, layer, bits)
    if kind in _ACTIVATIONS:
        return graph.node(_ACTIVATIONS[kind], [x])
    if kind in ("max_pool2d", "avg_pool2d"):
        return _pool_node(graph, x, op)
    if kind == "flatten":
        return graph.node("Flatten", [x], axis=1)
    if kind in ("log_softmax", "softmax"):
        axis = 1 if op["dim"] is None else int(op["dim"])
        return graph.node("LogSoftmax" if kind == "log_softmax" else "Softmax", [x], axis=axis)
    raise ValueError(f"op {kind!r} has no ONNX form")  # pragma: no cover - flatten_ops emits only the kinds above


def _normalise_input(graph: _Graph, mean: list[float], std: list[float]) -> str:
    """``(pixels / 255 - mean) * (1 / std)``, computed as the TorchScript export does."""
    channels = len(mean)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1)
    inv_std = (1.0 / torch.tensor(std, dtype=torch.float32)).view(1, channels, 1, 1)
    scaled = graph.node("Div", [INPUT_NAME, graph.const("input.255", np.array(255.0, dtype=np.float32))])
    centred = graph.node("Sub", [scaled, graph.const("input.mean", mean_t.numpy())])
    return graph.node("Mul", [centred, graph.const("input.inv_std", inv_std.numpy())])


def export_onnx(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    bits: int = 8,
    input_shape: Sequence[int],
    mean: float | Sequence[float],
    std: float | Sequence[float],
    name: str = "compact",
    fuse: bool = False,
    packed: bool = False,
) -> OnnxExportInfo:
    """Write ``model`` as ``{name}.onnx``: raw pixels in, logits out, int8 (QDQ) or float32 weights.

    The graph's input ``pixels`` is float32 ``(N, C, H, W)`` with values 0..255 (the batch
    size is free); it applies the training normalisation itself and returns the logits as
    ``logits``. Batch norms are folded and factored layers become their dense parts, as in
    :func:`~fedsqueeze.server.export.export_compact`, and the int8 weights and scales are the
    same as there, so the two files agree up to float rounding. onnxruntime alone runs the
    file (no torch or fedsqueeze needed).

    Parameters
    ----------
    model : torch.nn.Module
        Student from :func:`~fedsqueeze.server.compact.build_student` or any model
        :func:`~fedsqueeze.server.compact.to_chain` can read.
    out_dir : str or os.PathLike
        Folder for the file (created if missing).
    bits : int
        8 (int8 weights, DequantizeLinear) or 32 (float32 weights) (default: 8).
    input_shape : sequence of int
        ``(C, H, W)`` of one image.
    mean, std : float or sequence of float
        Per-channel normalisation of the [0, 1]-scaled pixels used in training.
    name : str
        File stem (default: "compact").
    fuse : bool
        Fewer nodes for batch-1 speed (:mod:`~fedsqueeze.server.onnx_fuse`): factored pairs
        merged where that adds few weights, the input normalisation folded into the first
        conv; the same function up to float rounding (default: False).
    packed : bool
        Weight-only quantisation with the weights packed at their bit width (LSQ layers at their
        learned 2..8 bits, other layers at ``bits``) and rebuilt by constant ops that onnxruntime
        folds when the session loads, so the graph runs as a float32 one; short names, no
        metadata but ``format`` and ``bits``. An LSQ layer's activation grids are not applied, so
        the file computes the student's weights on float activations (default: False: int8
        containers and, for LSQ layers, activation Q/DQ pairs).

    Returns
    -------
    OnnxExportInfo

    Raises
    ------
    ValueError
        If ``bits``, ``input_shape`` or the normalisation is invalid, or a layer cannot be exported.
    ImportError
        If the ``onnx`` package is not installed.
    """
    if bits not in _SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {_SUPPORTED_BITS}, got {bits}")
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) of positive sizes, got {tuple(input_shape)}")
    import onnx

    mean_c, std_c = channel_normalisation(mean, std, int(input_shape[0]))
    graph = _Graph(packed)
    ops = _weight_only(flatten_ops(model)) if packed else flatten_ops(model)
    how, shift = "none", [0.0] * len(mean_c)
    if fuse:
        ops, how, shift = fold_input_normalisation(merge_factored(ops), mean_c, std_c)
    x = _graph_input(graph, how, shift, mean_c, std_c)
    layer = 0
    for op in ops:
        x = _op_node(graph, x, op, layer, bits)
        layer += op["op"] in ("conv2d", "linear")
    _name_output(graph, x)
    proto = _model_proto(graph, [int(d) for d in input_shape], bits, mean_c, std_c)
    onnx.checker.check_model(proto)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.onnx"
    path.write_bytes(proto.SerializeToString())
    return OnnxExportInfo(name, bits, count_parameters(model), path, path.stat().st_size)


def _graph_input(graph: _Graph, how: str, shift: list[float], mean: list[float], std: list[float]) -> str:
    """What the first layer reads: the normalised pixels, the shifted pixels or the pixels (see ``how``)."""
    if how == "none":
        return _normalise_input(graph, mean, std)
    if how == "shift":
        shift_const = np.array(shift, dtype=np.float32).reshape(1, -1, 1, 1)
        return graph.node("Sub", [INPUT_NAME, graph.const("input.shift", shift_const)])
    return INPUT_NAME


def _name_output(graph: _Graph, x: str) -> None:
    """Make ``x`` the graph's output :data:`OUTPUT_NAME`."""
    if graph.packed and graph.nodes and graph.nodes[-1].output[0] == x:
        graph.nodes[-1].output[0] = OUTPUT_NAME  # the last op writes the output itself: no Identity node
    else:
        graph.nodes.append(graph.helper.make_node("Identity", [x], [OUTPUT_NAME], name=OUTPUT_NAME))


def _model_proto(graph: _Graph, input_shape: list[int], bits: int, mean: list[float], std: list[float]) -> Any:
    from onnx import TensorProto

    helper = graph.helper
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *input_shape])]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", "classes"])]
    body = helper.make_graph(graph.nodes, "g" if graph.packed else "fedsqueeze_compact", inputs, outputs,
                             graph.initializers)  # fmt: skip
    # IR version 8 with opset 13: readable by onnxruntime >= 1.10 and TensorRT 8
    proto = helper.make_model(body, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    proto.producer_name = "fedsqueeze"
    metadata = {"format": FORMAT, "bits": str(bits), "mean": json.dumps(mean), "std": json.dumps(std)}
    if graph.packed:  # the normalisation is in the graph; the readable copy is left out for size
        metadata = {"format": FORMAT, "bits": f"{bits}packed"}
    helper.set_model_props(proto, metadata)
    return proto


class OnnxRuntimeModel:
    """An exported ONNX file in an onnxruntime CPU session, called like the TorchScript model.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`export_onnx`.
    threads : int
        onnxruntime intra-op threads (default: 1, as the batch-1 latencies are stated).
    integer_kernels : bool
        Let onnxruntime fuse Q/DQ pairs into integer kernels (QLinearConv, QGemm); if False the
        int8 weights are dequantised once when the session loads and the graph runs in float32
        (default: False).

    Raises
    ------
    ImportError
        If onnxruntime is not installed.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int = 1, integer_kernels: bool = False) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not integer_kernels:
            # Without QDQ fusion, DequantizeLinear of constant weights is folded once at load time
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Logits for raw pixels ``x`` ``(N, C, H, W)``; a float32 numpy array is passed on without a copy."""
        pixels = x if isinstance(x, np.ndarray) else x.detach().to(torch.float32).numpy()
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: pixels})[0])
