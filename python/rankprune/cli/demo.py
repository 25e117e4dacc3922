"""`rankprune demo`: the main job on the built-in data (see ``rankprune.demo``)."""
from .common import add_common_options, check_output_dir, resolve_device, seed_everything

OUT_DEFAULT = "rankprune-demo"


def register(sub) -> None:
    """Add ``demo`` to the subcommands."""
    p = sub.add_parser(
        "demo", help="which compression method gives the best model at the same cost: one table, a verdict, a report",
        description="Train a small CIFAR ResNet on the built-in synthetic data, then compress it to the same "
                    "fractions of its FLOPs by every method, each called as a user would with calibration "
                    "batches: pruning by each criterion (with reconstruction), the default pruning pipeline, "
                    "data-aware decomposition, weight SVD and the hybrid (rankprune.compress); measure each "
                    "model's accuracy and its latency interleaved with the dense model's (median and IQR over "
                    "rounds); say which method won at equal FLOPs and at equal latency, with the margin and its "
                    "noise, and mark chance-level accuracies; write a report folder (JSON, Markdown, PNG plots, "
                    "the baseline's weights, plans). Within 10 minutes on 2 idle CPU cores; --quick within one.")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: fewer images and epochs, one criterion, one FLOPs level (within 1 min; "
                        "accuracies stay low)")
    p.add_argument("--trp", action="store_true",
                   help="also train with Trained Rank Pruning and decompose (shown, outside the comparison)")
    p.add_argument("--model", help="built-in CIFAR model (default resnet20)")
    p.add_argument("--width", type=float, help="channel width multiplier of the model (default 0.5)")
    p.add_argument("--epochs", type=int, help="baseline training epochs (default 8; --quick 2)")
    p.add_argument("--finetune-epochs", type=int,
                   help="fine-tuning epochs of every compressed model before it is measured (default 0: "
                        "compared as the library returns them; each epoch costs about one baseline epoch per "
                        "variant)")
    p.add_argument("--trp-epochs", type=int, help="TRP training epochs (default 2; --quick 1)")
    p.add_argument("--train-size", type=int, help="training images (default 8000; --quick 800)")
    p.add_argument("--test-size", type=int, help="test images (default 2000; --quick 500)")
    p.add_argument("--batch-size", type=int, help="training batch size (default 100)")
    p.add_argument("--flops", help="comma-separated fractions of the FLOPs every method keeps, each in (0, 1) "
                                   "(default 0.6,0.4; --quick 0.5)")
    p.add_argument("--latency-targets",
                   help="comma-separated fractions of the dense latency the latency-targeted pruning meets, each "
                        "in (0, 1), or 'none' (default 0.8,0.7; --quick none)")
    p.add_argument("--criteria", help="comma-separated pruning criteria compared besides the default pipeline "
                                      "(rankprune.scoring names; default l1,bn_scale,taylor,energy; --quick l1)")
    p.add_argument("--no-compress", action="store_true", help="leave the hybrid (rankprune.compress) out")
    p.add_argument("--calibration-batches", type=int,
                   help="training batches every method calibrates on (default 8; --quick 2)")
    p.add_argument("--energy", type=float,
                   help="spectral energy TRP keeps in each layer's weight, in (0, 1] (default 0.9)")
    p.add_argument("--latency-repeats", type=int,
                   help="timed forward passes per variant and round (default 20; --quick 10)")
    p.add_argument("--latency-rounds", type=int,
                   help="interleaved latency rounds over every variant and the dense model (default 7; --quick 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_common_options(p, OUT_DEFAULT, f"report folder (default ./{OUT_DEFAULT})",
                       dtype_help="floating-point type of the latency measurements; training runs in float32 "
                                  "(default float32)")
    p.set_defaults(run=run)


def run(args) -> int:
    """Check the options, then run ``rankprune.demo.run``."""
    from rankprune import demo

    from . import UsageError

    overrides = {k: getattr(args, k) for k in ("model", "width", "epochs", "finetune_epochs", "trp_epochs",
                                                "train_size", "test_size", "batch_size", "energy", "latency_repeats",
                                                "latency_rounds", "calibration_batches")
                 if getattr(args, k) is not None}
    for name in ("flops", "latency_targets"):
        text = getattr(args, name)
        if text is None:
            continue
        try:
            overrides[name] = () if text.strip() == "none" else tuple(float(r) for r in text.split(","))
        except ValueError:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if args.criteria is not None:
        overrides["criteria"] = tuple(c.strip() for c in args.criteria.split(",") if c.strip())
    device = resolve_device(args.device)
    overrides.update(trp=args.trp, compress=not args.no_compress, device=str(device), dtype=args.dtype,
                     seed=args.seed, out=args.out, progress=not args.no_progress)
    config = demo.DemoConfig.quick(**overrides) if args.quick else demo.DemoConfig(**overrides)
    try:
        config.check()
    except ValueError as exc:
        raise UsageError(f"--{str(exc).replace('_', '-')}") from None
    from rankprune import models

    if config.model not in models.available():
        raise UsageError(f"--model: unknown model '{config.model}'; built-in: {', '.join(models.available())}")
    check_output_dir(config.out)
    seed_everything(config.seed)
    demo.run(config)
    return 0
