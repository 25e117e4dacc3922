"""`rankprune trp`: train a built-in model on the built-in data with Trained Rank Pruning, then decompose it.

Writes ``<out>/model.pt`` (the decomposed model's state_dict; rebuild it with
``rankprune.apply_plan(rankprune.models.build(name), plan)`` and load it),
``<out>/plan.json``, ``<out>/trp_state.json`` (the pruner's state) and ``<out>/report.json`` /
``report.md`` (accuracy of the projected and of the decomposed model, FLOPs, parameters, ranks per layer).

The training loop is :func:`rankprune.training.train`, also the reference for using
:class:`rankprune.trp.TrainedRankPruner` in one's own loop.
"""
import json
import os
import time
from typing import Dict

OUT_DEFAULT = "rankprune-trp"


def register(sub) -> None:
    from .common import add_common_options

    p = sub.add_parser(
        "trp", help="train a built-in model with Trained Rank Pruning and decompose it",
        description="Train a built-in model on the built-in synthetic data with Trained Rank Pruning "
                    "(nuclear-norm regulariser + periodic energy-rank projection), decompose it at the trained "
                    "ranks (no fine-tuning) and write the decomposed model, its plan and a report.")
    p.add_argument("--model", default="resnet20", help="built-in CIFAR model (default resnet20)")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier of the model (default 1.0)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of SGD, cosine schedule (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (default 1e-4, TRP's)")
    p.add_argument("--train-size", type=int, default=10000, help="training images (default 10000)")
    p.add_argument("--test-size", type=int, default=2000, help="test images (default 2000)")
    p.add_argument("--scheme", default="channel", choices=("channel", "spatial"),
                   help="reshape / decomposition: channel (kxk C->r + 1x1) or spatial (kx1 + 1xk) (default channel)")
    p.add_argument("--energy", type=float, default=0.9, help="energy kept by each projection, in (0, 1] (default 0.9)")
    p.add_argument("--lam", type=float, default=3e-4, help="nuclear-norm weight, >= 0 (default 3e-4)")
    p.add_argument("--period", type=int, default=20,
                   help="project every PERIOD optimizer steps (default 20, as the Python API; TRP's CIFAR "
                        "commands use 1, which costs more accuracy at the same ranks: see docs/trp.md)")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision on CUDA (float16 autocast with a GradScaler)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_common_options(p, OUT_DEFAULT, f"output folder (default ./{OUT_DEFAULT})")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    import rankprune
    from rankprune import data, models, report
    from rankprune.training import evaluate, train

    from . import UsageError
    from .._inputs import check_fraction, resolve_dtype
    from .common import check_output_dir, resolve_device, seed_everything

    if args.model not in models.available():
        raise UsageError(f"--model: unknown model '{args.model}'; built-in: {', '.join(models.available())}")
    for name in ("epochs", "batch_size", "train_size", "test_size", "period"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_fraction("--energy", args.energy)
    if args.lam < 0 or args.lr <= 0 or args.weight_decay < 0 or args.width <= 0:
        raise UsageError("--lam and --weight-decay must be >= 0, --lr and --width > 0")
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        raise UsageError(f"--dtype {args.dtype}: train in float32 and use --amp for mixed precision")
    if args.amp and device.type != "cuda":
        raise UsageError("--amp needs a CUDA device (--device cuda)")
    out = check_output_dir(args.out)
    seed_everything(args.seed)

    train_loader, test_loader = data.loaders(args.batch_size, args.train_size, args.test_size, seed=args.seed)
    model = models.build(args.model, width=args.width).to(device, dtype)
    pruner = rankprune.trp.TrainedRankPruner(model, energy=args.energy, lam=args.lam, period=args.period,
                                             scheme=args.scheme, seed=args.seed)
    print(f"TRP on {args.model} (width {args.width}): {len(pruner.layer_names)} layers, scheme {args.scheme}, "
          f"energy {args.energy}, lam {args.lam}, period {args.period}, {args.epochs} epoch(s) on {device}")
    t0 = time.perf_counter()
    train(model, train_loader, args.epochs, args.lr, device, pruner=pruner, weight_decay=args.weight_decay,
          amp=args.amp, dtype=dtype, progress=not args.no_progress, desc="trp")
    train_s = time.perf_counter() - t0

    example = next(iter(test_loader))[0][:1].to(device, dtype)  # FLOPs at the size the model was trained on
    small, plan = pruner.finalize(example_inputs=(example,), progress=not args.no_progress)
    acc_projected = evaluate(model, test_loader, device, dtype)
    acc_decomposed = evaluate(small, test_loader, device, dtype)
    dense, lowrank = report.model_stats(model, (example,)), report.model_stats(small, (example,))
    ranks = pruner.ranks()
    result: Dict[str, object] = {
        "command": "trp",
        "args": {k: v for k, v in vars(args).items() if k != "run"},
        "train_seconds": round(train_s, 2),
        "accuracy_projected": acc_projected,
        "accuracy_decomposed": acc_decomposed,
        "dense": {"params": dense["params"], "flops": dense["flops"]},
        "decomposed": {"params": lowrank["params"], "flops": lowrank["flops"]},
        "flop_reduction": dense["flops"] / max(lowrank["flops"], 1),
        "ranks": ranks,
        "full_ranks": {name: min(rankprune.nn.weight_matrix(model.get_submodule(name).weight, args.scheme).shape)
                       for name in ranks},
    }
    torch.save(small.state_dict(), os.path.join(out, "model.pt"))
    _write_json(os.path.join(out, "plan.json"), plan)
    _write_json(os.path.join(out, "trp_state.json"), pruner.state_dict())
    _write_json(os.path.join(out, "report.json"), result)
    md = _markdown(result)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {out}/model.pt, plan.json, trp_state.json, report.json, report.md")
    return 0


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _markdown(result: Dict[str, object]) -> str:
    dense, small = result["dense"], result["decomposed"]
    lines = [
        "| model | accuracy | FLOPs per example | params |",
        "|---|---|---|---|",
        f"| TRP-trained, projected (dense) | {100 * result['accuracy_projected']:.2f}% | {dense['flops']:,} | "
        f"{dense['params']:,} |",
        f"| decomposed (no fine-tuning) | {100 * result['accuracy_decomposed']:.2f}% | {small['flops']:,} | "
        f"{small['params']:,} |",
        "",
        f"FLOP reduction {result['flop_reduction']:.2f}x; ranks: "
        + ", ".join(f"{k}={v}/{result['full_ranks'][k]}" for k, v in result["ranks"].items()),
        "",
    ]
    return "\n".join(lines)
