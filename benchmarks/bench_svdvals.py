"""Batched singular values: rankprune.ops.svdvals against torch's routes, side by side in one run.

Columns: rankprune, torch.linalg.svdvals (default driver), torch.linalg.svdvals(driver="gesvda") (CUDA only),
Gram + torch.linalg.eigvalsh. Each row reports median times, rankprune's speed-up over each, and the largest
nuclear-norm relative error of each route against float64 LAPACK on the first matrices of the batch.

    python benchmarks/bench_svdvals.py                 # CUDA if available, else CPU
    python benchmarks/bench_svdvals.py --device cpu --quick
    python benchmarks/bench_svdvals.py --device cpu --shapes 1024x56 4096x14   # focused: BATCHxN, no layer1 row
    python benchmarks/bench_svdvals.py --shapes 16384x56 65536x14 --baseline-batch 1024  # GPU targets, baselines sampled

The results JSON records the load average before and after the run (the CPU machines are shared).
"""
import argparse
import math
import os
import statistics
import sys

import torch

from rankprune import ops
from rankprune.benchmark import environment, measure, write_results

# (batch, n): square n x n maps; the last entry is ResNet-50's layer1 output at batch 64 ([64, 256, 56, 56]).
SHAPES = [(65536, 7), (65536, 14), (16384, 14), (4096, 28), (16384, 56), (1024, 112)]
RESNET50_LAYER1 = (64, 256, 56, 56)


def gram_eigvalsh(a):
    g = a.mT @ a if a.shape[-2] >= a.shape[-1] else a @ a.mT
    return torch.linalg.eigvalsh(g).clamp_min(0).sqrt().flip(-1)


def routes(device):
    r = {
        "rankprune": ops.svdvals,
        "torch.linalg.svdvals": torch.linalg.svdvals,
        "gram+eigvalsh": gram_eigvalsh,
    }
    if device.type == "cuda":
        r["svdvals(gesvda)"] = lambda a: torch.linalg.svdvals(a, driver="gesvda")
    return r


def nuclear_error(fn, a, check=256):
    sub = a[:check]
    ref = ops.nuclear_norm_reference(sub).double().cpu()  # on the inputs' device
    got = fn(sub).double().sum(-1).cpu()
    return ((got - ref).abs() / ref.clamp_min(1e-300)).max().item()


def relu_maps(shape, device):
    """Feature-map-like inputs: ReLU of a smooth low-rank field plus noise."""
    *batch, h, w = shape
    b = math.prod(batch)
    r = min(7, h, w)
    x = torch.randn(b, h, r, device=device) @ torch.randn(b, r, w, device=device)
    return torch.relu(x + 0.1 * torch.randn(b, h, w, device=device)).reshape(shape)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="batches divided by 16 (CPU smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per route (default 20 GPU, 3 CPU)")
    p.add_argument("--rounds", type=int, default=1, help="alternating measurement rounds per case (ratios: median)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="BATCHxN",
                   help="only these square shapes, e.g. 1024x56 (skips the ResNet-50 layer1 row and feature_energy)")
    p.add_argument("--baseline-batch", type=int, default=None, metavar="N",
                   help="time the other routes on the first N matrices of each case and scale their times by "
                        "batch/N (their cost is linear in the batch: a per-matrix loop); rankprune runs the "
                        "whole batch. Keeps the full-size GPU targets (16384x56, 65536x14) within a budget")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    div = 16 if args.quick else 1
    torch.manual_seed(0)

    rows = []
    load_before = os.getloadavg()
    if args.shapes:
        shapes = [tuple(int(v) for v in spec.lower().split("x")) for spec in args.shapes]
        cases = [(f"{b}x{n}x{n}", relu_maps((b, n, n), device)) for b, n in shapes]
    else:
        cases = [(f"{b // div}x{n}x{n}", relu_maps((b // div, n, n), device)) for b, n in SHAPES]
        n_img = max(1, RESNET50_LAYER1[0] // div)
        layer1 = relu_maps((n_img, *RESNET50_LAYER1[1:]), device)
        cases.append((f"resnet50.layer1 [{n_img},256,56,56]", layer1.reshape(-1, 56, 56)))
    if args.baseline_batch is not None and args.baseline_batch < 1:
        p.error("--baseline-batch must be a positive number of matrices")
    for name, a in cases:
        row = {"case": name, "batch": a.shape[0], "n": a.shape[-1], "median_ms": {}, "p10_ms": {}, "p90_ms": {},
               "nuclear_rel_err": {}}
        # The baselines' sample and the factor their times are scaled by (1: measured on the whole batch).
        sample = a if args.baseline_batch is None else a[:args.baseline_batch]
        scale = a.shape[0] / sample.shape[0]
        if scale != 1:
            row["baseline_batch"] = sample.shape[0]
        # Rounds alternate the routes so that a change of load on a shared machine hits all of them; each
        # round's ratios are taken within the round, and the medians over rounds are reported.
        # A baseline that fails on this case (cuSOLVER's gesvda does not converge on some ReLU maps) is recorded
        # as failed and left out of the timings; rankprune's route must run.
        usable = {}
        for route, fn in routes(device).items():
            try:
                fn(sample[:1] if route != "rankprune" else a[:1])
                fn(sample if route != "rankprune" else a)
                usable[route] = fn
            except torch.linalg.LinAlgError as exc:
                if route == "rankprune":
                    raise
                row.setdefault("failed", {})[route] = str(exc).splitlines()[0]
        timings = {route: [] for route in usable}
        for _ in range(args.rounds):
            for route, fn in usable.items():
                # LAPACK's and cuSOLVER's per-matrix loops get fewer repeats on the big batches.
                ours_route = route == "rankprune"
                inputs = a if ours_route else sample
                timings[route].append(measure(lambda: fn(inputs), device=device, warmup=1,
                                              repeats=repeats if ours_route else max(1, repeats // 2)))
        factor = {route: 1.0 if route == "rankprune" else scale for route in timings}
        for route, fn in usable.items():
            row["median_ms"][route] = factor[route] * statistics.median(t.median_ms for t in timings[route])
            row["p10_ms"][route] = factor[route] * min(t.p10_ms for t in timings[route])
            row["p90_ms"][route] = factor[route] * max(t.p90_ms for t in timings[route])
            row["nuclear_rel_err"][route] = nuclear_error(fn, a)
        ours = timings["rankprune"]
        row["speedup"] = {r: statistics.median(factor[r] * t.median_ms / o.median_ms for t, o in zip(ts, ours))
                          for r, ts in timings.items() if r != "rankprune"}
        rows.append(row)
        print(format_row(row), flush=True)

    extra = {}
    if not args.shapes:
        # The scoring path proper: feature_energy on the channels_last activations, read in place.
        x = layer1.to(memory_format=torch.channels_last)
        t_cl = measure(lambda: ops.feature_energy(x, "mean"), device=device, warmup=1, repeats=repeats)
        t_nchw = measure(lambda: ops.feature_energy(layer1, "mean"), device=device, warmup=1, repeats=repeats)
        extra = {"feature_energy_layer1_nchw_ms": t_nchw.median_ms,
                 "feature_energy_layer1_channels_last_ms": t_cl.median_ms}
        print(f"feature_energy resnet50.layer1: NCHW {t_nchw.median_ms:.3f} ms, channels_last {t_cl.median_ms:.3f} ms")

    load = {"before": list(load_before), "after": list(os.getloadavg()), "cpus": os.cpu_count()}
    print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']} on {load['cpus']} CPUs")
    payload = {"benchmark": "svdvals", "environment": environment(device), "quick": args.quick,
               "shapes": args.shapes, "baseline_batch": args.baseline_batch, "rounds": args.rounds,
               "dtype": "float32", "load_average": load, "rows": rows,
               **extra}
    path = write_results("svdvals", payload, args.out)
    print(f"wrote {path}")
    return 0


def format_row(row):
    parts = [f"{row['case']:<34}", f"rankprune {row['median_ms']['rankprune']:9.3f} ms"]
    for r, s in row["speedup"].items():
        parts.append(f"{r} {row['median_ms'][r]:9.3f} ms ({s:7.1f}x)")
    errs = ", ".join(f"{r} {e:.1e}" for r, e in row["nuclear_rel_err"].items())
    failed = "".join(f" | {r} FAILED: {why}" for r, why in row.get("failed", {}).items())
    return " | ".join(parts) + f" | nuc rel err: {errs}" + failed


if __name__ == "__main__":
    sys.exit(main())
