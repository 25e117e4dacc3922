"""Experiment: which channel criterion keeps accuracy best at the same FLOPs?

ResNet-20 on the built-in procedural data (``rankprune.data.synthetic_cifar``): train a baseline, prune 40%
of its FLOPs (``rankprune.prune(..., target_flops=0.6)``, the same ratio in every layer) by each criterion
(energy, hrank, weight_energy, l1, random), fine-tune briefly, evaluate; 3 seeds (each its own baseline).
Prints a Markdown table and writes JSON + Markdown to benchmarks/results/.

    python benchmarks/exp_pruning.py            # full settings (width 1, 10k images, 30 + 10 epochs)
    python benchmarks/exp_pruning.py --quick    # a small run for 2 CPU cores (width 0.5, 2k images, 5 + 2 epochs)
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import rankprune  # noqa: E402
from rankprune import data, models, report, scoring  # noqa: E402
from rankprune.benchmark import environment, write_results  # noqa: E402
from rankprune.training import evaluate, train  # noqa: E402

FULL = dict(width=1.0, train_size=10000, test_size=2000, epochs=30, finetune_epochs=10, calib_images=512,
            batch_size=128, lr=0.1, finetune_lr=0.01)
QUICK = dict(width=0.5, train_size=2000, test_size=1000, epochs=5, finetune_epochs=2, calib_images=128,
             batch_size=100, lr=0.1, finetune_lr=0.01)
# rankprune.training.train: SGD, momentum 0.9, cosine schedule over all steps
WEIGHT_DECAY = 5e-4


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings for 2 CPU cores")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--criteria", default="energy,hrank,weight_energy,l1,random")
    p.add_argument("--target-flops", type=float, default=0.6, help="fraction of FLOPs kept (default 0.6)")
    p.add_argument("--score-dtype", default="float32", choices=["float32", "float64"],
                   help="dtype of the model copy the data-driven criteria score (default float32)")
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), help=f"(default {value}; --quick {QUICK[key]})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. how the build differs)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    seeds = [int(s) for s in args.seeds.split(",")]
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    progress = not args.no_progress
    score_dtype = getattr(torch, args.score_dtype)

    runs = []
    t_start = time.time()
    for seed in seeds:
        torch.manual_seed(seed)
        train_set = data.synthetic_cifar("train", cfg["train_size"], seed=seed)
        test_loader = data.batch_loader(data.synthetic_cifar("test", cfg["test_size"], seed=seed), 500)
        train_loader = data.batch_loader(train_set, cfg["batch_size"], shuffle=True, seed=seed)
        calib = data.batch_loader(data.ImageTensorDataset(train_set.images[: cfg["calib_images"]],
                                                          train_set.labels[: cfg["calib_images"]]), 64)
        calib_scoring = [(x.to(score_dtype), y) for x, y in calib]
        base = models.build("resnet20", width=cfg["width"]).to(device)
        t0 = time.time()
        train(base, train_loader, cfg["epochs"], cfg["lr"], device, weight_decay=WEIGHT_DECAY, progress=progress,
              desc="baseline")
        base_acc = evaluate(base, test_loader, device)
        example = torch.zeros(1, 3, 32, 32, device=device)
        base_stats = report.model_stats(base, example)
        print(f"seed {seed}: baseline {100 * base_acc:.2f}% ({time.time() - t0:.0f}s), "
              f"{base_stats['flops'] / 1e6:.2f} MFLOPs", flush=True)
        for name in criteria:
            torch.manual_seed(seed)
            t0 = time.time()
            kwargs = {"seed": seed} if name == "random" else {}
            crit = scoring.get(name, **kwargs)
            if crit.needs_data:
                crit.progress = progress
                scores = crit.scores(copy.deepcopy(base).to(score_dtype), calib_scoring)
            else:
                scores = crit.scores(base)
            t_score = time.time() - t0
            pruned, plan = rankprune.prune(base, example, scores, target_flops=args.target_flops, progress=progress)
            acc_pruned = evaluate(pruned, test_loader, device)
            train(pruned, train_loader, cfg["finetune_epochs"], cfg["finetune_lr"], device,
                  weight_decay=WEIGHT_DECAY, progress=progress, desc=f"fine-tune {name}")
            acc_ft = evaluate(pruned, test_loader, device)
            run = {
                "seed": seed, "criterion": name, "baseline_acc": base_acc, "pruned_acc": acc_pruned,
                "finetuned_acc": acc_ft, "flops_kept": plan["flops"][1] / plan["flops"][0],
                "params_kept": plan["params"][1] / plan["params"][0], "ratio": plan["ratio"],
                "scoring_s": t_score,
            }
            runs.append(run)
            print(f"  {name:<14} FLOPs kept {100 * run['flops_kept']:.1f}%  pruned {100 * acc_pruned:.2f}%  "
                  f"fine-tuned {100 * acc_ft:.2f}%  (scoring {t_score:.1f}s)", flush=True)

    rows = []
    for name in criteria:
        mine = [r for r in runs if r["criterion"] == name]
        fl = mean_std([r["flops_kept"] for r in mine])
        pa = mean_std([100 * r["params_kept"] for r in mine])
        a0 = mean_std([100 * r["pruned_acc"] for r in mine])
        a1 = mean_std([100 * r["finetuned_acc"] for r in mine])
        rows.append([name, f"{100 * (1 - fl[0]):.1f}%", f"{100 - pa[0]:.1f}%", f"{a0[0]:.2f} ± {a0[1]:.2f}",
                     f"{a1[0]:.2f} ± {a1[1]:.2f}"])
    base_acc = mean_std([100 * r["baseline_acc"] for r in runs if r["criterion"] == criteria[0]])
    header = ["criterion", "FLOPs removed", "params removed", "acc. after pruning (%)",
              f"acc. after {cfg['finetune_epochs']} fine-tune epoch(s) (%)"]
    table = report.markdown_table(rows, header)
    setting = (f"ResNet-20 (width {cfg['width']}) on the built-in synthetic data ({cfg['train_size']} train / "
               f"{cfg['test_size']} test images), baseline {cfg['epochs']} epochs: {base_acc[0]:.2f} ± "
               f"{base_acc[1]:.2f}%; pruned to {100 * args.target_flops:.0f}% of the FLOPs (same channel ratio "
               f"in every layer), {cfg['calib_images']} calibration images, seeds {seeds}, mean ± std.")
    markdown = f"{setting}\n\n{table}\n"
    print("\n" + markdown)
    env = environment(device)
    payload = {"environment": env, "config": cfg, "quick": args.quick, "target_flops": args.target_flops,
               "score_dtype": args.score_dtype, "seeds": seeds, "criteria": criteria, "runs": runs,
               "markdown": markdown, "wall_s": time.time() - t_start, "note": args.note}
    path = write_results("exp_pruning" + ("-quick" if args.quick else ""), payload, args.out)
    md_path = os.path.join(args.out, "exp_pruning" + ("-quick" if args.quick else "") + f"-{env['device_type']}.md")
    with open(md_path, "w") as f:
        f.write(markdown)
    print(f"wrote {path} and {md_path}")


if __name__ == "__main__":
    main()
