"""`rankprune export`: a model, optionally compressed by a saved plan and its weights, as files that run
without rankprune: an ONNX file and a ``torch.export`` program of its plain-PyTorch form."""
import os

from . import UsageError
from .common import (add_common_options, add_model_options, build_model, check_output_dir,
                     default_input_size, load_weights, read_plan, resolve_device, seed_everything, write_onnx)

OUT_DEFAULT = "rankprune-export"
FORMATS = ("onnx", "pt2")


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="write a (compressed) model as ONNX and as a torch.export program that need no rankprune",
        description="Build --model, apply a saved --plan (from prune, decompose, trp or the demo) and load "
                    "--weights, then write OUT/model.onnx with its weights in OUT/model.onnx.data (standard ONNX "
                    "operators, dynamic batch size; keep the two files together; checked "
                    "against PyTorch in ONNX Runtime when it is installed) and OUT/model.pt2 (torch.export "
                    "program of rankprune.to_plain(model), dynamic batch size; loads with torch.export.load "
                    "where rankprune is not installed).")
    add_model_options(p)
    p.add_argument("--plan", help="plan JSON of the compressed model; --weights are then its state_dict")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help=f"comma-separated subset of {','.join(FORMATS)} (default: both)")
    add_common_options(p, OUT_DEFAULT, f"output folder (default ./{OUT_DEFAULT})",
                       dtype_help="floating-point type of the torch.export program: float32 (default), float64, "
                                  "float16 or bfloat16 (the ONNX file is float32)")
    p.set_defaults(run=run)


def _formats(text: str):
    names = [f.strip() for f in text.split(",") if f.strip()]
    if not names or any(f not in FORMATS for f in names):
        raise UsageError(f"--formats: expected a subset of {','.join(FORMATS)}, got {text!r}")
    return names


def _write_program(model, example, path: str) -> str:
    import torch

    from rankprune.export import to_plain

    plain = to_plain(model)
    # A batch of 2: torch.export specialises a dimension of size 1, which would fix the batch size.
    program = torch.export.export(plain, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    with torch.no_grad():
        diff = float((torch.export.load(path).module()(example) - model(example)).abs().max())
    return f"wrote {path} (torch.export program of plain PyTorch modules; max abs difference {diff:.2e})"


def run(args) -> int:
    import torch

    import rankprune

    from .._inputs import resolve_dtype

    formats = _formats(args.formats)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    seed_everything(args.seed)
    plan = read_plan(args.plan) if args.plan is not None else None
    model = build_model(args)
    if plan is not None:
        model = rankprune.apply_plan(model, plan)
    model = load_weights(model, args).to(device=device, dtype=dtype).eval()
    size = default_input_size(args)
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    out = check_output_dir(args.out)
    if "onnx" in formats:
        print(write_onnx(model, example[:1], os.path.join(out, "model.onnx")))
    if "pt2" in formats:
        print(_write_program(model, example.to(device=device, dtype=dtype), os.path.join(out, "model.pt2")))
    return 0
