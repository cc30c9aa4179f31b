"""Compact students built from a teacher CNN by structured pruning and low-rank factoring."""

from __future__ import annotations

import copy
import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "CompactConfig",
    "LowRankConv2d",
    "LowRankLinear",
    "Tucker2Conv2d",
    "build_student",
    "count_parameters",
    "describe",
    "prune_chain",
    "resolve_rank",
    "to_chain",
]

Rank = int | float | None


# ----------------------------------------------------------------------------------------------
# Factored layers
# ----------------------------------------------------------------------------------------------


def _svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``matrix`` (m, n) into ``left`` (m, rank) and ``right`` (rank, n), balanced by sqrt(S)."""
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    left = u[:, :rank] * root
    right = root[:, None] * vh[:rank]
    return left.to(matrix.dtype), right.to(matrix.dtype)


def _leading_singular_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Return the ``rank`` leading left singular vectors of ``matrix`` (m, n) as (m, rank)."""
    u, _, _ = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    return u[:, :rank]


class LowRankConv2d(nn.Module):
    """A k x k convolution with ``rank`` filters followed by a 1 x 1 convolution to ``out_channels``.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of the dense convolution this layer replaces.
    kernel_size : int or tuple of int
        Kernel of the first (spatial) convolution.
    rank : int
        Number of intermediate filters.
    stride, padding, dilation : int or tuple of int
        As in :class:`torch.nn.Conv2d`, applied by the spatial convolution (default: 1, 0, 1).
    bias : bool
        Whether the 1 x 1 convolution has a bias (default: True).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.reduce = nn.Conv2d(
            in_channels, rank, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False
        )
        self.expand = nn.Conv2d(rank, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(x))

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, rank: int) -> "LowRankConv2d":
        """Initialise from ``layer`` by truncated SVD of its weight reshaped to (out, in*k*k).

        Parameters
        ----------
        layer : torch.nn.Conv2d
            Dense convolution with ``groups == 1`` and a numeric padding.
        rank : int
            Kept rank, ``1 <= rank <= min(out, in*k*k)``; at the maximum the layer is exact.

        Returns
        -------
        LowRankConv2d
        """
        _check_plain_conv(layer)
        out_ch, in_ch, kh, kw = layer.weight.shape
        max_rank = min(out_ch, in_ch * kh * kw)
        if not 1 <= rank <= max_rank:
            raise ValueError(f"rank must be in [1, {max_rank}] for a conv of weight {tuple(layer.weight.shape)}, got {rank}")
        new = cls(in_ch, out_ch, (kh, kw), rank, layer.stride, layer.padding, layer.dilation, layer.bias is not None)
        left, right = _svd_factors(layer.weight.reshape(out_ch, -1), rank)
        with torch.no_grad():
            new.reduce.weight.copy_(right.reshape(rank, in_ch, kh, kw))
            new.expand.weight.copy_(left.reshape(out_ch, rank, 1, 1))
            if layer.bias is not None:
                new.expand.bias.copy_(layer.bias)
        return new.to(layer.weight.device)


class Tucker2Conv2d(nn.Module):
    """Tucker-2 convolution: 1 x 1 to ``in_rank``, k x k core to ``out_rank``, 1 x 1 to ``out_channels``.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of the dense convolution this layer replaces.
    kernel_size : int or tuple of int
        Kernel of the core convolution.
    in_rank, out_rank : int
        Channels entering and leaving the core.
    stride, padding, dilation : int or tuple of int
        As in :class:`torch.nn.Conv2d`, applied by the core (default: 1, 0, 1).
    bias : bool
        Whether the last 1 x 1 convolution has a bias (default: True).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        in_rank: int,
        out_rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_rank < 1 or out_rank < 1:
            raise ValueError(f"ranks must be >= 1, got in_rank={in_rank}, out_rank={out_rank}")
        self.project = nn.Conv2d(in_channels, in_rank, 1, bias=False)
        self.core = nn.Conv2d(in_rank, out_rank, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.expand = nn.Conv2d(out_rank, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.core(self.project(x)))

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, in_rank: int, out_rank: int) -> "Tucker2Conv2d":
        """Initialise from ``layer`` by a truncated higher-order SVD over its two channel modes.

        Parameters
        ----------
        layer : torch.nn.Conv2d
            Dense convolution with ``groups == 1`` and a numeric padding.
        in_rank : int
            Kept input-channel rank, ``1 <= in_rank <= in_channels``.
        out_rank : int
            Kept output-channel rank, ``1 <= out_rank <= out_channels``; full ranks are exact.

        Returns
        -------
        Tucker2Conv2d
        """
        _check_plain_conv(layer)
        weight = layer.weight.detach()
        out_ch, in_ch, kh, kw = weight.shape
        if not 1 <= in_rank <= in_ch or not 1 <= out_rank <= out_ch:
            raise ValueError(
                f"ranks must satisfy 1 <= in_rank <= {in_ch} and 1 <= out_rank <= {out_ch}, "
                f"got in_rank={in_rank}, out_rank={out_rank}"
            )
        new = cls(in_ch, out_ch, (kh, kw), in_rank, out_rank, layer.stride, layer.padding, layer.dilation, layer.bias is not None)
        u_out = _leading_singular_vectors(weight.reshape(out_ch, -1), out_rank)  # (O, r_out)
        u_in = _leading_singular_vectors(weight.transpose(0, 1).reshape(in_ch, -1), in_rank)  # (I, r_in)
        core = torch.einsum("oikl,or,is->rskl", weight.double(), u_out, u_in)
        with torch.no_grad():
            new.project.weight.copy_(u_in.T.reshape(in_rank, in_ch, 1, 1).to(weight.dtype))
            new.core.weight.copy_(core.to(weight.dtype))
            new.expand.weight.copy_(u_out.reshape(out_ch, out_rank, 1, 1).to(weight.dtype))
            if layer.bias is not None:
                new.expand.bias.copy_(layer.bias)
        return new.to(weight.device)


class LowRankLinear(nn.Module):
    """Two thin linear layers, ``in_features -> rank -> out_features``.

    Parameters
    ----------
    in_features, out_features : int
        Features of the dense layer this one replaces.
    rank : int
        Width of the bottleneck.
    bias : bool
        Whether the second layer has a bias (default: True).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.reduce = nn.Linear(in_features, rank, bias=False)
        self.expand = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(x))

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int) -> "LowRankLinear":
        """Initialise from ``layer`` by truncated SVD of its weight (exact at ``rank = min(out, in)``).

        Parameters
        ----------
        layer : torch.nn.Linear
            Dense layer to factor.
        rank : int
            Kept rank, ``1 <= rank <= min(out_features, in_features)``.

        Returns
        -------
        LowRankLinear
        """
        max_rank = min(layer.in_features, layer.out_features)
        if not 1 <= rank <= max_rank:
            raise ValueError(f"rank must be in [1, {max_rank}] for a {layer.in_features}->{layer.out_features} linear, got {rank}")
        new = cls(layer.in_features, layer.out_features, rank, layer.bias is not None)
        left, right = _svd_factors(layer.weight, rank)
        with torch.no_grad():
            new.reduce.weight.copy_(right)
            new.expand.weight.copy_(left)
            if layer.bias is not None:
                new.expand.bias.copy_(layer.bias)
        return new.to(layer.weight.device)


def _check_plain_conv(layer: nn.Module) -> None:
    if not isinstance(layer, nn.Conv2d):
        raise TypeError(f"expected a torch.nn.Conv2d, got {type(layer).__name__}")
    if layer.groups != 1:
        raise ValueError(f"only groups=1 convolutions can be factored, got groups={layer.groups}")
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        raise ValueError(
            f"only numeric zero padding is supported, got padding={layer.padding!r}, padding_mode={layer.padding_mode!r}"
        )


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable and frozen parameters of ``model`` (buffers excluded).

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    int
    """
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Reading a teacher as a chain of layers
# ----------------------------------------------------------------------------------------------

_LEAF_TYPES = (LowRankConv2d, LowRankLinear, Tucker2Conv2d)


class _ChainTracer(fx.Tracer):
    """fx tracer that keeps the factored layers of this module as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAF_TYPES) or super().is_leaf_module(m, module_qualified_name)


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
    params = dict(zip(names, args))
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
            dim = args[0] if args else kwargs.get("dim")
            return nn.LogSoftmax(dim=dim) if target in (F.log_softmax, torch.log_softmax) else nn.Softmax(dim=dim)
    if node.op == "call_method":
        if target in _ACTIVATION_METHODS:
            return _ACTIVATION_METHODS[str(target)]()
        if target == "flatten" and tuple(args) in ((1,), (1, -1)):
            return nn.Flatten()
        if target in ("view", "reshape") and _is_batch_flatten_shape(args, size_nodes):
            return nn.Flatten()
        if target in ("log_softmax", "softmax"):
            dim = args[0] if args else kwargs.get("dim")
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


# ----------------------------------------------------------------------------------------------
# Structured pruning
# ----------------------------------------------------------------------------------------------


def _importance(weight: torch.Tensor, norm: str) -> torch.Tensor:
    rows = weight.detach().reshape(weight.shape[0], -1)
    return rows.abs().sum(1) if norm == "l1" else rows.pow(2).sum(1).sqrt()


def _keep_indices(weight: torch.Tensor, ratio: float, norm: str) -> torch.Tensor:
    count = weight.shape[0]
    keep = max(1, count - int(round(count * ratio)))
    top = torch.topk(_importance(weight, norm), keep).indices
    return torch.sort(top).values


def _slice_out(layer: nn.Conv2d | nn.Linear, idx: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight[idx].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[idx].clone())
    if isinstance(layer, nn.Conv2d):
        layer.out_channels = len(idx)
    else:
        layer.out_features = len(idx)


def _slice_batchnorm(bn: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor) -> None:
    with torch.no_grad():
        if bn.affine:
            bn.weight = nn.Parameter(bn.weight[idx].clone())
            bn.bias = nn.Parameter(bn.bias[idx].clone())
        if bn.running_mean is not None:
            bn.running_mean = bn.running_mean[idx].clone()
            bn.running_var = bn.running_var[idx].clone()
    bn.num_features = len(idx)


def _slice_in(layer: nn.Conv2d | nn.Linear, idx: torch.Tensor, old_channels: int) -> None:
    """Keep input channels ``idx``; for a linear after a flatten, keep each channel's block of columns."""
    with torch.no_grad():
        if isinstance(layer, nn.Conv2d):
            layer.weight = nn.Parameter(layer.weight[:, idx].clone())
            layer.in_channels = len(idx)
            return
        if layer.in_features % old_channels:
            raise ValueError(f"linear with {layer.in_features} inputs cannot follow {old_channels} channels")
        block = layer.in_features // old_channels
        cols = (idx[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
        layer.weight = nn.Parameter(layer.weight[:, cols].clone())
        layer.in_features = len(cols)


def prune_chain(
    chain: list[tuple[str, nn.Module]],
    conv_ratio: float,
    linear_ratio: float,
    norm: Literal["l1", "l2"] = "l1",
    skip: Sequence[str] = (),
) -> None:
    """Remove the lowest-norm conv filters and linear hidden units of ``chain`` in place.

    A pruned layer loses output rows; batch norms up to the next conv/linear lose the same
    channels and the next conv/linear loses the matching input channels (a linear after a
    flatten loses each removed channel's block of spatial columns). The last weight layer keeps
    its outputs (the classes).

    Parameters
    ----------
    chain : list of (str, torch.nn.Module)
        Layers as returned by :func:`to_chain` (modified in place; copy first).
    conv_ratio, linear_ratio : float
        Fraction in [0, 1) of conv filters and of linear hidden units to remove.
    norm : {"l1", "l2"}
        Norm of a filter's weights used as its importance (default: "l1").
    skip : sequence of str
        Names of layers whose outputs are never pruned (default: ()).
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    for ratio, what in ((conv_ratio, "conv prune ratio"), (linear_ratio, "linear prune ratio")):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"{what} must be in [0, 1), got {ratio}")
    weighted = [i for i, (_, m) in enumerate(chain) if isinstance(m, (nn.Conv2d, nn.Linear, *_LEAF_TYPES))]
    for pos, nxt in zip(weighted, weighted[1:]):
        name, layer = chain[pos]
        ratio = conv_ratio if isinstance(layer, (nn.Conv2d, LowRankConv2d, Tucker2Conv2d)) else linear_ratio
        if ratio == 0.0 or name in skip:
            continue
        factored = [n for n, m in (chain[pos], chain[nxt]) if isinstance(m, _LEAF_TYPES)]
        if factored:
            raise ValueError(f"cannot prune around factored layer(s) {factored}: prune the dense model before factoring")
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError(f"cannot prune grouped convolution {name}")
        old = layer.weight.shape[0]
        idx = _keep_indices(layer.weight, ratio, norm)
        _slice_out(layer, idx)
        for _, between in chain[pos + 1 : nxt]:
            if isinstance(between, nn.modules.batchnorm._BatchNorm):
                _slice_batchnorm(between, idx)
        _slice_in(chain[nxt][1], idx, old)


# ----------------------------------------------------------------------------------------------
# Student construction
# ----------------------------------------------------------------------------------------------


def resolve_rank(rank: Rank, max_rank: int) -> int | None:
    """Turn a rank setting into a rank: a float in (0, 1] is a fraction of ``max_rank``.

    Parameters
    ----------
    rank : int, float or None
        An int >= 1 (capped at ``max_rank``), a fraction in (0, 1], or None (no factoring).
    max_rank : int
        Full rank of the layer.

    Returns
    -------
    int or None
    """
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rank must be an int, a float fraction or None, got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"a fractional rank must be in (0, 1], got {rank}")
        return max(1, int(round(rank * max_rank)))
    if rank < 1:
        raise ValueError(f"an integer rank must be >= 1, got {rank}")
    return min(rank, max_rank)


@dataclass
class CompactConfig:
    """How :func:`build_student` shrinks a teacher.

    Parameters
    ----------
    conv_rank : int, float or None
        Rank of factored convolutions: an int, a fraction of the full rank, or None to keep
        convolutions dense (default: 0.5). For Tucker-2 it applies to both channel modes.
    linear_rank : int, float or None
        Rank of factored linear layers, as ``conv_rank`` (default: 0.25).
    layer_ranks : dict of str to int or float
        Per-layer rank overriding the two above, keyed by the teacher's layer name (default: {}).
    conv_init : {"svd", "tucker2"}
        Factoring of convolutions: k x k to ``rank`` then 1 x 1 ("svd"), or 1 x 1, k x k core,
        1 x 1 ("tucker2") (default: "svd").
    prune_ratio : float
        Fraction of conv filters removed by norm, in [0, 1) (default: 0.0).
    linear_prune_ratio : float or None
        Fraction of linear hidden units removed; None uses ``prune_ratio`` (default: None).
    norm : {"l1", "l2"}
        Filter norm used to rank filters and units for pruning (default: "l1").
    bits : int
        Weight bits of the exported model: 8 (int8 + per-channel scale) or 32 (default: 8).
    keep_dense : tuple of str
        Layers never factored: teacher layer names or the aliases "first_conv" and
        "last_linear" (default: ("first_conv", "last_linear")). Any layer whose factored form
        would not have fewer parameters stays dense too.
    no_prune : tuple of str
        Layers whose outputs are never pruned, same naming (default: ()).
    """

    conv_rank: Rank = 0.5
    linear_rank: Rank = 0.25
    layer_ranks: dict[str, int | float] = field(default_factory=dict)
    conv_init: Literal["svd", "tucker2"] = "svd"
    prune_ratio: float = 0.0
    linear_prune_ratio: float | None = None
    norm: Literal["l1", "l2"] = "l1"
    bits: int = 8
    keep_dense: tuple[str, ...] = ("first_conv", "last_linear")
    no_prune: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.conv_init not in ("svd", "tucker2"):
            raise ValueError(f"conv_init must be 'svd' or 'tucker2', got {self.conv_init!r}")
        if self.norm not in ("l1", "l2"):
            raise ValueError(f"norm must be 'l1' or 'l2', got {self.norm!r}")
        if self.bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {self.bits}")
        for ratio in (self.prune_ratio, self.linear_prune_ratio):
            if ratio is not None and not 0.0 <= ratio < 1.0:
                raise ValueError(f"prune ratios must be in [0, 1), got {ratio}")
        for rank in (self.conv_rank, self.linear_rank, *self.layer_ranks.values()):
            resolve_rank(rank, 1)  # type and range check only


def _resolve_aliases(names: Sequence[str], chain: list[tuple[str, nn.Module]]) -> set[str]:
    convs = [n for n, m in chain if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in chain if isinstance(m, nn.Linear)]
    aliases = {"first_conv": convs[:1], "last_linear": linears[-1:]}
    known = {n for n, _ in chain}
    resolved: set[str] = set()
    for name in names:
        if name in aliases:
            resolved.update(aliases[name])
        elif name in known:
            resolved.add(name)
        else:
            raise ValueError(f"unknown layer {name!r} in config; layers are {sorted(known)} and aliases {sorted(aliases)}")
    return resolved


def _factor(name: str, layer: nn.Module, config: CompactConfig) -> nn.Module:
    """Return the factored form of ``layer`` if it has fewer parameters, else ``layer``."""
    dense = count_parameters(layer)
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        rank_setting = config.layer_ranks.get(name, config.conv_rank)
        out_ch, in_ch, kh, kw = layer.weight.shape
        if config.conv_init == "tucker2":
            in_rank, out_rank = resolve_rank(rank_setting, in_ch), resolve_rank(rank_setting, out_ch)
            if in_rank is None or out_rank is None:
                return layer
            candidate: nn.Module = Tucker2Conv2d.from_dense(layer, in_rank, out_rank)
        else:
            rank = resolve_rank(rank_setting, min(out_ch, in_ch * kh * kw))
            if rank is None:
                return layer
            candidate = LowRankConv2d.from_dense(layer, rank)
    elif isinstance(layer, nn.Linear):
        rank = resolve_rank(config.layer_ranks.get(name, config.linear_rank), min(layer.in_features, layer.out_features))
        if rank is None:
            return layer
        candidate = LowRankLinear.from_dense(layer, rank)
    else:
        return layer
    return candidate if count_parameters(candidate) < dense else layer


def build_student(teacher: nn.Module, config: CompactConfig | None = None) -> nn.Sequential:
    """Build a structurally smaller copy of ``teacher``: prune filters, then factor layers.

    The teacher is read with :func:`to_chain` (an ``nn.Sequential`` or any module whose
    ``forward`` is a single chain of conv/pool/activation/flatten/linear steps). Conv filters
    and linear hidden units with the smallest norms are removed from the tensor shapes
    (``prune_ratio``), then each remaining conv/linear not listed in ``keep_dense`` is replaced by
    its truncated-SVD (or Tucker-2) factorisation when that has fewer parameters. The teacher is
    not modified.

    Parameters
    ----------
    teacher : torch.nn.Module
        Trained model.
    config : CompactConfig or None
        Compression settings (default: None, i.e. ``CompactConfig()``).

    Returns
    -------
    torch.nn.Sequential
        The student, in eval mode, with layer names derived from the teacher's ('.' -> '_').
    """
    config = config or CompactConfig()
    chain = [(name, copy.deepcopy(layer)) for name, layer in to_chain(teacher)]
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for _, m in chain):
        raise ValueError("teacher has no Conv2d or Linear layer to compress")
    linear_ratio = config.prune_ratio if config.linear_prune_ratio is None else config.linear_prune_ratio
    prune_chain(chain, config.prune_ratio, linear_ratio, config.norm, _resolve_aliases(config.no_prune, chain))
    keep_dense = _resolve_aliases(config.keep_dense, chain)
    for name in config.layer_ranks:
        _resolve_aliases([name], chain)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, layer in chain:
        new = layer if name in keep_dense else _factor(name, layer, config)
        layers[name.replace(".", "_")] = new
    student = nn.Sequential(layers)
    return student.eval()


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """Summarise each conv/linear layer of a chain: name, kind, shapes and parameter count."""
    rows = []
    for name, layer in to_chain(model):
        params = count_parameters(layer)
        if params:
            shapes = [tuple(p.shape) for p in layer.parameters() if p.dim() > 1]
            rows.append({"name": name, "kind": type(layer).__name__, "weights": shapes, "params": params})
    return rows
