"""Singular values of many small matrices: svdvals, nuclear_norm, feature_energy, feature_rank."""
from typing import Optional

import torch
from torch import Tensor

from . import _library  # noqa: F401  (registers the schemas)

_REDUCTIONS = ("none", "sum", "mean")


def svdvals(A: Tensor) -> Tensor:
    """Singular values of every matrix of ``A [..., m, n]``, descending: ``[..., min(m, n)]``.

    Any float dtype and strides; results are float32 (float64 for float64 input). A matrix holding NaN or
    Inf gives NaN singular values (the rest of the batch is unaffected). Householder bidiagonalization, then
    a Sturm-count-bracketed Newton search per value; one CUDA warp/block per matrix on the GPU, one matrix per
    task on the CPU.
    """
    return torch.ops.rankprune.svdvals.default(A)


def nuclear_norm(A: Tensor) -> Tensor:
    """Nuclear norm (sum of singular values) of every matrix of ``A [..., m, n]``: ``[...]``."""
    return torch.ops.rankprune.nuclear_norm.default(A)


def feature_energy(x: Tensor, reduction: str = "mean") -> Tensor:
    """Energy (nuclear norm) of every H x W feature map of activations ``x [N, C, H, W]``.

    ``reduction="none"`` returns ``[N, C]``; ``"sum"`` / ``"mean"`` reduce over the N images to ``[C]``.
    Reads the maps where they lie (contiguous or channels_last): no copy of ``x``.
    """
    return torch.ops.rankprune.feature_energy.default(x, reduction)


def feature_rank(x: Tensor, rtol: Optional[float] = None, reduction: str = "mean") -> Tensor:
    """Numerical rank of every H x W map of ``x [N, C, H, W]`` (HRank's criterion).

    A singular value counts when it exceeds ``rtol * sigma_max``; ``rtol=None`` means
    ``max(H, W) * eps`` with eps of float32 (float64 for float64 input), ``torch.linalg.matrix_rank``'s
    default. Returned as float32 (float64 for float64 input) so that means are exact and a map holding
    NaN/Inf reads NaN. Reductions as in :func:`feature_energy`.
    """
    return torch.ops.rankprune.feature_rank.default(x, rtol, reduction)


# ---- fake kernels (shapes and dtypes only) for torch.compile / torch.export -------------------------


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_float(t: Tensor, op: str) -> None:
    torch._check(
        t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        lambda: f"rankprune.{op}: expected a float16/bfloat16/float32/float64 tensor, got {t.dtype}",
    )


def _check_maps(x: Tensor, op: str, reduction: str) -> None:
    torch._check(x.dim() == 4, lambda: f"rankprune.{op}: expected activations [N, C, H, W], got {tuple(x.shape)}")
    _check_float(x, op)
    torch._check(reduction in _REDUCTIONS, lambda: f"rankprune.{op}: reduction must be one of {_REDUCTIONS}")


def _per_channel(x: Tensor, reduction: str) -> Tensor:
    shape = (x.shape[0], x.shape[1]) if reduction == "none" else (x.shape[1],)
    return x.new_empty(shape, dtype=_real_dtype(x.dtype))


@torch.library.register_fake("rankprune::svdvals")
def _svdvals_fake(A):
    torch._check(A.dim() >= 2, lambda: f"rankprune.svdvals: expected [..., m, n], got {tuple(A.shape)}")
    _check_float(A, "svdvals")
    k = min(A.shape[-2], A.shape[-1])
    return A.new_empty((*A.shape[:-2], k), dtype=_real_dtype(A.dtype))


@torch.library.register_fake("rankprune::nuclear_norm")
def _nuclear_norm_fake(A):
    torch._check(A.dim() >= 2, lambda: f"rankprune.nuclear_norm: expected [..., m, n], got {tuple(A.shape)}")
    _check_float(A, "nuclear_norm")
    return A.new_empty(A.shape[:-2], dtype=_real_dtype(A.dtype))


@torch.library.register_fake("rankprune::feature_energy")
def _feature_energy_fake(x, reduction="mean"):
    _check_maps(x, "feature_energy", reduction)
    return _per_channel(x, reduction)


@torch.library.register_fake("rankprune::feature_rank")
def _feature_rank_fake(x, rtol=None, reduction="mean"):
    _check_maps(x, "feature_rank", reduction)
    return _per_channel(x, reduction)


# ---- float64 references (torch.linalg / LAPACK), used by the tests ----------------------------------


def svdvals_reference(A: Tensor) -> Tensor:
    """float64 ``torch.linalg.svdvals`` of ``A``."""
    return torch.linalg.svdvals(A.detach().to(torch.float64))


def nuclear_norm_reference(A: Tensor) -> Tensor:
    """Float64 reference of :func:`nuclear_norm` (LAPACK singular values), for tests."""
    return svdvals_reference(A).sum(-1)


def _reduce(per_image: Tensor, reduction: str) -> Tensor:
    return {"none": lambda t: t, "sum": lambda t: t.sum(0), "mean": lambda t: t.mean(0)}[reduction](per_image)


def feature_energy_reference(x: Tensor, reduction: str = "mean") -> Tensor:
    """Float64 reference of :func:`feature_energy`, for tests."""
    return _reduce(nuclear_norm_reference(x), reduction)


def feature_rank_reference(x: Tensor, rtol: Optional[float] = None, reduction: str = "mean") -> Tensor:
    """Float64 reference of :func:`feature_rank`, for tests."""
    if rtol is None:
        eps = torch.finfo(_real_dtype(x.dtype)).eps
        rtol = max(x.shape[-2], x.shape[-1]) * eps
    s = svdvals_reference(x)
    smax = s[..., :1] if s.shape[-1] else s.sum(-1, keepdim=True)
    return _reduce((s > rtol * smax).sum(-1).to(torch.float64), reduction)
