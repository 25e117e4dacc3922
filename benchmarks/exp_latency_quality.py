"""Accuracy at equal measured latency: FLOPs-targeted against latency-targeted compression (issue 22's target:
latency-targeted models at least as accurate as FLOPs-targeted ones at equal measured latency, on ResNet-20
and MobileNetV2, built-in data, 3 seeds, no fine-tuning).

For each model and seed (``exp_quality``'s trained baselines, its calibration images and test set) and each
method:

1. ``flops``: the method at ``target_flops=t`` for each ``t`` of ``--targets``: a curve of accuracy against
   latency;
2. ``latency``: the method at ``target_latency=r`` for each ``r`` of ``--latency-targets`` (eager, this
   machine's CPU threads, batch ``--batch``), chosen inside the range the curve spans;
3. dense and every model of (1) and (2) timed together (``rankprune.latency``: interleaved rounds, the median
   over rounds of each model's time over dense in the same round), then their test accuracies as returned (no
   fine-tuning).

Each latency-targeted model is compared with the FLOPs-targeted curve at its own measured ratio: the accuracy
the curve reaches there, linear between the two FLOPs-targeted models measured on either side (outside the
curve's range: not compared). "Equal latency" is thus read off measurements taken in the same rounds, not from
a target one measurement can only reach to within its noise (a model's ratio moved by up to 0.1 between two
timings at batch 32 on 2 cores); the gap to the curve is counted over every seed and latency target.

Methods: ``prune`` (the default pipeline with data: output_error, reconstruction, allocation across layers by
output error per FLOP, or per measured millisecond with ``target_latency``) and ``decompose`` (data-aware,
allocated by output error per FLOP or per millisecond; at batch 32 on the CPU slower than dense at half the
FLOPs, so not in the default run).

    python benchmarks/exp_latency_quality.py                      # 2 models x 3 seeds, prune, 5 + 2 targets
    python benchmarks/exp_latency_quality.py --quick              # resnet20, seed 0 (a few min)

Needs exp_quality's cached baselines (``--cache``, trained on first use by exp_quality's own code). Timing
wants an otherwise idle machine. Writes ``benchmarks/results/exp_latency_quality[-quick]-cpu-<stamp>.json``.
"""
import argparse
import os
import statistics
import sys
import time
import types
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import exp_quality  # noqa: E402  (the baselines, data and settings of the quality experiment)
import rankprune  # noqa: E402
from rankprune.benchmark import environment, write_results  # noqa: E402
from rankprune.latency.runtimes import interleaved, make_timer, pooled, round_ratios, runtime_threads  # noqa: E402
from rankprune.report import count_flops  # noqa: E402
from rankprune.training import evaluate  # noqa: E402

MODELS = ("resnet20", "mobilenetv2")
METHODS = ("prune", "decompose")
# FLOPs targets span the curve; latency targets lie inside the range it measured at batch 32 (0.5 of the FLOPs:
# 0.79x dense on both models, README)
TARGETS = (0.3, 0.4, 0.5, 0.6, 0.7)
LATENCY_TARGETS = (0.75, 0.85)
ROUNDS, REPEATS = 15, 5


def compress(method: str, base, example, calibration, budget: Dict[str, float]):
    """``(model, plan)`` of ``method`` with ``budget`` (``target_flops`` or ``target_latency``)."""
    if method == "prune":
        return rankprune.prune(base, example, data=calibration, progress=False, **budget)
    model, plan, _ = rankprune.decompose(base, data=calibration, example_inputs=example, progress=False, **budget)
    return model, plan


def timed_together(models: Dict[str, torch.nn.Module], example) -> Dict[str, Dict[str, float]]:
    """Each model's median time over dense in the same rounds, with the rounds' 10th-90th percentile spread."""
    threads = runtime_threads("eager", None)
    timers = {name: make_timer(m.eval(), example, "eager", example.device, threads) for name, m in models.items()}
    rounds = interleaved(timers, ROUNDS, REPEATS)
    out = {}
    for name, timings in rounds.items():
        spread = round_ratios(rounds["dense"], timings)
        out[name] = {"ratio": spread["ratio"], "p10": spread["ratio_p10"], "p90": spread["ratio_p90"],
                     "ms": pooled(timings).median_ms}
    return out


def run_unit(model_name: str, seed: int, args) -> List[dict]:
    setting = exp_quality.MODELS[model_name]
    unit = exp_quality.Unit(setting, seed, types.SimpleNamespace(device="cpu", cache=args.cache))
    base = unit.baseline()
    example = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    dense_acc = evaluate(base, unit.test_loader)
    one = example[:1]
    dense_flops = count_flops(base, one)
    rows = []
    for method in args.methods:
        models, points = {"dense": base}, []
        for target in args.targets:
            t0 = time.perf_counter()
            models[f"flops {target}"], plan = compress(method, base, example, unit.calibration,
                                                       {"target_flops": target})
            points.append({"side": "flops", "target_flops": target, "seconds": time.perf_counter() - t0,
                           "own_check": plan["latency"]["ratio"]})
        for target in args.latency_targets:
            point = {"side": "latency", "target_latency": target}
            t0 = time.perf_counter()
            try:
                models[f"latency {target}"], plan = compress(method, base, example, unit.calibration,
                                                             {"target_latency": target})
                point["own_check"] = plan["latency"]["ratio"]
            except ValueError as exc:  # out of the search's reach
                point["error"] = str(exc).split(":")[0]
            point["seconds"] = time.perf_counter() - t0
            points.append(point)
        times = timed_together(models, example)
        for point in points:
            name = point_name(point)
            if name in models:
                point.update(times[name], acc=evaluate(models[name], unit.test_loader),
                             flops_kept=count_flops(models[name], one) / dense_flops)
        curve = sorted((p["ratio"], p["acc"]) for p in points if p["side"] == "flops")
        for point in points:
            if point["side"] == "latency" and "acc" in point:
                point["curve_acc"] = on_curve(curve, point["ratio"])
        row = {"model": model_name, "seed": seed, "method": method, "batch": args.batch, "dense_acc": dense_acc,
               "dense_ms": times["dense"]["ms"], "points": points}
        rows.append(row)
        for point in points:
            print(line(row, point), flush=True)
    return rows


def point_name(point: dict) -> str:
    """``"flops 0.5"`` / ``"latency 0.75"``: the side and its target."""
    return f"{point['side']} {point['target_' + point['side']]}"


def on_curve(curve: List[tuple], ratio: float) -> Optional[float]:
    """The accuracy of the ``(ratio, acc)`` curve at ``ratio``: linear between the two points on either side
    (where two share a ratio, the lower accuracy: the curve is sorted by ratio, then accuracy); None outside
    the curve's range."""
    for (r0, a0), (r1, a1) in zip(curve, curve[1:]):
        if r0 <= ratio <= r1:
            return a0 if r1 == r0 else a0 + (ratio - r0) * (a1 - a0) / (r1 - r0)
    return None


def line(row: dict, point: dict) -> str:
    head = f"{row['model']} s{row['seed']} {row['method']:9s} {point_name(point)}: "
    if "error" in point:
        return head + point["error"]
    text = f"{100 * point['acc']:.2f}% at {point['ratio']:.3f}x ({100 * point['flops_kept']:.0f}% FLOPs)"
    if point["side"] == "latency":
        curve = point["curve_acc"]
        text += (f"; FLOPs-targeted curve there: {100 * curve:.2f}%" if curve is not None
                 else "; outside the FLOPs-targeted curve")
    return head + text


def markdown(rows: List[dict], config: dict) -> str:
    out = [f"Accuracy at equal measured latency, eager CPU ({config['threads']} threads), batch {config['batch']}, "
           "no fine-tuning; every model of a (model, seed, method) timed together in one set of interleaved rounds "
           "(ratio to dense); mean over seeds. Each latency-targeted model is compared with the FLOPs-targeted "
           "curve at its own measured ratio (linear between the FLOPs-targeted models on either side).",
           "", "| model | method | target | acc / time | FLOPs kept | FLOPs-targeted curve at that time | "
           "at least as accurate as the curve (seeds) |", "|---|---|---|---|---|---|---|"]
    mean = lambda ps, key: statistics.mean(p[key] for p in ps)  # noqa: E731
    gaps = {}
    for model, method in sorted({(r["model"], r["method"]) for r in rows}):
        group = [p for r in rows if (r["model"], r["method"]) == (model, method) for p in r["points"]]
        for side, targets in (("flops", config["targets"]), ("latency", config["latency_targets"])):
            for target in targets:
                points = [p for p in group if p["side"] == side and p[f"target_{side}"] == target]
                done = [p for p in points if "acc" in p]
                cells = ([f"{100 * mean(done, 'acc'):.2f}% / {mean(done, 'ratio'):.3f}x"
                          + (f" ({len(done)} of {len(points)} seeds)" if len(done) < len(points) else ""),
                          f"{100 * mean(done, 'flops_kept'):.1f}%"] if done else [points[0]["error"], "-"])
                if side == "flops" or not done:
                    cells += ["-", "-"]
                else:
                    compared = [p for p in done if p["curve_acc"] is not None]
                    gaps.setdefault((model, method), []).extend(p["acc"] - p["curve_acc"] for p in compared)
                    cells += [f"{100 * mean(compared, 'curve_acc'):.2f}%"
                              + (f" ({len(compared)} of {len(done)} within the curve)" if len(compared) < len(done)
                                 else "") if compared else "outside the curve",
                              f"{sum(p['acc'] >= p['curve_acc'] for p in compared)} of {len(compared)}"]
                label = f"target_{side}={target}"
                out.append(f"| {model} | {method} | {label} | " + " | ".join(cells) + " |")
    out.append("")
    for (model, method), values in gaps.items():
        if values:
            out.append(f"- {model}, {method}: latency-targeted minus the FLOPs-targeted curve at equal measured "
                       f"latency: mean {100 * statistics.mean(values):+.2f} points over {len(values)} models, "
                       f"at least as accurate in {sum(v >= 0 for v in values)}")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet20, seed 0")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="prune", help=f"among {', '.join(METHODS)} (default prune)")
    p.add_argument("--targets", default=",".join(str(t) for t in TARGETS), help="FLOPs targets (the curve)")
    p.add_argument("--latency-targets", default=",".join(str(t) for t in LATENCY_TARGETS),
                   help="latency targets (fractions of dense), inside the range the curve measures")
    p.add_argument("--batch", type=int, default=32, help="batch size the latency is measured at (default 32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", ".cache", "exp_quality"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.seeds = "resnet20", "0"
    args.models, args.methods = args.models.split(","), args.methods.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.targets = [float(t) for t in args.targets.split(",")]
    args.latency_targets = [float(t) for t in args.latency_targets.split(",")]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [row for model in args.models for seed in args.seeds for row in run_unit(model, seed, args)]
    config = {"models": args.models, "seeds": args.seeds, "methods": args.methods, "targets": args.targets,
              "latency_targets": args.latency_targets,
              "batch": args.batch, "threads": args.threads, "rounds": ROUNDS,
              "repeats": REPEATS}
    text = markdown(rows, config)
    print(text)
    name = "exp_latency_quality" + ("-quick" if args.quick else "")
    payload = {"benchmark": name, "environment": environment(torch.device("cpu")), "config": config, "rows": rows,
               "wall_s": time.perf_counter() - start, "markdown": text}
    print(write_results(name, payload, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
