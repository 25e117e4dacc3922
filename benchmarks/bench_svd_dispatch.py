"""Where rankprune's batched Jacobi SVD kernel stops beating LAPACK: the threshold behind ``rankprune.ops.svd``'s
dispatch, measured side by side in one run at one and two threads.

For each ``k = min(m, n)``, square ``k x k`` and wide ``k x 4.5k`` (a 3x3 conv's channel matrix ``[N, 9C]`` with
``N = 2C``), batches of one matrix and of eight, float64: the raw kernel
(``torch.ops.rankprune.svd``, no dispatch) against ``torch.linalg.svd(full_matrices=False)``, and the
dispatching ``ops.svd``. Times are 10th percentiles of the repeats (``*_ms``): on a shared machine
the lower tail is what the code costs, the median what the neighbours cost. The suggested threshold is the smallest ``k`` from which LAPACK is faster in every
case at both thread counts; ``ops.svd`` uses ``SVD_KERNEL_MAX_K`` (set from this benchmark).

    python benchmarks/bench_svd_dispatch.py --device cpu
"""
import argparse
import sys

import torch

from rankprune import ops
from rankprune.benchmark import environment, measure, write_results
from rankprune.ops._svd import SVD_KERNEL_MAX_K

SIZES = (16, 32, 64, 96, 128, 192, 256)
ASPECTS = (1.0, 4.5)
BATCHES = (1, 8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", default="1,2", help="CPU thread counts, side by side (default 1,2)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.manual_seed(0)
    kernel = torch.ops.rankprune.svd.default
    lapack = lambda a: torch.linalg.svd(a, full_matrices=False)
    rows = []
    for k in sizes:
        for aspect in ASPECTS:
            for batch in BATCHES:
                a = torch.randn(batch, k, int(round(aspect * k)), dtype=torch.float64, device=device)
                row = {"k": k, "m": a.shape[-2], "n": a.shape[-1], "batch": batch}
                for t in threads:
                    torch.set_num_threads(t)
                    ours = measure(lambda: kernel(a), device=device, warmup=1, repeats=args.repeats).p10_ms
                    ref = measure(lambda: lapack(a), device=device, warmup=1, repeats=args.repeats).p10_ms
                    disp = measure(lambda: ops.svd(a), device=device, warmup=1, repeats=args.repeats).p10_ms
                    row[f"kernel_ms_{t}t"] = ours
                    row[f"linalg_ms_{t}t"] = ref
                    row[f"ops_svd_ms_{t}t"] = disp
                    row[f"kernel_over_linalg_{t}t"] = ours / ref
                    row[f"ops_svd_over_linalg_{t}t"] = disp / ref
                rows.append(row)
                print(" ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                               for key, value in row.items()), flush=True)
    losing = sorted({r["k"] for r in rows if any(r[f"kernel_over_linalg_{t}t"] > 1.0 for t in threads)})
    winning_from = next((k for k in sizes if all(kk >= k or kk not in losing for kk in sizes)
                         and all(kk in losing for kk in sizes if kk >= k)), None)
    payload = {"benchmark": "svd_dispatch", "environment": environment(device), "threads": threads,
               "dtype": "float64", "rows": rows, "kernel_slower_at_k": losing,
               "suggested_threshold_k": winning_from, "SVD_KERNEL_MAX_K": SVD_KERNEL_MAX_K}
    path = write_results("bench_svd_dispatch", payload, args.out)
    print(f"kernel slower than LAPACK at k in {losing}; LAPACK faster in every case from k = {winning_from}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
