"""Investigation: why does the energy criterion rank below l1, bn_scale, Taylor and random on ResNet-20?

One trained ResNet-20 (width 0.5, built-in data; trained once and saved, ``--checkpoint``, with its config
in a JSON next to it so that other experiments can reuse it), pruned to 80% and 60% of its FLOPs by each
criterion and each variant of the energy criterion, BatchNorm recalibrated on the calibration images, no
fine-tuning; test accuracy raw and after recalibration. Variants of energy: where the map is read (the
``tap``; "residual at BN" is where ``tap="auto"`` read the convs of residual groups before it read the
block output), local vs global ranking, the number of calibration images, the group reduction of residual
groups, and the DC (mean) part of each map, which recalibration absorbs (see docs/pruning.md and
``rankprune.scoring.Energy``). Prints a Markdown table and writes JSON + Markdown to benchmarks/results/.

    python benchmarks/exp_energy.py --checkpoint /work/coord/resnet20_w05.pt
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import rankprune  # noqa: E402
from rankprune import data, models, pruning, report, scoring  # noqa: E402
from rankprune.benchmark import environment, write_results  # noqa: E402
from rankprune.training import evaluate, recalibrate, train  # noqa: E402

TRAIN = dict(model="resnet20", width=0.5, train_size=4000, test_size=2000, epochs=4, batch_size=100, lr=0.1,
             weight_decay=5e-4, data="rankprune.data.synthetic_cifar(split, n, seed=seed)")


def load_or_train(path: str, progress: bool, seed: int = 0):
    """The baseline: loaded from ``path`` (state_dict) and ``path``'s JSON, or trained with TRAIN (and
    ``seed``: initialisation, data and shuffling) and saved."""
    config_path = os.path.splitext(path)[0] + ".json"
    if os.path.exists(path) and os.path.exists(config_path):
        with open(config_path) as f:
            cfg = json.load(f)
        model = models.build(cfg["model"], width=cfg["width"])
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), cfg
    cfg = dict(TRAIN, seed=seed)
    torch.manual_seed(cfg["seed"])
    train_set = data.synthetic_cifar("train", n=cfg["train_size"], seed=cfg["seed"])
    test_set = data.synthetic_cifar("test", n=cfg["test_size"], seed=cfg["seed"])
    model = models.build(cfg["model"], width=cfg["width"])
    t0 = time.time()
    train(model, data.batch_loader(train_set, cfg["batch_size"], shuffle=True, seed=cfg["seed"]), cfg["epochs"],
          cfg["lr"], weight_decay=cfg["weight_decay"], progress=progress)
    cfg["train_seconds"] = round(time.time() - t0, 1)
    cfg["test_accuracy"] = evaluate(model, data.batch_loader(test_set, 500))
    cfg["how_to_load"] = ("m = rankprune.models.build(cfg['model'], width=cfg['width']); "
                          "m.load_state_dict(torch.load(path, weights_only=True))")
    torch.save(model.state_dict(), path)
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    print(f"trained {cfg['model']} (width {cfg['width']}): {100 * cfg['test_accuracy']:.2f}% in "
          f"{cfg['train_seconds']} s; saved {path} and {config_path}", flush=True)
    return model.eval(), cfg


def energy_scores(model, calibration, centred=False, residual_at_bn=False):
    """``energy`` with the default taps, changed in two ways the library does not offer:

    - ``centred``: the nuclear norm of each map minus its channel's mean over the calibration data (a first
      pass), i.e. the part of a channel that BatchNorm recalibration cannot absorb once it is removed;
    - ``residual_at_bn``: the convs of a residual group (each block's second conv and the shortcut conv)
      read on their own BatchNorm output before the addition, as ``tap="auto"`` did before it read the
      block output after the addition and its ReLU (HRank's place).
    """
    convs = scoring.conv_layers(model)
    taps = scoring.find_taps(model, calibration[0][0][:1], convs, "auto")
    if residual_at_bn:
        for name, block in model.named_modules():
            if hasattr(block, "relu2"):
                taps[f"{name}.conv2"] = scoring._Tap(block.bn2, None)
                if f"{name}.shortcut.0" in taps:
                    taps[f"{name}.shortcut.0"] = scoring._Tap(block.shortcut[1], None)
    means = {name: torch.zeros(conv.out_channels, dtype=torch.float64) for name, conv in convs.items()}
    sums = {name: torch.zeros(conv.out_channels, dtype=torch.float64) for name, conv in convs.items()}

    def run(make_hook):
        count = 0
        handles = [t.host.register_forward_hook(make_hook(name, t)) for name, t in taps.items()]
        try:
            with torch.no_grad():
                for x, _ in calibration:
                    model(x)
                    count += x.shape[0]
        finally:
            for h in handles:
                h.remove()
        return count

    def mean_hook(name, tap):
        def hook(module, inputs, output):
            means[name].add_(tap.read(output).mean((2, 3)).sum(0).double())
        return hook

    def energy_hook(name, tap):
        def hook(module, inputs, output):
            maps = tap.read(output)
            if centred:
                maps = maps - (means[name] / n_mean).to(maps.dtype).view(1, -1, 1, 1)
            sums[name].add_(rankprune.ops.feature_energy(maps, reduction="sum").double())
        return hook

    n_mean = run(mean_hook) if centred else 1
    n = run(energy_hook)
    return {name: s / n for name, s in sums.items()}


@contextlib.contextmanager
def unnormalized_groups():
    """ScoreImportance without the per-conv division by the mean score (raw scores averaged in a group)."""
    from rankprune.pruning import _importance

    saved = _importance._normalized
    _importance._normalized = lambda s: s
    try:
        yield
    finally:
        _importance._normalized = saved


# variant -> (criterion name or scoring function, criterion kwargs, calibration images, prune kwargs, context)
VARIANTS = {
    "energy": ("energy", {}, 1000, {}, None),
    "energy residual at BN": (energy_scores, {"residual_at_bn": True}, 1000, {}, None),
    "energy tap=relu": ("energy", {"tap": "relu"}, 1000, {}, None),
    "energy tap=bn": ("energy", {"tap": "bn"}, 1000, {}, None),
    "energy tap=conv": ("energy", {"tap": "conv"}, 1000, {}, None),
    "energy global": ("energy", {}, 1000, {"global_ranking": True}, None),
    "energy 100 images": ("energy", {}, 100, {}, None),
    "energy unnormalised groups": ("energy", {}, 1000, {}, unnormalized_groups),
    "energy centred": (energy_scores, {"centred": True}, 1000, {}, None),
    "energy centred global": (energy_scores, {"centred": True}, 1000, {"global_ranking": True}, None),
    "hrank": ("hrank", {}, 1000, {}, None),
    "l1": ("l1", {}, 0, {}, None),
    "l1 global": ("l1", {}, 0, {"global_ranking": True}, None),
    "bn_scale": ("bn_scale", {}, 0, {}, None),
    "bn_scale global": ("bn_scale", {}, 0, {"global_ranking": True}, None),
    "taylor": ("taylor", {}, 1000, {}, None),
    "random": ("random", {}, 0, {}, None),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="baseline state_dict (trained and saved if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of a baseline trained here (default 0)")
    p.add_argument("--train-only", action="store_true", help="train and save the baseline, then stop")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants (default: all)")
    p.add_argument("--target-flops", default="0.8,0.6", help="fractions of the FLOPs kept (default 0.8,0.6)")
    p.add_argument("--recalibration-images", type=int, default=1000,
                   help="training images BatchNorm is recalibrated on (default 1000, the issue's 10 x 100)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    progress = not args.no_progress
    base, cfg = load_or_train(args.checkpoint, progress, args.seed)
    if args.train_only:
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    targets = [float(t) for t in args.target_flops.split(",")]
    seed = cfg.get("seed", 0)
    train_set = data.synthetic_cifar("train", n=cfg.get("train_size", cfg.get("n_train", 4000)), seed=seed)
    test_loader = data.batch_loader(data.synthetic_cifar("test", n=cfg.get("test_size", cfg.get("n_test", 2000)),
                                                         seed=seed), 500)
    batches = list(data.batch_loader(train_set, 100))
    recalibration = batches[: max(1, args.recalibration_images // 100)]
    example = torch.zeros(1, 3, 32, 32)
    base_acc = evaluate(base, test_loader)
    print(f"baseline {cfg['model']} width {cfg['width']}: {100 * base_acc:.2f}%", flush=True)
    runs = []
    t_start = time.time()
    for variant in variants:
        criterion, kwargs, images, prune_kwargs, context = VARIANTS[variant]
        calibration = batches[: max(1, images // 100)]
        t0 = time.time()
        if callable(criterion):
            scores = criterion(base, calibration, **kwargs)
        else:
            crit = scoring.get(criterion, **kwargs)
            if hasattr(crit, "progress"):
                crit.progress = progress
            scores = crit.scores(base, calibration if crit.needs_data else None)
        score_s = time.time() - t0
        for target in targets:
            with context() if context else contextlib.nullcontext():
                pruned, plan = rankprune.prune(base, example, scores, target_flops=target, progress=False,
                                               **prune_kwargs)
            raw = evaluate(pruned, test_loader)
            recalibrate(pruned, recalibration)
            acc = evaluate(pruned, test_loader)
            runs.append({"variant": variant, "target_flops": target, "flops_kept": plan["flops"][1] / plan["flops"][0],
                         "raw_acc": raw, "recalibrated_acc": acc, "scoring_s": round(score_s, 1)})
            print(f"{variant:<28} FLOPs {100 * runs[-1]['flops_kept']:5.1f}%  raw {100 * raw:5.1f}%  "
                  f"recalibrated {100 * acc:5.1f}%", flush=True)

    header = ["variant"] + [f"{100 * t:.0f}% FLOPs: raw / recalibrated (%)" for t in targets]
    rows = []
    for variant in variants:
        cells = [variant]
        for target in targets:
            r = next(r for r in runs if r["variant"] == variant and r["target_flops"] == target)
            cells.append(f"{100 * r['raw_acc']:.1f} / {100 * r['recalibrated_acc']:.1f}")
        rows.append(cells)
    setting = (f"ResNet-20 (width {cfg['width']}) trained {cfg['epochs']} epochs on {len(train_set)} built-in "
               f"images, baseline {100 * base_acc:.2f}% on {len(test_loader.dataset)} test images; pruned by "
               f"each variant to the FLOPs shown (local ranking unless 'global'), no fine-tuning; BatchNorm "
               f"recalibrated on {100 * len(recalibration)} training images. One model (seed {seed}).")
    markdown = f"{setting}\n\n{report.markdown_table(rows, header)}\n"
    print("\n" + markdown)
    env = environment("cpu")
    payload = {"environment": env, "config": cfg, "baseline_acc": base_acc, "targets": targets, "runs": runs,
               "markdown": markdown, "wall_s": round(time.time() - t_start, 1)}
    name = "exp_energy-" + os.path.splitext(os.path.basename(args.checkpoint))[0]
    path = write_results(name, payload, args.out)
    md_path = os.path.join(args.out, f"{name}-{env['device_type']}-{os.path.basename(path)[-21:-5]}.md")
    with open(md_path, "w") as f:
        f.write(markdown)
    print(f"wrote {path} and {md_path}")


if __name__ == "__main__":
    main()
