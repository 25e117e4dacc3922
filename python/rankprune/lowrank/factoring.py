"""Factoring one layer: the SVD of its weight matrix (data-free), of its whitened weight (data-aware: the least
output error on the calibration inputs), or the reduced-rank regression of the asymmetric refit; and the
low-rank module built from the factors.

With ``C = X X^T + damping * mean(diag) * I = L L^T`` (Cholesky) on the calibration inputs ``X``, the best
rank-r weight is ``(W L)_r L^{-1}``, and the discarded squared singular values of ``W L`` are the output error
``||(W - W_r) X||_F^2`` of every rank (see docs/lowrank.md)."""
from types import SimpleNamespace
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from .._linalg import damped_cholesky
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
    vectors, S, inverse = descending_eigh(short @ short.mT)
    long = (short.mT @ vectors) * inverse
    return (vectors, S, long) if wide else (long, S, vectors)


def cholesky(C: Tensor, damping: float, name: str) -> Tensor:
    """Lower ``L`` with ``L L^T = C + damping * mean(diag C) * I`` (see ``shifted_cholesky``)."""
    return shifted_cholesky(C, damping, float(C.diagonal().mean()), name)[0]


def shifted_cholesky(C: Tensor, damping: float, scale: float, name: str) -> Tuple[Tensor, float]:
    """``(L, shift)`` with ``L L^T = C + shift * I`` and ``shift = damping * scale``, the damping raised tenfold
    (7 times at most) until the factorisation succeeds; ``(I, 0)`` where ``scale`` is 0 (a layer that only ever
    saw zeros: every rank gives the same, zero, output error)."""
    if not scale > 0:
        return torch.eye(C.shape[0], dtype=C.dtype, device=C.device), 0.0
    return damped_cholesky(C, (damping * 10 ** attempt * scale for attempt in range(8)),
                           f"decompose: the input covariance of layer {name!r}")


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
        C = layer.covariance
        quadratic = C.quadratic(weight)
        layer.output_energy = float(quadratic.trace())
        if weight.shape[0] <= weight.shape[1]:
            return projected_factors(weight, quadratic, float(C.diagonal().mean()), damping)
        L = cholesky(C.matrix(), damping, layer.name)
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


def projected_factors(weight: Tensor, quadratic: Tensor, scale: float, damping: float
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """The symmetric whitened factors of a float64 ``weight`` ``[n, d]`` with ``n <= d``, without a Cholesky of
    the ``d x d`` covariance ``C``: with ``W L = U S V_L^T``, the best rank-r weight ``(W L)_r L^{-1}`` is
    ``U_r U_r^T W``, and ``U``, ``S^2`` are the eigenvectors and eigenvalues of ``W L L^T W^T = W C W^T +
    damping * scale * W W^T`` (``n x n``; ``quadratic = W C W^T`` and ``scale = mean(diag C)``, formed by the
    caller). Returns ``(U, S, V = W^T U / S)`` (zero columns where ``S`` is numerically zero: those directions
    carry no output). Costs the ``n d^2`` of ``W C`` (or ``n d`` per column, see ``ColumnStatistics``) instead of
    the Cholesky's ``d^3 / 3`` plus two ``n d^2`` products; an all-zero ``C`` (inputs that are always zero) gives
    the weight SVD, as ``cholesky`` does."""
    gram = weight @ weight.mT
    M = quadratic + (damping * scale) * gram if scale > 0 else gram
    U, S, inverse = descending_eigh(M)
    return U, S, (weight.mT @ U) * inverse


def descending_eigh(M: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(U, S, 1 / S)`` of a symmetric PSD ``M = U S^2 U^T`` (symmetrised first: products round each triangle
    differently), ``S`` descending; ``1 / S`` is 0 where ``S`` is numerically zero (below ``1e-12 S_max``)."""
    values, U = torch.linalg.eigh((M + M.mT) / 2)
    values, U = values.flip(-1).clamp_min(0), U.flip(-1)
    S = values.sqrt()
    inverse = torch.where(S > S[:1] * 1e-12, 1 / S, torch.zeros_like(S)) if S.numel() else S
    return U, S, inverse


def sample_space_factors(columns: Tensor, targets: Tensor, damping: float, name: str,
                         kernel: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The asymmetric refit's factors (``whitened_factors`` with ``inputs = H H^T``, ``outputs_cross = H Y^T``),
    computed from the columns themselves where there are fewer of them than inputs (``n < d``): ``columns``
    ``[n, d]`` holds ``H^T``, ``targets`` ``[n, m]`` holds ``Y^T`` (float64), ``m <= d``.

    With ``lambda = damping * mean(diag H H^T)`` and ``K = H^T H + lambda I`` (``n x n``), the regression's
    weight is ``W* = Y H^T (H H^T + lambda I)^{-1} = Y K^{-1} H^T`` (push-through), and the whitened target
    ``T = Y H^T L_H^{-T}`` of the ``d x d`` path has ``T T^T = Y H^T (H H^T + lambda I)^{-1} H Y^T =
    Y (I - lambda K^{-1}) Y^T`` (``m x m``). Its eigenvectors ``U`` and eigenvalues ``S^2`` give the rank-r weight
    ``U_r U_r^T W*``, returned as ``(U, S, V = W*^T U / S)``: the same factors as the ``d x d`` path, for
    ``n^2 d`` (the kernel ``H^T H``) and ``n^3 / 3`` (its Cholesky) instead of ``n d^2`` and ``d^3 / 3`` (at 32
    images, ResNet-18's 4608-input convolutions see 1568 columns: 3x fewer). ``kernel``: ``H^T H`` (float64) if
    the caller has it (``columns @ columns^T``, formed here otherwise)."""
    d, m = columns.shape[1], targets.shape[1]
    if kernel is None:
        kernel = (columns @ columns.mT).to(torch.float64)
    scale = float(kernel.diagonal().sum()) / d  # mean(diag H H^T) = ||H||_F^2 / d = tr(H^T H) / d
    if not scale > 0:  # all-zero inputs: no weight reproduces anything (the d x d path's zero target)
        return (torch.eye(m, dtype=torch.float64, device=targets.device), targets.new_zeros(m),
                targets.new_zeros(d, m))
    L, shift = shifted_cholesky(kernel, damping, scale, name)
    Z = torch.linalg.solve_triangular(L, targets, upper=False)  # L^{-1} Y^T: [n, m]
    U, S, inverse = descending_eigh(targets.mT @ targets - shift * (Z.mT @ Z))
    # W*^T = H (K^{-1} Y^T): [d, m], the product in the columns' dtype (float32 for wide layers, as the d x d
    # path forms H H^T: 4x faster than float64 at d = 4608, n = 1568 on 2 CPU threads)
    weight_t = (columns.mT @ torch.linalg.solve_triangular(L.mT, Z, upper=True).to(columns.dtype)).to(torch.float64)
    return U, S, (weight_t @ U) * inverse


def refit_factors(layer: Candidate, fit: Callable[[float, int], Tuple[Tensor, Tensor, Tensor]], damping: float,
                  rank: int) -> Tuple[Optional[Tuple[Tensor, Tensor, Tensor]], Optional[float]]:
    """The asymmetric refit of ``layer``: ``fit(damping, rank)`` gives its factors from its statistics (see
    ``whitened_factors`` and ``sample_space_factors``); the damping is the least (of ``damping`` times a power
    of ten) that keeps the rank-``rank`` weight within ``MAX_REFIT_GROWTH`` of the dense weight. Returns
    ``(factors, damping)``, or ``(None, None)`` when no damping does (see ``MAX_REFIT_GROWTH``)."""
    energy = layer.energy  # the allocation's (symmetric) energy stays what energy_kept reports
    limit = MAX_REFIT_GROWTH * float(layer.matrix().to(torch.float64).norm())
    try:
        for step in range(REFIT_DAMPING_STEPS + 1):
            U, S, V = fit(damping * 10 ** step, rank)
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
    CB = layer.covariance.times(B)
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
