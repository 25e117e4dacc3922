"""`rankprune score`: per-channel importance scores of every conv of a model (``rankprune.scoring``)."""
import json
import os

from .common import add_common_options, check_output_dir, resolve_device, resolve_dtype, seed_everything

OUT_DEFAULT = "rankprune-scores"


def add_model_data_options(p) -> None:
    """Options shared by ``score`` and ``prune``: the model, its weights, the data and the criterion."""
    p.add_argument("--model", required=True,
                   help="built-in name (resnet20, resnet56, vgg16, mobilenetv2, resnet50) or 'module:factory'")
    p.add_argument("--weights", help="state_dict file for the model (loaded with weights_only=True)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the model (default 10)")
    p.add_argument("--width", type=float, help="channel width multiplier of a built-in model (default 1)")
    p.add_argument("--data", default="synthetic",
                   help="calibration data: 'synthetic' (built-in), a folder of images, or a .pt tensor file")
    p.add_argument("--num-images", type=int, default=512,
                   help="calibration images taken from the data (default 512; the built-in set is generated)")
    p.add_argument("--batch-size", type=int, default=64, help="calibration batch size (default 64)")
    p.add_argument("--criterion", default="energy",
                   help="energy, hrank, weight_energy, l1, l2, bn_scale, taylor or random (default energy)")
    p.add_argument("--tap", default="auto", choices=["auto", "relu", "bn", "conv"],
                   help="where feature-map criteria read the map (default auto: after the conv's BN and ReLU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_model(args, device, dtype):
    """The model of ``--model`` (with ``--width``, ``--num-classes``, ``--weights``) on ``device`` in eval mode."""
    import torch

    from rankprune import models

    from . import UsageError

    kwargs = {} if args.width is None else {"width": args.width}
    if args.num_classes < 1:
        raise UsageError(f"--num-classes must be >= 1, got {args.num_classes}")
    try:
        model = models.build(args.model, num_classes=args.num_classes, **kwargs)
    except TypeError as exc:
        raise UsageError(f"--model {args.model}: {exc}") from None
    if args.weights:
        if not os.path.isfile(args.weights):
            raise UsageError(f"--weights {args.weights}: no such file")
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise UsageError(f"--weights {args.weights} do not fit --model {args.model}: "
                             f"{first[1].strip() if len(first) > 1 else first[0]}") from None
    return model.to(device=device, dtype=dtype).eval()


def load_data(args, split: str = "train"):
    """``(loader, image_shape)``: the first ``--num-images`` of the data named by ``--data``, in batches."""
    from rankprune import data

    from . import UsageError

    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    n = args.num_images if args.data in ("synthetic", "builtin") else None
    dataset = data.load(args.data, split=split, n=n, seed=args.seed)
    if len(dataset) > args.num_images:
        dataset = data.ImageTensorDataset(dataset.images[: args.num_images], dataset.labels[: args.num_images])
    return data.batch_loader(dataset, args.batch_size), tuple(dataset.images.shape[1:])


def make_criterion(args):
    """The ``rankprune.scoring`` criterion named by ``--criterion`` (with ``--tap``, progress as asked)."""
    from rankprune import scoring

    from . import UsageError

    if args.criterion not in scoring.CRITERIA:
        raise UsageError(f"--criterion: unknown '{args.criterion}'; one of {', '.join(sorted(scoring.CRITERIA))}")
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
    add_model_data_options(p)
    add_common_options(p, OUT_DEFAULT, f"output folder (default ./{OUT_DEFAULT})")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    seed_everything(args.seed)
    criterion = make_criterion(args)
    model = load_model(args, device, dtype)
    loader, _ = load_data(args)
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
