"""Batched truncated SVD: rankprune.ops.svd_lowrank vs torch.svd_lowrank (same q = k + oversample and
niter = power_iters) and torch.linalg.svd, and rankprune.ops.svd vs torch.linalg.svd on many small matrices.

Every ratio is measured side by side in one run on one device (median of the repeats). Usage:

    python benchmarks/bench_svd_lowrank.py --device cuda            # the issue's shapes
    python benchmarks/bench_svd_lowrank.py --device cpu --quick     # scaled-down shapes for a small CPU
    python benchmarks/bench_svd_lowrank.py --device cpu --quick --threads 1

Writes benchmarks/results/bench_svd_lowrank-<device>-<stamp>.json (rankprune.benchmark.write_results).
"""
import argparse

import torch

import rankprune
from rankprune.benchmark import environment, measure, write_results

# (batch, m, n, k) for the truncated SVD; batch, size for the small full SVD.
FULL_LOWRANK = [(16, 512, 4608, 64), (64, 256, 2304, 64)]
FULL_SMALL = [(4096, 64)]
QUICK_LOWRANK = [(4, 256, 1152, 32), (8, 128, 576, 32)]
QUICK_SMALL = [(512, 64), (4096, 16)]


def lowrank_error(A, U, S, V):
    """Relative Frobenius error of U diag(S) V^T, worst over the batch (float64)."""
    A64 = A.double()
    R = A64 - (U.double() * S.double().unsqueeze(-2)) @ V.double().mT
    return float((R.norm(dim=(-2, -1)) / A64.norm(dim=(-2, -1))).max())


def decaying_matrices(batch, m, n, device, generator):
    """Gaussian factors with a 1/j spectrum (random singular vectors), float32."""
    r = min(m, n)
    scale = 1.0 / torch.arange(1, r + 1, device=device, dtype=torch.float32)
    left = torch.randn(batch, m, r, device=device, generator=generator) / m ** 0.5
    right = torch.randn(batch, r, n, device=device, generator=generator) / n ** 0.5
    return (left * scale) @ right


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="scaled-down shapes (CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--oversample", type=int, default=8)
    parser.add_argument("--power-iters", type=int, default=2)
    parser.add_argument("--no-linalg", action="store_true", help="skip the torch.linalg.svd baseline of the lowrank cases")
    parser.add_argument("--no-small", action="store_true",
                        help="skip the full SVD of many small matrices (torch.linalg.svd loops cuSOLVER over them)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU run")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    warmup = 3 if device.type == "cuda" else 1
    gen = torch.Generator(device=device).manual_seed(0)

    def timed(fn):
        return measure(fn, device=device, warmup=warmup, repeats=repeats)

    rows = []
    header = f"{'case':<34} {'rankprune ms':>12} {'baseline':>22} {'baseline ms':>12} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for batch, m, n, k in QUICK_LOWRANK if args.quick else FULL_LOWRANK:
        A = decaying_matrices(batch, m, n, device, gen)
        q = k + args.oversample
        ours = lambda: rankprune.ops.svd_lowrank(A, k, args.oversample, args.power_iters, generator=gen)  # noqa: E731
        theirs = lambda: torch.svd_lowrank(A, q=q, niter=args.power_iters)  # noqa: E731
        t_ours, t_lr = timed(ours), timed(theirs)
        U, S, V = ours()
        Ut, St, Vt = theirs()
        row = {
            "case": "svd_lowrank", "batch": batch, "m": m, "n": n, "k": k, "q": q, "niter": args.power_iters,
            "rankprune_ms": t_ours.as_dict(), "torch_svd_lowrank_ms": t_lr.as_dict(),
            "speedup_vs_torch_svd_lowrank": t_lr.median_ms / t_ours.median_ms,
            "rel_error_rankprune": lowrank_error(A, U, S, V),
            "rel_error_torch_svd_lowrank_rank_k": lowrank_error(A, Ut[..., :k], St[..., :k], Vt[..., :k]),
        }
        name = f"svd_lowrank {batch}x{m}x{n} k={k}"
        print(f"{name:<34} {t_ours.median_ms:>12.2f} {'torch.svd_lowrank':>22} {t_lr.median_ms:>12.2f} "
              f"{row['speedup_vs_torch_svd_lowrank']:>7.1f}x")
        if not args.no_linalg:
            t_full = timed(lambda: torch.linalg.svd(A, full_matrices=False))
            row["torch_linalg_svd_ms"] = t_full.as_dict()
            row["speedup_vs_torch_linalg_svd"] = t_full.median_ms / t_ours.median_ms
            print(f"{'':<34} {'':>12} {'torch.linalg.svd':>22} {t_full.median_ms:>12.2f} "
                  f"{row['speedup_vs_torch_linalg_svd']:>7.1f}x")
        print(f"{'':<34} rel. error rank-{k}: rankprune {row['rel_error_rankprune']:.3e}, "
              f"torch.svd_lowrank {row['rel_error_torch_svd_lowrank_rank_k']:.3e}")
        rows.append(row)
    for batch, size in [] if args.no_small else QUICK_SMALL if args.quick else FULL_SMALL:
        A = torch.randn(batch, size, size, device=device, generator=gen)
        t_ours = timed(lambda: rankprune.ops.svd(A))
        t_full = timed(lambda: torch.linalg.svd(A, full_matrices=False))
        row = {
            "case": "svd", "batch": batch, "m": size, "n": size,
            "rankprune_ms": t_ours.as_dict(), "torch_linalg_svd_ms": t_full.as_dict(),
            "speedup_vs_torch_linalg_svd": t_full.median_ms / t_ours.median_ms,
            "rel_error_rankprune": lowrank_error(A, *rankprune.ops.svd(A)),
        }
        name = f"svd {batch}x{size}x{size}"
        print(f"{name:<34} {t_ours.median_ms:>12.2f} {'torch.linalg.svd':>22} {t_full.median_ms:>12.2f} "
              f"{row['speedup_vs_torch_linalg_svd']:>7.1f}x")
        rows.append(row)
    payload = {
        "environment": environment(device),
        "benchmark": "svd_lowrank",
        "quick": args.quick,
        "oversample": args.oversample,
        "power_iters": args.power_iters,
        "repeats": repeats,
        "results": rows,
    }
    print("wrote", write_results("bench_svd_lowrank", payload, args.out))


if __name__ == "__main__":
    main()
