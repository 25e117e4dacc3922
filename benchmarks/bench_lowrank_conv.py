"""Low-rank convolution timings: layer level (fused op vs the same two convolutions vs the dense one) and
model level (ResNet-50 decomposed to about half its FLOPs vs dense).

Layer shapes are ResNet-50's 3x3 convolutions (C -> C at 56, 28, 14, 7) at rank C/4, channels_last inputs,
``torch.backends.cudnn.benchmark = True`` on CUDA, one dtype for every path. "op" is
``rankprune.ops.lowrank_conv2d`` as dispatched (under cudnn.benchmark it times both paths once per shape and
keeps the faster); on CUDA "fused" forces the fused kernel (RANKPRUNE_LOWRANK_CONV2D=fused) and "op_static" is
the op with cudnn.benchmark off, i.e. the path it picks by default (the cuDNN pair: what a default user gets).
Results go to benchmarks/results/ as JSON.

    python benchmarks/bench_lowrank_conv.py --device cpu --quick
    python benchmarks/bench_lowrank_conv.py --device cuda
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

import rankprune
from rankprune import ops
from rankprune.benchmark import environment, measure, write_results

LAYER_SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # (channels, spatial size)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _forced_path(path):
    def run(fn):
        old = os.environ.get("RANKPRUNE_LOWRANK_CONV2D")
        os.environ["RANKPRUNE_LOWRANK_CONV2D"] = path
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["RANKPRUNE_LOWRANK_CONV2D"]
            else:
                os.environ["RANKPRUNE_LOWRANK_CONV2D"] = old
    return run


def _without_cudnn_benchmark(fn):
    def run():
        old = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False
        try:
            return fn()
        finally:
            torch.backends.cudnn.benchmark = old
    return run


def bench_layer(device, dtype, channels, size, batch, timing):
    rank = channels // 4
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    dense_w = randn(channels, channels, 3, 3, scale=(channels * 9) ** -0.5)
    w1 = randn(rank, channels, 3, 3, scale=(channels * 9) ** -0.5)
    w2 = randn(channels, rank, 1, 1, scale=rank ** -0.5)
    bias = randn(channels)
    paths = {
        "dense": lambda: F.conv2d(x, dense_w, bias, 1, 1),
        "unfused": lambda: F.conv2d(F.conv2d(x, w1, None, 1, 1), w2, bias),
        "op": lambda: ops.lowrank_conv2d(x, w1, w2, bias, 1, 1, 1),
    }
    if device == "cuda":
        forced = _forced_path("fused")
        paths["fused"] = lambda: forced(lambda: ops.lowrank_conv2d(x, w1, w2, bias, 1, 1, 1))
        paths["op_static"] = _without_cudnn_benchmark(paths["op"])
    row = {"channels": channels, "size": size, "rank": rank, "batch": batch, "dtype": str(dtype).split(".")[-1]}
    with torch.no_grad():
        for name, fn in paths.items():
            row[f"{name}_ms"] = measure(fn, device, **timing).as_dict()
    t = {name: row[f"{name}_ms"]["median_ms"] for name in paths}
    row["speedup_vs_unfused"] = t["unfused"] / t["op"]
    row["speedup_vs_dense"] = t["dense"] / t["op"]
    if "fused" in t:
        row["fused_kernel_vs_unfused"] = t["unfused"] / t["fused"]
        # Below 1 where the default path is the slower one (the target: never below 0.95).
        row["op_static_vs_best"] = min(t["unfused"], t["fused"]) / t["op_static"]
    print(f"  {row['dtype']:9s} C={channels:3d}@{size:2d} r={rank:3d} B={batch:3d}  "
          + "  ".join(f"{k}={v:.3f}ms" for k, v in t.items())
          + f"  op vs unfused x{row['speedup_vs_unfused']:.2f}, vs dense x{row['speedup_vs_dense']:.2f}", flush=True)
    return row


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(rows):
    out = {}
    for dtype in sorted({r["dtype"] for r in rows}):
        sel = [r for r in rows if r["dtype"] == dtype]
        out[dtype] = {
            "geomean_speedup_vs_unfused": _geomean([r["speedup_vs_unfused"] for r in sel]),
            "min_speedup_vs_unfused": min(r["speedup_vs_unfused"] for r in sel),
            "geomean_speedup_vs_dense": _geomean([r["speedup_vs_dense"] for r in sel]),
        }
        if "fused_kernel_vs_unfused" in sel[0]:
            out[dtype]["geomean_fused_kernel_vs_unfused"] = _geomean([r["fused_kernel_vs_unfused"] for r in sel])
            out[dtype]["min_op_static_vs_best"] = min(r["op_static_vs_best"] for r in sel)
    return out


def bench_model(device, dtype, batch, timing, rank_multiple):
    """ResNet-50 (rankprune.models, random weights) decomposed to about half its FLOPs vs dense."""
    try:
        from rankprune import models
    except ImportError:
        return {"skipped": "rankprune.models is not available in this build"}
    dense = models.build("resnet50", num_classes=1000).eval()
    example = torch.randn(1, 3, 224, 224)
    _, plan, _ = rankprune.decompose(dense, target_flops=0.5, example_inputs=example)
    # Ranks rounded to multiples of `rank_multiple` (16: the fused kernel's granule), then rebuilt exactly.
    ranks = {}
    for name, entry in plan["layers"].items():
        r = entry["rank"]
        ranks[name] = max(rank_multiple, int(round(r / rank_multiple)) * rank_multiple) if rank_multiple > 1 else r
    small, plan, report = rankprune.decompose(dense, ranks=ranks, example_inputs=example)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    result = {
        "batch": batch, "dtype": str(dtype).split(".")[-1], "rank_multiple": rank_multiple,
        "flops_ratio": report["total"]["flops"] / report["total"]["flops_dense"],
        "params_ratio": report["total"]["params"] / report["total"]["params_dense"],
        "decomposed_layers": len(plan["layers"]),
    }
    with torch.no_grad():
        for name, model in (("dense", dense), ("decomposed", small)):
            model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last)
            result[f"{name}_ms"] = measure(lambda: model(x), device, **timing).as_dict()
    result["speedup"] = result["dense_ms"]["median_ms"] / result["decomposed_ms"]["median_ms"]
    print(f"  model resnet50 {result['dtype']} B={batch}: dense {result['dense_ms']['median_ms']:.2f} ms, "
          f"decomposed ({result['flops_ratio']:.2f} of the FLOPs) {result['decomposed_ms']['median_ms']:.2f} ms, "
          f"x{result['speedup']:.2f}", flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8, float32 only, few repeats (CPU)")
    parser.add_argument("--dtypes", default=None, help="comma-separated, default bfloat16,float32 (quick: float32)")
    parser.add_argument("--batches", default=None, help="comma-separated, default 1,8,32,128 (quick: 1,8)")
    parser.add_argument("--model-batch", type=int, default=None, help="default 32 on CUDA, 1 on CPU")
    parser.add_argument("--no-model", action="store_true", help="skip the ResNet-50 model-level comparison")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per path, with a tenth as many warm-up calls (default 50; quick 5)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device(args.device).type
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtypes = (args.dtypes or ("float32" if args.quick else "bfloat16,float32")).split(",")
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,32,128")).split(",")]
    timing = dict(warmup=2, repeats=5) if args.quick else dict(warmup=10, repeats=50, min_time_s=0.2)
    if args.repeats is not None:
        timing = dict(warmup=max(1, args.repeats // 10), repeats=args.repeats)

    print(f"layer level on {device}:", flush=True)
    rows = [bench_layer(device, DTYPES[d], c, s, b, timing) for d in dtypes for c, s in LAYER_SHAPES
            for b in batches]
    payload = {"environment": environment(device), "config": {"quick": args.quick, "dtypes": dtypes,
               "batches": batches, "layer_shapes": LAYER_SHAPES, "rank": "C/4", "memory_format": "channels_last",
               "cudnn_benchmark": device == "cuda"}, "layers": rows, "summary": summarize(rows)}
    if not args.no_model:
        model_dtype = DTYPES["bfloat16"] if device == "cuda" else torch.float32
        batch = args.model_batch or (32 if device == "cuda" else 1)
        payload["model"] = bench_model(device, model_dtype, batch, timing, 16 if device == "cuda" else 1)
    for dtype, s in payload["summary"].items():
        print(f"summary {dtype}: " + ", ".join(f"{k}={v:.3f}" for k, v in s.items()))
    print("wrote", write_results("bench_lowrank_conv", payload, args.out))


if __name__ == "__main__":
    sys.exit(main())
