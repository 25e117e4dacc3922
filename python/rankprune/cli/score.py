"""`rankprune score`: per-channel importance scores of every conv of a model (``rankprune.scoring``)."""
import json
import os
from typing import Optional

from .common import (add_common_options, add_data_options, add_model_options, check_output_dir, default_input_size,
                     load_data, load_model, resolve_device, seed_everything)

OUT_DEFAULT = "rankprune-scores"


def add_criterion_options(p, default: Optional[str] = "energy", extra: str = "") -> None:
    """``--criterion``, ``--tap`` and ``--no-progress``, shared by ``score`` and ``prune`` (``default`` None:
    the library's; ``extra``: more names the command takes, for the help)."""
    p.add_argument("--criterion", default=default,
                   help=f"energy, hrank, weight_energy, l1, l2, bn_scale, taylor, random, output_error{extra} "
                        f"(default {default or 'the library default: output_error with reconstruction and allocation'})")
    p.add_argument("--tap", default="auto", choices=["auto", "relu", "bn", "conv"],
                   help="where feature-map criteria read the map (default auto: after the conv's BN and ReLU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_model_and_data(args):
    """``(model, loader, image_shape, device, dtype)`` for ``score`` and ``prune``: seeds, loads ``--model``
    and ``--data`` at the model's input size, and prints what data and normalisation are used."""
    from .._inputs import resolve_dtype

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    seed_everything(args.seed)
    model = load_model(args, device, dtype)
    loader, image_shape, description = load_data(args, default_input_size(args))
    print(description)
    return model, loader, image_shape, device, dtype


def make_criterion(args):
    """The ``rankprune.scoring`` criterion named by ``--criterion`` (with ``--tap``, progress as asked)."""
    from rankprune import scoring

    from . import UsageError

    if args.criterion == "output_error":
        from rankprune.pruning import OutputError

        return OutputError(progress=not args.no_progress)
    if args.criterion not in scoring.CRITERIA:
        names = sorted([*scoring.CRITERIA, "output_error"])
        raise UsageError(f"--criterion: unknown '{args.criterion}'; one of {', '.join(names)}")
    cls = scoring.CRITERIA[args.criterion]
    kwargs = {}
    if issubclass(cls, scoring.FeatureMapCriterion):
        kwargs["tap"] = args.tap
    if cls.needs_data:
        kwargs["progress"] = not args.no_progress
    if cls is scoring.Random:
        kwargs["seed"] = args.seed
    return scoring.get(args.criterion, **kwargs)


def register(sub) -> None:
    p = sub.add_parser(
        "score", help="score every conv channel of a model (energy, hrank, weights, ...); write scores files",
        description="Run one calibration pass of a channel criterion over a model and write the per-channel "
                    "scores: OUT/scores.pt ({conv_name: tensor}, loads with weights_only=True) and "
                    "OUT/scores.json (lists). `rankprune prune --scores OUT/scores.pt` prunes with them.")
    add_model_options(p)
    add_data_options(p)
    add_criterion_options(p)
    add_common_options(p, OUT_DEFAULT, f"output folder (default ./{OUT_DEFAULT})")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    criterion = make_criterion(args)
    model, loader, _, _, _ = load_model_and_data(args)
    scores = criterion.scores(model, loader)
    out = check_output_dir(args.out)
    torch.save(scores, os.path.join(out, "scores.pt"))
    with open(os.path.join(out, "scores.json"), "w") as f:
        json.dump({"criterion": criterion.name, "model": args.model,
                   "scores": {k: v.tolist() for k, v in scores.items()}}, f)
    n_channels = sum(v.numel() for v in scores.values())
    print(f"scored {n_channels} channels in {len(scores)} convs with {criterion.name}; wrote {out}/scores.pt, "
          f"{out}/scores.json")
    return 0
