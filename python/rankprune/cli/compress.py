"""`rankprune compress`: channel pruning and low-rank decomposition together at one FLOPs or latency budget
(``rankprune.compress``); writes the plan, the weights and a report."""
from .common import (accuracy_fn, add_common_options, add_data_options, add_eval_option, add_latency_options,
                     add_model_options, add_onnx_option, check_onnx_path, check_output_dir, write_compressed,
                     write_onnx)
from .score import load_model_and_data

OUT_DEFAULT = "rankprune-compressed"


def register(sub) -> None:
    p = sub.add_parser(
        "compress", help="prune channels and factor layers at one FLOPs or latency budget; write plan, weights "
                         "and report",
        description="Prune channels (output-error selection, least-squares reconstruction, allocation by output "
                    "error per FLOP) and decompose the pruned model into low-rank layers (data-aware), trying "
                    "splits of the FLOPs (or latency) budget between the two and keeping the one whose outputs stay closest "
                    "to the dense model's on held-out calibration images (rankprune.compress). Writes "
                    "OUT/plan.json, OUT/compressed.pt (state_dict: rebuild with rankprune.apply_plan(fresh_model, "
                    "plan), then load_state_dict), OUT/report.json and OUT/report.md (the splits compared, "
                    "params, FLOPs per example, accuracy with --eval), and with --onnx an ONNX file.")
    add_model_options(p)
    add_data_options(p)
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-flops", type=float, help="fraction of the FLOPs to keep, in (0, 1]")
    add_latency_options(p, goal)
    add_eval_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_onnx_option(p)
    add_common_options(p, OUT_DEFAULT, f"output folder (default ./{OUT_DEFAULT})")
    p.set_defaults(run=run)


def render_splits(rep) -> str:
    """Markdown: the splits compared (share of the budget given to pruning, divergence), the reference (pruning
    alone), the splits clearly closer than it and the chosen one marked."""
    from rankprune import report

    def marks(c) -> str:
        said = ["reference"] if c["prune_share"] == rep.get("reference") else []
        said += ["clearly closer"] if c.get("clearly_closer") else []
        return ", ".join(said + (["chosen"] if c == rep["chosen"] else []))

    rows = [[f"{c['prune_share']:.2f}", f"{c['pruned_to']:.1%}", f"{c['divergence']:.4g}", marks(c)]
            for c in rep["candidates"]]
    budget = "latency" if rep["candidates"] and rep["candidates"][0].get("budget") == "latency" else "FLOPs"
    return report.markdown_table(rows, ["pruning share of log(target)", f"pruned to ({budget})",
                                        "divergence on held-out images", ""])


def run(args) -> int:
    import torch

    import rankprune
    from rankprune import report

    from .._inputs import check_fraction

    budget = "flops" if args.target_flops is not None else "latency"
    target = check_fraction(f"--target-{budget}", getattr(args, f"target_{budget}"))
    check_onnx_path(args.onnx)
    model, loader, image_shape, device, dtype = load_model_and_data(args)
    example = torch.zeros(1, *image_shape, device=device, dtype=dtype)
    small, plan, rep = rankprune.compress(model, example, data=loader, **{f"target_{budget}": target},
                                          runtime=args.runtime, progress=not args.no_progress)
    eval_fn = accuracy_fn(args, device, dtype, image_shape[-1]) if args.eval else None
    result = report.compare(model, small, example, eval_fn)
    result["splits"] = rep
    splits = render_splits(rep)
    print(splits)
    print(report.render(result, per_layer=False))
    print(write_compressed(check_output_dir(args.out), plan, small, "compressed.pt", result,
                           f"# rankprune compress: {args.model}\n\n{splits}\n\n{report.render(result)}\n"))
    if args.onnx:
        print(write_onnx(small, example, args.onnx))
    return 0
