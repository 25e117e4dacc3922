"""Low-rank layers: ``LowRankConv2d`` and ``LowRankLinear``, built from dense layers by truncated SVD.

A dense weight is reshaped into a matrix ``M`` and factored as ``M ~ (U_r sqrt(S_r)) (sqrt(S_r) V_r^T)``:

- channel scheme (Zhang et al.): ``M = W.reshape(N, C*kh*kw)``; a kh x kw convolution C -> r (the original
  stride, padding and dilation) followed by a 1x1 convolution r -> N holding the bias. Runs as the fused op
  ``rankprune.ops.lowrank_conv2d``.
- spatial scheme (Jaderberg et al.): ``M = W.permute(1, 2, 0, 3).reshape(C*kh, N*kw)``; a kh x 1 convolution
  C -> r (vertical stride/padding/dilation) followed by a 1 x kw convolution r -> N (horizontal ones).
- linear: ``M = W [out, in]``; Linear in -> r then Linear r -> out holding the bias.

Full rank reproduces the dense layer up to rounding.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops
from ._inputs import check_fraction

SCHEMES = ("channel", "spatial")


def _int_pair(value, name: str, min_value: int) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value!r}")
    return pair


def _check_rank(rank, name: str = "rank") -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{name} must be a positive int, got {rank!r}")
    return rank


def _explicit_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    """The symmetric zero padding of ``conv`` as a pair (resolving padding="valid"/"same")."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in totals):
            raise ValueError(
                f"padding='same' with kernel {conv.kernel_size} and dilation {conv.dilation} pads asymmetrically, "
                "which the low-rank layers do not support"
            )
        return (totals[0] // 2, totals[1] // 2)
    return tuple(conv.padding)


def check_decomposable_conv(conv: nn.Module) -> None:
    """Raise TypeError/ValueError when ``conv`` is not a Conv2d the low-rank layers can replace."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"grouped convolutions (groups={conv.groups}) cannot be decomposed; only groups=1")
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported; only 'zeros'")
    _explicit_padding(conv)


def weight_matrix(weight: Tensor, scheme: str) -> Tensor:
    """The matrix whose truncated SVD gives the low-rank layer: ``[N, C*kh*kw]`` (channel, and [out, in] for a
    linear weight), ``[C*kh, N*kw]`` (spatial)."""
    if weight.dim() == 2:
        return weight
    if scheme == "channel":
        return weight.reshape(weight.shape[0], -1)
    if scheme == "spatial":
        n, c, kh, kw = weight.shape
        return weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def factorize(matrix: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(U, S, V)`` of ``matrix`` in float64 (descending S), by ``rankprune.ops.svd``."""
    return ops.svd(matrix.detach().to(torch.float64))


def select_rank(S: Tensor, rank: Optional[int], energy: Optional[float]) -> int:
    """``rank`` when given (at most ``len(S)``), else the smallest rank keeping ``energy`` of ``sum(S^2)``,
    else full rank ``len(S)``."""
    full = S.shape[-1]
    if rank is not None and energy is not None:
        raise ValueError("give rank or energy, not both")
    if rank is not None:
        _check_rank(rank)
        if rank > full:
            raise ValueError(f"rank={rank} exceeds the full rank {full} of this layer's weight matrix")
        return rank
    if energy is not None:
        return int(ops.energy_rank(S, check_fraction("energy", energy)))
    return full


def _split(U: Tensor, S: Tensor, V: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
    """``(U_r sqrt(S_r), V_r sqrt(S_r))``: the factors of ``M ~ A B^T`` split evenly."""
    root = S[:rank].sqrt()
    return U[:, :rank] * root, V[:, :rank] * root


class LowRankConv2d(nn.Module):
    """A Conv2d with a rank-``rank`` weight, as two convolutions ``first`` then ``second`` (groups=1).

    ``scheme="channel"``: ``first`` is kh x kw C -> rank (stride, padding, dilation of the layer), ``second``
    1x1 rank -> N with the bias; forward runs the fused ``rankprune.ops.lowrank_conv2d``.
    ``scheme="spatial"``: ``first`` is kh x 1 C -> rank (vertical stride/padding/dilation), ``second`` 1 x kw
    rank -> N (horizontal ones) with the bias. ``padding`` is an int or pair (zero padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, scheme: str = "channel", device=None, dtype=None):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        _check_rank(in_channels, "in_channels")
        _check_rank(out_channels, "out_channels")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _int_pair(kernel_size, "kernel_size", 1)
        self.stride = _int_pair(stride, "stride", 1)
        self.padding = _int_pair(padding, "padding", 0)
        self.dilation = _int_pair(dilation, "dilation", 1)
        self.rank = _check_rank(rank)
        self.scheme = scheme
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        kw_ = dict(device=device, dtype=dtype)
        if scheme == "channel":
            self.first = nn.Conv2d(in_channels, rank, (kh, kw), (sh, sw), (ph, pw), (dh, dw), bias=False, **kw_)
            self.second = nn.Conv2d(rank, out_channels, 1, bias=bias, **kw_)
        else:
            self.first = nn.Conv2d(in_channels, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False, **kw_)
            self.second = nn.Conv2d(rank, out_channels, (1, kw), (1, sw), (0, pw), (1, dw), bias=bias, **kw_)

    def forward(self, x: Tensor) -> Tensor:
        if self.scheme == "channel":
            return ops.lowrank_conv2d(x, self.first.weight, self.second.weight, self.second.bias, self.stride,
                                      self.padding, self.dilation)
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.second.bias is not None}, scheme={self.scheme!r}")

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: Optional[int] = None, energy: Optional[float] = None,
                   scheme: str = "channel") -> "LowRankConv2d":
        """The rank-``rank`` truncated SVD of ``conv`` (or the smallest rank keeping ``energy`` of the squared
        singular values; full rank when neither is given), on the device and dtype of ``conv``.
        Raises ValueError for grouped convolutions, non-zero padding modes and asymmetric 'same' padding."""
        check_decomposable_conv(conv)
        U, S, V = factorize(weight_matrix(conv.weight, scheme))
        return cls.from_factors(conv, U, S, V, select_rank(S, rank, energy), scheme)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, U: Tensor, S: Tensor, V: Tensor, rank: int,
                     scheme: str = "channel") -> "LowRankConv2d":
        """Build from the SVD ``(U, S, V)`` of ``weight_matrix(conv.weight, scheme)`` truncated to ``rank``."""
        check_decomposable_conv(conv)
        weight = conv.weight
        n, c, kh, kw = weight.shape
        layer = cls(c, n, (kh, kw), rank, conv.stride, _explicit_padding(conv), conv.dilation,
                    bias=conv.bias is not None, scheme=scheme, device=weight.device, dtype=weight.dtype)
        left, right = _split(U, S, V, rank)
        with torch.no_grad():
            if scheme == "channel":
                layer.first.weight.copy_(right.T.reshape(rank, c, kh, kw))
                layer.second.weight.copy_(left.reshape(n, rank, 1, 1))
            else:
                layer.first.weight.copy_(left.T.reshape(rank, c, kh, 1))
                layer.second.weight.copy_(right.reshape(n, kw, rank).permute(0, 2, 1).reshape(n, rank, 1, kw))
            if conv.bias is not None:
                layer.second.bias.copy_(conv.bias)
        return layer

    def dense_weight(self) -> Tensor:
        """The rank-``rank`` weight ``[N, C, kh, kw]`` this layer computes with."""
        w1, w2 = self.first.weight, self.second.weight
        if self.scheme == "channel":
            n, r = w2.shape[:2]
            return (w2.reshape(n, r) @ w1.reshape(r, -1)).reshape(n, *w1.shape[1:])
        return torch.einsum("nrj,rci->ncij", w2[:, :, 0, :], w1[..., 0])

    def to_dense(self) -> nn.Conv2d:
        """An nn.Conv2d computing the same function (weight of rank ``rank``)."""
        w = self.first.weight
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.second.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if conv.bias is not None:
                conv.bias.copy_(self.second.bias)
        return conv


class LowRankLinear(nn.Module):
    """A Linear with a rank-``rank`` weight: ``first`` Linear in -> rank (no bias), ``second`` rank -> out."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features = _check_rank(in_features, "in_features")
        self.out_features = _check_rank(out_features, "out_features")
        self.rank = _check_rank(rank)
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.second.bias is not None}")

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: Optional[int] = None,
                   energy: Optional[float] = None) -> "LowRankLinear":
        """The rank-``rank`` truncated SVD of ``linear`` (or the smallest rank keeping ``energy``; full rank when
        neither is given), on the device and dtype of ``linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        U, S, V = factorize(linear.weight)
        return cls.from_factors(linear, U, S, V, select_rank(S, rank, energy))

    @classmethod
    def from_factors(cls, linear: nn.Linear, U: Tensor, S: Tensor, V: Tensor, rank: int) -> "LowRankLinear":
        """Build from the SVD ``(U, S, V)`` of ``linear.weight`` truncated to ``rank``."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        left, right = _split(U, S, V, rank)
        with torch.no_grad():
            layer.first.weight.copy_(right.T)
            layer.second.weight.copy_(left)
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias)
        return layer

    def dense_weight(self) -> Tensor:
        """The rank-``rank`` weight ``[out, in]``."""
        return self.second.weight @ self.first.weight

    def to_dense(self) -> nn.Linear:
        """An nn.Linear computing the same function."""
        w = self.first.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.second.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if linear.bias is not None:
                linear.bias.copy_(self.second.bias)
        return linear


__all__ = ["LowRankConv2d", "LowRankLinear"]
