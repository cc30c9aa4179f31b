"""Reading a sequential-style CNN (an ``nn.Sequential`` or an fx-traceable single chain) as a list of layers."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from fedsqueeze.compact_arch.layers import FACTORED_LAYERS

__all__ = ["to_chain"]


class _ChainTracer(fx.Tracer):
    """fx tracer that keeps the factored layers of this module as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, FACTORED_LAYERS) or super().is_leaf_module(m, module_qualified_name)


def _flatten_sequential(model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            layers.extend(_flatten_sequential(child, full + "."))
        else:
            layers.append((full, child))
    return layers


def _pool_from_call(cls: type[nn.Module], args: tuple, kwargs: dict) -> nn.Module:
    names = ["kernel_size", "stride", "padding"]
    if cls is nn.MaxPool2d:
        names += ["dilation", "ceil_mode", "return_indices"]
    else:
        names += ["ceil_mode", "count_include_pad", "divisor_override"]
    params = dict(zip(names, args, strict=False))
    params.update(kwargs)
    return cls(**params)


_ACTIVATION_FUNCTIONS: dict[Any, Callable[[], nn.Module]] = {
    F.relu: nn.ReLU,
    torch.relu: nn.ReLU,
    torch.tanh: nn.Tanh,
    F.tanh: nn.Tanh,
    torch.sigmoid: nn.Sigmoid,
    F.sigmoid: nn.Sigmoid,
}
_ACTIVATION_METHODS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _is_batch_flatten_shape(shape: Sequence[Any], size_nodes: set[fx.Node]) -> bool:
    """True for ``view``/``reshape`` targets that keep dim 0 and flatten the rest: (N, -1) or (-1, F)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    if len(shape) != 2:
        return False
    first, second = shape
    return second == -1 or first == -1 or (isinstance(first, fx.Node) and first in size_nodes)


def _node_to_layer(node: fx.Node, modules: dict[str, nn.Module], size_nodes: set[fx.Node]) -> nn.Module | None:
    """Translate one fx node of a chain into a module (None for no-ops such as dropout)."""
    args, kwargs = node.args[1:], dict(node.kwargs)
    if node.op == "call_module":
        return modules[str(node.target)]
    target = node.target
    if node.op == "call_function":
        if target in _ACTIVATION_FUNCTIONS:
            return _ACTIVATION_FUNCTIONS[target]()
        if target is F.max_pool2d or target is torch.max_pool2d:
            return _pool_from_call(nn.MaxPool2d, args, kwargs)
        if target is F.avg_pool2d or target is torch._C._nn.avg_pool2d:
            return _pool_from_call(nn.AvgPool2d, args, kwargs)
        if target is torch.flatten:
            start = args[0] if args else kwargs.get("start_dim", 0)
            if start == 1 and (len(args) < 2 or args[1] == -1) and kwargs.get("end_dim", -1) == -1:
                return nn.Flatten()
        if target in (F.dropout, F.dropout2d):
            return None
        if target in (F.log_softmax, torch.log_softmax, F.softmax, torch.softmax):
            dim = cast("int | None", args[0] if args else kwargs.get("dim"))
            return nn.LogSoftmax(dim=dim) if target in (F.log_softmax, torch.log_softmax) else nn.Softmax(dim=dim)
    if node.op == "call_method":
        if target in _ACTIVATION_METHODS:
            return _ACTIVATION_METHODS[str(target)]()
        if target == "flatten" and tuple(args) in ((1,), (1, -1)):
            return nn.Flatten()
        if target in ("view", "reshape") and _is_batch_flatten_shape(args, size_nodes):
            return nn.Flatten()
        if target in ("log_softmax", "softmax"):
            dim = cast("int | None", args[0] if args else kwargs.get("dim"))
            return nn.LogSoftmax(dim=dim) if target == "log_softmax" else nn.Softmax(dim=dim)
    raise ValueError(
        f"cannot read {node.op} {target!r} as a layer of a sequential CNN; supported: conv/linear/"
        "batchnorm/activation modules, relu/tanh/sigmoid, max/avg pool, flatten/view(N, -1), dropout, (log_)softmax"
    )


def to_chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Read a sequential-style network as an ordered list of ``(name, layer)`` pairs.

    An ``nn.Sequential`` (nested ones included) is read directly; any other module is read by
    ``torch.fx`` symbolic tracing, which must find a single chain from the input to the output.
    Functional calls (``F.relu``, ``F.max_pool2d``, ``torch.flatten``, ``x.view(x.size(0), -1)``,
    ...) become the equivalent modules; dropout is dropped. Returned modules are the model's own
    objects, not copies.

    Parameters
    ----------
    model : torch.nn.Module
        A CNN made of convolutions, pools, activations, one flatten and linear layers.

    Returns
    -------
    list of (str, torch.nn.Module)
        Layer names (the model's qualified module names where there is one) and layers.
    """
    if type(model) is nn.Sequential:
        return [(n, m) for n, m in _flatten_sequential(model, "") if not isinstance(m, (nn.Dropout, nn.Dropout2d))]
    graph = _ChainTracer().trace(model)
    modules = dict(model.named_modules())
    size_nodes = {
        n
        for n in graph.nodes
        if (n.op == "call_method" and n.target == "size") or (n.target is getattr and n.args[1] == "shape")
    }
    size_nodes |= {n for n in graph.nodes if n.target is operator.getitem and n.args[0] in size_nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"expected a model with a single input, got {len(placeholders)} inputs")
    current = placeholders[0]
    chain: list[tuple[str, nn.Module]] = []
    counter = 0
    for node in graph.nodes:
        if node.op == "placeholder" or node in size_nodes:
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise ValueError("the model's output is not the end of a single chain of layers")
            break
        others = [n for n in node.all_input_nodes if n is not current and n not in size_nodes]
        if not node.args or node.args[0] is not current or others:
            raise ValueError(
                f"node {node.name} ({node.target}) does not take just the previous layer's output: the model "
                "is not a single chain of layers (residual and multi-input blocks are not supported)"
            )
        layer = _node_to_layer(node, modules, size_nodes)
        current = node
        if layer is None or isinstance(layer, (nn.Dropout, nn.Dropout2d)):
            continue
        if node.op == "call_module":
            name = str(node.target)
        else:
            name = f"{type(layer).__name__.lower()}_{counter}"
            counter += 1
        chain.append((name, layer))
    return chain
