"""Options every working subcommand shares (``--device``, ``--dtype``, ``--seed``, ``--out``) and their checks.

Building the parser imports nothing heavy (torch, the models, the data): ``rankprune --help`` stays fast, and
each option reads the library's names (dtypes, normalisations) only when it checks a value or prints its
subcommand's help."""
import argparse
import json
import os
import random
from typing import Callable, Iterable, Optional

from . import UsageError


class LazyChoices:
    """argparse ``choices`` listed by ``load()`` when a value is checked, so that registering the option imports
    nothing. argparse also lists the choices while adding the option, to check its usage string: options with
    lazy choices give a ``metavar`` and name the choices in their help (``tests/test_cli.py`` checks both agree)."""

    def __init__(self, load: Callable[[], Iterable[str]]):
        self._load = load

    def __iter__(self):
        return iter(self._load())

    def __contains__(self, value) -> bool:
        return value in list(self._load())


def _dtype_names():
    from .._inputs import DTYPES

    return sorted(DTYPES)


def add_common_options(parser: argparse.ArgumentParser, out_default: Optional[str], out_help: str,
                       dtype_help: str = "floating-point type: float32 (default), float64, float16 or bfloat16"
                       ) -> None:
    """Add ``--device``, ``--dtype``, ``--seed`` and ``--out`` to ``parser``."""
    parser.add_argument("--device", default="auto",
                        help="'cpu', 'cuda', 'cuda:N', or 'auto' (CUDA when available; default)")
    parser.add_argument("--dtype", default="float32", choices=LazyChoices(_dtype_names), metavar="DTYPE",
                        help=dtype_help)
    parser.add_argument("--seed", type=int, default=0, help="random seed for torch, numpy and Python (default 0)")
    parser.add_argument("--out", default=out_default, help=out_help)


def resolve_device(name: str):
    """'auto' -> CUDA when available else CPU; anything else must be a valid, available torch device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device '{name}' (use cpu, cuda, cuda:N or auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: only cpu and cuda are supported, got '{name}'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, numpy (when installed) and torch (all devices)."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def check_output_dir(path: str) -> str:
    """Create ``path`` as a folder (parents too); refuse a path that is an existing file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path}: exists and is not a folder")
    os.makedirs(path, exist_ok=True)
    return path


# ---- the model and the data of score / prune / decompose / bench model -----------------------------------

def add_model_options(parser: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    """Add ``--model``, ``--weights``, ``--num-classes``, ``--width`` and ``--input-size`` to ``parser``."""
    from rankprune import models

    parser.add_argument("--model", required=default is None, default=default,
                        help=f"a built-in name ({', '.join(models.available())}), "
                             "torchvision:NAME (e.g. torchvision:resnet50), timm:NAME (needs timm) or "
                             "module:factory (a function returning an nn.Module)"
                             + (f" (default {default})" if default else ""))
    parser.add_argument("--weights", help="checkpoint for the model: a state_dict, or a dict holding one under "
                                          "'state_dict' or 'model' (loaded with weights_only=True)")
    parser.add_argument("--num-classes", type=int,
                        help="classifier outputs (default: 10 for built-in and module:factory models, 1000 for "
                             "torchvision and timm ones)")
    parser.add_argument("--width", type=float, help="channel width multiplier of a built-in model (default 1)")
    parser.add_argument("--input-size", type=int,
                        help="input height = width in pixels (default: the model's own, 32 for the CIFAR "
                             "built-ins, 224 for resnet50, torchvision, timm and module:factory models)")


def _model_source(name: str) -> str:
    return name.split(":", 1)[0] if ":" in name else "builtin"


def default_input_size(args) -> int:
    """``--input-size`` when given, else the input size the model of ``--model`` is built for."""
    from rankprune import models

    if args.input_size is not None:
        if args.input_size < 8:
            raise UsageError(f"--input-size must be >= 8, got {args.input_size}")
        return args.input_size
    if args.model in models.INPUT_SHAPES:
        return models.INPUT_SHAPES[args.model][-1]
    return 224


def _state_dict_of(checkpoint, path: str):
    import torch

    # Training scripts save {"state_dict": ...} or {"model": ...} next to optimiser state; DDP prefixes keys.
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UsageError(f"--weights {path}: not a state_dict (a dict of tensors, or one under 'state_dict'/'model')")
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def build_model(args):
    """The model of ``--model`` (with ``--width`` and ``--num-classes``), freshly initialised, without weights."""
    from rankprune import models

    source = _model_source(args.model)
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = 1000 if source in ("torchvision", "timm") else 10
    if num_classes < 1:
        raise UsageError(f"--num-classes must be >= 1, got {num_classes}")
    kwargs = {} if args.width is None else {"width": args.width}
    if args.width is not None and source != "builtin":
        raise UsageError(f"--width applies to the built-in models only, not {args.model}")
    if args.width is not None and not 0 < args.width <= 4:
        raise UsageError(f"--width must be in (0, 4], got {args.width}")
    try:
        model = models.build(args.model, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise UsageError(f"--model {args.model}: {exc}") from None
    return model


def load_weights(model, args):
    """Load the ``--weights`` checkpoint (when given) into ``model`` with ``weights_only=True``; returns it."""
    import torch

    if not args.weights:
        return model
    if not os.path.isfile(args.weights):
        raise UsageError(f"--weights {args.weights}: no such file")
    try:
        checkpoint = torch.load(args.weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling error: a whole pickled model, or not a torch file at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--weights {args.weights}: cannot be loaded with weights_only=True ({first}); "
                         "save model.state_dict() instead of the model") from None
    state = _state_dict_of(checkpoint, args.weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise UsageError(f"--weights {args.weights} do not fit --model {args.model}: {detail}"
                         f"{_mismatch_hint(model, state, args)}") from None
    return model


def _mismatch_hint(model, state, args) -> str:
    """The likely cause of a checkpoint that does not fit the model: another ``--num-classes`` (only the last
    layer differs), another ``--width`` (a built-in model's first differing layer is that factor wider), or the
    weights of a pruned or decomposed model loaded without its plan."""
    own = model.state_dict()
    compressed = "; weights saved after prune or decompose load only with their plan (rankprune export --plan)"
    differ = [k for k in own if k in state and state[k].shape != own[k].shape]
    if not differ:
        return compressed if set(own) != set(state) else ""
    first = differ[0]
    last_layer = list(own)[-1].rpartition(".")[0]
    if all(k.rpartition(".")[0] == last_layer for k in differ):
        return f" (saved with --num-classes {state[first].shape[0]}?)"
    if _model_source(args.model) == "builtin" and state[first].dim() >= 1 and own[first].shape[0]:
        width = state[first].shape[0] / own[first].shape[0] * (args.width or 1.0)
        return f" (saved with --width {width:g}?){compressed}"
    return compressed


def load_model(args, device, dtype):
    """The model of ``--model`` with the ``--weights`` (when given) on ``device`` in eval mode."""
    return load_weights(build_model(args), args).to(device=device, dtype=dtype).eval()


def read_plan(path: str):
    """The rankprune plan (a dict with a 'method', or a list of them) in the JSON file ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--plan {path}: no such file")
    try:
        with open(path) as f:
            plan = json.load(f)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--plan {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    steps = plan if isinstance(plan, list) else [plan]
    if not steps or not all(isinstance(p, dict) and "method" in p for p in steps):
        raise UsageError(f"--plan {path}: not a rankprune plan (a dict with a 'method' key, or a list of them)")
    return plan


def add_data_options(parser: argparse.ArgumentParser, default: Optional[str] = "synthetic",
                     data_help: Optional[str] = None) -> None:
    """Add ``--data``, ``--num-images``, ``--batch-size``, ``--normalize``, ``--mean`` and ``--std``."""
    parser.add_argument("--data", default=default,
                        help=data_help or "calibration data: 'synthetic' (built-in, drawn at the input size), a "
                                          "folder of images (resized to the input size), or a .pt tensor file "
                                          f"(default {default})")
    parser.add_argument("--num-images", type=int, default=512,
                        help="calibration images taken from the data (default 512; the built-in set is generated)")
    parser.add_argument("--batch-size", type=int, default=64, help="calibration batch size (default 64)")
    parser.add_argument("--normalize", choices=LazyChoices(_normalization_names), metavar="NAME",
                        help="normalisation of 8-bit images (folders, uint8 tensor files): imagenet (torchvision/"
                             "timm statistics), builtin (mean 0.5, std 0.25, the built-in set's) or none (scaled "
                             "to [0, 1]); default builtin for built-in models, imagenet for the others")
    parser.add_argument("--mean", help="per-channel mean of images scaled to [0, 1], e.g. 0.485,0.456,0.406 "
                                       "(overrides --normalize; with --std)")
    parser.add_argument("--std", help="per-channel standard deviation, e.g. 0.229,0.224,0.225 (with --mean)")


def _normalization_names():
    from rankprune.data import NORMALIZATIONS

    return sorted(NORMALIZATIONS)


def _floats(text: str, option: str):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated numbers, got {text!r}") from None


def normalization(args):
    """``(name, mean, std)`` of the normalisation the options ask for (see :func:`add_data_options`)."""
    from rankprune.data import NORMALIZATIONS

    if (args.mean is None) != (args.std is None):
        raise UsageError("--mean and --std go together")
    if args.mean is not None:
        if args.normalize is not None:
            raise UsageError("give --normalize or --mean/--std, not both")
        mean, std = _floats(args.mean, "--mean"), _floats(args.std, "--std")
        if any(s <= 0 for s in std):
            raise UsageError(f"--std must be positive, got {args.std}")
        return "custom", mean, std
    name = args.normalize or ("builtin" if _model_source(args.model) == "builtin" else "imagenet")
    return (name, *NORMALIZATIONS[name])


def load_data(args, input_size: int, split: str = "train"):
    """``(loader, image_shape, description)``: the first ``--num-images`` of ``--data`` at ``input_size``,
    normalised as asked, in batches of ``--batch-size``; ``description`` says what was used."""
    import torch

    from rankprune import data

    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    name, mean, std = normalization(args)
    n = args.num_images if args.data in ("synthetic", "builtin") else None
    try:
        dataset = data.load(args.data, split=split, n=n, seed=args.seed, size=input_size, mean=mean, std=std)
    except ValueError as exc:
        raise UsageError(f"--data {args.data}: {exc}") from None
    if len(dataset) > args.num_images:
        dataset = data.ImageTensorDataset(dataset.images[: args.num_images], dataset.labels[: args.num_images],
                                          dataset.mean, dataset.std)
    shape = tuple(dataset.images.shape[1:])
    if dataset.images.dtype == torch.uint8:
        values = lambda t: ", ".join(f"{v:.4g}" for v in t.flatten().tolist())  # noqa: E731
        how = f"normalised {name} (mean {values(dataset.mean)}; std {values(dataset.std)})"
    else:
        if args.mean is not None or args.normalize is not None:
            raise UsageError(f"--data {args.data} holds float images, used as stored: --normalize/--mean/--std "
                             "apply to 8-bit images only")
        how = "float images used as stored (no normalisation)"
    # The built-in set and folders come at input_size; a tensor file keeps its own size unless one was asked.
    if args.input_size is not None and shape[-2:] != (input_size, input_size):
        raise UsageError(f"--data {args.data}: images are {shape[-2]}x{shape[-1]}, not --input-size {input_size}")
    description = f"data: {args.data}, {len(dataset)} images {shape[-2]}x{shape[-1]}, {how}"
    return data.batch_loader(dataset, args.batch_size), shape, description


RUNTIMES = ("eager", "cuda_graph", "onnxruntime")  # rankprune.latency.RUNTIMES (not imported: --help stays fast)


def add_latency_options(parser: argparse.ArgumentParser, goal) -> None:
    """Add ``--target-latency`` to the ``goal`` group (exclusive with the other targets) and ``--runtime``."""
    goal.add_argument("--target-latency", type=float,
                      help="fraction of the dense model's latency to reach, in (0, 1], measured in --runtime on the "
                           "model's device at batch 1 (see rankprune.latency)")
    parser.add_argument("--runtime", choices=RUNTIMES,
                        help="where latency is measured: eager (PyTorch, default), cuda_graph (CUDA only) or "
                             "onnxruntime (the exported model in ONNX Runtime on the CPU)")


def add_eval_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--eval``: the accuracy of the model before and after compression (:func:`accuracy_fn`)."""
    parser.add_argument("--eval", action="store_true",
                        help="report accuracy before/after on the built-in test split (--data synthetic, or no "
                             "--data) or on --data itself")


def accuracy_fn(args, device, dtype, size: int):
    """``model -> top-1 accuracy`` for ``--eval``: 2000 images of the built-in test split (also without
    ``--data``), or all of ``--data`` (a folder or tensor file), at ``size``, normalised as ``--data`` is."""
    from rankprune import data
    from rankprune.training import evaluate

    source = args.data or "synthetic"
    split = "test" if source in ("synthetic", "builtin") else "train"
    _, mean, std = normalization(args)
    dataset = data.load(source, split=split, n=2000 if split == "test" else None, seed=args.seed, size=size,
                        mean=mean, std=std)
    loader = data.batch_loader(dataset, 256)
    return lambda model: evaluate(model, loader, device, dtype)


def add_onnx_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--onnx PATH``: also write the compressed model as an ONNX file."""
    parser.add_argument("--onnx", metavar="PATH",
                        help="also write the compressed model as an ONNX file (opset 20, dynamic batch size; its "
                             "weights go to PATH.data next to it; needs onnx and onnxscript) and, with onnxruntime "
                             "installed, check its outputs against PyTorch")


def check_onnx_path(path: Optional[str]) -> None:
    """Create the folder of an ``--onnx`` path (as ``--out`` does) before any long work; refuse a path that is
    a folder or lies under a file."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"--onnx {path}: is a folder; give a file name such as {os.path.join(path, 'model.onnx')}")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--onnx {path}: {folder} is not a folder")
    os.makedirs(folder, exist_ok=True)


def write_onnx(model, example, path: str) -> str:
    """Export ``model`` (eval mode, on the CPU in float32) to ``path`` through ``rankprune.export_onnx`` with a
    dynamic batch dimension; with onnxruntime installed, compare its outputs with PyTorch's on ``example``.
    Returns a line saying what was written (and the largest difference)."""
    import copy

    import torch

    from rankprune.export import export_onnx, onnx_max_abs_diff

    model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    example = example.to(device="cpu", dtype=torch.float32)
    try:
        export_onnx(model, (example,), path, dynamic_shapes=({0: "batch"},), verbose=False)
    except ImportError as exc:
        raise UsageError(f"--onnx: {exc}") from None
    wrote = f"wrote {path}" + (f" and its weights {path}.data" if os.path.exists(path + ".data") else "")
    try:
        check = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(0))
        diff = onnx_max_abs_diff(path, model, (check,))
    except ImportError:
        return f"{wrote} (onnxruntime is not installed: outputs not checked)"
    return f"{wrote} (ONNX Runtime vs PyTorch on CPU: max abs difference {diff:.2e})"


def write_compressed(out: str, plan, model, weights_name: str, report, markdown: str) -> str:
    """Write a compression's ``OUT/plan.json``, ``OUT/<weights_name>`` (the state_dict), ``OUT/report.json`` and
    ``OUT/report.md`` (``markdown``); the line that says so."""
    import json

    import torch

    with open(os.path.join(out, "plan.json"), "w") as f:
        json.dump(plan, f)
    torch.save(model.state_dict(), os.path.join(out, weights_name))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown)
    return f"wrote {out}/plan.json, {out}/{weights_name}, {out}/report.json, {out}/report.md"
