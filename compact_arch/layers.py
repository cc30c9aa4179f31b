"""Factored replacements of dense layers: low-rank (SVD) conv and linear, and Tucker-2 conv."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FACTORED_LAYERS", "LowRankConv2d", "LowRankLinear", "Tucker2Conv2d", "count_parameters"]


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
    def from_dense(cls, layer: nn.Conv2d, rank: int) -> LowRankConv2d:
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
            raise ValueError(
                f"rank must be in [1, {max_rank}] for a conv of weight {tuple(layer.weight.shape)}, got {rank}"
            )
        stride, padding, dilation = _conv_geometry(layer)
        new = cls(in_ch, out_ch, (kh, kw), rank, stride, padding, dilation, layer.bias is not None)
        left, right = _svd_factors(layer.weight.reshape(out_ch, -1), rank)
        with torch.no_grad():
            new.reduce.weight.copy_(right.reshape(rank, in_ch, kh, kw))
            new.expand.weight.copy_(left.reshape(out_ch, rank, 1, 1))
            if layer.bias is not None and new.expand.bias is not None:
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
        self.core = nn.Conv2d(
            in_rank, out_rank, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False
        )
        self.expand = nn.Conv2d(out_rank, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.core(self.project(x)))

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, in_rank: int, out_rank: int) -> Tucker2Conv2d:
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
        new = cls(
            in_ch,
            out_ch,
            (kh, kw),
            in_rank,
            out_rank,
            *_conv_geometry(layer),
            layer.bias is not None,
        )
        u_out = _leading_singular_vectors(weight.reshape(out_ch, -1), out_rank)  # (O, r_out)
        u_in = _leading_singular_vectors(weight.transpose(0, 1).reshape(in_ch, -1), in_rank)  # (I, r_in)
        core = torch.einsum("oikl,or,is->rskl", weight.double(), u_out, u_in)
        with torch.no_grad():
            new.project.weight.copy_(u_in.T.reshape(in_rank, in_ch, 1, 1).to(weight.dtype))
            new.core.weight.copy_(core.to(weight.dtype))
            new.expand.weight.copy_(u_out.reshape(out_ch, out_rank, 1, 1).to(weight.dtype))
            if layer.bias is not None and new.expand.bias is not None:
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
    def from_dense(cls, layer: nn.Linear, rank: int) -> LowRankLinear:
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
            raise ValueError(
                f"rank must be in [1, {max_rank}] for a {layer.in_features}->{layer.out_features} linear, got {rank}"
            )
        new = cls(layer.in_features, layer.out_features, rank, layer.bias is not None)
        left, right = _svd_factors(layer.weight, rank)
        with torch.no_grad():
            new.reduce.weight.copy_(right)
            new.expand.weight.copy_(left)
            if layer.bias is not None and new.expand.bias is not None:
                new.expand.bias.copy_(layer.bias)
        return new.to(layer.weight.device)


def _conv_geometry(layer: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Stride, padding and dilation of a 2-D convolution with numeric padding (see :func:`_check_plain_conv`)."""
    stride, padding, dilation = layer.stride, layer.padding, layer.dilation
    if isinstance(padding, str):
        raise ValueError(f"only numeric padding is supported, got padding={padding!r}")
    return (stride[0], stride[1]), (padding[0], padding[1]), (dilation[0], dilation[1])


def _check_plain_conv(layer: nn.Module) -> None:
    if not isinstance(layer, nn.Conv2d):
        raise TypeError(f"expected a torch.nn.Conv2d, got {type(layer).__name__}")
    if layer.groups != 1:
        raise ValueError(f"only groups=1 convolutions can be factored, got groups={layer.groups}")
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        raise ValueError(
            "only numeric zero padding is supported, "
            f"got padding={layer.padding!r}, padding_mode={layer.padding_mode!r}"
        )


#: The factored layer types: fx tracing keeps them as leaves and pruning refuses to cut around them.
FACTORED_LAYERS = (LowRankConv2d, LowRankLinear, Tucker2Conv2d)


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
