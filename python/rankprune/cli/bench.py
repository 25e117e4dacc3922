"""`rankprune bench`: latency of a whole model or of a single layer, dense against compressed variants.

``rankprune bench model`` times a built-in network dense, channel-pruned and low-rank decomposed (or with a
saved plan applied); ``rankprune bench layer`` times one convolution dense, with fewer channels, and as a
low-rank pair of convolutions (unfused: two convolutions called one after the other; fused:
``rankprune.ops.lowrank_conv2d``, one kernel on CUDA where it covers the shape); ``rankprune bench clear-cache``
deletes the layer timings cached by ``rankprune.latency``. Timing uses
``rankprune.benchmark.measure``: warm-up, many repeats, median and p10-p90 spread; CUDA events (optionally
CUDA graphs) on GPU, ``torch.utils.benchmark`` / ``perf_counter`` on CPU. Prints a table with speed-ups
against the dense variant and writes ``<out>/<name>-<device>-<stamp>.{json,md,png}``.
"""
from __future__ import annotations  # torch in annotations only: registering the parser imports no torch

import copy
import os
import re
from typing import TYPE_CHECKING, Callable, Dict, List, Tuple

from . import UsageError
from .common import (add_common_options, add_model_options, build_model, check_output_dir, default_input_size,
                     load_model, read_plan, resolve_device, seed_everything)

if TYPE_CHECKING:
    import torch
    from torch import nn

OUT_DEFAULT = "rankprune-bench"
MODEL_VARIANTS = ("dense", "pruned", "decomposed")
LAYER_VARIANTS = ("dense", "pruned", "lowrank", "lowrank-fused")


def register(sub) -> None:
    """Add ``bench`` (with its targets ``model`` and ``layer``) to the subcommands."""
    p = sub.add_parser("bench", help="latency of a model or a layer: dense vs pruned vs decomposed",
                       description="Latency of a model or a single layer, dense against compressed variants "
                                   "(median and p10-p90 of many timed runs after warm-up).")
    kinds = p.add_subparsers(dest="target", metavar="TARGET", required=True)

    m = kinds.add_parser("model", help="time a network dense, pruned and decomposed (or with a plan)",
                         description="Time a network (built-in, torchvision, timm or module:factory): dense, "
                                     "channel-pruned (--ratio) and low-rank decomposed (--rank-ratio), or dense "
                                     "against a saved plan (--plan); with --onnx each also as an ONNX file run "
                                     "by ONNX Runtime on the CPU.")
    add_model_options(m, default="resnet20")
    m.add_argument("--variants", default=",".join(MODEL_VARIANTS),
                   help=f"comma-separated subset of {','.join(MODEL_VARIANTS)} (default: all)")
    m.add_argument("--ratio", type=float, default=0.5,
                   help="pruned variant: fraction of channels removed per pruned layer, in (0, 1) (default 0.5)")
    m.add_argument("--rank-ratio", type=float, default=0.25,
                   help="decomposed variant: rank as a fraction of each layer's full rank, in (0, 1] (default 0.25)")
    m.add_argument("--plan", help="a plan JSON (from rankprune prune/decompose/trp --out or the demo) to time "
                                  "against the dense model instead of the pruned/decomposed variants")
    m.add_argument("--onnx", action="store_true",
                   help="also export each variant to ONNX and time it in ONNX Runtime (CPU, float32, as many "
                        "threads as PyTorch uses; needs onnx, onnxscript and onnxruntime)")
    m.add_argument("--predict", action="store_true",
                   help="also show the latency model's prediction of each variant (rankprune.latency: the dense "
                        "model timed end to end, its layers and their changed shapes timed alone) beside the "
                        "measurement")
    _add_timing_options(m)
    m.set_defaults(run=run_model)

    lay = kinds.add_parser("layer", help="time one convolution dense, pruned, low-rank unfused and fused",
                           description="Time one k x k convolution (stride 1, 'same' padding): dense, with "
                                       "both channel counts reduced by --ratio, and as a rank --rank low-rank "
                                       "pair, unfused (two convolutions) and fused (rankprune's op).")
    lay.add_argument("--in-channels", type=int, default=64, help="input channels (default 64)")
    lay.add_argument("--out-channels", type=int, default=64, help="output channels (default 64)")
    lay.add_argument("--kernel-size", type=int, default=3, help="kernel height = width (default 3)")
    lay.add_argument("--input-size", type=int, default=32, help="input height = width (default 32)")
    lay.add_argument("--rank", type=int, default=16, help="rank of the low-rank variants (default 16)")
    lay.add_argument("--scheme", default="channel", choices=("channel", "spatial"),
                     help="low-rank scheme (see rankprune.nn.LowRankConv2d; default channel)")
    lay.add_argument("--ratio", type=float, default=0.5,
                     help="pruned variant: fraction of input and output channels removed, in (0, 1) (default 0.5)")
    lay.add_argument("--variants", default=",".join(LAYER_VARIANTS),
                     help=f"comma-separated subset of {','.join(LAYER_VARIANTS)} (default: all)")
    _add_timing_options(lay)
    lay.set_defaults(run=run_layer)

    clear = kinds.add_parser("clear-cache", help="delete the layer timings cached by rankprune.latency",
                             description="Delete the layer timings that rankprune.latency caches on disk "
                                         "($RANKPRUNE_CACHE_DIR/latency, default ~/.cache/rankprune/latency).")
    clear.set_defaults(run=run_clear_cache)


def _add_timing_options(p) -> None:
    p.add_argument("--batch-size", type=int, default=1, help="images per call (default 1)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (default 10)")
    p.add_argument("--repeats", type=int, default=100, help="timed calls, at least (default 100)")
    p.add_argument("--cuda-graph", action="store_true", help="on CUDA, capture each call into a CUDA graph and replay it")
    p.add_argument("--name", help="results name: files are <out>/<name>-<device>-<stamp>.* (default bench-model or "
                                  "bench-layer)")
    add_common_options(p, OUT_DEFAULT, f"folder for the JSON, Markdown and PNG results (default ./{OUT_DEFAULT})")


def _parse_variants(text: str, allowed: Tuple[str, ...]) -> List[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in allowed]
    if unknown or not names:
        raise UsageError(f"--variants: unknown variant(s) {unknown or text!r}; choose from {','.join(allowed)}")
    return names


def _check_timing(args) -> Tuple[torch.device, torch.dtype]:
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*", args.name):
        raise UsageError(f"--name {args.name!r}: use letters, digits, '_', '.' and single '-' between them")
    for name in ("batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    from .._inputs import resolve_dtype

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if args.cuda_graph and device.type != "cuda":
        raise UsageError("--cuda-graph needs a CUDA device (--device cuda)")
    seed_everything(args.seed)
    return device, dtype


def run_model(args) -> int:
    """Build the model and its variants, time each, print and write the results."""
    import torch

    from .._inputs import check_fraction

    device, dtype = _check_timing(args)
    variants = _parse_variants(args.variants, MODEL_VARIANTS)
    check_fraction("--ratio", args.ratio, high_open=True)
    check_fraction("--rank-ratio", args.rank_ratio)
    plan = read_plan(args.plan) if args.plan is not None else None
    size = default_input_size(args)
    if args.onnx and (device.type != "cpu" or dtype != torch.float32):
        raise UsageError("--onnx times ONNX Runtime on the CPU: use it with --device cpu --dtype float32")
    check_output_dir(args.out)
    import rankprune
    from rankprune import report

    x = torch.randn(args.batch_size, 3, size, size)
    dense = load_model(args, torch.device("cpu"), torch.float32)
    built: Dict[str, Callable[[], nn.Module]] = {"dense": lambda: dense}
    if args.plan is not None:
        built["plan"] = lambda: rankprune.apply_plan(build_model(args), plan)
    else:
        if "pruned" in variants:
            built["pruned"] = lambda: _pruned(dense, x, args.ratio)
        if "decomposed" in variants:
            built["decomposed"] = lambda: _decomposed(dense, x, args.rank_ratio)
        built = {k: v for k, v in built.items() if k in variants or k == "dense"}
    rows = []
    from tqdm.auto import tqdm

    predictors = {}
    for name, make in tqdm(list(built.items()), desc="bench model", unit="variant"):
        net = make().eval()
        stats = report.model_stats(net, (x[:1],))  # FLOPs per example, as every command reports them
        net = net.to(device=device, dtype=dtype)
        xd = x.to(device=device, dtype=dtype)
        if args.predict and name == "dense":
            predictors = _predictors(net, xd, args)
        rows.append(_timed_row(name, net, xd, stats, device, args))
        if args.onnx:  # the net is on the CPU in float32 (checked above)
            rows.append(_onnx_row(f"{name} (onnxruntime)", net, x, stats, args))
        for row, runtime in zip(rows[-2:] if args.onnx else rows[-1:], predictors):
            row["predicted_ms"] = predictors[runtime].predict(net)
    config = {"model": args.model, "width": args.width, "weights": args.weights, "batch_size": args.batch_size,
              "input_size": size, "ratio": args.ratio, "rank_ratio": args.rank_ratio, "plan": args.plan,
              "onnx": args.onnx, "predict": args.predict}
    return _finish(args.name or "bench-model", f"{args.model}, batch {args.batch_size}, {size}x{size}", rows,
                   config, device, args)


def _predictors(dense: nn.Module, x: torch.Tensor, args) -> Dict[str, object]:
    """``{runtime: LatencyModel}`` of the dense model, in the order of the rows each variant gets."""
    from rankprune.latency import LatencyModel

    runtimes = ["cuda_graph" if args.cuda_graph else "eager"] + (["onnxruntime"] if args.onnx else [])
    models = {runtime: LatencyModel.measure(dense, x, runtime) for runtime in runtimes}
    print("latency model: profiled in " + ", ".join(f"{r} {m.profiling_s:.1f} s" for r, m in models.items()))
    return models


def _onnx_row(name: str, net: nn.Module, x: torch.Tensor, stats: Dict[str, object], args) -> Dict[str, object]:
    """Export ``net`` to a temporary ONNX file and time an ONNX Runtime CPU session on ``x``."""
    import tempfile

    from rankprune.benchmark import measure
    from rankprune.export import export_onnx, onnx_session

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        try:
            export_onnx(net, (x,), path, verbose=False)
            session = onnx_session(path, spinning=False)  # as the latency model times (latency.runtimes)
        except ImportError as exc:
            raise UsageError(f"--onnx: {exc}") from None
    feeds = {session.get_inputs()[0].name: x.numpy()}
    t = measure(lambda: session.run(None, feeds), "cpu", warmup=args.warmup, repeats=args.repeats)
    return {"variant": name, "params": int(stats["params"]), "flops": int(stats["flops"]), **t.as_dict()}


def _pruned(dense: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    import rankprune

    # Latency depends on the shapes only, so the cheapest criterion (weight magnitude) stands in for any.
    net, _ = rankprune.prune(dense, (x,), "l1", ratio=ratio, progress=False)
    return net


def _decomposed(dense: nn.Module, x: torch.Tensor, rank_ratio: float) -> nn.Module:
    import rankprune

    net, _, _ = rankprune.decompose(dense, rank_ratio=rank_ratio, example_inputs=(x,), inplace=False,
                                   progress=False)
    return net


def run_layer(args) -> int:
    """Build the layer variants, time each, print and write the results."""
    import torch
    from torch import nn

    from .._inputs import check_fraction

    device, dtype = _check_timing(args)
    variants = _parse_variants(args.variants, LAYER_VARIANTS)
    for name in ("in_channels", "out_channels", "kernel_size", "input_size", "rank"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_fraction("--ratio", args.ratio, high_open=True)
    c_in, c_out, k = args.in_channels, args.out_channels, args.kernel_size
    full_rank = min(c_out, c_in * k) if args.scheme == "spatial" else min(c_out, c_in * k * k)
    if args.rank > full_rank:
        raise UsageError(f"--rank {args.rank} exceeds the full rank {full_rank} of this layer")
    check_output_dir(args.out)
    from rankprune import nn as rnn
    from rankprune import report

    pad = k // 2
    x = torch.randn(args.batch_size, c_in, args.input_size, args.input_size)
    keep = lambda c: max(1, round(c * (1 - args.ratio)))  # noqa: E731
    dense = nn.Conv2d(c_in, c_out, k, padding=pad)
    layers: Dict[str, Tuple[nn.Module, torch.Tensor]] = {"dense": (dense, x)}
    if "pruned" in variants:
        layers["pruned"] = (nn.Conv2d(keep(c_in), keep(c_out), k, padding=pad), x[:, : keep(c_in)].contiguous())
    if "lowrank" in variants or "lowrank-fused" in variants:
        low = rnn.LowRankConv2d.from_dense(dense, rank=args.rank, scheme=args.scheme)
        if "lowrank" in variants:  # the same two convolutions, called one after the other
            layers["lowrank"] = (nn.Sequential(copy.deepcopy(low.first), copy.deepcopy(low.second)), x)
        if "lowrank-fused" in variants:
            if args.scheme == "channel":
                layers["lowrank-fused"] = (low, x)  # forward is the one op rankprune.ops.lowrank_conv2d
            else:
                print("bench layer: note: the spatial scheme has no fused op; skipping lowrank-fused")
    from tqdm.auto import tqdm

    rows = []
    for name, (layer, inp) in tqdm(list(layers.items()), desc="bench layer", unit="variant"):
        stats = report.model_stats(layer, (inp[:1],))  # FLOPs per example
        layer = layer.to(device=device, dtype=dtype).eval()
        rows.append(_timed_row(name, layer, inp.to(device=device, dtype=dtype), stats, device, args))
    config = {"in_channels": c_in, "out_channels": c_out, "kernel_size": k, "input_size": args.input_size,
              "batch_size": args.batch_size, "rank": args.rank, "scheme": args.scheme, "ratio": args.ratio}
    title = f"conv {c_in}->{c_out} k{k} on {args.input_size}x{args.input_size}, batch {args.batch_size}, rank {args.rank}"
    return _finish(args.name or "bench-layer", title, rows, config, device, args)


def _timed_row(name: str, net: nn.Module, x: torch.Tensor, stats: Dict[str, object], device: torch.device, args):
    from rankprune.benchmark import latency

    t = latency(net, (x,), device=device, warmup=args.warmup, repeats=args.repeats, cuda_graph=args.cuda_graph)
    return {"variant": name, "params": int(stats["params"]), "flops": int(stats["flops"]), **t.as_dict()}


def run_clear_cache(args) -> int:
    """Delete the cached layer timings and say how many files went."""
    from rankprune.latency import cache_dir, clear_cache

    removed = clear_cache()
    print(f"removed {removed} cached timing file(s) from {cache_dir()}")
    return 0


def _finish(name: str, title: str, rows: List[Dict[str, object]], config: Dict[str, object], device: torch.device,
            args) -> int:
    from rankprune import plots
    from rankprune.benchmark import environment, markdown_table, write_results

    base = rows[0]
    for r in rows:
        r["speedup"] = base["median_ms"] / r["median_ms"]
        r["flops_ratio"] = r["flops"] / base["flops"] if base["flops"] else None
    env = environment(device)
    config.update({"dtype": args.dtype, "warmup": args.warmup, "repeats": args.repeats, "cuda_graph": args.cuda_graph,
                   "seed": args.seed})
    headers = ["variant", "params", "MFLOPs / example", "median ms", "p10 ms", "p90 ms", "speed-up", "FLOPs ratio"]
    cells = [[r["variant"], r["params"], r["flops"] / 1e6, r["median_ms"], r["p10_ms"], r["p90_ms"], r["speedup"],
              r["flops_ratio"]] for r in rows]
    if any("predicted_ms" in r for r in rows):
        headers.append("predicted ms")
        cells = [c + [r.get("predicted_ms")] for c, r in zip(cells, rows)]
    table = markdown_table(headers, cells)
    where = f"{env['device']}, torch {env['torch']}, {args.dtype}, {env['date']}"
    print(f"{title} on {where}")
    print(table)
    path = write_results(name, {"environment": env, "config": config, "rows": rows}, args.out)
    stem = path[: -len(".json")]
    with open(stem + ".md", "w") as f:
        f.write(f"# {name}: {title}\n\nMeasured on {where}, commit {env['commit']}.\n\n{table}\n")
    png = plots.latency_bars(rows, stem + ".png", f"{title}\n{env['device']}")
    print(f"wrote {path}, {stem}.md" + (f", {png}" if png else " (no plot: matplotlib is not installed)"))
    return 0
