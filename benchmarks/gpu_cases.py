"""One small case per CUDA path of rankprune's kernels, each compared with the CPU kernel (and, for
svdvals-type results, float64 LAPACK): the smoke pass and the compute-sanitizer workload of gpu_check.sh.

    python benchmarks/gpu_cases.py --family svdvals            # one op family per process (default device cuda)
    python benchmarks/gpu_cases.py --family all --small        # batches of 1-2 matrices, for the sanitizers
    python benchmarks/gpu_cases.py --family lowrank_conv --device cpu --small   # the plumbing, on the CPU
    python benchmarks/gpu_cases.py --list

Families: svdvals (svdvals / nuclear_norm / feature_energy / feature_rank: warp, block at 64/128/256 threads,
global-memory path, half precision, channels_last maps, rank epilogue, NaN), svd (direct Jacobi in shared
and global memory, the QR path, orthonormalize in shared and global memory, svd_lowrank), lowrank_conv
(the fused kernel at several ranks, dtypes, layouts and geometries, forced with RANKPRUNE_LOWRANK_CONV2D=fused,
and the cuDNN fallback) and errors (misuses that must raise from the C++ checks, on CPU tensors and on the
device: a crash there prints its Python stack, faulthandler being on). One JSON line per case on stdout ({"family", "case", "ok", "err", "tol", "ms"} or
"error"); the exit code is 1 if any case failed. A CUDA error is sticky for the process, so a case that
raises one ends the run of its family (the remaining cases are reported as not run).
"""
import argparse
import faulthandler
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from rankprune import ops  # noqa: E402


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _sigma_err(got, want):
    """Largest |difference| relative to the largest singular value of each matrix (NaN where want is NaN)."""
    got, want = got.double().cpu(), want.double().cpu()
    if want.isnan().any() or got.isnan().any():
        return 0.0 if torch.equal(got.isnan(), want.isnan()) else float("inf")
    scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-300) if want.dim() else want.abs().clamp_min(1e-300)
    return float(((got - want).abs() / scale).max()) if want.numel() else 0.0


def _rel_err(got, want):
    """Largest |difference| relative to the largest |want|; inf if the non-finite entries differ."""
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.equal(got.isfinite(), want.isfinite()):
        return float("inf")
    finite = want.isfinite()
    scale = float(want[finite].abs().max()) if finite.any() else 1.0
    return float((got[finite] - want[finite]).abs().max()) / max(scale, 1e-300) if finite.any() else 0.0


# ---- svdvals family ----------------------------------------------------------------------------------


def _svdvals_case(batch, m, n, dtype=torch.float32, nan=False):
    def run(device, small):
        a = _randn(1 if small else batch, m, n, dtype=dtype)
        if nan:
            a[0, m // 2, n // 3] = float("nan")
        got = ops.svdvals(a.to(device))
        nuc = ops.nuclear_norm(a.to(device))
        want = ops.svdvals(a)  # the CPU kernel (LAPACK refuses NaN: then the CPU kernel is the reference)
        ref = want.double() if nan else ops.svdvals_reference(a)
        return max(_sigma_err(got, want), _sigma_err(got, ref), _rel_err(nuc, ref.sum(-1)))
    return run


def _feature_case(size, channels_last, dtype=torch.float32):
    def run(device, small):
        # Rank-5 maps: the rank at rtol 1e-3 is 5 with a wide margin on both sides, so the devices agree exactly.
        x = (_randn(6, size, 5) @ _randn(6, 5, size + 3)).reshape(2, 3, size, size + 3).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xd = x.to(device)
        energy = ops.feature_energy(xd, "none")
        rank = ops.feature_rank(xd, 1e-3, "none")
        return max(_rel_err(energy, ops.feature_energy(x, "none")), _rel_err(energy, ops.feature_energy_reference(x, "none")),
                   float((rank.cpu() != ops.feature_rank(x, 1e-3, "none")).any()))
    return run


SVDVALS = {
    "warp fp32 14x14": (_svdvals_case(64, 14, 14), 1e-5),
    "warp fp64 9x7": (_svdvals_case(64, 9, 7, torch.float64), 1e-12),
    "warp fp16 28x28": (_svdvals_case(64, 28, 28, torch.float16), 1e-5),
    "warp rows=32": (_svdvals_case(16, 32, 32), 1e-5),
    "warp NaN 14x14": (_svdvals_case(8, 14, 14, nan=True), 1e-5),
    "warp channels_last maps 9x12": (_feature_case(9, True), 1e-5),
    "block64 rows=33": (_svdvals_case(16, 33, 5), 1e-5),
    "block64 fp32 56x56": (_svdvals_case(16, 56, 56), 1e-5),
    "block64 bf16 56x56": (_svdvals_case(16, 56, 56, torch.bfloat16), 1e-5),
    "block64 NaN 56x56": (_svdvals_case(4, 56, 56, nan=True), 1e-5),
    "block64 maps 56x59 (energy, rank)": (_feature_case(56, False), 1e-5),
    "block64 channels_last maps 56x59": (_feature_case(56, True), 1e-5),
    "block128 fp32 112x112": (_svdvals_case(8, 112, 112), 1e-5),
    "block128 fp64 65x65": (_svdvals_case(8, 65, 65, torch.float64), 1e-12),
    "block256 fp32 140x130": (_svdvals_case(4, 140, 130), 1e-5),
    "block256 wide fp32 40x257": (_svdvals_case(4, 40, 257), 1e-5),
    "global fp32 239x239": (_svdvals_case(2, 239, 239), 1e-5),
    "global fp64 168x168": (_svdvals_case(2, 168, 168, torch.float64), 1e-11),
    "global fp16 239x239": (_svdvals_case(2, 239, 239, torch.float16), 1e-5),
}


# ---- svd family --------------------------------------------------------------------------------------


def _product(U, S, V):
    """U diag(S) V^T in float64 on the CPU."""
    return (U.double().cpu() * S.double().cpu()[..., None, :]) @ V.double().cpu().mT


def _svd_case(batch, m, n, dtype=torch.float32):
    def run(device, small):
        a = _randn(1 if small else batch, m, n, dtype=dtype)
        U, S, V = ops.svd(a.to(device))
        Uc, Sc, Vc = ops.svd(a)
        ref = ops.svdvals_reference(a)
        recon = _product(U, S, V)
        return max(_sigma_err(S, Sc), _sigma_err(S, ref), _rel_err(recon, a.double()))
    return run


def _orthonormalize_case(batch, m, k, dtype=torch.float32):
    def run(device, small):
        a = _randn(1 if small else batch, m, k, dtype=dtype)
        q = ops.orthonormalize(a.to(device)).double().cpu()
        eye = torch.eye(k, dtype=torch.float64)
        outside = a.double() - q @ (q.mT @ a.double())  # the part of A outside span(Q): zero
        # Q is unique up to column signs: compare |Q| with the CPU kernel's.
        return max(_rel_err(q.mT @ q, eye.expand(q.shape[0], k, k)), float(outside.abs().max() / a.abs().max()),
                   _rel_err(q.abs(), ops.orthonormalize(a).double().abs()))
    return run


def _svd_lowrank_case(batch, m, n, k):
    def run(device, small):
        g = torch.Generator().manual_seed(0)
        left = torch.randn(1 if small else batch, m, k, generator=g)
        a = left @ torch.randn(left.shape[0], k, n, generator=g)  # exact rank k
        gen = torch.Generator(device=device).manual_seed(0)
        U, S, V = ops.svd_lowrank(a.to(device), k, generator=gen)
        recon = _product(U, S, V)
        return max(_sigma_err(S, ops.svdvals_reference(a)[..., :k]), _rel_err(recon, a.double()))
    return run


SVD = {
    "svd direct fp32 20x12": (_svd_case(8, 20, 12), 1e-5),
    "svd direct fp64 64x64 (opt-in smem)": (_svd_case(4, 64, 64, torch.float64), 1e-10),
    "svd direct bf16 30x30": (_svd_case(4, 30, 30, torch.bfloat16), 1e-5),
    "svd QR path fp32 300x20": (_svd_case(4, 300, 20), 1e-5),
    "svd QR path fp16 300x20": (_svd_case(4, 300, 20, torch.float16), 1e-5),
    "svd global fp64 120x120": (_svd_case(2, 120, 120, torch.float64), 1e-10),
    "orthonormalize smem fp32 200x40": (_orthonormalize_case(4, 200, 40), 1e-5),
    "orthonormalize global fp32 3000x72": (_orthonormalize_case(2, 3000, 72), 1e-5),
    "orthonormalize bf16 300x20": (_orthonormalize_case(2, 300, 20, torch.bfloat16), 1e-5),
    "svd_lowrank fp32 2x512x1152 k=16": (_svd_lowrank_case(2, 512, 1152, 16), 1e-4),
}


# ---- lowrank_conv family -----------------------------------------------------------------------------


def _conv_case(c, r, n, hw, dtype=torch.float16, kernel=(3, 3), stride=1, padding=1, dilation=1, batch=2,
               channels_last=False, path="fused"):
    def run(device, small):
        os.environ["RANKPRUNE_LOWRANK_CONV2D"] = path
        h, w = hw
        kh, kw = kernel
        x = _randn(batch, c, h, w)
        w1 = _randn(r, c, kh, kw) / (c * kh * kw) ** 0.5
        w2 = _randn(n, r, 1, 1) / r ** 0.5
        bias = _randn(n)
        args = (stride, padding, dilation)
        xd = x.to(device=device, dtype=dtype)
        if channels_last:
            xd = xd.contiguous(memory_format=torch.channels_last)
        got = ops.lowrank_conv2d(xd, w1.to(device, dtype), w2.to(device, dtype), bias.to(device, dtype), *args)
        # The CPU kernel in float32 on the same (rounded) operands, and the float64 reference.
        cast = [t.to(dtype).float() for t in (x, w1, w2, bias)]
        want = ops.lowrank_conv2d(*cast, *args)
        ref = ops.lowrank_conv2d_reference(*cast, *args)
        return max(_rel_err(got, want), _rel_err(got, ref))
    return run


def _conv_cases():
    cases = {}
    for r in (16, 32, 48, 64, 80, 96, 112, 128):
        cases[f"fused fp16 r={r}"] = (_conv_case(24, r, 40, (9, 9)), 2e-2)
    cases.update({
        "fused bf16 r=112": (_conv_case(24, 112, 40, (9, 9), torch.bfloat16), 6e-2),
        "fused fp32/TF32 r=48": (_conv_case(24, 48, 40, (9, 9), torch.float32), 1e-2),
        "fused fp32/TF32 r=112": (_conv_case(24, 112, 40, (9, 9), torch.float32), 1e-2),
        "fused channels_last bf16": (_conv_case(32, 32, 72, (10, 10), torch.bfloat16, channels_last=True), 6e-2),
        "fused stride (2,1)": (_conv_case(16, 16, 24, (11, 9), stride=(2, 1)), 2e-2),
        "fused dilation 2 padding 2": (_conv_case(16, 16, 24, (11, 9), padding=2, dilation=2), 2e-2),
        "fused 5x3 kernel": (_conv_case(16, 16, 24, (11, 9), kernel=(5, 3), padding=(2, 1)), 2e-2),
        "fused 1x1 kernel": (_conv_case(16, 16, 24, (11, 9), kernel=(1, 1), padding=0), 2e-2),
        "fused multi-chunk phase 2 (N=512)": (_conv_case(16, 16, 512, (48, 48)), 2e-2),
        "unfused (cuDNN) r=24": (_conv_case(16, 24, 24, (9, 9), path="auto"), 2e-2),
    })
    return cases


# ---- errors family --------------------------------------------------------------------------------------


def _raises_case(expected, call, on_cpu=False):
    """A misuse that must raise ``expected`` from the C++ checks, not crash the process: 0.0 when it does."""
    def run(device, small):
        try:
            call(torch.device("cpu") if on_cpu else device)
        except expected:
            return 0.0
        raise AssertionError(f"no {expected.__name__} raised")
    return run


def _orthonormalize_tall_then_wide(device):
    # the sequence of tests/test_svd.py::test_orthonormalize, whose wide call crashed with a segmentation
    # fault on an H100 (torch 2.11.0+cu130, 2026-12-05) instead of raising ValueError
    a = torch.randn(4, 50, 12, device=device)
    a[3] = 0
    ops.orthonormalize(a)
    ops.orthonormalize(torch.randn(3, 5, device=device))


# CPU tensors first: if they pass and the device's cases crash, the crash is the device path's, not the
# build's exception handling. The suspected case is last (a crash ends the process).
ERRORS = {
    "energy_rank bad energy (CPU tensor)": (_raises_case(ValueError, lambda d: ops.energy_rank(
        torch.ones(3, 4, device=d), 1.5), on_cpu=True), 0.0),
    "orthonormalize wide (CPU tensor)": (_raises_case(ValueError, _orthonormalize_tall_then_wide, on_cpu=True), 0.0),
    "svdvals 1-d input": (_raises_case(RuntimeError, lambda d: ops.svdvals(torch.ones(5, device=d))), 0.0),
    "energy_rank bad energy": (_raises_case(ValueError, lambda d: ops.energy_rank(torch.ones(3, 4, device=d), 1.5)),
                               0.0),
    "orthonormalize wide": (_raises_case(ValueError, lambda d: ops.orthonormalize(torch.randn(3, 5, device=d))), 0.0),
    "orthonormalize tall then wide": (_raises_case(ValueError, _orthonormalize_tall_then_wide), 0.0),
}

FAMILIES = {"svdvals": SVDVALS, "svd": SVD, "lowrank_conv": _conv_cases(), "errors": ERRORS}


def run_family(name, device, small):
    """Run every case of a family; yields one result dict per case."""
    cases = FAMILIES[name]
    broken = None
    for case, (fn, tol) in cases.items():
        if broken is not None:
            yield {"family": name, "case": case, "ok": False, "error": f"not run: {broken}"}
            continue
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            err = fn(device, small)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # a CUDA error is sticky: stop the family, report the rest as not run
            yield {"family": name, "case": case, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
            if device.type == "cuda":
                broken = f"an earlier case of the family raised ({type(e).__name__})"
            continue
        ms = (time.perf_counter() - t0) * 1e3
        yield {"family": name, "case": case, "ok": err <= tol, "err": err, "tol": tol, "ms": round(ms, 1)}


def main(argv=None):
    faulthandler.enable()  # a crash in a kernel's host code prints the Python stack into the log
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="all", choices=["all", *FAMILIES])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="one matrix per case (for compute-sanitizer)")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    args = p.parse_args(argv)
    families = list(FAMILIES) if args.family == "all" else [args.family]
    if args.list:
        for f in families:
            for case in FAMILIES[f]:
                print(f"{f}: {case}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and ops.cuda_kernels_built()):
        print(json.dumps({"error": "no CUDA device or no CUDA kernels in this build"}), flush=True)
        return 2
    failed = 0
    for f in families:
        for result in run_family(f, device, args.small):
            failed += not result["ok"]
            print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
