"""Factoring one layer: the SVD of its weight matrix (data-free), of its whitened weight (data-aware: the least
output error on the calibration inputs), or the reduced-rank regression of the asymmetric refit; and the
low-rank module built from the factors.

With ``C = X X^T + damping * mean(diag) * I = L L^T`` (Cholesky) on the calibration inputs ``X``, the best
rank-r weight is ``(W L)_r L^{-1}``, and the discarded squared singular values of ``W L`` are the output error
``||(W - W_r) X||_F^2`` of every rank (see docs/lowrank.md)."""
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..nn import LowRankConv2d, LowRankLinear
from .cost import Candidate, linear_features

# Default damping of the input covariance, relative to its mean diagonal (SVD-LLM, ASVD use 1e-6..1e-2).
DEFAULT_DAMPING = 1e-4
# A layer is factored by the randomized ops.svd_lowrank instead of the full ops.svd when the rank it needs is
# known in advance (ranks=, rank_ratio=) and at most this fraction of min(m, n), for min(m, n) >= 256.
LOWRANK_SVD_MAX_FRACTION = 0.25
LOWRANK_SVD_MIN_DIM = 256
# An asymmetric refit regresses the dense layer's outputs on the inputs of the partly decomposed model. Where
# those inputs span fewer directions than the layer has inputs (fewer calibration samples than features, e.g.
# a classifier on pooled features), the regression interpolates the calibration set with a weight far larger
# than the dense one: MobileNetV2's classifier came out 23.7x the dense norm, and one fine-tune epoch then fell
# from 71% to 46%. The refit's damping is raised tenfold (REFIT_DAMPING_STEPS times at most) until the rank-r
# weight is at most MAX_REFIT_GROWTH times the dense weight's Frobenius norm; failing that the layer keeps its
# symmetric fit, which projects the dense weight and never grows it.
MAX_REFIT_GROWTH = 2.0
REFIT_DAMPING_STEPS = 3


def factor(layer: Candidate, matrix: Tensor, rank: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """SVD ``(U, S, V)`` of the float64 ``matrix``: the randomized rank-``rank`` ``ops.svd_lowrank`` when that is
    a small part of a large matrix (recording the total energy in ``layer.energy``), else the full ``ops.svd``."""
    k = min(matrix.shape)
    if rank is not None and k >= LOWRANK_SVD_MIN_DIM and rank <= LOWRANK_SVD_MAX_FRACTION * k:
        layer.energy = float(matrix.square().sum())
        generator = torch.Generator(device=matrix.device).manual_seed(0)
        return ops.svd_lowrank(matrix, rank, generator=generator)
    return ops.svd(matrix)


def gram_svd(matrix: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(U, S, V)`` of a float64 matrix from the eigendecomposition of its Gram matrix on the smaller
    side (``A A^T = U S^2 U^T``, ``V = A^T U / S``): a GEMM and a small ``eigh`` instead of LAPACK's SVD,
    3-10x faster for the whitened weights of convolutions (``[n, C*kh*kw]``, n far from C*kh*kw), measured
    on 2 CPU threads. Squaring costs the small singular values their relative accuracy (absolute error
    about 1e-16 of the largest squared), which the discarded energies and the leading factors do not feel;
    directions of (numerically) zero singular values get zero vectors on the long side."""
    wide = matrix.shape[0] <= matrix.shape[1]
    short = matrix if wide else matrix.mT
    values, vectors = torch.linalg.eigh(short @ short.mT)
    values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
    S = values.sqrt()
    scale = torch.where(S > S[:1] * 1e-12, 1 / S, torch.zeros_like(S)) if S.numel() else S
    long = (short.mT @ vectors) * scale
    return (vectors, S, long) if wide else (long, S, vectors)


def cholesky(C: Tensor, damping: float, name: str) -> Tensor:
    """Lower ``L`` with ``L L^T = C + damping * mean(diag C) * I`` (the damping raised tenfold until the
    factorisation succeeds: dead inputs make C singular); the identity for an all-zero C."""
    scale = float(C.diagonal().mean())
    if not scale > 0:  # the layer only ever saw zeros: every rank gives the same (zero) output error
        return torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    for attempt in range(8):
        damped = C.clone()  # the damping added on the diagonal only: no d x d identity formed and added
        damped.diagonal().add_((damping * 10 ** attempt) * scale)
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return L
    raise ValueError(f"decompose: the input covariance of layer {name!r} is not positive definite even with "
                     f"damping {damping * 10 ** 7:g}; it cannot be factored on this data")



def whitened_factors(layer: Candidate, damping: float, rank: Optional[int] = None,
                     outputs_cross: Optional[Tensor] = None, inputs: Optional[Tensor] = None
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(U, S, V)`` such that ``U_r S_r V_r^T`` is the rank-r weight with the least output error.

    Symmetric (default): the error ``||(W - W_r) X||_F`` on the layer's calibration inputs ``X``
    (``layer.covariance = X X^T = L L^T`` up to the damping): the SVD ``W L = U S V_L^T`` and ``V = L^{-T} V_L``;
    ``S`` are then the singular values of ``W L``. Where the layer has no more outputs than inputs this is
    computed without ``L`` (``projected_factors``). Asymmetric (``inputs = H H^T`` and ``outputs_cross = H Y^T``
    with ``H`` the inputs the layer gets in the partly decomposed model and ``Y = W X`` the dense layer's
    outputs): the error ``||W X - W_r H||_F``, minimised by the same whitened SVD of ``Y H^T L_H^{-T}`` with
    ``H H^T = L_H L_H^T`` (reduced-rank regression). ``rank``: the only rank needed, if known (see
    ``factor``)."""
    if inputs is None:
        weight = layer.matrix().to(torch.float64)
        weighted = weight @ layer.covariance
        layer.output_energy = float((weighted * weight).sum())
        if weight.shape[0] <= weight.shape[1]:
            return projected_factors(weight, weighted, layer.covariance, damping)
        L = cholesky(layer.covariance, damping, layer.name)
        target = weight @ L
    else:
        L = cholesky(inputs, damping, layer.name)
        target = torch.linalg.solve_triangular(L, outputs_cross, upper=False).mT
    k = min(target.shape)
    if rank is not None and k >= LOWRANK_SVD_MIN_DIM and rank <= LOWRANK_SVD_MAX_FRACTION * k:
        U, S, V = factor(layer, target, rank)
    else:
        U, S, V = gram_svd(target)
    return U, S, torch.linalg.solve_triangular(L.mT, V, upper=True)


def projected_factors(weight: Tensor, weighted: Tensor, C: Tensor, damping: float) -> Tuple[Tensor, Tensor, Tensor]:
    """The symmetric whitened factors of a float64 ``weight`` ``[n, d]`` with ``n <= d``, without a Cholesky of
    the ``d x d`` covariance: with ``W L = U S V_L^T``, the best rank-r weight ``(W L)_r L^{-1}`` is
    ``U_r U_r^T W``, and ``U``, ``S^2`` are the eigenvectors and eigenvalues of ``W L L^T W^T = W C W^T +
    damping * mean(diag C) * W W^T`` (``n x n``; ``weighted = W C``, formed by the caller). Returns ``(U, S, V =
    W^T U / S)`` (zero columns where ``S`` is numerically zero: those directions carry no output). Costs the
    ``n d^2`` of ``W C`` instead of the Cholesky's ``d^3 / 3`` plus two ``n d^2`` products; an all-zero ``C``
    (inputs that are always zero) gives the weight SVD, as ``cholesky`` does."""
    scale = float(C.diagonal().mean())
    gram = weight @ weight.mT
    M = weighted @ weight.mT + (damping * scale) * gram if scale > 0 else gram
    values, U = torch.linalg.eigh((M + M.mT) / 2)  # symmetrised: the products round each triangle differently
    values, U = values.flip(-1).clamp_min(0), U.flip(-1)
    S = values.sqrt()
    inverse = torch.where(S > S[:1] * 1e-12, 1 / S, torch.zeros_like(S)) if S.numel() else S
    return U, S, (weight.mT @ U) * inverse


def refit_factors(layer: Candidate, inputs: Tensor, outputs_cross: Tensor, damping: float, rank: int
                  ) -> Tuple[Optional[Tuple[Tensor, Tensor, Tensor]], Optional[float]]:
    """The asymmetric refit of ``layer`` from its statistics (see ``whitened_factors``) with the damping that
    keeps the rank-``rank`` weight within ``MAX_REFIT_GROWTH`` of the dense weight: ``(factors, damping)``, or
    ``(None, None)`` when no damping does (see ``MAX_REFIT_GROWTH``)."""
    energy = layer.energy  # the allocation's (symmetric) energy stays what energy_kept reports
    limit = MAX_REFIT_GROWTH * float(layer.matrix().to(torch.float64).norm())
    try:
        for step in range(REFIT_DAMPING_STEPS + 1):
            U, S, V = whitened_factors(layer, damping * 10 ** step, rank, outputs_cross, inputs)
            # ||U_r S_r V_r^T||_F = ||V_r S_r||_F: U's columns are orthonormal, so no m x n product is formed
            if float((V[:, :rank] * S[:rank]).norm()) <= limit:
                return (U, S, V), damping * 10 ** step
        return None, None
    finally:
        layer.energy = energy


def calibration_error(layer: Candidate, rank: int) -> Tuple[float, float]:
    """``(||(W - W_r) X||_F^2, ||W X||_F^2)`` on the calibration inputs (float64, from the covariance ``C``) of a
    layer whose symmetric factors were computed (``whitened_factors`` records ``||W X||_F^2 = tr(W C W^T)``).
    With ``W_r = A B^T`` (``A = U_r S_r``, ``B = V_r``, the factors in place, refitted or not) the error is
    ``tr(W C W^T) - 2 tr(A^T W (C B)) + tr(A^T A B^T (C B))``: ``d^2 r + n d r``, no ``n d^2`` product."""
    U, S, V = layer.factors
    W = layer.matrix().to(torch.float64)
    A, B = U[:, :rank] * S[:rank], V[:, :rank]
    CB = layer.covariance @ B
    quadratic = float(((A.mT @ A) * (B.mT @ CB)).sum())
    error = layer.output_energy - 2 * float(((W @ CB) * A).sum()) + quadratic
    return max(error, 0.0), layer.output_energy


def lowrank_module(layer: Candidate, rank: int) -> nn.Module:
    """The low-rank module of ``layer`` at ``rank`` from its factors."""
    U, S, V = layer.factors
    # Whitened factors (V = L^{-T} V_L) do not have unit columns: fold each column's norm into S so that
    # from_factors splits every rank-1 term evenly between the two layers (the product is unchanged).
    # Otherwise the scale of the whitening lands on one side (measured ~70x apart on ResNet-20), and SGD on
    # the pair diverges in the first fine-tune epoch. Weight-SVD columns have unit norm: a no-op there.
    norms = V[:, :rank].norm(dim=0)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    U, S, V = U[:, :rank], S[:rank] * norms, V[:, :rank] / norms
    if layer.kind == "conv2d":
        return LowRankConv2d.from_factors(layer.module, U, S, V, rank, layer.scheme)
    out_features, in_features = linear_features(layer.module)
    # from_factors reads the shapes, device, dtype and bias: an HF Conv1D passes as such a Linear
    linear = layer.module if isinstance(layer.module, nn.Linear) else SimpleNamespace(
        in_features=in_features, out_features=out_features, weight=layer.module.weight, bias=layer.module.bias)
    return LowRankLinear.from_factors(linear, U, S, V, rank)
