"""svd, orthonormalize, svd_lowrank, energy_rank against float64 references (fresh random inputs each run)."""
import pytest
import torch

import rankprune.ops as ops
from rankprune.ops import _svd as svd_module
from conftest import devices


def _decaying(batch, m, n, kind, dtype=torch.float64, device="cpu"):
    """Random matrices with a prescribed spectrum (random singular vectors)."""
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, r, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, r, dtype=torch.float64))
    j = torch.arange(r, dtype=torch.float64)
    s = {"poly": (j + 1) ** -1.0, "poly2": (j + 1) ** -2.0, "exp": 0.93 ** j, "graded": 10.0 ** (-6 * j / max(r - 1, 1))}[kind]
    return ((U * s) @ V.mT).to(device=device, dtype=dtype)


# torch.linalg.svd on CUDA (cuSOLVER) in float32: orthonormality and singular values to about 2e-5 and 4e-5 of
# sigma_max on an H100 (torch 2.11), against 1e-5 for rankprune's kernels and LAPACK.
CUSOLVER_FLOAT32_RTOL = 1e-4


def _rtol(A, library: bool) -> float:
    """The tolerance of ``_check_svd`` for ``A`` on the library (torch.linalg.svd) side of the dispatch or not."""
    return CUSOLVER_FLOAT32_RTOL if library and A.is_cuda and A.dtype != torch.float64 else 1e-5


def _check_svd(A, U, S, V, rtol=1e-5):
    """Shapes, descending S matching the float64 singular values, orthonormal U/V, reconstruction."""
    m, n = A.shape[-2], A.shape[-1]
    k = min(m, n)
    assert U.shape == (*A.shape[:-2], m, k) and S.shape == (*A.shape[:-2], k) and V.shape == (*A.shape[:-2], n, k)
    want = torch.float64 if A.dtype == torch.float64 else torch.float32
    assert U.dtype == S.dtype == V.dtype == want
    A64, U64, S64, V64 = (t.detach().cpu().double() for t in (A, U, S, V))
    if k == 0 or A64.numel() == 0:
        return
    assert (S64[..., 1:] <= S64[..., :-1]).all()
    S_ref = torch.linalg.svdvals(A64)
    scale = S_ref[..., :1].clamp_min(1e-300)
    assert ((S64 - S_ref).abs() / scale).max() <= rtol
    eye = torch.eye(k, dtype=torch.float64)
    assert (U64.mT @ U64 - eye).abs().max() <= rtol
    assert (V64.mT @ V64 - eye).abs().max() <= rtol
    rec = (U64 * S64.unsqueeze(-2)) @ V64.mT
    err = (rec - A64).norm(dim=(-2, -1)) / A64.norm(dim=(-2, -1)).clamp_min(1e-300)
    assert err.max() <= rtol


# ---- svd ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["kernel", "library"])
def svd_route(request, monkeypatch):
    """Run an ``ops.svd`` test through rankprune's kernel at every size, then through torch.linalg.svd at
    every size (the two sides of the size dispatch)."""
    limit = 10**9 if request.param == "kernel" else 0
    monkeypatch.setattr(svd_module, "SVD_KERNEL_MAX_K", {"cpu": limit, "cuda": limit})
    return request.param


@pytest.mark.parametrize("device", devices())
def test_svd_dispatches_by_size(seed, device, monkeypatch):
    # up to SVD_KERNEL_MAX_K the kernel runs (torch.linalg.svd is never called), beyond it torch.linalg.svd
    limit = svd_module.SVD_KERNEL_MAX_K[torch.device(device).type]
    calls = []
    library = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(a[0].shape) or library(*a, **k))
    for m, n in ((limit, limit), (3 * limit, limit), (limit + 1, limit + 1), (limit + 1, 2 * limit + 5)):
        A = torch.randn(2, m, n, device=device)
        _check_svd(A, *ops.svd(A), rtol=_rtol(A, min(m, n) > limit))
        assert len(calls) == (min(m, n) > limit), (m, n, calls)
        calls.clear()



@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(7, 1, 1), (6, 3, 3), (5, 7, 4), (5, 4, 7), (2, 3, 16, 16), (3, 33, 33),
                                   (2, 64, 64), (2, 40, 9), (2, 150, 40), (2, 40, 150)])
def test_svd_gaussian(seed, device, shape, svd_route):
    A = torch.randn(*shape, device=device)
    _check_svd(A, *ops.svd(A), rtol=_rtol(A, svd_route == "library"))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["poly", "poly2", "exp", "graded"])
@pytest.mark.parametrize("mn", [(24, 24), (80, 20), (20, 80)])
def test_svd_spectra(seed, device, kind, mn, svd_route):
    A = _decaying((3,), *mn, kind, dtype=torch.float32, device=device)
    _check_svd(A, *ops.svd(A), rtol=_rtol(A, svd_route == "library"))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mnr", [(20, 12, 3), (12, 20, 5), (120, 30, 4), (16, 16, 0)])
def test_svd_rank_deficient(seed, device, mnr, svd_route):
    m, n, r = mnr
    A = torch.randn(4, m, r, device=device) @ torch.randn(4, r, n, device=device)
    A[0, :, 0] = 0  # an exactly zero column as well
    U, S, V = ops.svd(A)
    _check_svd(A, U, S, V, rtol=_rtol(A, svd_route == "library"))
    if r > 0:
        assert (S[..., r:] <= 1e-5 * S[..., :1]).all()
    else:
        assert (S == 0).all()


@pytest.mark.parametrize("device", devices())
def test_svd_nan_is_isolated(device, svd_route):
    A = torch.randn(3, 9, 6, device=device)
    A[1, 4, 2] = float("nan")
    B = torch.randn(2, 300, 20, device=device)  # the QR-preconditioned path
    B[0, 7, 3] = float("inf")
    for X, bad in ((A, 1), (B, 0)):
        U, S, V = ops.svd(X)
        assert torch.isnan(S[bad]).all() and torch.isnan(U[bad]).all() and torch.isnan(V[bad]).all()
        good = [i for i in range(X.shape[0]) if i != bad]
        _check_svd(X[good], U[good], S[good], V[good])


@pytest.mark.parametrize("device", devices())
def test_svd_strides(seed, device, svd_route):
    base = torch.randn(5, 30, 40, device=device)
    for A in (base.mT, base[:, ::2, 1::3], base.permute(1, 0, 2)[:, :, :20], base[::2].expand(2, 3, 30, 40)):
        _check_svd(A, *ops.svd(A))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_svd_dtypes(seed, device, dtype, svd_route):
    A = torch.randn(3, 20, 12, device=device).to(dtype)
    U, S, V = ops.svd(A)
    _check_svd(A, U, S, V, rtol=1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("device", devices())
def test_svd_empty(device, svd_route):
    for shape in [(0, 5, 3), (2, 0, 4), (2, 4, 0), (3, 0, 0)]:
        A = torch.randn(*shape, device=device)
        U, S, V = ops.svd(A)
        _check_svd(A, U, S, V)


def test_svd_errors():
    with pytest.raises(RuntimeError, match="svd"):
        ops.svd(torch.randn(5))
    with pytest.raises(RuntimeError, match="float"):
        ops.svd(torch.ones(3, 3, dtype=torch.int32))


# ---- orthonormalize -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_orthonormalize(seed, device):
    A = torch.randn(4, 50, 12, device=device)
    A[1, :, 5] = A[1, :, 2]  # rank-deficient sketches: duplicate column, zero column, zero matrix
    A[2, :, 7] = 0
    A[3] = 0
    Q = ops.orthonormalize(A)
    assert Q.shape == A.shape and Q.dtype == torch.float32
    Q64, A64 = Q.double().cpu(), A.double().cpu()
    assert (Q64.mT @ Q64 - torch.eye(12, dtype=torch.float64)).abs().max() < 1e-5
    resid = A64 - Q64 @ (Q64.mT @ A64)  # span(Q) holds span(A)
    assert (resid.norm(dim=(-2, -1)) <= 1e-5 * A64.norm(dim=(-2, -1)).clamp_min(1e-30)).all()
    with pytest.raises(ValueError, match="tall"):
        ops.orthonormalize(torch.randn(3, 5, device=device))


# ---- svd_lowrank ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["poly", "poly2", "exp"])
@pytest.mark.parametrize("bmnk", [(3, 200, 160, 16), (2, 96, 300, 24)])
def test_svd_lowrank_near_optimal(seed, device, kind, bmnk):
    b, m, n, k = bmnk
    A = _decaying((b,), m, n, kind, dtype=torch.float32, device=device)
    U, S, V = ops.svd_lowrank(A, k)
    assert U.shape == (b, m, k) and S.shape == (b, k) and V.shape == (b, n, k)
    A64 = A.double().cpu()
    err = (A64 - (U.double().cpu() * S.double().cpu().unsqueeze(-2)) @ V.double().cpu().mT).norm(dim=(-2, -1))
    assert (err <= 1.05 * ops.lowrank_error_reference(A64, k)).all()
    eye = torch.eye(k, dtype=torch.float64)
    assert (U.double().cpu().mT @ U.double().cpu() - eye).abs().max() < 1e-5
    assert (V.double().cpu().mT @ V.double().cpu() - eye).abs().max() < 1e-5


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_svd_lowrank_exact_rank(seed, device, dtype):
    k = 10
    A = (torch.randn(3, 80, k, device=device) @ torch.randn(3, k, 120, device=device)).to(dtype)
    U, S, V = ops.svd_lowrank(A, k)
    A64 = A.double().cpu()
    err = (A64 - (U.double().cpu() * S.double().cpu().unsqueeze(-2)) @ V.double().cpu().mT).norm(dim=(-2, -1))
    assert (err <= 1e-4 * A64.norm(dim=(-2, -1))).all()
    assert torch.allclose(S.double().cpu(), torch.linalg.svdvals(A64)[..., :k], rtol=1e-4)


@pytest.mark.parametrize("device", devices())
def test_svd_lowrank_deterministic_and_independent(device):
    A = torch.randn(2, 60, 40, device=device)
    outs = [ops.svd_lowrank(A, 5, generator=torch.Generator(device=device).manual_seed(7)) for _ in range(2)]
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    # Each matrix has its own sketch: two equal matrices in one batch still get computed independently,
    # and their results agree with the batch-of-one results only through the spectrum.
    same = A[:1].expand(2, 60, 40)
    _, S, _ = ops.svd_lowrank(same, 5, power_iters=0, oversample=0,
                              generator=torch.Generator(device=device).manual_seed(3))
    assert not torch.equal(S[0], S[1])


@pytest.mark.parametrize("device", devices())
def test_svd_lowrank_edge_cases(device):
    U, S, V = ops.svd_lowrank(torch.zeros(0, 30, 20, device=device), 4)
    assert U.shape == (0, 30, 4) and S.shape == (0, 4) and V.shape == (0, 20, 4)
    U, S, V = ops.svd_lowrank(torch.zeros(2, 30, 20, device=device), 4)
    assert (S == 0).all()
    eye = torch.eye(4, dtype=torch.float64)
    assert (U.double().cpu().mT @ U.double().cpu() - eye).abs().max() < 1e-5
    U, S, V = ops.svd_lowrank(torch.randn(2, 30, 20, device=device, dtype=torch.float16), 20)  # k = min(m, n)
    assert U.dtype == torch.float32 and S.shape == (2, 20)


def test_svd_lowrank_errors():
    A = torch.randn(2, 30, 20)
    for k in (0, -1, 21):
        with pytest.raises(ValueError, match="k must be"):
            ops.svd_lowrank(A, k)
    with pytest.raises(ValueError, match="oversample"):
        ops.svd_lowrank(A, 3, oversample=-1)
    with pytest.raises(ValueError, match="power_iters"):
        ops.svd_lowrank(A, 3, power_iters=-2)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.svd_lowrank(A, 2.5)
    with pytest.raises(ValueError, match="batch of matrices"):
        ops.svd_lowrank(torch.randn(5), 1)


# ---- energy_rank ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("energy", [1e-9, 0.5, 0.9, 0.99, 1.0])
def test_energy_rank(seed, device, energy):
    S = torch.rand(4, 3, 17, device=device).sort(-1, descending=True).values
    S[0, 0] = 0  # all-zero spectrum -> 1
    S[1, 1, 5:] = 0  # energy 1 stops at the last nonzero value
    r = ops.energy_rank(S, energy)
    assert r.dtype == torch.int64 and r.shape == (4, 3)
    assert torch.equal(r.cpu(), ops.energy_rank_reference(S, energy))
    assert (r >= 1).all()
    if energy == 1.0:
        assert r[1, 1] == 5 and r[0, 0] == 1


@pytest.mark.parametrize("device", devices())
def test_energy_rank_dtypes_and_nan(device):
    S = torch.tensor([[4.0, 3.0, 0.0], [1.0, float("nan"), 0.0]], device=device)
    assert ops.energy_rank(S, 0.6).tolist() == [1, 3]  # 16/25 >= 0.6; NaN keeps everything
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert ops.energy_rank(S[:1].to(dtype), 0.7).tolist() == [2]


def test_energy_rank_errors():
    S = torch.ones(3, 4)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="energy must be in"):
            ops.energy_rank(S, bad)
    with pytest.raises(ValueError, match="at least one"):
        ops.energy_rank(torch.ones(3, 0), 0.5)


# ---- opcheck and fake tensors ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_opcheck(seed, device):
    A = torch.randn(3, 12, 7, device=device)
    torch.library.opcheck(torch.ops.rankprune.svd.default, (A,))
    torch.library.opcheck(torch.ops.rankprune.svd.default, (A.mT.contiguous().double(),))
    torch.library.opcheck(torch.ops.rankprune.svd.default, (torch.randn(2, 200, 30, device=device),))
    torch.library.opcheck(torch.ops.rankprune.orthonormalize.default, (A,))
    torch.library.opcheck(torch.ops.rankprune.energy_rank.default, (torch.rand(3, 5, device=device), 0.9))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        A = torch.empty(4, 2, 9, 5, dtype=torch.bfloat16)
        U, S, V = ops.svd(A)
        assert U.shape == (4, 2, 9, 5) and S.shape == (4, 2, 5) and V.shape == (4, 2, 5, 5)
        assert U.dtype == torch.float32
        U, S, V = ops.svd(A.mT)
        assert U.shape == (4, 2, 5, 5) and V.shape == (4, 2, 9, 5)
        assert ops.orthonormalize(A).shape == A.shape
        r = ops.energy_rank(torch.empty(6, 5), 0.5)
        assert r.shape == (6,) and r.dtype == torch.int64
        U, S, V = ops.svd_lowrank(torch.empty(3, 40, 30), 4)
        assert U.shape == (3, 40, 4) and S.shape == (3, 4) and V.shape == (3, 30, 4)


def test_svd_compiles(seed):
    A = torch.randn(2, 10, 6)
    f = torch.compile(lambda x: ops.svd(x)[1].sum(-1), fullgraph=True, backend="eager")
    assert torch.allclose(f(A), ops.svd(A)[1].sum(-1))


@pytest.mark.parametrize("device", devices())
def test_large_matrices(seed, device):
    """Sizes whose workspace exceeds GPU shared memory (the global-memory workspace path on CUDA)."""
    A = torch.randn(2, 180, 170, device=device)
    _check_svd(A, *ops.svd(A))
    A = torch.randn(2, 3000, 72, device=device)
    Q = ops.orthonormalize(A).double().cpu()
    assert (Q.mT @ Q - torch.eye(72, dtype=torch.float64)).abs().max() < 1e-5
    _check_svd(A, *ops.svd(A))  # QR path with a global-memory QR
