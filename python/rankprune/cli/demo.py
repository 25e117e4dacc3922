"""`rankprune demo`: the main job on the built-in data (see ``rankprune.demo``)."""
from .common import add_common_options, check_output_dir, resolve_device, seed_everything

OUT_DEFAULT = "rankprune-demo"


def register(sub) -> None:
    """Add ``demo`` to the subcommands."""
    p = sub.add_parser(
        "demo", help="train, score, prune, decompose (and TRP) a small model; print one table, write a report",
        description="Train a small CIFAR ResNet on the built-in synthetic data, score its channels by each "
                    "criterion, prune with each, decompose into low-rank layers within a FLOP budget, data-aware "
                    "(on calibration batches) and from the weights alone (and, with --trp, train with Trained "
                    "Rank Pruning and decompose); measure each compressed model as it comes out, after "
                    "BatchNorm recalibration and after fine-tuning; measure latency, print one table, say which "
                    "criterion won and why, and write a report folder (JSON, Markdown, PNG plots, the "
                    "baseline's weights, plans). A few minutes on 2 CPU cores (at most 10); --quick: about one.")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: fewer images and epochs, two criteria (~1 min; accuracies stay low)")
    p.add_argument("--trp", action="store_true", help="also train with Trained Rank Pruning and decompose")
    p.add_argument("--model", help="built-in CIFAR model (default resnet20)")
    p.add_argument("--width", type=float, help="channel width multiplier of the model (default 0.5)")
    p.add_argument("--epochs", type=int, help="baseline training epochs (default 8; --quick 3)")
    p.add_argument("--finetune-epochs", type=int,
                   help="fine-tuning epochs of every compressed model (default 1)")
    p.add_argument("--trp-epochs", type=int, help="TRP training epochs (default 2; --quick 1)")
    p.add_argument("--train-size", type=int, help="training images (default 8000; --quick 1000)")
    p.add_argument("--test-size", type=int, help="test images (default 2000; --quick 500)")
    p.add_argument("--batch-size", type=int, help="training batch size (default 100)")
    p.add_argument("--ratios", help="comma-separated channel ratios to prune, each in (0, 1) (default 0.5)")
    p.add_argument("--criteria", help="comma-separated pruning criteria (rankprune.scoring names; default "
                                      "energy,l1,bn_scale,taylor,random; --quick energy,l1)")
    p.add_argument("--calibration-batches", type=int,
                   help="training batches used to score channels, recalibrate BatchNorm and fit the data-aware "
                        "decomposition (default 8; --quick 2)")
    p.add_argument("--decompose-flops", type=float,
                   help="fraction of the FLOPs the decomposed model keeps, in (0, 1] (default 0.5)")
    p.add_argument("--energy", type=float,
                   help="spectral energy TRP keeps in each layer's weight, in (0, 1] (default 0.9)")
    p.add_argument("--latency-repeats", type=int, help="timed forward passes per variant (default 50)")
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
                                                "train_size", "test_size", "batch_size", "decompose_flops", "energy",
                                                "latency_repeats", "calibration_batches")
                 if getattr(args, k) is not None}
    try:
        if args.ratios is not None:
            overrides["ratios"] = tuple(float(r) for r in args.ratios.split(","))
    except ValueError:
        raise UsageError(f"--ratios: expected comma-separated numbers, got {args.ratios!r}") from None
    if args.criteria is not None:
        overrides["criteria"] = tuple(c.strip() for c in args.criteria.split(",") if c.strip())
    device = resolve_device(args.device)
    overrides.update(trp=args.trp, device=str(device), dtype=args.dtype, seed=args.seed, out=args.out,
                     progress=not args.no_progress)
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
