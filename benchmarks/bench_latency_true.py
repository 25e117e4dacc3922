"""Compressed means faster: FLOPs-targeted against latency-targeted compression, each timed against the dense
model it came from, side by side in one run (issue 22).

For each model (torchvision, random weights, eval mode, 224x224), batch size and runtime (``eager``: PyTorch on
the CPU; ``onnxruntime``: the model exported by ``rankprune.export_onnx`` and run by ONNX Runtime with the same
number of intra-op threads), and each method of ``METHODS`` (adding one, e.g. ``prune`` once it takes
``target_latency``, is one entry), the method runs at ``target_flops`` and at ``target_latency`` for every
target (0.5 and 0.7). Each row gives the compressed model's measured latency over dense (``ratio``: the median
over interleaved rounds of compressed / dense, with ``ratio_p10`` / ``ratio_p90``), the FLOPs kept, the output
error on the example inputs, the latency model's predicted ratio next to the measurement (``prediction_error``:
predicted / measured - 1; FLOPs-targeted rows are predicted by a latency model built for the row's setting,
latency-targeted ones by the model decompose allocated with) and, for latency-targeted rows, the seconds spent
profiling (the first target of a setting profiles with an empty cache, the second reads it).

Decomposition here is data-free (weight SVD): latency depends on the shapes, not on the weights; accuracy at
equal latency needs trained models and calibration data (``exp_quality``), not random torchvision weights.
The layer-timing cache lives in a fresh temporary folder for each run unless ``--keep-cache``.

    python benchmarks/bench_latency_true.py --quick          # resnet18, batch 1, both runtimes: a few minutes
    python benchmarks/bench_latency_true.py                  # every model, batch 1 and 8 (hours on 2 CPU threads)
    python benchmarks/bench_latency_true.py --models mobilenet_v2 --batches 1 --runtimes onnxruntime

Needs torchvision (and onnx, onnxscript, onnxruntime for the ONNX Runtime rows). Writes
``benchmarks/results/bench_latency_true[-quick]-cpu-<stamp>.json`` with a Markdown table (README).
"""
import argparse
import os
import re
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The worktree's package when no other is importable; PYTHONPATH (e.g. a copy built for another torch) comes first.
sys.path.append(os.path.join(ROOT, "python"))

import rankprune  # noqa: E402
from rankprune import latency  # noqa: E402
from rankprune.benchmark import environment, markdown_table, write_results  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
TARGETS = (0.5, 0.7)


def _decompose(model, x, budget: str, target: float, runtime: str):
    return rankprune.decompose(model, example_inputs=x, runtime=runtime, progress=False,
                               **{f"target_{budget}": target})


# method -> compress(model, x, budget ("flops" | "latency"), target, runtime) -> (model, plan, report); a
# report without "latency" is timed against dense here.
METHODS: Dict[str, Callable] = {"decompose": _decompose}


def run_setting(name: str, batch: int, runtime: str, methods: List[str], targets: Tuple[float, ...]) -> List[dict]:
    """Every method, budget and target for one model, batch size and runtime."""
    import torchvision

    torch.manual_seed(0)
    dense = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    predictor = None
    rows = []
    for method in methods:
        for target in targets:
            for budget in ("flops", "latency"):
                start = time.perf_counter()
                try:
                    small, plan, report = METHODS[method](dense, x, budget, target, runtime)
                except ValueError as exc:  # a target the model cannot reach: the error names the closest
                    rows.append({"model": name, "batch": batch, "runtime": runtime, "method": method,
                                 "budget": budget, "target": target, "error": str(exc)})
                    print(f"{name} b{batch} {runtime} {method} {budget}={target}: {exc}", flush=True)
                    continue
                seconds = time.perf_counter() - start
                measured = report.get("latency") or latency.compare(dense, small, x, runtime)
                if "predicted_ratio" not in measured:  # FLOPs-targeted: predicted by a model of this setting
                    predictor = predictor or latency.LatencyModel.measure(dense, x, runtime, progress=False)
                    measured["predicted_ratio"] = predictor.predict(small) / predictor.dense_ms
                flops = report.get("total", {})
                rows.append({
                    "model": name, "batch": batch, "runtime": runtime, "method": method, "budget": budget,
                    "target": target, "dense_ms": measured["dense"]["median_ms"],
                    "compressed_ms": measured["compressed"]["median_ms"], "ratio": measured["ratio"],
                    "ratio_p10": measured["ratio_p10"], "ratio_p90": measured["ratio_p90"],
                    "predicted_ratio": measured["predicted_ratio"],
                    "prediction_error": measured["predicted_ratio"] / measured["ratio"] - 1,
                    "flops_ratio": flops["flops"] / flops["flops_dense"] if flops.get("flops_dense") else None,
                    "output_rel_error": flops.get("output_rel_error"),
                    "profiling_s": measured.get("profiling_s"), "layers_measured": measured.get("layers_measured"),
                    "layers_cached": measured.get("layers_cached"), "seconds": seconds,
                    "warning": measured.get("warning"),
                    "load_average": os.getloadavg()[0],  # other processes on the machine, after the row
                })
                print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    profiled = f", profiled {row['profiling_s']:.0f} s" if row["profiling_s"] is not None else ""
    return (f"{row['model']} b{row['batch']} {row['runtime']} {row['method']} {row['budget']}={row['target']}: "
            f"{row['ratio']:.3f}x dense ({row['ratio_p10']:.3f}-{row['ratio_p90']:.3f}), predicted "
            f"{row['predicted_ratio']:.3f}x, FLOPs {row['flops_ratio']:.3f}{profiled}, {row['seconds']:.0f} s, "
            f"load {row['load_average']:.1f}")


def _error_cell(error: str) -> str:
    reachable = re.search(r"closest reachable latency is ([\d.]+) of dense", error)
    return f"not reachable (closest: {reachable[1]})" if reachable else error[:60]


def markdown(rows: List[dict], config: dict) -> str:
    """The README table: FLOPs-targeted and latency-targeted rows of a setting and target side by side."""
    headers = ["model", "batch", "runtime", "method", "target", "dense ms", "FLOPs-targeted: ratio (p10-p90)",
               "predicted", "FLOPs kept", "latency-targeted: ratio (p10-p90)", "predicted", "FLOPs kept",
               "profiling s"]
    pairs: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        pairs.setdefault((r["model"], r["batch"], r["runtime"], r["method"], r["target"]), {})[r["budget"]] = r
    lines = []
    for (model, batch, runtime, method, target), by_budget in pairs.items():
        timed = [r for r in by_budget.values() if "error" not in r]
        cells = [model, batch, runtime, method, target, timed[0]["dense_ms"] if timed else None]
        for budget in ("flops", "latency"):
            r = by_budget.get(budget, {"error": "not run"})
            cells += ([f"{r['ratio']:.3f} ({r['ratio_p10']:.2f}-{r['ratio_p90']:.2f})", r["predicted_ratio"],
                       r["flops_ratio"]] if "error" not in r else [_error_cell(r["error"]), None, None])
        cells.append(by_budget.get("latency", {}).get("profiling_s"))
        lines.append(cells)
    setting = (f"CPU, {config['threads']} threads (ONNX Runtime: as many intra-op threads), torchvision models with "
               "random weights at 224x224, data-free decomposition; ratio = compressed / dense latency, median "
               "over interleaved rounds (10th-90th percentile); predicted = the latency model's ratio; profiling "
               "s = seconds the latency-targeted call spent measuring (the second target of a setting reads the "
               "first one's cache).")
    return setting + "\n\n" + markdown_table(headers, lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated torchvision models ({','.join(MODELS)})")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--runtimes", default="eager,onnxruntime", help="comma-separated runtimes (default eager,onnxruntime)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated methods ({','.join(METHODS)})")
    p.add_argument("--targets", default=",".join(str(t) for t in TARGETS), help="comma-separated fractions")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of PyTorch and ONNX Runtime (default 2)")
    p.add_argument("--quick", action="store_true", help="resnet18 at batch 1 only")
    p.add_argument("--keep-cache", action="store_true", help="use the ordinary layer-timing cache, not a fresh one")
    p.add_argument("--out", help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = ["resnet18"] if args.quick else args.models.split(",")
    batches = [1] if args.quick else [int(b) for b in args.batches.split(",")]
    runtimes, methods = args.runtimes.split(","), args.methods.split(",")
    targets = tuple(float(t) for t in args.targets.split(","))
    unknown = [m for m in methods if m not in METHODS] + [r for r in runtimes if r not in latency.RUNTIMES]
    if unknown:
        p.error(f"unknown method(s) or runtime(s): {unknown}")
    with tempfile.TemporaryDirectory() as folder:
        if not args.keep_cache:
            os.environ[latency.CACHE_ENV] = folder
        rows = [row for name in models for batch in batches for runtime in runtimes
                for row in run_setting(name, batch, runtime, methods, targets)]
    config = {"models": models, "batches": batches, "runtimes": runtimes, "methods": methods, "targets": targets,
              "threads": args.threads, "quick": args.quick}
    md = markdown(rows, config)
    print(md)
    payload = {"environment": environment("cpu"), "config": config, "rows": rows, "markdown": md}
    name = "bench_latency_true-quick" if args.quick else "bench_latency_true"
    print(f"wrote {write_results(name, payload, args.out or os.path.join(ROOT, 'benchmarks', 'results'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
