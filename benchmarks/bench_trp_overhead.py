"""Cost of TRP inside a training step: rankprune's batched TrainedRankPruner against the official code's
per-layer ``torch.linalg.svd`` loop, side by side in one run.

Three training iterations are timed on the same model, batch and optimizer (median of many runs):

* ``plain``: forward, backward, ``optimizer.step()``;
* ``rankprune``: the same plus ``pruner.regularize()`` and ``pruner.step()`` with period 1 (one batched
  ``rankprune.ops.svd`` call per group of equal-shape layers, no host sync);
* ``linalg_loop``: TRP as the official code does it (cifar-TRP.py, period 1): before the forward, for every
  layer, ``torch.linalg.svd`` of the reshaped weight, energy rank read on the host, ``W <- U_r S_r V_r^T``,
  and ``lam * U_r V_r^T`` added to the gradient after the backward.

The variants are timed in turn (one call each per round) so that a busy machine slows them alike. The
overhead of each TRP variant is its iteration time over ``plain`` minus one; the TRP-only parts are also
timed alone (``regularize()`` + ``optimizer.step()`` + ``step()`` against ``optimizer.step()``, and the loop's
SVD/projection/gradient work against ``optimizer.step()``). Before timing, one projection by each route is
compared on the same weights (they must agree).

    python benchmarks/bench_trp_overhead.py                          # ResNet-56, batch 128, CUDA if present
    python benchmarks/bench_trp_overhead.py --device cpu --quick     # ResNet-20 at width 0.5, batch 16
"""
import argparse
import copy
import statistics
import sys
from collections import Counter
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from rankprune import models
from rankprune.benchmark import Timing, environment, measure, write_results
from rankprune.nn import weight_matrix
from rankprune.trp import TrainedRankPruner, matrix_to_weight

ENERGY, LAM = 0.9, 3e-4


class LinalgLoopTRP:
    """The official code's TRP step, one ``torch.linalg.svd`` per layer (the baseline being compared)."""

    def __init__(self, model: nn.Module, layer_names: List[str], scheme: str):
        self.weights = [model.get_submodule(n).weight for n in layer_names]
        self.scheme = scheme
        self.subgradients: List[torch.Tensor] = []

    @torch.no_grad()
    def project(self) -> None:
        self.subgradients = []
        for w in self.weights:
            u, s, vh = torch.linalg.svd(weight_matrix(w, self.scheme), full_matrices=False)
            energy = s.square().cumsum(0)
            r = int((energy < ENERGY * energy[-1]).sum()) + 1  # host sync, as in the official code
            w.copy_(matrix_to_weight((u[:, :r] * s[:r]) @ vh[:r], w.shape, self.scheme))
            self.subgradients.append(matrix_to_weight(u[:, :r] @ vh[:r], w.shape, self.scheme))

    @torch.no_grad()
    def add_gradients(self) -> None:
        for w, g in zip(self.weights, self.subgradients):
            w.grad.add_(g, alpha=LAM)


def interleaved(fns: Dict[str, Callable[[], object]], device, warmup: int, rounds: int) -> Dict[str, Timing]:
    """Time the variants in turn, one call each per round, so that a busy machine slows them alike."""
    for fn in fns.values():
        measure(fn, device=device, warmup=warmup, repeats=1)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(measure(fn, device=device, warmup=0, repeats=1).median_ms)
    out = {}
    for name, ms in samples.items():
        q = statistics.quantiles(ms, n=10) if len(ms) >= 2 else ms * 9
        out[name] = Timing(median_ms=statistics.median(ms), p10_ms=q[0], p90_ms=q[-1], repeats=len(ms))
    return out


def setup(args, device) -> Tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    torch.manual_seed(0)
    model = models.build(args.model, width=args.width).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch_size, *models.INPUT_SHAPES[args.model], device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    def forward_backward() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    return model, opt, forward_backward


def agreement(args, device) -> float:
    """Largest difference between the weights one projection gives by each route, relative to the weight."""
    model, _, _ = setup(args, device)
    other = copy.deepcopy(model)
    pruner = TrainedRankPruner(model, energy=ENERGY, lam=LAM, period=1, scheme=args.scheme)
    pruner.project()
    LinalgLoopTRP(other, pruner.layer_names, args.scheme).project()
    with torch.no_grad():
        return max(
            float((model.get_submodule(n).weight - other.get_submodule(n).weight).norm()
                  / other.get_submodule(n).weight.norm())
            for n in pruner.layer_names
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="ResNet-20 at width 0.5, batch 16 (a CPU smoke run)")
    p.add_argument("--model", default=None, help="built-in model (default resnet56; --quick resnet20)")
    p.add_argument("--width", type=float, default=None, help="width multiplier (default 1; --quick 0.5)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 128; --quick 16)")
    p.add_argument("--scheme", default="channel", choices=("channel", "spatial"))
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (default 50 GPU, 30 CPU)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    args.model = args.model or ("resnet20" if args.quick else "resnet56")
    args.width = args.width or (0.5 if args.quick else 1.0)
    args.batch_size = args.batch_size or (16 if args.quick else 128)
    device = torch.device(args.device)
    repeats = args.repeats or (50 if device.type == "cuda" else 30)
    timing = dict(device=device, warmup=5 if device.type == "cuda" else 2, rounds=repeats)

    diff = agreement(args, device)
    print(f"projection agreement (rankprune vs linalg loop): max relative difference {diff:.2e}")

    # One model per variant (same initialisation), so that each keeps its own steady state: rankprune's
    # regularize() reuses the factors of the previous step's projection, which another variant's update
    # of shared weights would invalidate.
    model, opt, forward_backward = setup(args, device)
    ours_model, ours_opt, ours_fb = setup(args, device)
    loop_model, loop_opt, loop_fb = setup(args, device)
    pruner = TrainedRankPruner(ours_model, energy=ENERGY, lam=LAM, period=1, scheme=args.scheme)
    loop = LinalgLoopTRP(loop_model, pruner.layer_names, args.scheme)

    def plain() -> None:
        forward_backward()
        opt.step()

    def ours() -> None:
        ours_fb()
        pruner.regularize()
        ours_opt.step()
        pruner.step()

    def official() -> None:
        loop.project()
        loop_fb()
        loop.add_gradients()
        loop_opt.step()

    times = interleaved({"plain": plain, "rankprune": ours, "linalg_loop": official}, **timing)
    for name, t in times.items():
        print(f"{name:<12} iteration {t.median_ms:9.3f} ms (p10 {t.p10_ms:.3f}, p90 {t.p90_ms:.3f})", flush=True)

    # The TRP-only work, with the gradients of one backward left in place.
    for fb in (forward_backward, ours_fb, loop_fb):
        fb()
    alone = interleaved({
        "optimizer_step": opt.step,
        "rankprune": lambda: (pruner.regularize(), ours_opt.step(), pruner.step()),
        "linalg_loop": lambda: (loop.project(), loop.add_gradients(), loop_opt.step()),
    }, **timing)
    trp_only = {k: alone[k].median_ms - alone["optimizer_step"].median_ms for k in ("rankprune", "linalg_loop")}
    overhead = {k: times[k].median_ms / times["plain"].median_ms - 1 for k in ("rankprune", "linalg_loop")}
    shapes = Counter(tuple(weight_matrix(ours_model.get_submodule(n).weight, args.scheme).shape)
                     for n in pruner.layer_names)
    groups = list(shapes.values())
    print(f"overhead over a plain step: rankprune {100 * overhead['rankprune']:.1f}%, "
          f"linalg loop {100 * overhead['linalg_loop']:.1f}%")
    print(f"TRP work alone: rankprune {trp_only['rankprune']:.3f} ms, linalg loop {trp_only['linalg_loop']:.3f} ms "
          f"({len(pruner.layer_names)} layers in {len(groups)} batched groups {groups})")

    payload = {
        "benchmark": "trp_overhead",
        "environment": environment(device),
        "quick": args.quick,
        "model": args.model,
        "width": args.width,
        "batch_size": args.batch_size,
        "scheme": args.scheme,
        "energy": ENERGY,
        "lam": LAM,
        "period": 1,
        "layers": len(pruner.layer_names),
        "group_sizes": groups,
        "projection_max_rel_diff": diff,
        "iteration_ms": {k: t.as_dict() for k, t in times.items()},
        "alone_ms": {k: t.as_dict() for k, t in alone.items()},
        "trp_only_ms": trp_only,
        "overhead_fraction": overhead,
        "target_overhead_fraction": 0.15,
        "rankprune_speedup_over_linalg_loop": trp_only["linalg_loop"] / max(trp_only["rankprune"], 1e-9),
        "ranks_at_end": pruner.ranks(),
    }
    path = write_results("trp_overhead", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
