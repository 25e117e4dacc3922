"""`rankprune prune`: structural channel pruning of a model; writes the plan, pruned weights and a report."""
import os

from .common import (accuracy_fn, add_common_options, add_data_options, add_eval_option, add_latency_options,
                     add_model_options, add_onnx_option, check_onnx_path, check_output_dir, write_compressed,
                     write_onnx)
from .score import add_criterion_options, load_model_and_data, make_criterion

OUT_DEFAULT = "rankprune-pruned"


def register(sub) -> None:
    p = sub.add_parser(
        "prune", help="remove conv channels by a criterion (or saved scores); write plan, weights and report",
        description="Score a model's channels (or read --scores from `rankprune score`), remove the least "
                    "important channels with everything coupled to them, refit the layers that read them by least "
                    "squares (unless --no-reconstruct), re-estimate the BatchNorm statistics on the calibration "
                    "images (unless --no-recalibrate), and write OUT/plan.json, "
                    "OUT/pruned.pt (state_dict: rebuild with rankprune.apply_plan(fresh_model, plan), then "
                    "load_state_dict), OUT/report.json and OUT/report.md (params, FLOPs per example, per-layer "
                    "channels, accuracy with --eval), and with --onnx an ONNX file.")
    add_model_options(p)
    add_data_options(p)
    add_criterion_options(p, default=None, extra=" or auto (compare pipelines on held-out calibration images)")
    p.add_argument("--scores", help="scores file from `rankprune score` (instead of scoring here)")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--ratio", type=float, help="fraction of channels to remove, in [0, 1)")
    goal.add_argument("--target-flops", type=float, help="fraction of the FLOPs to keep, in (0, 1]")
    add_latency_options(p, goal)
    ranking = p.add_mutually_exclusive_group()
    ranking.add_argument("--global", dest="global_ranking", action="store_const", const=True,
                         help="rank channels of all layers together (default for output_error: allocation by "
                              "output error per FLOP)")
    ranking.add_argument("--uniform", dest="global_ranking", action="store_const", const=False,
                         help="the same ratio in every layer (default for the other criteria)")
    p.add_argument("--round-to", type=int, help="keep a multiple of this many channels per layer")
    p.add_argument("--no-reconstruct", dest="reconstruct", action="store_false",
                   help="do not refit the layers whose input channels were removed (default: least-squares "
                        "reconstruction on the calibration images)")
    p.add_argument("--no-recalibrate", dest="recalibrate", action="store_false",
                   help="keep the original BatchNorm statistics (default: re-estimate them on the calibration "
                        "images after pruning)")
    add_eval_option(p)
    add_onnx_option(p)
    add_common_options(p, OUT_DEFAULT, f"output folder (default ./{OUT_DEFAULT})")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    import rankprune
    from rankprune import report, scoring

    from . import UsageError
    from .._inputs import check_fraction

    if args.ratio is not None:
        check_fraction("--ratio", args.ratio, low_open=False, high_open=True)
    elif args.target_flops is not None:
        check_fraction("--target-flops", args.target_flops)
    else:
        check_fraction("--target-latency", args.target_latency)
    check_onnx_path(args.onnx)
    model, loader, image_shape, device, dtype = load_model_and_data(args)
    example = torch.zeros(1, *image_shape, device=device, dtype=dtype)
    if args.scores:
        if not os.path.isfile(args.scores):
            raise UsageError(f"--scores {args.scores}: no such file")
        criterion = torch.load(args.scores, map_location="cpu", weights_only=True)
        if not isinstance(criterion, dict):
            raise UsageError(f"--scores {args.scores}: expected a dict {{conv_name: tensor}}")
        criterion = scoring.check_scores(model, criterion)
    elif args.criterion in (None, "auto"):
        criterion = args.criterion
    else:
        criterion = make_criterion(args)
    pruned, plan = rankprune.prune(
        model, example, criterion, data=loader, ratio=args.ratio, target_flops=args.target_flops,
        target_latency=args.target_latency, runtime=args.runtime, global_ranking=args.global_ranking, round_to=args.round_to, reconstruct=args.reconstruct,
        recalibrate=args.recalibrate, progress=not args.no_progress,
    )
    eval_fn = accuracy_fn(args, device, dtype, image_shape[-1]) if args.eval else None
    result = report.compare(model, pruned, example, eval_fn)
    recalibrated = "recalibrated on the calibration images" if plan["recalibrated"] else "not recalibrated"
    markdown = (f"# rankprune prune: {args.model}, criterion {plan['criterion']}\n\nBatchNorm statistics "
                f"{recalibrated}.\n\n{report.render(result)}\n")
    print(report.render(result, per_layer=False))
    print(write_compressed(check_output_dir(args.out), plan, pruned, "pruned.pt", result, markdown))
    if args.onnx:
        print(write_onnx(pruned, example, args.onnx))
    return 0
