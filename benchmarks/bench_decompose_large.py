"""Decomposing large layers: ``rankprune.decompose`` against one ``torch.linalg.svd`` of the largest matrix
(issue 14's target: within 2x), side by side in one run.

Cases: ``linear`` (an ``nn.Linear(11008, 4096)``, the MLP shape of a 7B language model) and ``vgg11_bn``
(torchvision, random weights, every Conv2d and Linear, input 1x3x32x32: the classifier's 4096x25088 is the
largest matrix). Each is decomposed with ``energy=0.9`` (needs every singular value: ``ops.svd``, which hands
matrices this large to LAPACK / cuSOLVER) and with ``rank_ratio=0.1`` (one known small rank:
``ops.svd_lowrank``); the reference is ``torch.linalg.svd(full_matrices=False)`` of the largest weight in
float64, the precision decompose factors in. ``--scale S`` divides the Linear's dimensions by S (CPU smoke run).

    python benchmarks/bench_decompose_large.py                       # both cases, full size
    python benchmarks/bench_decompose_large.py --cases linear --scale 4
"""
import argparse
import sys
import time

import torch
from torch import nn

import rankprune
from rankprune.benchmark import environment, write_results


def _seconds(fn, repeats: int):
    """``(seconds, result)``: the fastest of ``repeats`` calls (on a shared machine the fastest call is the one
    least slowed by others) and the last call's result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _largest_weight(model: nn.Module) -> torch.Tensor:
    weights = [m.weight.detach().reshape(m.weight.shape[0], -1) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    return max(weights, key=lambda w: w.numel())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="linear,vgg11_bn")
    p.add_argument("--scale", type=int, default=1, help="divide the Linear's dimensions by this (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per route; the fastest counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    for case in args.cases.split(","):
        if case == "linear":
            model = nn.Sequential(nn.Linear(11008 // args.scale, 4096 // args.scale))  # decompose takes submodules
            example = torch.randn(1, 11008 // args.scale)
        elif case == "vgg11_bn":
            import torchvision

            model = torchvision.models.vgg11_bn()
            example = torch.randn(1, 3, 32, 32)
        else:
            p.error(f"unknown case {case!r}")
        model = model.to(device).eval()
        example = example.to(device)
        largest = _largest_weight(model).double()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        torch.linalg.svd(largest[:64, :64], full_matrices=False)  # LAPACK's first-call setup, untimed
        reference, _ = _seconds(lambda: (torch.linalg.svd(largest, full_matrices=False), sync()), args.repeats)
        row = {"case": case, "largest_matrix": list(largest.shape), "linalg_svd_s": reference}
        layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
        for label, kwargs in (("energy_0.9", dict(energy=0.9)), ("rank_ratio_0.1", dict(rank_ratio=0.1))):
            seconds, (result, _) = _seconds(lambda: (rankprune.decompose(
                model, example_inputs=example, progress=False, **kwargs), sync()), args.repeats)
            _, plan, report = result
            # every layer went through an SVD: decomposed, or skipped because its rank saves no FLOPs
            assert len(plan["layers"]) + len(report["skipped"]) == layers
            row[f"decompose_{label}_s"] = seconds
            row[f"decompose_{label}_layers"] = len(plan["layers"])
            row[f"decompose_{label}_over_linalg_svd"] = seconds / reference
        rows.append(row)
        print(row, flush=True)
    payload = {"benchmark": "decompose_large", "environment": environment(device), "scale": args.scale,
               "rows": rows}
    print(f"wrote {write_results('bench_decompose_large', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
