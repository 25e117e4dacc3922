"""CUDA paths of svd / orthonormalize / svd_lowrank that test_svd.py does not reach (issue 13, cuda-review.md
section 3 items 3, 4 and 7): svd_lowrank at its real shape (TRP's 16 x 512 x 4608 groups) and with NaN,
orthonormalize with NaN on the shared and global QR paths, the svd shared/global workspace boundary, the
grid-stride loops of the global svd and QR paths, and float16/bfloat16 through svd's QR path and
orthonormalize. Paths (csrc/cuda/svd_cuda.cpp, kernels in svd_kernels.cu): a matrix's workspace in shared memory while it fits the opt-in
limit (227 KB on H100/H200), else in global memory with the grid capped at 4 blocks per SM."""
import pytest
import torch

from rankprune import ops
from conftest import devices

cuda = pytest.mark.cuda


def sms():
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def check_svd(a, U, S, V, tol):
    """S against float64 LAPACK, U and V orthonormal, U diag(S) V^T = a (all relative to sigma_max)."""
    a = a.double().cpu()
    U, S, V = U.double().cpu(), S.double().cpu(), V.double().cpu()
    ref = torch.linalg.svdvals(a)
    smax = ref[..., :1]
    assert ((S - ref).abs() / smax).max() <= tol
    eye = torch.eye(S.shape[-1], dtype=torch.float64)
    torch.testing.assert_close(U.mT @ U, eye.expand_as(U.mT @ U), rtol=0, atol=tol * 10)
    torch.testing.assert_close(V.mT @ V, eye.expand_as(V.mT @ V), rtol=0, atol=tol * 10)
    assert (((U * S[..., None, :]) @ V.mT - a).abs().amax((-2, -1)) / smax[..., 0]).max() <= tol * 10


def check_orthonormal_basis(a, q, tol):
    """q has orthonormal columns and spans the columns of a."""
    a, q = a.double().cpu(), q.double().cpu()
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    torch.testing.assert_close(q.mT @ q, eye.expand_as(q.mT @ q), rtol=0, atol=tol)
    residual = a - q @ (q.mT @ a)
    assert (residual.norm(dim=(-2, -1)) / a.norm(dim=(-2, -1))).max() <= tol


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n", [119, 120])  # float64 square: shared memory up to 119, global workspace from 120
def test_svd_shared_global_boundary(device, n, seed):
    a = torch.randn(2, n, n, dtype=torch.float64)
    check_svd(a, *ops.svd(a.to(device)), tol=1e-10)


def _repeated(count, stride, shape, dtype):
    """count matrices, a few distinct ones repeated so that a matrix and the one `stride` later differ."""
    period = 5 if stride % 5 else 7
    distinct = torch.randn(period, *shape, dtype=torch.float64).to(dtype)
    return distinct[torch.arange(count) % period]


@cuda
def test_svd_grid_stride_on_global_path(seed):
    # 130 x 120: Householder QR first, then the 120 x 120 R (230 KB of float64 with V) on the global path;
    # more matrices than its 4-blocks-per-SM grid.
    stride = 4 * sms()
    a = _repeated(stride + 5, stride, (130, 120), torch.float64)
    U, S, V = ops.svd(a.cuda())
    check_svd(a, U, S, V, tol=1e-10)


@cuda
def test_orthonormalize_grid_stride_on_global_path(seed):
    stride = 4 * sms()
    a = _repeated(stride + 5, stride, (1000, 64), torch.float32)  # 256 KB of float32 per matrix
    check_orthonormal_basis(a, ops.orthonormalize(a.cuda()), tol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(200, 40), (3000, 72)])  # QR in shared memory / in global memory (on the GPU)
def test_orthonormalize_nan_stays_in_its_matrix(device, shape, seed):
    a = torch.randn(3, *shape)
    a[1, 7, 3] = float("nan")
    q = ops.orthonormalize(a.to(device)).cpu()
    assert q[1].isnan().all()
    check_orthonormal_basis(a[[0, 2]], q[[0, 2]], tol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_svd_lowrank_nan_stays_in_its_matrix(device, seed):
    a = torch.randn(3, 300, 200)
    a[2, 10, 10] = float("nan")
    U, S, V = ops.svd_lowrank(a.to(device), 8)
    assert S[2].isnan().all() and U[2].isnan().all() and V[2].isnan().all()
    assert S[:2].isfinite().all() and U[:2].isfinite().all() and V[:2].isfinite().all()


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_through_qr(dtype, seed):
    # 300 x 20 has more than 4096 entries: svd runs the Householder QR first, then the SVD of R.
    a = torch.randn(2, 300, 20, dtype=torch.float64).to(dtype)
    check_svd(a, *ops.svd(a.cuda()), tol=1e-5)
    check_orthonormal_basis(a, ops.orthonormalize(a.cuda()), tol=1e-5)


@cuda
def test_svd_lowrank_at_trp_shape(seed):
    # TRP's grouped convs: 16 matrices of 512 x 4608 (3x3 convs of 512 channels), rank 64. A known spectrum
    # 0.8^i decays fast enough that 2 power iterations with 8 oversampling columns recover the top 64 values.
    batch, m, n, k = 16, 512, 4608, 64
    u = torch.linalg.qr(torch.randn(batch, m, 128, device="cuda")).Q
    v = torch.linalg.qr(torch.randn(batch, n, 128, device="cuda")).Q
    s = 0.8 ** torch.arange(128, device="cuda", dtype=torch.float32)
    a = (u * s) @ v.mT
    gen = torch.Generator(device="cuda").manual_seed(seed)
    U, S, V = ops.svd_lowrank(a, k, generator=gen)
    assert U.shape == (batch, m, k) and S.shape == (batch, k) and V.shape == (batch, n, k)
    torch.testing.assert_close(S, s[:k].expand(batch, k), rtol=0, atol=1e-4)
    eye = torch.eye(k, device="cuda")
    torch.testing.assert_close(U.mT @ U, eye.expand(batch, k, k), rtol=0, atol=1e-4)
    torch.testing.assert_close(V.mT @ V, eye.expand(batch, k, k), rtol=0, atol=1e-4)
    # What a rank-64 approximation cannot hold has Frobenius norm 1.1e-6; the rest is float32 rounding.
    err = torch.linalg.matrix_norm(a - (U * S[:, None]) @ V.mT)
    assert (err <= 1e-4).all()
