"""Thin SVD with vectors, randomized truncated SVD and energy ranks: svd, svd_lowrank, orthonormalize,
energy_rank."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _library  # noqa: F401  (registers the schemas)
from ._svdvals import _check_float, _real_dtype


# Largest min(m, n) that the batched Jacobi kernel takes; larger matrices go to LAPACK / cuSOLVER through
# torch.linalg.svd, which is faster there. CPU: from benchmarks/bench_svd_dispatch.py (1 and 2 threads,
# side by side). CUDA: not measured yet (no GPU run); the kernel keeps matrices up to its global-workspace
# regime, where cuSOLVER's per-matrix gesvdj loop is not yet a clear winner.
SVD_KERNEL_MAX_K = {"cpu": 32, "cuda": 256}


def svd(A: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of every matrix of ``A [..., m, n]``: ``U [..., m, k]``, ``S [..., k]`` (descending),
    ``V [..., n, k]`` with ``k = min(m, n)`` and ``A = U diag(S) V^T``.

    Any float dtype and strides; results are float32 (float64 for float64 input). Up to
    ``k = SVD_KERNEL_MAX_K[device]``: one-sided Jacobi in float64 arithmetic on chip (one CUDA block per
    matrix, shared memory when the matrix fits, a global workspace beyond); tall or wide matrices with more
    than 4096 entries go through a Householder QR first (SVD of the small R factor, then ``U = Q U_R`` by one
    batched GEMM). Larger matrices go to ``torch.linalg.svd`` (LAPACK gesdd / cuSOLVER) in the result dtype,
    which is faster there (``benchmarks/bench_svd_dispatch.py``). Zero singular values get orthonormal
    completions of U and V; a matrix holding NaN or Inf gives NaN outputs (the rest of the batch is
    unaffected). No autograd.
    """
    if isinstance(A, Tensor) and A.dim() >= 2 and A.is_floating_point() and not A.is_complex():
        limit = SVD_KERNEL_MAX_K.get(A.device.type)
        if limit is not None and min(A.shape[-2], A.shape[-1]) > limit:
            return _library_svd(A)
    return torch.ops.rankprune.svd.default(A)


def _library_svd(A: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``svd`` through ``torch.linalg.svd``, with the op's dtypes and its NaN behaviour (a matrix holding NaN
    or Inf gives NaN outputs, the others are unaffected)."""
    X = A.detach().to(_real_dtype(A.dtype))
    # one reduction over everything first: the per-matrix mask costs three more small ops, which at k=32 are a
    # tenth of the SVD itself
    finite = torch.isfinite(X)
    has_bad = not bool(finite.all())
    if has_bad:
        bad = ~finite.all(-1).all(-1)
        X = X.masked_fill(bad[..., None, None], 0.0)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    V = Vh.mT
    if has_bad:
        nan = float("nan")
        U, S, V = (U.masked_fill(bad[..., None, None], nan), S.masked_fill(bad[..., None], nan),
                   V.masked_fill(bad[..., None, None], nan))
    return U.contiguous(), S, V.contiguous()


def orthonormalize(A: Tensor) -> Tensor:
    """Orthonormal basis ``Q [..., m, k]`` of the columns of every tall matrix ``A [..., m, k]`` (m >= k).

    Householder QR on chip (LAPACK geqr2/org2r arithmetic), batched: ``Q`` has orthonormal columns and
    ``span(Q) ⊇ span(A)`` even when ``A`` is rank-deficient (zero directions are completed), which
    Gram/Cholesky-based QR cannot give. float32 results (float64 for float64 input).
    """
    return torch.ops.rankprune.orthonormalize.default(A)


def energy_rank(S: Tensor, energy: float) -> Tensor:
    """Smallest ``r >= 1`` per matrix such that ``sum(S[..., :r]**2) >= energy * sum(S**2)``.

    ``S [..., k]`` holds singular values in descending order (as from :func:`svd` / :func:`svdvals`);
    returns int64 ``[...]``. ``energy`` must lie in (0, 1] (``ValueError`` otherwise); an all-zero ``S``
    gives 1, a row holding NaN gives ``k`` (keep everything rather than a meaningless low rank).
    Sums in float64.
    """
    return torch.ops.rankprune.energy_rank.default(S, float(energy))


def svd_lowrank(
    A: Tensor,
    k: int,
    oversample: int = 8,
    power_iters: int = 2,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Rank-``k`` truncated SVD of every matrix of ``A [..., m, n]`` by a randomized range finder
    (Halko, Martinsson & Tropp 2011, Alg. 4.4 with re-orthonormalized power iterations).

    Each matrix gets its own Gaussian sketch of ``l = min(k + oversample, min(m, n))`` columns drawn from
    ``generator`` (a ``torch.Generator`` on ``A``'s device; the global one if ``None``), so results are
    deterministic for a given generator state. Products with ``A`` are batched ATen matmuls (cuBLAS on
    GPU), orthonormalization is the batched on-chip :func:`orthonormalize`, and the small ``l x n``
    problem is solved by :func:`svd`. Returns ``U [..., m, k]``, ``S [..., k]`` (descending),
    ``V [..., n, k]``, float32 (float64 for float64 input). Raises ``ValueError`` unless
    ``1 <= k <= min(m, n)``, ``oversample >= 0`` and ``power_iters >= 0``.
    """
    if not isinstance(A, Tensor):
        raise TypeError(f"rankprune.svd_lowrank: A must be a Tensor, got {type(A).__name__}")
    if A.dim() < 2:
        raise ValueError(f"rankprune.svd_lowrank: A must be a batch of matrices [..., m, n], got shape {tuple(A.shape)}")
    if A.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"rankprune.svd_lowrank: A must be float16, bfloat16, float32 or float64, got {A.dtype}")
    m, n = A.shape[-2], A.shape[-1]
    for name, value, low in (("k", k, 1), ("oversample", oversample, 0), ("power_iters", power_iters, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"rankprune.svd_lowrank: {name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"rankprune.svd_lowrank: {name} must be >= {low}, got {value}")
    if k > min(m, n):
        raise ValueError(f"rankprune.svd_lowrank: k must be <= min(m, n) = {min(m, n)}, got {k}")
    if m < n:  # sketch the tall side: A^T = V S U^T
        U, S, V = svd_lowrank(A.mT, k, oversample, power_iters, generator)
        return V, S, U
    X = A.to(_real_dtype(A.dtype))
    sketch = min(k + oversample, n)
    omega = torch.randn(*X.shape[:-2], n, sketch, dtype=X.dtype, device=X.device, generator=generator)
    Q = orthonormalize(X @ omega)
    for _ in range(power_iters):
        Q = orthonormalize(X @ orthonormalize(X.mT @ Q))
    Ub, S, V = svd(Q.mT @ X)  # [..., l, n] = Ub diag(S) V^T
    return Q @ Ub[..., :k], S[..., :k], V[..., :k]


# ---- fake kernels (shapes and dtypes only) for torch.compile / torch.export -------------------------


@torch.library.register_fake("rankprune::svd")
def _svd_fake(A):
    torch._check(A.dim() >= 2, lambda: f"rankprune.svd: expected [..., m, n], got {tuple(A.shape)}")
    _check_float(A, "svd")
    m, n = A.shape[-2], A.shape[-1]
    k = min(m, n)
    dtype = _real_dtype(A.dtype)
    batch = A.shape[:-2]
    return (A.new_empty((*batch, m, k), dtype=dtype), A.new_empty((*batch, k), dtype=dtype),
            A.new_empty((*batch, n, k), dtype=dtype))


@torch.library.register_fake("rankprune::orthonormalize")
def _orthonormalize_fake(A):
    torch._check(A.dim() >= 2, lambda: f"rankprune.orthonormalize: expected [..., m, k], got {tuple(A.shape)}")
    _check_float(A, "orthonormalize")
    torch._check_value(A.shape[-2] >= A.shape[-1],
                       lambda: f"rankprune.orthonormalize: A must be tall (m >= k), got {tuple(A.shape)}")
    return A.new_empty(A.shape, dtype=_real_dtype(A.dtype))


@torch.library.register_fake("rankprune::energy_rank")
def _energy_rank_fake(S, energy):
    torch._check_value(S.dim() >= 1, lambda: "rankprune.energy_rank: S must hold singular values [..., k]")
    _check_float(S, "energy_rank")
    torch._check_value(0.0 < energy <= 1.0, lambda: f"rankprune.energy_rank: energy must be in (0, 1], got {energy}")
    torch._check_value(S.shape[-1] >= 1, lambda: "rankprune.energy_rank: S must hold at least one singular value")
    return S.new_empty(S.shape[:-1], dtype=torch.int64)


# ---- float64 references (torch.linalg / LAPACK), used by the tests ----------------------------------


def svd_reference(A: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """float64 thin ``torch.linalg.svd`` of ``A`` as ``(U, S, V)``."""
    U, S, Vh = torch.linalg.svd(A.detach().to(torch.float64), full_matrices=False)
    return U, S, Vh.mH


def lowrank_error_reference(A: Tensor, k: int) -> Tensor:
    """Optimal rank-``k`` error ``||A - A_k||_F`` per matrix (Eckart-Young), from a float64 SVD."""
    S = torch.linalg.svdvals(A.detach().to(torch.float64))
    return S[..., k:].square().sum(-1).sqrt()


def energy_rank_reference(S: Tensor, energy: float) -> Tensor:
    """Loop over the rows in float64: the first r whose leading sum of squares reaches ``energy`` of the total."""
    S64 = S.detach().to(torch.float64, copy=True).cpu()
    flat = S64.reshape(-1, S64.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.int64)
    for row in range(flat.shape[0]):
        sq = flat[row].square().tolist()
        total = 0.0
        for x in sq:  # sequential, like the cumulative sum the op compares with
            total += x
        if total != total:
            out[row] = flat.shape[1]
            continue
        acc, r = 0.0, flat.shape[1]
        for i in range(flat.shape[1]):
            acc += sq[i]
            if acc >= energy * total:
                r = i + 1
                break
        out[row] = r
    return out.reshape(S64.shape[:-1])
