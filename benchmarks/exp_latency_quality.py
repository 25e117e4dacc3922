"""Accuracy at equal measured latency: FLOPs-targeted against latency-targeted compression (issue 22's target:
latency-targeted models at least as accurate as FLOPs-targeted ones at equal measured latency, on ResNet-20
and MobileNetV2, built-in data, 3 seeds, no fine-tuning).

For each model and seed (``exp_quality``'s trained baselines, its calibration images and test set), each
method and each FLOPs target ``t``:

1. ``flops``: the method at ``target_flops=t``;
2. ``latency``: the method at ``target_latency=r``, where ``r`` is the latency of (1) over dense measured by
   the method's own check (``plan["latency"]``, eager, this machine's CPU threads, batch ``--batch``);
3. dense, (1) and (2) timed together (``rankprune.latency``: interleaved rounds, the median over rounds of
   each model's time over dense in the same round), then their test accuracies as returned (no fine-tuning).

Methods: ``prune`` (the default pipeline with data: output_error, reconstruction, allocation across layers by
output error per FLOP, or per measured millisecond with ``target_latency``) and ``decompose`` (data-aware,
allocated by output error per FLOP or per millisecond). A row compares the two at the latency they measured in
the same rounds; ``latency`` counts as at least as accurate when its accuracy is no lower while its measured
ratio is no higher than ``flops``'s plus ``--slack`` (the rounds' spread).

    python benchmarks/exp_latency_quality.py                      # 2 models x 3 seeds x 2 methods (~30 min)
    python benchmarks/exp_latency_quality.py --quick              # resnet20, seed 0, prune only (a few min)

Needs exp_quality's cached baselines (``--cache``, trained on first use by exp_quality's own code). Timing
wants an otherwise idle machine. Writes ``benchmarks/results/exp_latency_quality[-quick]-cpu-<stamp>.json``.
"""
import argparse
import os
import statistics
import sys
import time
import types
from typing import Dict, List

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
TARGETS = (0.5,)
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
    flops_kept = lambda model: count_flops(model, one) / dense_flops  # noqa: E731
    rows = []
    for method in args.methods:
        for target in args.targets:
            t0 = time.perf_counter()
            by_flops, plan_f = compress(method, base, example, unit.calibration, {"target_flops": target})
            seconds_f = time.perf_counter() - t0
            reached = plan_f["latency"]["ratio"]
            t0 = time.perf_counter()
            by_latency = plan_l = None
            if reached >= 1.0:  # no latency below dense to match: the dense model is the latency-targeted answer
                error = f"the FLOPs-targeted model is not faster than dense ({reached:.3f}x): no latency to match"
            else:
                try:
                    by_latency, plan_l = compress(method, base, example, unit.calibration,
                                                  {"target_latency": reached})
                    error = None
                except ValueError as exc:  # the latency the FLOPs target reached is out of the search's reach
                    error = str(exc)
            seconds_l = time.perf_counter() - t0
            models = {"dense": base, "flops": by_flops}
            if by_latency is not None:
                models["latency"] = by_latency
            times = timed_together(models, example)
            row = {"model": model_name, "seed": seed, "method": method, "target_flops": target, "batch": args.batch,
                   "dense_acc": dense_acc, "dense_ms": times["dense"]["ms"],
                   "flops": {"acc": evaluate(by_flops, unit.test_loader), **times["flops"], "seconds": seconds_f,
                             "flops_kept": flops_kept(by_flops), "own_check": reached}}
            if by_latency is not None:
                row["latency"] = {"acc": evaluate(by_latency, unit.test_loader), **times["latency"],
                                  "seconds": seconds_l, "flops_kept": flops_kept(by_latency),
                                  "own_check": plan_l["latency"]["ratio"], "target": reached}
                row["at_least_as_accurate"] = (row["latency"]["acc"] >= row["flops"]["acc"]
                                               and row["latency"]["ratio"] <= row["flops"]["ratio"] + args.slack)
            else:
                row["latency"] = {"error": error}
            rows.append(row)
            print(line(row), flush=True)
    return rows


def line(row: dict) -> str:
    f, l = row["flops"], row["latency"]
    head = (f"{row['model']} s{row['seed']} {row['method']:9s} t={row['target_flops']}: flops-targeted "
            f"{100 * f['acc']:.2f}% at {f['ratio']:.3f}x ({100 * f['flops_kept']:.0f}% FLOPs)")
    if "error" in l:
        return head + f"; latency-targeted: {l['error']}"
    return head + (f"; latency-targeted {100 * l['acc']:.2f}% at {l['ratio']:.3f}x ({100 * l['flops_kept']:.0f}% "
                   f"FLOPs); at least as accurate: {row['at_least_as_accurate']}")


def markdown(rows: List[dict], config: dict) -> str:
    out = [f"Accuracy at equal measured latency, eager CPU ({config['threads']} threads), batch {config['batch']}, "
           "no fine-tuning; each row's times measured together in one set of interleaved rounds; mean over seeds. "
           "\"At least as accurate\": no less accurate and measured no slower than the FLOPs-targeted model plus "
           f"{config['slack']} of dense.",
           "", "| model | method | FLOPs target | flops-targeted: acc / time | latency-targeted: acc / time | "
           "at least as accurate (seeds) |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["method"], r["target_flops"]) for r in rows})
    for model, method, target in keys:
        group = [r for r in rows if (r["model"], r["method"], r["target_flops"]) == (model, method, target)]
        done = [r for r in group if "acc" in r["latency"]]
        mean = lambda side, key, rs: statistics.mean(r[side][key] for r in rs)  # noqa: E731
        flops_cell = f"{100 * mean('flops', 'acc', group):.2f}% / {mean('flops', 'ratio', group):.3f}x"
        latency_cell = (f"{100 * mean('latency', 'acc', done):.2f}% / {mean('latency', 'ratio', done):.3f}x"
                        + (f" ({len(done)} of {len(group)} seeds)" if len(done) < len(group) else "")
                        if done else group[0]["latency"]["error"].split(":")[0])
        wins = sum(bool(r.get("at_least_as_accurate")) for r in group)
        out.append(f"| {model} | {method} | {target} | {flops_cell} | {latency_cell} | {wins} of {len(group)} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet20, seed 0, prune only")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--targets", default=",".join(str(t) for t in TARGETS))
    p.add_argument("--batch", type=int, default=32, help="batch size the latency is measured at (default 32)")
    p.add_argument("--slack", type=float, default=0.02, help="ratio tolerance of 'equal latency' (default 0.02)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", ".cache", "exp_quality"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.methods = "resnet20", "0", "prune"
    args.models, args.methods = args.models.split(","), args.methods.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.targets = [float(t) for t in args.targets.split(",")]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [row for model in args.models for seed in args.seeds for row in run_unit(model, seed, args)]
    config = {"models": args.models, "seeds": args.seeds, "methods": args.methods, "targets": args.targets,
              "batch": args.batch, "slack": args.slack, "threads": args.threads, "rounds": ROUNDS,
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
