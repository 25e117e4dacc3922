"""Experiment: decomposition of a trained ResNet-20 without fine-tuning: weight SVD vs data-aware factors vs
data-aware factors with ranks allocated by output error (issue 12's decomposition targets).

For each FLOPs fraction (default 0.8, 0.6, 0.5) of a trained checkpoint (default the width-0.5 ResNet-20 at
``/work/coord/resnet20_w05.pt``, 4 epochs on 4000 built-in images; ``--train`` trains one):

- ``weight-svd``: ``decompose(target_flops=f)`` without data (weight SVD, ranks by discarded weight energy);
- ``data-aware``: the same ranks, factors from ``decompose(ranks=..., data=calib)`` (output error on the
  calibration images);
- ``data-aware+alloc``: ``decompose(target_flops=f, data=calib)`` (ranks allocated by relative output error).

Each is evaluated raw and after BatchNorm recalibration on the calibration images
(``rankprune.training.recalibrate``). All variants use the same ``min_rank`` / ``rank_multiple``.
Targets (no fine-tuning): data-aware at 80% FLOPs within 2 points of the baseline, at 50% within 10 points.

    python benchmarks/exp_decompose.py --checkpoint /work/coord/resnet20_w05.pt --width 0.5
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

import rankprune
from rankprune import data, models
from rankprune.benchmark import environment, markdown_table, write_results
from rankprune.training import evaluate, recalibrate, train


METHODS = ("weight-svd", "data-aware", "data-aware+alloc", "data-aware+alloc, unweighted",
           "data-aware+alloc, symmetric")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="/work/coord/resnet20_w05.pt", help="state_dict of a trained model")
    p.add_argument("--train", action="store_true", help="train the baseline (4 epochs, 4000 images) instead")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--fractions", default="0.8,0.6,0.5", help="FLOPs fractions to keep")
    p.add_argument("--calib-batches", type=int, default=10, help="calibration batches of --batch-size train images")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--min-rank", type=float, default=None, help="min_rank (default: decompose's default)")
    p.add_argument("--rank-multiple", type=int, default=1)
    p.add_argument("--scheme", default="channel")
    p.add_argument("--methods", default=",".join(METHODS), help=f"variants to run (default all: {', '.join(METHODS)})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.methods = args.methods.split(",")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.build(args.model, width=args.width)
    if args.train:
        train_loader, _ = data.loaders(batch_size=128, n_train=4000, n_test=args.test_size, seed=0)
        train(model, train_loader, 4, 0.1, device, progress=False)
    else:
        model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    model.to(device).eval()
    test = data.batch_loader(data.synthetic_cifar("test", args.test_size, seed=0), 500)
    calib_set = data.synthetic_cifar("train", args.calib_batches * args.batch_size, seed=1)
    calib = [x for x, _ in data.batch_loader(calib_set, args.batch_size)]
    example = calib[0][:1].to(device)
    options = dict(rank_multiple=args.rank_multiple, scheme=args.scheme, progress=False)
    if args.min_rank is not None:
        options["min_rank"] = int(args.min_rank) if args.min_rank >= 1 else args.min_rank
    # raw first: recalibration is measured separately below
    aware = dict(options, example_inputs=example, recalibrate=False)
    baseline = evaluate(model, test, device)
    baseline_recalibrated = evaluate(recalibrate(copy.deepcopy(model), calib), test, device)
    print(f"baseline {baseline:.4f}, recalibrated {baseline_recalibrated:.4f}", flush=True)
    rows = []
    for fraction in args.fractions:
        start = time.perf_counter()
        weight, weight_plan, weight_report = rankprune.decompose(model, target_flops=fraction,
                                                                 example_inputs=example, **options)
        ranks = {name: e["rank"] for name, e in weight_plan["layers"].items()}
        variants = {
            "weight-svd": lambda: (weight, weight_plan, weight_report),
            "data-aware": lambda: rankprune.decompose(model, ranks=ranks, data=calib, **aware),
            "data-aware+alloc": lambda: rankprune.decompose(model, target_flops=fraction, data=calib, **aware),
            "data-aware+alloc, unweighted": lambda: rankprune.decompose(
                model, target_flops=fraction, data=calib, sensitivity=False, **aware),
            "data-aware+alloc, symmetric": lambda: rankprune.decompose(
                model, target_flops=fraction, data=calib, asymmetric=False, **aware),
        }
        for method in args.methods:
            net, _, rep = variants[method]()
            raw = evaluate(net, test, device)
            recal = evaluate(recalibrate(copy.deepcopy(net), calib), test, device)
            layer_ranks = [e["rank"] / e["full_rank"] for e in rep["layers"].values()]
            row = {"flops_target": fraction, "method": method,
                   "flops_kept": rep["total"]["flops"] / rep["total"]["flops_dense"],
                   "acc_raw": raw, "acc_recalibrated": recal,
                   "drop_raw_pts": 100 * (baseline - raw), "drop_recalibrated_pts": 100 * (baseline - recal),
                   "layers_decomposed": len(rep["layers"]),
                   "min_rank_fraction": min(layer_ranks) if layer_ranks else None,
                   "ranks": {n: e["rank"] for n, e in rep["layers"].items()}}
            rows.append(row)
            print(f"{fraction:.2f} {method:18s} flops {row['flops_kept']:.3f} raw {raw:.4f} recal {recal:.4f} "
                  f"min rank frac {row['min_rank_fraction']}", flush=True)
        print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)
    headers = ["FLOPs target", "method", "FLOPs kept", "acc raw", "acc recal.", "drop raw (pts)",
               "drop recal. (pts)", "layers", "min rank / full"]
    keys = ["flops_target", "method", "flops_kept", "acc_raw", "acc_recalibrated", "drop_raw_pts",
            "drop_recalibrated_pts", "layers_decomposed", "min_rank_fraction"]
    table = markdown_table(headers, [[r[k] for k in keys] for r in rows])
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["min_rank"] = options.get("min_rank", rankprune.lowrank.DEFAULT_MIN_RANK)
    md = (f"{args.model} (width {args.width}) from `{'trained here' if args.train else args.checkpoint}`, baseline "
          f"{100 * baseline:.2f}% ({100 * baseline_recalibrated:.2f}% recalibrated), {args.calib_batches}x{args.batch_size} calibration images, no fine-tuning.\n\n"
          + table + "\n")
    path = write_results("exp_decompose", {"environment": environment(device), "config": config,
                                           "baseline_acc": baseline,
                                           "baseline_recalibrated_acc": baseline_recalibrated, "rows": rows,
                                           "markdown": md}, args.out)
    with open(path[:-5] + ".md", "w") as f:
        f.write(md)
    print(md)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
