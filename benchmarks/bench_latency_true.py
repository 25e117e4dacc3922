"""Compressed means faster: FLOPs-targeted against latency-targeted compression, each timed against the dense
model it came from, side by side in one run (issue 22).

For each model (torchvision, random weights, eval mode, 224x224, float32), batch size and runtime, and each
method of ``METHODS`` (``decompose``: data-free weight SVD; ``prune``: l1 channel pruning, data-free; both by
default), the method runs at ``target_flops`` and at ``target_latency`` for every target (0.5 and 0.7).
Runtimes: on the CPU (``--device cpu``, the default) ``eager`` (PyTorch) and ``onnxruntime`` (the model exported by
``rankprune.export_onnx`` and run by ONNX Runtime with the same number of intra-op threads); on a GPU
(``--device cuda``) ``eager`` and ``cuda_graph`` (each call captured into a CUDA graph and replayed: no launch
overhead); ONNX Runtime is CPU-only here. Each row gives the compressed model's measured latency over dense
(``ratio``: the median over interleaved rounds of compressed / dense, with ``ratio_p10`` / ``ratio_p90``), the
FLOPs kept, the output error on the example inputs, the latency model's predicted ratio next to the measurement
(``prediction_error``: predicted / measured - 1; FLOPs-targeted rows are predicted by a latency model built for
the row's setting, latency-targeted ones by the model decompose allocated with) and, for latency-targeted rows,
the seconds spent profiling (the first target of a setting profiles with an empty cache, the second reads it).
Latency-targeted rows come out of the methods' closed loop (``rankprune.latency.meet_measured``: the structure
built for the predicted target is timed against dense and the search redone on a corrected goal); each row
keeps its ``measured_tries``.

On CUDA each row also times the compressed model with its low-rank convolutions forced onto each path of
``rankprune.ops.lowrank_conv2d``, interleaved with dense and the default path in one more set of rounds:
``ratio_fused`` (the fused kernel on every layer it covers: channel scheme, rank a multiple of 16 up to 128,
float32 with cuDNN TF32 allowed, sm_80+; the cuDNN pair on the others, counted in ``fused_layers`` /
``lowrank_layers``) and ``ratio_pair`` (every layer as two cuDNN convolutions), each over dense, with
``ratio_default`` (the path the op picks by itself: the cuDNN pair, or a timing per shape under
``--cudnn-benchmark``) from the same rounds. The path is forced with ``RANKPRUNE_LOWRANK_CONV2D``
(``fused`` / ``unfused``), which the op reads at every call (docs/lowrank.md); the layers the kernel does not
cover switch it to ``unfused`` around their own call (forward hooks: a few microseconds of Python per such layer
in ``eager``, none in a replayed CUDA graph). ``ratio`` stays the default path's, measured by the method's own
check.

Decomposition here is data-free (weight SVD): latency depends on the shapes, not on the weights; accuracy at
equal latency needs trained models and calibration data (``exp_quality``), not random torchvision weights.
The layer-timing cache lives in a fresh temporary folder for each run unless ``--keep-cache``.

    python benchmarks/bench_latency_true.py --quick          # resnet18, batch 1, both runtimes: a few minutes
    python benchmarks/bench_latency_true.py                  # every model, batch 1 and 8 (hours on 2 CPU threads)
    python benchmarks/bench_latency_true.py --models mobilenet_v2 --batches 1 --runtimes onnxruntime
    python benchmarks/bench_latency_true.py --device cuda --quick --targets 0.5 --out DIR   # resnet50, batch 8
    python benchmarks/bench_latency_true.py --device cuda   # every model, batch 1 and 8, eager and cuda_graph

On CUDA ``--quick`` means resnet50 at batch 8 (the ResNet-50 3x3 shapes the fused kernel was written for), both
CUDA runtimes, the targets of ``--targets``. The CUDA run needs a build of rankprune with its CUDA kernels
(``rankprune.ops.cuda_kernels_built()``; it stops at once without one).

Needs torchvision (and onnx, onnxscript, onnxruntime for the ONNX Runtime rows). Writes
``benchmarks/results/bench_latency_true[-quick]-<cpu|cuda>-<stamp>.json`` with a Markdown table (README); a run
of part of the matrix gets a name and a table of its own, so that it does not replace the full run's:
``--batches 8`` writes ``bench_latency_true-b8-...``, ``--models resnet18`` adds ``-resnet18`` to the name and
``--runtimes eager`` (on the CPU) ``-eager``.
"""
import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The worktree's package when no other is importable; PYTHONPATH (e.g. a copy built for another torch) comes first.
sys.path.append(os.path.join(ROOT, "python"))

import rankprune  # noqa: E402
from rankprune import latency  # noqa: E402
from rankprune.benchmark import environment, markdown_table, spread, write_results  # noqa: E402
from rankprune.latency.runtimes import DEFAULT_ROUNDS, interleaved, make_timer  # noqa: E402
from rankprune.nn import LowRankConv2d  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
TARGETS = (0.5, 0.7)
DEFAULT_RUNTIMES = {"cpu": "eager,onnxruntime", "cuda": "eager,cuda_graph"}
QUICK = {"cpu": ("resnet18", 1), "cuda": ("resnet50", 8)}  # --quick: (model, batch) per device
# The low-rank conv's path switch on CUDA, read by the op at every call (csrc/cuda/lowrank_conv_cuda.cpp,
# docs/lowrank.md): auto (default), fused, unfused (the cuDNN pair).
PATH_ENV = "RANKPRUNE_LOWRANK_CONV2D"
FUSED_MAX_RANK = 128  # kMaxRank of csrc/cuda/lowrank_conv_kernels.h


def _decompose(model, x, budget: str, target: float, runtime: str):
    return rankprune.decompose(model, example_inputs=x, runtime=runtime, progress=False,
                               **{f"target_{budget}": target})


def _prune(model, x, budget: str, target: float, runtime: str):
    # l1, data-free: the weights are random, so a data-aware criterion would measure nothing more here.
    small, plan = rankprune.prune(model, x, "l1", runtime=runtime, progress=False, **{f"target_{budget}": target})
    search = plan.get("latency_search") or {}
    measured = dict(plan["latency"], **{k: search[k] for k in ("profiling_s", "layers_measured", "layers_cached")
                                        if k in search})
    return small, plan, {"latency": measured, "total": {"flops": plan["flops"][1], "flops_dense": plan["flops"][0]}}


# method -> compress(model, x, budget ("flops" | "latency"), target, runtime) -> (model, plan, report); a
# report without "latency" is timed against dense here.
METHODS: Dict[str, Callable] = {"decompose": _decompose, "prune": _prune}


def run_setting(name: str, batch: int, runtime: str, methods: List[str], targets: Tuple[float, ...],
                device: str = "cpu") -> List[dict]:
    """Every method, budget and target for one model, batch size and runtime on ``device``."""
    import torchvision

    torch.manual_seed(0)
    dense = getattr(torchvision.models, name)(weights=None).eval().to(device)
    x = torch.randn(batch, 3, 224, 224).to(device)  # drawn on the CPU: the same inputs on either device
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
                    # the closed loop of a latency target: each structure's goal, predicted and measured ratio
                    "measured_tries": (plan.get("latency_search") or {}).get("measured_tries"),
                    "load_average": os.getloadavg()[0],  # other processes on the machine, after the row
                })
                if x.device.type == "cuda":
                    rows[-1].update(path_ratios(dense, small, x, runtime))
                print(_line(rows[-1]), flush=True)
    return rows


def fused_covers(module: LowRankConv2d) -> bool:
    """Whether the fused CUDA kernel covers ``module``'s calls: ``fused_refusal`` of
    csrc/cuda/lowrank_conv_cuda.cpp (channel scheme, rank a multiple of 16 up to 128, float16/bfloat16 or float32
    with ``torch.backends.cudnn.allow_tf32``, sm_80+), less its size limits (2^31 output pixels)."""
    weight = module.first.weight
    if module.scheme != "channel" or weight.device.type != "cuda" or weight.dtype == torch.float64:
        return False
    if weight.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return False
    return (module.rank % 16 == 0 and module.rank <= FUSED_MAX_RANK
            and torch.cuda.get_device_capability(weight.device)[0] >= 8)


@contextlib.contextmanager
def lowrank_path(setting: Optional[str], pair_modules: Iterable[torch.nn.Module] = ()):
    """Run the low-rank convolutions on one path: ``RANKPRUNE_LOWRANK_CONV2D=setting`` (None: as it is), with
    ``pair_modules`` switched to ``unfused`` around their own calls; the variable is restored after."""
    old = os.environ.get(PATH_ENV)
    handles = []
    if setting is not None:
        os.environ[PATH_ENV] = setting

        def to_pair(module, args):
            os.environ[PATH_ENV] = "unfused"

        def back(module, args, output):
            os.environ[PATH_ENV] = setting

        for m in pair_modules:
            handles += [m.register_forward_pre_hook(to_pair), m.register_forward_hook(back)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if old is None:
            os.environ.pop(PATH_ENV, None)
        else:
            os.environ[PATH_ENV] = old


def _on_path(timer, setting: Optional[str], pair_modules=()):
    def run(warmup: int, repeats: int):
        with lowrank_path(setting, pair_modules):
            return timer(warmup, repeats)
    return run


def path_ratios(dense, small, x, runtime: str, rounds: int = DEFAULT_ROUNDS, repeats: int = 5) -> dict:
    """CUDA: ``small`` on the default path, on the fused kernel (where it covers a layer; the cuDNN pair
    elsewhere) and on the cuDNN pair, interleaved with ``dense`` in ``rounds`` rounds; each ratio is the median
    over rounds of that round's time over dense (10th-90th percentile beside it). The fused run is skipped when
    the kernel covers no layer."""
    lowrank = [m for m in small.modules() if isinstance(m, LowRankConv2d) and m.scheme == "channel"]
    uncovered = [m for m in lowrank if not fused_covers(m)]
    row = {"lowrank_layers": len(lowrank), "fused_layers": len(lowrank) - len(uncovered)}
    if not lowrank:
        return row
    threads = torch.get_num_threads()
    timers = {"dense": make_timer(dense, x, runtime, x.device, threads)}
    compressed = make_timer(small, x, runtime, x.device, threads)
    timers["default"] = compressed
    if len(uncovered) < len(lowrank):
        timers["fused"] = _on_path(compressed, "fused", uncovered)
    timers["pair"] = _on_path(compressed, "unfused")
    start = time.perf_counter()
    try:
        results = interleaved(timers, rounds, repeats)
    except RuntimeError as exc:  # e.g. a forced fused call the kernel refuses: the row keeps the op's message
        row["path_error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return row
    row["paths_s"] = time.perf_counter() - start
    dense_ms = [t.median_ms for t in results.pop("dense")]
    row["paths_dense_ms"] = spread(dense_ms)[0]
    for path, timings in results.items():
        ms = [t.median_ms for t in timings]
        ratio, low, high = spread([c / d for c, d in zip(ms, dense_ms)])
        row.update({f"{path}_ms": spread(ms)[0], f"ratio_{path}": ratio, f"ratio_{path}_p10": low,
                    f"ratio_{path}_p90": high})
    return row


def _line(row: dict) -> str:
    profiled = f", profiled {row['profiling_s']:.0f} s" if row["profiling_s"] is not None else ""
    if row.get("measured_tries"):
        profiled += f", {len(row['measured_tries'])} measured tries"
    return (f"{row['model']} b{row['batch']} {row['runtime']} {row['method']} {row['budget']}={row['target']}: "
            f"{row['ratio']:.3f}x dense ({row['ratio_p10']:.3f}-{row['ratio_p90']:.3f}), predicted "
            f"{row['predicted_ratio']:.3f}x, FLOPs {row['flops_ratio']:.3f}{profiled}, {row['seconds']:.0f} s, "
            f"load {row['load_average']:.1f}" + (_line_cuda(row) if "lowrank_layers" in row else ""))


def _paths_cell(row: dict) -> str:
    """CUDA rows: fused and cuDNN-pair ratios over dense, and how many low-rank layers the kernel covered."""
    if "path_error" in row:
        return row["path_error"][:60]
    if not row.get("lowrank_layers"):
        return "no low-rank conv"
    fused = f"{row['ratio_fused']:.3f}" if "ratio_fused" in row else "-"
    return (f"{fused} / {row['ratio_pair']:.3f} (default {row['ratio_default']:.3f}; "
            f"{row['fused_layers']}/{row['lowrank_layers']} fused)")


def _line_cuda(row: dict) -> str:
    """The progress line's CUDA part: the path ratios and the seconds their rounds took."""
    paths = f", {row['paths_s']:.0f} s" if "paths_s" in row else ""
    return f"; fused / pair {_paths_cell(row)}{paths}"


def _error_cell(error: str) -> str:
    reachable = re.search(r"closest reachable latency is ([\d.]+) of dense", error)
    return f"not reachable (closest: {reachable[1]})" if reachable else error[:60]


def markdown(rows: List[dict], config: dict) -> str:
    """The README table: FLOPs-targeted and latency-targeted rows of a setting and target side by side."""
    cuda = config.get("device") == "cuda"
    per_budget = ["ratio (p10-p90)", "predicted", "FLOPs kept"] + (["fused / cuDNN pair"] if cuda else [])
    headers = (["model", "batch", "runtime", "method", "target", "dense ms"]
               + [f"{b}-targeted: {h}" if i == 0 else h for b in ("FLOPs", "latency") for i, h in enumerate(per_budget)]
               + ["profiling s"])
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
            if cuda:
                cells.append(_paths_cell(r) if "error" not in r else None)
        cells.append(by_budget.get("latency", {}).get("profiling_s"))
        lines.append(cells)
    common = ("torchvision models with random weights at 224x224, data-free decomposition; ratio = compressed / "
              "dense latency, median over interleaved rounds (10th-90th percentile); predicted = the latency "
              "model's ratio; profiling s = seconds the latency-targeted call spent measuring (the second target "
              "of a setting reads the first one's cache)")
    if cuda:
        setting = (f"{config['device_name']} (CUDA), float32 (convolutions in TF32: cudnn.allow_tf32 "
                   f"{'on' if config['allow_tf32'] else 'off'}), cudnn.benchmark "
                   f"{'on' if config['cudnn_benchmark'] else 'off'}; eager = PyTorch, cuda_graph = each call "
                   f"captured into a CUDA graph and replayed; {common}. The ratio is the low-rank convolutions' "
                   "default path (the cuDNN pair, or the op's timing per shape under cudnn.benchmark); fused / "
                   "cuDNN pair = the same model with RANKPRUNE_LOWRANK_CONV2D forcing the fused kernel (on the "
                   "layers it covers: channel scheme, rank a multiple of 16 up to 128; the cuDNN pair elsewhere; "
                   "k/n layers fused) and the two cuDNN convolutions, each over dense in further interleaved rounds "
                   "with the default path (its ratio there in parentheses).")
    else:
        setting = f"CPU, {config['threads']} threads (ONNX Runtime: as many intra-op threads), {common}."
    return setting + "\n\n" + markdown_table(headers, lines) + "\n"


def result_name(models: List[str], batches: List[int], runtimes: List[str], device: str, quick: bool) -> str:
    """The result file's name: a run of part of the matrix (without batch 1, of some models, or of some of the
    device's runtimes) gets a name and a README table of its own, so that it does not replace another run's."""
    if quick:
        return "bench_latency_true-quick"
    name = "bench_latency_true" + ("" if 1 in batches else "-b" + "_".join(str(b) for b in batches))
    name += "" if models == list(MODELS) else "-" + "_".join(models)
    return name + ("" if runtimes == DEFAULT_RUNTIMES[device].split(",") else "-" + "_".join(runtimes))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated torchvision models ({','.join(MODELS)})")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8; a run without 1, "
                   "or of some models or runtimes, writes a result of its own name: "
                   "bench_latency_true-b8-resnet18-...json)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where models run (default cpu)")
    p.add_argument("--runtimes", help="comma-separated runtimes (default eager,onnxruntime on cpu, eager,cuda_graph "
                                      "on cuda)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated methods ({','.join(METHODS)})")
    p.add_argument("--targets", default=",".join(str(t) for t in TARGETS), help="comma-separated fractions")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of PyTorch and ONNX Runtime (default 2)")
    p.add_argument("--quick", action="store_true", help="resnet18 at batch 1 only (on cuda: resnet50 at batch 8)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="cuda: torch.backends.cudnn.benchmark on (cuDNN picks algorithms by timing; the low-rank "
                        "conv's default path is then timed per shape)")
    p.add_argument("--keep-cache", action="store_true", help="use the ordinary layer-timing cache, not a fresh one")
    p.add_argument("--out", help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():  # one line, exit status 1, before any work
        raise SystemExit("bench_latency_true: --device cuda, but torch.cuda.is_available() is False (no GPU, or a "
                         "CPU-only torch build)")
    if device == "cuda" and not rankprune.ops.cuda_kernels_built():
        raise SystemExit("bench_latency_true: --device cuda, but this build of rankprune has no CUDA kernels "
                         "(rankprune.ops.cuda_kernels_built() is False): build it with RANKPRUNE_CUDA=ON")
    torch.set_num_threads(args.threads)
    models = [QUICK[device][0]] if args.quick else args.models.split(",")
    batches = [QUICK[device][1]] if args.quick else [int(b) for b in args.batches.split(",")]
    runtimes, methods = (args.runtimes or DEFAULT_RUNTIMES[device]).split(","), args.methods.split(",")
    targets = tuple(float(t) for t in args.targets.split(","))
    unknown = [m for m in methods if m not in METHODS] + [r for r in runtimes if r not in latency.RUNTIMES]
    if unknown:
        p.error(f"unknown method(s) or runtime(s): {unknown}")
    if device == "cuda" and "onnxruntime" in runtimes:
        p.error("--device cuda: runtime onnxruntime times ONNX Runtime on the CPU; run it with --device cpu")
    if device == "cpu" and "cuda_graph" in runtimes:
        p.error("runtime cuda_graph needs --device cuda")
    config = {"models": models, "batches": batches, "runtimes": runtimes, "methods": methods, "targets": targets,
              "threads": args.threads, "quick": args.quick}
    if device == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        config.update({"device": device, "device_name": torch.cuda.get_device_name(),
                       "cudnn_benchmark": args.cudnn_benchmark, "allow_tf32": torch.backends.cudnn.allow_tf32,
                       PATH_ENV: os.environ.get(PATH_ENV, "auto")})
    with tempfile.TemporaryDirectory() as folder:
        if not args.keep_cache:
            os.environ[latency.CACHE_ENV] = folder
        rows = [row for name in models for batch in batches for runtime in runtimes
                for row in run_setting(name, batch, runtime, methods, targets, device)]
    md = markdown(rows, config)
    print(md)
    payload = {"environment": environment(device), "config": config, "rows": rows, "markdown": md}
    out = args.out or os.path.join(ROOT, "benchmarks", "results")
    print(f"wrote {write_results(result_name(models, batches, runtimes, device, args.quick), payload, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
