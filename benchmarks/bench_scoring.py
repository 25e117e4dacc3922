"""Cost of scoring every conv output of a network by energy, next to the plain forward and to HRank's loop.

Three measurements on the same model and batch:

1. ``forward``: the plain forward pass (no_grad, eval).
2. ``energy`` (and ``hrank``): ``rankprune.scoring`` on the same batches, i.e. the forward with a hook on
   every conv's tap computing per-channel nuclear norms (ranks) with ``rankprune.ops`` — reported per batch,
   so ``energy / forward - 1`` is the overhead of scoring.
3. ``hrank_loop``: HRank's own scheme (``rank_generation.py``): for every image and channel,
   ``torch.linalg.matrix_rank(map).item()`` in a Python loop. Far too slow to run in full, so each conv
   layer's loop is timed on a few maps of that layer's size and scaled to ``N x C`` maps, plus the forward.

Defaults: ResNet-50 (random weights, ImageNet shape), batch 64 at 224x224 on CUDA; on CPU a small setting
(batch 4 at 64x64) so that it finishes in a minute. Results (JSON) go to benchmarks/results/.

    python benchmarks/bench_scoring.py                       # CUDA if available, else the CPU setting
    python benchmarks/bench_scoring.py --device cpu --batch 2 --size 32
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from rankprune import models, scoring  # noqa: E402
from rankprune.benchmark import environment, measure, write_results  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_output_shapes(model, x):
    """{conv_name: (C, H, W)} of every conv's output on ``x``."""
    shapes = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
               for n, m in scoring.conv_layers(model).items()]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return shapes


def hrank_loop_estimate(shapes, batch, device, dtype, maps_per_layer):
    """Seconds HRank's per-map ``matrix_rank(...).item()`` loop would take for all maps of all layers,
    from timing ``maps_per_layer`` maps of each layer's size (random post-ReLU-like maps)."""
    total = 0.0
    timed_maps = 0
    per_size = {}
    for name, (c, h, w) in shapes.items():
        if (h, w) not in per_size:
            maps = torch.relu(torch.randn(maps_per_layer, h, w, device=device, dtype=dtype))
            torch.linalg.matrix_rank(maps[0]).item()  # warm-up (library load, kernels)
            _sync(device)
            t0 = time.perf_counter()
            for k in range(maps_per_layer):
                torch.linalg.matrix_rank(maps[k]).item()
            _sync(device)
            per_size[(h, w)] = (time.perf_counter() - t0) / maps_per_layer
            timed_maps += maps_per_layer
        total += per_size[(h, w)] * batch * c
    return total, {f"{h}x{w}": t for (h, w), t in per_size.items()}, timed_maps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="built-in model name (default resnet50)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--batch", type=int, help="images per batch (default 64 on CUDA, 4 on CPU)")
    p.add_argument("--size", type=int, help="image side (default 224 on CUDA, 64 on CPU)")
    p.add_argument("--batches", type=int, default=4, help="batches per scoring pass (default 4)")
    p.add_argument("--repeats", type=int, help="timed repeats (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--maps-per-layer", type=int, help="maps timed per layer size for the HRank loop (default 64 / 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    batch = args.batch or (64 if cuda else 4)
    size = args.size or (224 if cuda else 64)
    repeats = args.repeats or (10 if cuda else 3)
    maps_per_layer = args.maps_per_layer or (64 if cuda else 8)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    model = models.build(args.model, num_classes=1000).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    batches = [x] * args.batches

    def forward():
        with torch.no_grad():
            for b in batches:
                model(b)

    results = {}
    results["forward"] = measure(forward, device, warmup=1, repeats=repeats)
    print(f"forward            {results['forward'].median_ms / args.batches:10.2f} ms/batch", flush=True)
    for name in ("energy", "hrank"):
        crit = scoring.get(name, progress=False)
        results[name] = measure(lambda: crit.scores(model, batches), device, warmup=1, repeats=repeats)
        print(f"{name:<18} {results[name].median_ms / args.batches:10.2f} ms/batch", flush=True)

    shapes = conv_output_shapes(model, x)
    loop_s, per_map_s, timed = hrank_loop_estimate(shapes, batch, device, dtype, maps_per_layer)
    forward_ms = results["forward"].median_ms / args.batches
    loop_ms = loop_s * 1e3 + forward_ms
    energy_ms = results["energy"].median_ms / args.batches
    hrank_ms = results["hrank"].median_ms / args.batches
    n_maps = sum(c for c, _, _ in shapes.values()) * batch
    print(f"hrank python loop  {loop_ms:10.1f} ms/batch (estimated from {timed} timed maps, {n_maps} maps/batch)")
    summary = {
        "energy_overhead_vs_forward": energy_ms / forward_ms - 1,
        "hrank_overhead_vs_forward": hrank_ms / forward_ms - 1,
        "speedup_energy_vs_hrank_loop": loop_ms / energy_ms,
        "speedup_hrank_vs_hrank_loop": loop_ms / hrank_ms,
    }
    for k, v in summary.items():
        print(f"{k:<32} {v:10.3f}")
    payload = {
        "environment": environment(device),
        "model": args.model,
        "shapes": {"batch": batch, "size": size, "batches_per_pass": args.batches, "dtype": args.dtype,
                   "convs": len(shapes), "maps_per_batch": n_maps},
        "ms_per_batch": {"forward": forward_ms, "energy": energy_ms, "hrank": hrank_ms,
                         "hrank_python_loop_estimated": loop_ms},
        "timings": {k: v.as_dict() for k, v in results.items()},
        "hrank_loop_seconds_per_map": per_map_s,
        "hrank_loop_maps_timed": timed,
        "summary": summary,
        "targets": {"energy_overhead_vs_forward_max": 0.5, "speedup_energy_vs_hrank_loop_min": 1000,
                    "note": "targets are for CUDA, ResNet-50, batch 64, 224x224"},
    }
    path = write_results("bench_scoring", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
