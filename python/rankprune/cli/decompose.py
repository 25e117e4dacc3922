"""`rankprune decompose`: replace a model's Conv2d/Linear layers by low-rank pairs (``rankprune.decompose``);
writes the plan, the weights, a report and optionally an ONNX file."""
from . import UsageError
from .common import (accuracy_fn, add_common_options, add_data_options, add_eval_option, add_latency_options,
                     add_model_options, add_onnx_option, check_onnx_path, check_output_dir, default_input_size, load_data, load_model,
                     resolve_device, seed_everything, write_compressed, write_onnx)

OUT_DEFAULT = "rankprune-decomposed"


def register(sub) -> None:
    p = sub.add_parser(
        "decompose", help="factor conv/linear layers into low-rank pairs; write plan, weights and report",
        description="Replace the Conv2d/Linear layers of a model by low-rank pairs (rankprune.decompose): "
                    "data-free from the weights' SVD, or data-aware with --data (factors and ranks chosen by "
                    "the error of each layer's output on calibration images, each refitted to the dense layer's "
                    "outputs). "
                    "Writes OUT/plan.json, OUT/decomposed.pt (state_dict: rebuild with "
                    "rankprune.apply_plan(fresh_model, plan), then load_state_dict), OUT/report.json and "
                    "OUT/report.md (rank, FLOPs per example and output error per layer, accuracy with --eval), "
                    "and with --onnx an ONNX file.")
    add_model_options(p)
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--energy", type=float,
                      help="per layer, the smallest rank keeping this fraction of the spectral energy, in (0, 1]")
    goal.add_argument("--rank-ratio", type=float, help="per layer, this fraction of the full rank, in (0, 1]")
    goal.add_argument("--target-flops", type=float, help="fraction of the model's FLOPs to keep, in (0, 1]")
    goal.add_argument("--target-params", type=float, help="fraction of the model's parameters to keep, in (0, 1]")
    add_latency_options(p, goal)
    p.add_argument("--scheme", default="channel", choices=("channel", "spatial"),
                   help="convolutions: channel (kxk C->r, then 1x1) or spatial (kx1, then 1xk) (default channel)")
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="only layers whose name matches this fnmatch pattern, e.g. 'layer3.*' (repeatable)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="leave layers whose name matches this pattern dense, e.g. fc (repeatable)")
    p.add_argument("--min-rank", type=_int_or_fraction,
                   help="no layer below this rank: an int >= 1, or a fraction of each layer's full rank in (0, 1] "
                        "such as 0.25 (default: the library's, rankprune.lowrank.DEFAULT_MIN_RANK)")
    p.add_argument("--rank-multiple", type=int,
                   help="ranks rounded up to a multiple of this, e.g. 8 for tensor cores (default 1)")
    add_data_options(p, default=None, data_help="calibration data for data-aware decomposition: 'synthetic', a "
                                                "folder of images or a .pt tensor file (default: none, data-free "
                                                "weight SVD)")
    recal = p.add_mutually_exclusive_group()
    recal.add_argument("--recalibrate", dest="recalibrate", action="store_const", const=True,
                       help="with --data, re-estimate BatchNorm statistics after decomposing (default: only when no "
                            "layer was refitted to the dense outputs, see rankprune.decompose)")
    recal.add_argument("--no-recalibrate", dest="recalibrate", action="store_const", const=False,
                       help="with --data, never re-estimate BatchNorm statistics after decomposing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_eval_option(p)
    add_onnx_option(p)
    add_common_options(p, OUT_DEFAULT, f"output folder (default ./{OUT_DEFAULT})")
    p.set_defaults(run=run)


def _int_or_fraction(text: str):
    """``--min-rank`` as an int (a rank) or, with a decimal point, a float (a fraction of the full rank)."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def _decompose_kwargs(args, loader):
    """Keyword arguments of ``rankprune.decompose`` for the options given (library defaults otherwise)."""
    kwargs = {"scheme": args.scheme, "include": args.include, "exclude": args.exclude,
              "progress": not args.no_progress}
    from .._inputs import check_fraction

    if args.runtime is not None:
        kwargs["runtime"] = args.runtime
    for name in ("energy", "rank_ratio", "target_flops", "target_params", "target_latency"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = check_fraction(f"--{name.replace('_', '-')}", value)
    if args.min_rank is not None:
        if isinstance(args.min_rank, float) and not 0 < args.min_rank <= 1 or args.min_rank < 1 and isinstance(
                args.min_rank, int):
            raise UsageError(f"--min-rank must be an int >= 1 or a fraction in (0, 1], got {args.min_rank}")
        kwargs["min_rank"] = args.min_rank
    if args.rank_multiple is not None:
        if args.rank_multiple < 1:
            raise UsageError(f"--rank-multiple must be >= 1, got {args.rank_multiple}")
        kwargs["rank_multiple"] = args.rank_multiple
    if loader is not None:
        kwargs["data"] = loader
        if args.recalibrate is not None:
            kwargs["recalibrate"] = args.recalibrate
    elif args.recalibrate is not None:
        flag = "--recalibrate" if args.recalibrate else "--no-recalibrate"
        raise UsageError(f"{flag} needs --data (data-free decomposition does not recalibrate)")
    return kwargs


def render_report(rep) -> str:
    """Markdown: one row per decomposed layer (rank / full rank, energy kept, FLOPs per example, output error),
    the skipped layers, the whole model's totals and, with ``--eval``, its accuracy before and after."""
    from rankprune import report

    def fmt_error(value):
        return "-" if value is None else f"{value:.3g}"

    rows = [[name, layer.get("kind", ""), layer.get("scheme", ""), f"{layer['rank']} / {layer['full_rank']}",
             layer.get("energy_kept", "-"), f"{layer['flops_dense'] / 1e6:.3g} -> {layer['flops'] / 1e6:.3g}",
             fmt_error(layer.get("rel_error"))]
            for name, layer in rep.get("layers", {}).items()]
    text = report.markdown_table(rows, ["layer", "kind", "scheme", "rank / full", "energy kept",
                                        "MFLOPs per example", "output rel. error"])
    skipped = rep.get("skipped") or {}
    if skipped:
        text += "\n\nLeft dense:\n" + "\n".join(f"- {name}: {why}" for name, why in skipped.items())
    total = rep.get("total") or {}
    if total:
        rows = [["params", total["params_dense"], total["params"], f"{total['params'] / max(total['params_dense'], 1):.3f}"],
                ["FLOPs per example", total.get("flops_dense"), total.get("flops"),
                 f"{total['flops'] / max(total['flops_dense'], 1):.3f}" if total.get("flops_dense") else "-"]]
        text += "\n\n" + report.markdown_table(rows, ["", "dense", "decomposed", "kept"])
        if "accuracy_before" in rep:
            a, b = rep["accuracy_before"], rep["accuracy_after"]
            text += f"\n\naccuracy: {100 * a:.2f}% -> {100 * b:.2f}% (change {100 * (b - a):+.2f} pt)"
        if total.get("output_rel_error") is not None:
            text += (f"\n\nrelative error of the model's output on the example input (the first calibration "
                     f"image, or a random one without --data): {total['output_rel_error']:.3g}")
    return text


def run(args) -> int:
    import torch

    import rankprune

    from .._inputs import resolve_dtype

    check_onnx_path(args.onnx)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    seed_everything(args.seed)
    model = load_model(args, device, dtype)
    size = default_input_size(args)
    loader, shape = None, (3, size, size)
    if args.data is not None:
        loader, shape, description = load_data(args, size)
        print(description)
    else:
        if any(getattr(args, k) is not None for k in ("normalize", "mean", "std")):
            raise UsageError("--normalize/--mean/--std describe --data, which is not given")
        print(f"data-free (weight SVD); input {size}x{size} for the FLOP counts")
    # The example input sets the FLOP counts and the output errors of the report: a real image when there is
    # data, else a seeded random one (an all-zero input would show every error as 0).
    if loader is not None:
        example = next(iter(loader))[0][:1]
    else:
        example = torch.randn(1, *shape, generator=torch.Generator().manual_seed(args.seed))
    example = example.to(device=device, dtype=dtype)
    kwargs = _decompose_kwargs(args, loader)
    small, plan, rep = rankprune.decompose(model, example_inputs=(example,), **kwargs)
    if args.eval:
        accuracy = accuracy_fn(args, device, dtype, shape[-1])
        rep["accuracy_before"], rep["accuracy_after"] = accuracy(model), accuracy(small)
    text = render_report(rep)
    print(text)
    print(write_compressed(check_output_dir(args.out), plan, small, "decomposed.pt", rep,
                           f"# rankprune decompose: {args.model}\n\n{text}\n"))
    if args.onnx:
        print(write_onnx(small, example, args.onnx))
    return 0
