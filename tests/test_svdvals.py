"""svdvals / nuclear_norm / feature_energy / feature_rank against float64 LAPACK, on fresh random inputs."""
import math

import pytest
import torch

from rankprune import ops
from conftest import devices

DEVICES = devices()


# ---- matrix families (float64, then cast by the test) ------------------------------------------------


def gaussian(b, m, n):
    return torch.randn(b, m, n, dtype=torch.float64)


def relu_lowrank_noise(b, m, n):
    # Feature-map-like: ReLU of a rank-7 field plus noise.
    r = min(7, m, n)
    return torch.relu(torch.randn(b, m, r, dtype=torch.float64) @ torch.randn(b, r, n, dtype=torch.float64)
                      + 0.05 * torch.randn(b, m, n, dtype=torch.float64))


def rank_deficient(b, m, n, r=5):
    r = min(r, m, n)
    return torch.randn(b, m, r, dtype=torch.float64) @ torch.randn(b, r, n, dtype=torch.float64)


def graded(b, m, n):
    # Geometric spectrum 1 ... 1e-6.
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(b, m, k, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(b, n, k, dtype=torch.float64)).Q
    s = torch.logspace(0, -6, k, dtype=torch.float64)
    return (u * s) @ v.mT


def sparse_relu(b, m, n):
    # Post-ReLU maps that are mostly zero: whole zero rows/columns and rounding residue in the reduction.
    return torch.relu(torch.randn(b, m, n, dtype=torch.float64) - 2.0)


FAMILIES = {
    "gaussian": gaussian,
    "relu_lowrank": relu_lowrank_noise,
    "sparse_relu": sparse_relu,
    "rank5": rank_deficient,
    "graded": graded,
}
SHAPES = [(1, 1), (1, 9), (9, 1), (2, 2), (7, 7), (14, 14), (28, 28), (56, 56), (60, 20), (20, 60), (33, 5), (112, 112)]


def check_close(values, reference, rel=1e-5):
    """Every singular value within rel * sigma_max of the float64 reference."""
    assert values.shape == reference.shape
    smax = reference[..., :1].clamp_min(1e-300)
    err = ((values.double() - reference).abs() / smax).max().item() if values.numel() else 0.0
    assert err <= rel, f"max |sigma - sigma_ref| / sigma_max = {err:.3g} > {rel}"


def check_nuclear(values, reference, rel=1e-5):
    denom = reference.abs().clamp_min(1e-300)
    err = ((values.double() - reference).abs() / denom).max().item() if values.numel() else 0.0
    assert err <= rel, f"nuclear norm relative error {err:.3g} > {rel}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_float32_accuracy(device, family, shape, seed):
    a64 = FAMILIES[family](24 if shape[0] <= 60 else 6, *shape)
    a = a64.float().to(device)
    ref = ops.svdvals_reference(a.cpu())  # of the float32 matrix itself
    s = ops.svdvals(a)
    assert s.dtype == torch.float32 and s.device.type == device
    check_close(s.cpu(), ref)
    assert (s[..., :-1] >= s[..., 1:]).all(), "not descending"
    check_nuclear(ops.nuclear_norm(a).cpu(), ref.sum(-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [1.0, 2.0, 2.5, 3.0])
def test_sparse_post_relu_maps(device, dtype, threshold, seed):
    # Regression: reflectors built from underflowed residue gave inf / wrong values on such maps.
    a = torch.relu(torch.randn(2000, 14, 14, dtype=torch.float64) - threshold).to(dtype)
    ref = ops.svdvals_reference(a)
    s = ops.svdvals(a.to(device)).cpu()
    assert torch.isfinite(s).all()
    check_close(s, ref, rel=1e-5 if dtype == torch.float32 else 1e-12)
    check_nuclear(ops.nuclear_norm(a.to(device)).cpu(), ref.sum(-1), rel=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(130, 130), (300, 40), (40, 257)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_large_matrices(device, shape, seed):
    # Larger block-path sizes (GPU: 128/256 threads, opt-in shared memory); the global path: test_cuda_svdvals_paths.py
    a = relu_lowrank_noise(2, *shape).float().to(device)
    ref = ops.svdvals_reference(a.cpu())
    check_close(ops.svdvals(a).cpu(), ref)
    check_nuclear(ops.nuclear_norm(a).cpu(), ref.sum(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_float64_is_float64_accurate(device, seed):
    a = graded(8, 40, 30).to(device)
    s = ops.svdvals(a)
    assert s.dtype == torch.float64
    check_close(s.cpu(), ops.svdvals_reference(a.cpu()), rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(device, dtype, seed):
    a = relu_lowrank_noise(16, 28, 28).to(dtype).to(device)
    s = ops.svdvals(a)
    assert s.dtype == torch.float32
    check_close(s.cpu(), ops.svdvals_reference(a.cpu()))  # reference of the same rounded values


@pytest.mark.parametrize("device", DEVICES)
def test_zero_matrix_gives_exact_zeros(device):
    a = torch.zeros(3, 14, 9, device=device)
    assert torch.equal(ops.svdvals(a).cpu(), torch.zeros(3, 9))
    assert torch.equal(ops.nuclear_norm(a).cpu(), torch.zeros(3))
    x = torch.zeros(2, 3, 7, 7, device=device)
    assert torch.equal(ops.feature_energy(x, "none").cpu(), torch.zeros(2, 3))
    assert torch.equal(ops.feature_rank(x, reduction="none").cpu(), torch.zeros(2, 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("n", [14, 56])
def test_non_finite_matrix_is_nan_alone(device, bad, n, seed):
    a = gaussian(5, n, n).float()
    a[2, 3, 1] = bad
    s = ops.svdvals(a.to(device)).cpu()
    assert torch.isnan(s[2]).all()
    keep = [0, 1, 3, 4]
    check_close(s[keep], ops.svdvals_reference(a[keep]))
    nn = ops.nuclear_norm(a.to(device)).cpu()
    assert torch.isnan(nn[2]) and torch.isfinite(nn[keep]).all()
    x = a.reshape(5, 1, n, n).to(device)
    assert torch.isnan(ops.feature_energy(x, "none").cpu()[2]).all()
    assert torch.isnan(ops.feature_rank(x, reduction="none").cpu()[2]).all()


# ---- subnormal inputs ----------------------------------------------------------------------------------
# A matrix whose largest entry is subnormal is finite: its values are the scaled values of a normal matrix.
# The reference scales by an exact power of two, so it is the float64 value of the very same matrix. The
# outputs (singular values, norms) are subnormal too and carry an output ulp (the smallest subnormal) of
# rounding, which the checks allow.


def subnormal_case(dtype, b, m, n):
    """(a, normal, scale): a = normal * scale with max |a| in [tiny / 4, tiny / 2), scale a power of two."""
    base = relu_lowrank_noise(b, m, n)
    k = int(torch.floor(torch.log2(torch.finfo(dtype).tiny / base.abs().max()))) - 1
    a = torch.ldexp(base, torch.tensor(k)).to(dtype)
    assert a.abs().max() < torch.finfo(dtype).tiny and (a != 0).any()
    return a, torch.ldexp(a.double(), torch.tensor(-k)), 2.0 ** k


def check_scaled_close(got, want, scale, dtype, rel):
    """got / scale within rel * max|want| (per row) of want, plus one output ulp."""
    assert torch.isfinite(got).all()
    ulp = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / scale
    err = (got.double() / scale - want).abs() - ulp
    assert (err <= rel * want.abs().amax(-1, keepdim=True)).all(), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subnormal_matrices_svdvals(device, dtype, seed):
    a, normal, scale = subnormal_case(dtype, 6, 9, 7)
    ref = ops.svdvals_reference(normal)
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    check_scaled_close(ops.svdvals(a.to(device)).cpu(), ref, scale, dtype, rel)
    check_scaled_close(ops.nuclear_norm(a.to(device)).cpu().unsqueeze(-1), ref.sum(-1, keepdim=True), scale, dtype, rel)
    x = a.reshape(2, 3, 9, 7).to(device)
    energy = ops.feature_energy(x, "none").cpu().unsqueeze(-1)
    check_scaled_close(energy, ref.sum(-1).reshape(2, 3, 1), scale, dtype, rel)
    rank_ref = ops.feature_rank_reference(normal.reshape(2, 3, 9, 7).to(dtype), reduction="none")
    assert torch.equal(ops.feature_rank(x, reduction="none").cpu().double(), rank_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subnormal_matrices_svd_and_orthonormalize(device, dtype, seed):
    a, normal, scale = subnormal_case(dtype, 4, 12, 5)
    u, s, v = ops.svd(a.to(device))
    u, s, v = u.cpu().double(), s.cpu().double(), v.cpu().double()
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    check_scaled_close(s, ops.svdvals_reference(normal), scale, dtype, 1e-5 if dtype == torch.float32 else 1e-12)
    eye = torch.eye(5, dtype=torch.float64)
    assert (u.mT @ u - eye).abs().max() < 1e-5 and (v.mT @ v - eye).abs().max() < 1e-5
    rec = (u * (s / scale).unsqueeze(-2)) @ v.mT
    assert ((rec - normal).norm(dim=(-2, -1)) <= 1e-5 * normal.norm(dim=(-2, -1))).all()
    q = ops.orthonormalize(a.to(device)).cpu().double()
    assert torch.isfinite(q).all()
    assert (q.mT @ q - eye).abs().max() < 1e-5
    resid = normal - q @ (q.mT @ normal)  # span(Q) holds span(A)
    assert (resid.norm(dim=(-2, -1)) <= 1e-5 * normal.norm(dim=(-2, -1))).all()


# ---- adversarial spectra for the per-value search ------------------------------------------------------
# The values come from Sturm counts and Newton steps on the Golub-Kahan matrix of the bidiagonal form:
# clusters never isolate (they end as bisection), exact zeros on the diagonal make zero pivots, graded
# bidiagonals with tiny off-diagonals nearly split. An upper bidiagonal input stays bidiagonal through the
# Householder stage (up to signs), so these reach the search as written.


def bidiagonal(d, e):
    return torch.diag_embed(d) + torch.diag_embed(e, offset=1)


def with_spectrum(s, b=4, m=None):
    """Random singular vectors around the given singular values (float64)."""
    n = s.shape[-1]
    m = m or n
    u = torch.linalg.qr(torch.randn(b, m, n, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(b, n, n, dtype=torch.float64)).Q
    return (u * s) @ v.mT


def adversarial_cases():
    n = 24
    ones = torch.ones(n, dtype=torch.float64)
    graded = torch.logspace(0, -6, n, dtype=torch.float64)
    step = torch.arange(12, dtype=torch.float64)
    zeros_on_diagonal = torch.rand(3, n, dtype=torch.float64) + 0.5
    zeros_on_diagonal[:, ::3] = 0
    return {
        "identity": torch.eye(n, dtype=torch.float64).expand(3, n, n),
        "orthogonal": torch.linalg.qr(torch.randn(3, n, n, dtype=torch.float64)).Q,
        "repeated": with_spectrum(torch.tensor([3.0] * 8 + [1.0] * 8 + [1e-3] * 8, dtype=torch.float64)),
        "clustered": with_spectrum(1.0 + 1e-7 * torch.arange(n, dtype=torch.float64)),
        "two_clusters": with_spectrum(torch.cat([2.0 + 1e-9 * step, 1e-4 * (1 + 1e-9 * step)])),
        "graded_tiny_offdiagonal": bidiagonal(graded.expand(3, n), 1e-20 * torch.rand(3, n - 1, dtype=torch.float64)),
        "graded_offdiagonal_equal": bidiagonal(graded.expand(3, n), graded[1:].expand(3, n - 1)),
        "zeros_on_diagonal": bidiagonal(zeros_on_diagonal, torch.rand(3, n - 1, dtype=torch.float64) + 0.5),
        "all_zero_diagonal": bidiagonal(torch.zeros(3, n, dtype=torch.float64), ones[1:].expand(3, n - 1)),
        "wilkinson_like": bidiagonal((torch.arange(n, dtype=torch.float64) - n / 2).abs().expand(3, n),
                                     ones[1:].expand(3, n - 1)),
        "rank_one": torch.ones(3, n, n, dtype=torch.float64),
        "tiny_and_huge": with_spectrum(torch.cat([torch.ones(n // 2), torch.full((n - n // 2,), 1e-30)]).double()),
        "two_by_two": torch.tensor([[[1.0, 1e-8], [0.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]], [[3.0, 4.0], [4.0, -3.0]]],
                                   dtype=torch.float64),
        "row": torch.randn(3, 1, 9, dtype=torch.float64),
        "column": torch.randn(3, 9, 1, dtype=torch.float64),
        "wide_zero_diagonal": bidiagonal(zeros_on_diagonal, torch.rand(3, n - 1, dtype=torch.float64)).mT[:, :10, :],
    }


ADVERSARIAL = list(adversarial_cases())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ADVERSARIAL)
def test_adversarial_spectra(device, dtype, case, seed):
    a = adversarial_cases()[case].to(dtype)
    ref = ops.svdvals_reference(a)  # of the rounded matrix itself
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    s = ops.svdvals(a.to(device)).cpu()
    check_close(s, ref, rel=rel)
    assert (s[..., :-1] >= s[..., 1:]).all(), "not descending"
    check_nuclear(ops.nuclear_norm(a.to(device)).cpu(), ref.sum(-1), rel=rel)
    # The Rank epilogue (sigma_max and one Sturm count) against the float64 count, away from the threshold.
    x = a.unsqueeze(0).to(device)
    tol = max(a.shape[-2:]) * torch.finfo(dtype).eps * ref[..., :1]
    if ((ref - tol).abs() > 0.01 * tol).all():
        assert torch.equal(ops.feature_rank(x, reduction="none").cpu()[0].long(), (ref > tol).sum(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_float64_zero_singular_values_are_tiny(device):
    # Exactly rank-deficient bidiagonal inputs: the zero singular values come back below eps * sigma_max.
    d = torch.tensor([2.0, 0.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    a = bidiagonal(d, torch.zeros(4, dtype=torch.float64)).expand(2, 5, 5).to(device)
    s = ops.svdvals(a).cpu()
    torch.testing.assert_close(s[:, :3], torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64).expand(2, 3))
    assert (s[:, 3:] <= 4 * torch.finfo(torch.float64).eps * 2.0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_any_strides(device, seed):
    base = gaussian(6, 30, 20).float().to(device)
    views = {
        "transposed": base.mT,  # [6, 20, 30], column-major matrices
        "batch-sliced": base[::2],
        "inner-sliced": base[:, 1:25:2, ::3],
        "expanded": base[:1].expand(4, 30, 20),
        "4-d non-mergeable": torch.randn(3, 4, 5, 16, 12, device=device).permute(1, 0, 2, 4, 3)[:, :, 1:],
    }
    for name, view in views.items():
        ref = ops.svdvals_reference(view.cpu())
        check_close(ops.svdvals(view).cpu(), ref)
        check_nuclear(ops.nuclear_norm(view).cpu(), ref.sum(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_batch_shapes(device):
    assert ops.svdvals(torch.randn(0, 5, 4, device=device)).shape == (0, 4)
    assert ops.nuclear_norm(torch.randn(2, 0, 5, 4, device=device)).shape == (2, 0)
    assert ops.svdvals(torch.randn(5, 4, device=device)).shape == (4,)
    assert ops.nuclear_norm(torch.randn(5, 4, device=device)).shape == ()
    assert ops.svdvals(torch.randn(2, 3, 0, 4, device=device)).shape == (2, 3, 0)
    assert torch.equal(ops.nuclear_norm(torch.randn(2, 0, 4, device=device)).cpu(), torch.zeros(2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_feature_energy_matches_reference(device, reduction, seed):
    x = relu_lowrank_noise(4 * 6, 14, 14).float().reshape(4, 6, 14, 14).to(device)
    got = ops.feature_energy(x, reduction).cpu()
    ref = ops.feature_energy_reference(x.cpu(), reduction)
    assert got.shape == ref.shape == ((4, 6) if reduction == "none" else (6,))
    check_nuclear(got, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_feature_ops_read_channels_last_in_place(device, seed):
    x = relu_lowrank_noise(3 * 8, 9, 11).float().reshape(3, 8, 9, 11).to(device)
    xcl = x.to(memory_format=torch.channels_last)
    assert not xcl.is_contiguous()
    torch.testing.assert_close(ops.feature_energy(xcl, "none"), ops.feature_energy(x, "none"), rtol=1e-6, atol=0)
    assert torch.equal(ops.feature_rank(xcl, reduction="none"), ops.feature_rank(x, reduction="none"))


@pytest.mark.parametrize("device", DEVICES)
def test_feature_rank_matches_matrix_rank(device, seed):
    # Maps of known rank 0..7 (products in float64, cast to float32: rounding noise ~1e-8 sigma_max sits far
    # below the default tolerance max(H, W) * eps * sigma_max).
    n, c, h, w = 3, 8, 14, 12
    ranks = torch.randint(0, 8, (n, c))
    maps = torch.zeros(n, c, h, w, dtype=torch.float64)
    for i in range(n):
        for j in range(c):
            r = int(ranks[i, j])
            if r:
                maps[i, j] = torch.randn(h, r, dtype=torch.float64) @ torch.randn(r, w, dtype=torch.float64)
    x = maps.float().to(device)
    got = ops.feature_rank(x, reduction="none").cpu()
    assert torch.equal(got, ranks.float())
    assert torch.equal(got.double(), ops.feature_rank_reference(x.cpu(), reduction="none"))
    default_rank = torch.linalg.matrix_rank(x.cpu().double(), rtol=max(h, w) * torch.finfo(torch.float32).eps)
    assert torch.equal(got.long(), default_rank)
    torch.testing.assert_close(ops.feature_rank(x).cpu(), ranks.float().mean(0))
    # A loose tolerance drops the weak directions.
    assert (ops.feature_rank(x, rtol=0.999, reduction="none").cpu() <= got).all()


def test_clear_errors():
    with pytest.raises(RuntimeError, match=r"batch of matrices \[..., m, n\]"):
        ops.svdvals(torch.randn(5))
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        ops.svdvals(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        ops.nuclear_norm(torch.randn(3, 3, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match=r"activations \[N, C, H, W\]"):
        ops.feature_energy(torch.randn(3, 7, 7))
    with pytest.raises(RuntimeError, match="reduction must be"):
        ops.feature_energy(torch.randn(1, 2, 7, 7), "max")
    with pytest.raises(RuntimeError, match="rtol must be >= 0"):
        ops.feature_rank(torch.randn(1, 2, 7, 7), rtol=-1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    a = torch.randn(3, 9, 7, device=device)
    x = torch.randn(2, 3, 6, 5, device=device)
    torch.library.opcheck(torch.ops.rankprune.svdvals.default, (a,))
    torch.library.opcheck(torch.ops.rankprune.nuclear_norm.default, (a,))
    for reduction in ("none", "sum", "mean"):
        torch.library.opcheck(torch.ops.rankprune.feature_energy.default, (x, reduction))
        torch.library.opcheck(torch.ops.rankprune.feature_rank.default, (x, None, reduction))
    torch.library.opcheck(torch.ops.rankprune.feature_rank.default, (x, 0.1, "mean"))


def test_compiles_without_graph_breaks():
    def score(x):
        return ops.feature_energy(torch.relu(x), "mean") + ops.feature_rank(x, reduction="mean")

    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(score, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), score(x))


def test_cuda_tensor_without_cuda_kernels_is_refused():
    if ops.cuda_kernels_built() or not torch.cuda.is_available():
        pytest.skip("only meaningful for a CPU-only build on a CUDA machine")
    with pytest.raises(NotImplementedError):
        ops.svdvals(torch.randn(2, 3, 3, device="cuda"))


# ---- the CPU's lanes path: 8 float / 4 double matrices at once, one per SIMD lane --------------------------
# Batches of at least 8 (float) / 4 (double) matrices of up to 64 rows go through cpu/svdvals_lanes.h; what one
# lane holds must never reach another, and a partial last group repeats its last matrix.


def mixed_batch(count, m, n, dtype):
    """count matrices cycling through the hard cases (float64), the indices of the non-finite ones, and the index
    and exponent k of the one scaled by 2^-k so that its largest entry is subnormal in float32 / float64."""
    cases = [gaussian(1, m, n), torch.zeros(1, m, n, dtype=torch.float64), rank_deficient(1, m, n, 2),
             graded(1, m, n), sparse_relu(1, m, n), gaussian(1, m, n)]
    a = torch.cat([cases[i % len(cases)] for i in range(count)])
    tiny_at, k = 2 % count, (1060 if dtype == torch.float64 else 140)
    a[tiny_at] = torch.ldexp(a[tiny_at], torch.tensor(-k))
    bad = {5 % count: float("nan"), 11 % count: float("inf")}
    bad.pop(tiny_at, None)
    return a, bad, tiny_at, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("count", [4, 5, 8, 9, 17, 24])
@pytest.mark.parametrize("shape", [(1, 1), (14, 14), (56, 56), (64, 30), (30, 64), (65, 65), (9, 2)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_cpu_lanes_keep_matrices_apart(dtype, count, shape, seed):
    a64, bad, tiny_at, k = mixed_batch(count, *shape, dtype)
    a = a64.to(dtype)
    for i, value in bad.items():
        a[i, 0, 0] = value
    values, nuclear = ops.svdvals(a), ops.nuclear_norm(a)
    out_ulp = torch.finfo(values.dtype).smallest_normal * torch.finfo(values.dtype).eps  # smallest subnormal
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    for i in range(count):
        if i in bad:
            assert torch.isnan(values[i]).all() and torch.isnan(nuclear[i]), i
            continue
        # the subnormal matrix is compared scaled back by 2^k (exact), with one output ulp of rounding
        up = k if i == tiny_at else 0
        ref = ops.svdvals_reference(torch.ldexp(a[i].double(), torch.tensor(up)))
        got = torch.ldexp(values[i].double(), torch.tensor(up))
        alone = torch.ldexp(ops.svdvals(a[i:i + 1])[0].double(), torch.tensor(up))  # the per-matrix path
        slack = math.ldexp(out_ulp, up)
        if ref[0] == 0:
            assert torch.equal(values[i], torch.zeros_like(values[i])) and nuclear[i] == 0, i
            continue
        err = (got - ref).abs().max().item()
        assert err <= rel * ref[0].item() + slack, f"matrix {i}: {err / ref[0].item():.3g}"
        assert (values[i, :-1] >= values[i, 1:]).all(), i
        total = torch.ldexp(nuclear[i].double(), torch.tensor(up))
        assert abs(total - ref.sum()).item() <= 2 * rel * ref.sum().item() + len(ref) * slack, i
        assert (got - alone).abs().max().item() <= 2 * rel * ref[0].item() + 2 * slack, i
