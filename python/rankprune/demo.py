"""The main job, end to end on the built-in data: what ``rankprune demo`` runs.

1. train a small CIFAR ResNet on ``rankprune.data.synthetic_cifar`` (the baseline);
2. score its channels by the energy of their feature maps (and by the other criteria, for comparison);
3. prune with each criterion at each ratio, fine-tune briefly, evaluate;
4. decompose the baseline into low-rank layers within a FLOP budget (``decompose_flops``; the ranks are
   spread over the layers by the spectral energy they discard), fine-tune;
5. with ``trp=True``: continue training the baseline with Trained Rank Pruning (weights kept near their
   ``energy`` rank), decompose it at the trained ranks, fine-tune;
6. measure inference latency of every variant on the CPU (and the GPU when there is one);
7. write a report folder: ``results.json``, ``report.md``, ``accuracy_vs_flops.png``, ``layers.png`` and, for
   every compressed variant, its plan (``plans/<variant>.json``) and weights (``plans/<variant>.pt``, loads
   with ``torch.load(..., weights_only=True)`` after ``rankprune.apply_plan``).

The demo trains because it is the user here (the library's verbs never own a loop); it uses the loop of
``rankprune trp`` (``rankprune.training.train``: SGD, cosine schedule, TRP's two calls around the step).
"""
import copy
import dataclasses
import json
import os
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

_CRITERIA = ("energy", "l1", "random")
_WEIGHT_DECAY = 5e-4  # the usual CIFAR ResNet setting


@dataclasses.dataclass
class DemoConfig:
    """Settings of :func:`run`. The defaults finish in a few minutes on 2 CPU cores; :meth:`quick` in about one."""

    model: str = "resnet20"
    width: float = 0.5
    train_size: int = 8000
    test_size: int = 2000
    batch_size: int = 100
    epochs: int = 8
    lr: float = 0.1
    finetune_epochs: int = 1
    finetune_lr: float = 0.02
    criteria: Sequence[str] = _CRITERIA
    ratios: Sequence[float] = (0.3, 0.5)
    decompose_flops: float = 0.5
    energy: float = 0.9
    trp: bool = False
    trp_epochs: int = 2
    trp_lam: float = 3e-4
    calibration_batches: int = 4
    latency_batch_size: int = 1
    latency_repeats: int = 50
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    out: str = "rankprune-demo"
    progress: bool = True

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """About a minute on 2 CPU cores: fewer images and epochs, one ratio, two criteria."""
        settings = dict(train_size=1000, test_size=500, epochs=3, finetune_epochs=1, criteria=("energy", "l1"),
                        ratios=(0.5,), trp_epochs=1, calibration_batches=2, latency_repeats=20)
        settings.update(overrides)
        return cls(**settings)

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        positive = ("train_size", "test_size", "batch_size", "epochs", "calibration_batches",
                    "latency_batch_size", "latency_repeats")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("finetune_epochs", "trp_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.width <= 4:
            raise ValueError(f"width must be in (0, 4], got {self.width}")
        for r in self.ratios:
            if not 0 < r < 1:
                raise ValueError(f"ratio must be in (0, 1), got {r}")
        if not 0 < self.decompose_flops <= 1:
            raise ValueError(f"decompose_flops must be in (0, 1], got {self.decompose_flops}")
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        unknown = [c for c in self.criteria if c not in _CRITERIA]
        if unknown:
            raise ValueError(f"unknown criteria {unknown}; choose from {', '.join(_CRITERIA)}")


class _Stages:
    """Times the demo's stages and prints one line per stage."""

    def __init__(self, echo: Callable[[str], None]):
        self.seconds: Dict[str, float] = {}
        self.echo = echo

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.echo(f"[{len(self.seconds) + 1}] {name} ...")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.echo(f"    {name}: {self.seconds[name]:.1f} s")


def _finetune(model: nn.Module, loader, config: DemoConfig, device: torch.device, desc: str) -> None:
    from rankprune.training import train

    if config.finetune_epochs:
        train(model, loader, config.finetune_epochs, config.finetune_lr, device, weight_decay=_WEIGHT_DECAY,
              progress=config.progress, desc=desc)


def _conv_names(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def run(config: DemoConfig, echo: Callable[[str], None] = print) -> Dict[str, object]:
    """Run the whole demo with ``config``, write the report folder ``config.out`` and return the results
    (what ``results.json`` holds). Raises ValueError for settings out of range."""
    import rankprune
    from rankprune import data, models, report
    from rankprune.training import evaluate, train

    config.check()
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    stages = _Stages(echo)
    os.makedirs(os.path.join(config.out, "plans"), exist_ok=True)
    notes: List[str] = []
    variants: List[Dict[str, object]] = []
    built: Dict[str, nn.Module] = {}

    with stages("data"):
        train_set = data.synthetic_cifar("train", n=config.train_size, seed=config.seed)
        test_set = data.synthetic_cifar("test", n=config.test_size, seed=config.seed)
        train_loader = data.batch_loader(train_set, config.batch_size, shuffle=True, seed=config.seed)
        test_loader = data.batch_loader(test_set, 250)
        example = next(iter(data.batch_loader(train_set, 1)))[0]
        calibration = [x for x, _ in _first(data.batch_loader(train_set, config.batch_size), config.calibration_batches)]

    def add(name: str, model: nn.Module, stage: str, plan: Optional[dict] = None, **extra) -> None:
        model = model.to(device).eval()
        stats = report.model_stats(model, (example.to(device),))
        row = {"variant": name, "stage": stage, "params": int(stats["params"]), "flops": int(stats["flops"]),
               "accuracy": evaluate(model, test_loader, device), **extra}
        if plan is not None:
            stem = os.path.join(config.out, "plans", name)
            with open(stem + ".json", "w") as f:
                json.dump(plan, f, indent=1)
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, stem + ".pt")  # loads without a GPU
            row["plan"] = os.path.relpath(stem + ".json", config.out)
        variants.append(row)
        built[name] = model
        echo(f"    {name}: accuracy {100 * row['accuracy']:.1f}%, {row['params']:,} params, "
             f"{row['flops'] / 1e6:.1f} MFLOPs")

    with stages(f"train baseline {config.model} (width {config.width}), {config.epochs} epochs"):
        baseline = models.build(config.model, num_classes=10, width=config.width)
        train(baseline, train_loader, config.epochs, config.lr, device, weight_decay=_WEIGHT_DECAY,
              progress=config.progress, desc="baseline")
        add("baseline", baseline, "train")

    with stages("score channels by feature-map energy"):
        energy_scores = rankprune.scoring.score(baseline, calibration, "energy", progress=config.progress)

    for ratio in config.ratios:
        for criterion in config.criteria:
            name = f"pruned-{criterion}-{ratio:g}"
            with stages(f"prune {ratio:.0%} of channels by {criterion}, fine-tune {config.finetune_epochs} epoch(s)"):
                # Energy scores were computed once above; the other criteria are named and scored by prune().
                scores = energy_scores if criterion == "energy" else criterion
                pruned, plan = rankprune.prune(baseline, (example.to(device),), scores, ratio=ratio,
                                               progress=config.progress)
                before = evaluate(pruned, test_loader, device)
                _finetune(pruned, train_loader, config, device, name)
                add(name, pruned, "prune", plan, criterion=criterion, ratio=ratio, accuracy_before_finetune=before)

    with stages(f"decompose to {config.decompose_flops:.0%} of the FLOPs, fine-tune {config.finetune_epochs} epoch(s)"):
        decomposed, plan, _ = rankprune.decompose(baseline, target_flops=config.decompose_flops,
                                                  example_inputs=(example.to(device),), progress=config.progress)
        before = evaluate(decomposed, test_loader, device)
        _finetune(decomposed, train_loader, config, device, "decomposed")
        add("decomposed", decomposed, "decompose", plan, target_flops=config.decompose_flops,
            accuracy_before_finetune=before)

    trp_ranks: Dict[str, int] = {}
    if config.trp:
        with stages(f"train with TRP (energy {config.energy}) {config.trp_epochs} epoch(s), decompose, "
                    f"fine-tune {config.finetune_epochs} epoch(s)"):
            trained = copy.deepcopy(baseline)
            pruner = rankprune.trp.TrainedRankPruner(trained, energy=config.energy, lam=config.trp_lam)
            train(trained, train_loader, config.trp_epochs, config.finetune_lr, device, pruner=pruner,
                  weight_decay=_WEIGHT_DECAY, progress=config.progress, desc="trp")
            trp_model, plan = pruner.finalize(example_inputs=(example.to(device),), progress=config.progress)
            trp_ranks = {k: int(v) for k, v in pruner.ranks().items()}
            before = evaluate(trp_model, test_loader, device)
            _finetune(trp_model, train_loader, config, device, "trp fine-tune")
            add("trp", trp_model, "trp", plan, energy=config.energy, accuracy_before_finetune=before)

    with stages("latency"):
        _measure_latency(variants, built, example, config, notes)

    results = {
        "config": dataclasses.asdict(config),
        "environment": _environment(device),
        "stages_s": stages.seconds,
        "total_s": round(sum(stages.seconds.values()), 1),
        "rows": variants,
        "layers": _layer_table(baseline, built, energy_scores, trp_ranks),
        "notes": notes,
    }
    write_report(results, config.out, echo)
    return results


def _first(loader, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


def _environment(device: torch.device) -> Dict[str, object]:
    from rankprune.benchmark import environment

    env = {"cpu": environment("cpu")}
    if torch.cuda.is_available():
        env["cuda"] = environment("cuda")
    return env


def _measure_latency(rows: List[Dict[str, object]], built: Dict[str, nn.Module], example: torch.Tensor,
                     config: DemoConfig, notes: List[str]) -> None:
    from rankprune.benchmark import latency
    from rankprune.cli.common import resolve_dtype
    from tqdm.auto import tqdm

    dtype = resolve_dtype(config.dtype)
    x = example.expand(config.latency_batch_size, *example.shape[1:]).contiguous()
    targets = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if len(targets) == 1:
        notes.append("no CUDA device: GPU latency not measured")
    for row in tqdm(rows, desc="latency", disable=not config.progress, leave=False, unit="model"):
        for target in targets:
            model = copy.deepcopy(built[row["variant"]]).to(device=target, dtype=dtype)
            t = latency(model, (x.to(device=target, dtype=dtype),), warmup=5, repeats=config.latency_repeats)
            row[f"{target}_ms"] = t.median_ms
            row[f"{target}_p10_ms"], row[f"{target}_p90_ms"] = t.p10_ms, t.p90_ms


def _layer_table(baseline: nn.Module, built: Dict[str, nn.Module], energy_scores, trp_ranks: Dict[str, int]
                 ) -> List[Dict[str, object]]:
    """Per conv layer of the baseline: channels, mean channel energy, full rank, decomposed and TRP ranks,
    channels kept by the energy-pruned variants."""
    decomposed = built.get("decomposed")
    rows = []
    for name in _conv_names(baseline):
        conv = baseline.get_submodule(name)
        full = min(conv.out_channels, conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1])
        row = {"layer": name, "out_channels": conv.out_channels, "full_rank": full}
        if name in energy_scores:
            row["energy"] = float(torch.as_tensor(energy_scores[name]).float().mean())
        if decomposed is not None:
            sub = _get(decomposed, name)
            row["decomposed_rank"] = getattr(sub, "rank", None)
        if name in trp_ranks:
            row["trp_rank"] = trp_ranks[name]
        for variant, model in built.items():
            if variant.startswith("pruned-energy-"):
                sub = _get(model, name)
                row[f"kept_{variant[len('pruned-energy-'):]}"] = getattr(sub, "out_channels", None)
        rows.append(row)
    return rows


def _get(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def summary_table(results: Dict[str, object]) -> str:
    """The demo's one table: params, FLOPs, accuracy and latency of every variant (Markdown)."""
    from rankprune.benchmark import markdown_table

    rows = results["rows"]
    base = rows[0]
    has_gpu = any("cuda_ms" in r for r in rows)
    headers = ["variant", "params", "MFLOPs", "FLOPs kept", "accuracy %", "CPU ms"] + (["GPU ms"] if has_gpu else [])
    body = []
    for r in rows:
        line = [r["variant"], r["params"], r["flops"] / 1e6, r["flops"] / base["flops"], 100 * r["accuracy"],
                r.get("cpu_ms")]
        if has_gpu:
            line.append(r.get("cuda_ms"))
        body.append(line)
    return markdown_table(headers, body)


def write_report(results: Dict[str, object], out: str, echo: Callable[[str], None] = print) -> None:
    """Write ``results.json``, ``report.md`` and the plots into ``out`` and print the summary table."""
    from rankprune import plots

    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = summary_table(results)
    env = results["environment"]["cpu"]
    where = f"CPU: {env['device']}" + (f"; GPU: {results['environment']['cuda']['device']}"
                                        if "cuda" in results["environment"] else "")
    points = [{"series": "baseline", "flops": results["rows"][0]["flops"], "accuracy": results["rows"][0]["accuracy"]}]
    points += [{"series": f"prune: {r['criterion']}", "flops": r["flops"], "accuracy": r["accuracy"]}
               for r in results["rows"] if r["stage"] == "prune"]
    points += [{"series": r["stage"], "flops": r["flops"], "accuracy": r["accuracy"]}
               for r in results["rows"] if r["stage"] in ("decompose", "trp")]
    cfg = results["config"]
    title = f"{cfg['model']} (width {cfg['width']}) on synthetic CIFAR"
    made = [plots.accuracy_vs_flops(points, os.path.join(out, "accuracy_vs_flops.png"), title)]
    layers = results["layers"]
    rank_series = {"full_rank": "full rank", "decomposed_rank": "decomposed (dense where absent)",
                   "trp_rank": "TRP energy rank"}
    panels = [{"ylabel": "rank", "series": {
        label: [row.get(k) for row in layers] for k, label in rank_series.items() if any(k in row for row in layers)}}]
    kept = sorted({k for row in layers for k in row if k.startswith("kept_")})
    if kept:
        panels.append({"ylabel": "output channels", "series": {
            "dense": [row["out_channels"] for row in layers],
            **{f"kept, energy pruning {k[len('kept_'):]}": [row.get(k) for row in layers] for k in kept}}})
    if any("energy" in row for row in layers):
        panels.append({"ylabel": "mean channel energy", "series": {"energy": [row.get("energy") for row in layers]}})
    made.append(plots.layer_profile([row["layer"] for row in layers], panels, os.path.join(out, "layers.png"),
                                    title + ": per conv layer"))
    notes = list(results["notes"])
    if None in made:
        notes.append("plots skipped: matplotlib is not installed (pip install matplotlib)")
    stage_lines = "\n".join(f"- {k}: {v:.1f} s" for k, v in results["stages_s"].items())
    md = [f"# rankprune demo: {title}", "", f"Measured on {where}; {env['date']}; torch {env['torch']}; "
          f"commit {env['commit']}.", "", table, "",
          "Latency: median of repeated single-image forward passes (`rankprune.benchmark.latency`).", ""]
    if made[0]:
        md += ["![accuracy vs FLOPs](accuracy_vs_flops.png)", ""]
    if made[1]:
        md += ["![per-layer ranks and energy](layers.png)", ""]
    md += ["## Stages", "", stage_lines, f"- total: {results['total_s']:.1f} s", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md))
    echo("")
    echo(table)
    for n in notes:
        echo(f"note: {n}")
    echo(f"total {results['total_s']:.1f} s; report in {out}/ (report.md, results.json"
         + (", accuracy_vs_flops.png, layers.png" if None not in made else "") + ", plans/)")
