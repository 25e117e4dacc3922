"""rankprune's custom ops (namespace ``torch.ops.rankprune``) with their Python wrappers.

Every op has a C++ CPU kernel, a CUDA kernel when the build has them (`cuda_kernels_built()`), a fake
kernel for torch.compile / torch.export, and a float64 pure-PyTorch reference (``*_reference``) that the
tests compare against.
"""
from . import _library
from ._lowrank_conv import lowrank_conv2d, lowrank_conv2d_reference
from ._svd import (
    energy_rank,
    energy_rank_reference,
    lowrank_error_reference,
    orthonormalize,
    svd,
    svd_lowrank,
    svd_reference,
)
from ._svdvals import (
    feature_energy,
    feature_energy_reference,
    feature_rank,
    feature_rank_reference,
    nuclear_norm,
    nuclear_norm_reference,
    svdvals,
    svdvals_reference,
)


def cuda_kernels_built() -> bool:
    """Whether this build of rankprune holds the CUDA kernels (else CUDA tensors are refused by the ops)."""
    return _library.cuda_kernels_built()


__all__ = [
    "cuda_kernels_built",
    "svdvals",
    "svdvals_reference",
    "nuclear_norm",
    "nuclear_norm_reference",
    "feature_energy",
    "feature_energy_reference",
    "feature_rank",
    "feature_rank_reference",
    "svd",
    "svd_reference",
    "svd_lowrank",
    "lowrank_error_reference",
    "orthonormalize",
    "energy_rank",
    "energy_rank_reference",
    "lowrank_conv2d",
    "lowrank_conv2d_reference",
]
