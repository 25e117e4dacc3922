"""The main job, end to end on the built-in data: what ``rankprune demo`` runs. It answers one question: which
method gives the best model at the same cost, at equal FLOPs and at equal measured latency.

1. train a small CIFAR ResNet on ``rankprune.data.synthetic_cifar`` (the baseline, saved as ``plans/baseline.pt``);
2. compress it to each FLOPs level (``flops``) by every method, each called as a user would, with the calibration
   batches: ``prune: <criterion>`` for each of ``criteria`` (``prune(model, x, criterion, data=calib,
   target_flops=t)``: reconstruction and BatchNorm recalibration included), ``prune: default`` (the default
   pipeline: ``prune(model, x, data=calib, target_flops=t)``), ``decompose: data-aware`` (``decompose(data=calib,
   target_flops=t)``), ``decompose: weight SVD`` (``decompose(target_flops=t)``) and ``compress`` (the hybrid,
   ``rankprune.compress``); then ``prune: latency-targeted`` to each of ``latency_targets`` of the baseline's
   measured latency (``prune(model, x, data=calib, target_latency=t)``; compared at equal latency only); measure
   each as the library returns it (with ``finetune_epochs``, fine-tuned);
3. with ``trp=True``: train the baseline further with Trained Rank Pruning and decompose it at the trained ranks
   (shown, outside the comparison: it trains longer and its FLOPs follow from ``energy``);
4. time every variant interleaved with the baseline in the same rounds (``rankprune.benchmark.latency``, a
   rotated order each round): median and interquartile range over the rounds, in ms and as a ratio to the
   baseline's time in the same round;
5. say which method won at each FLOPs level and within the tightest latency budget every method that runs faster
   than the baseline meets, with the margin and its noise, and mark accuracies within the noise of chance;
6. write a report folder: ``results.json``, ``report.md``, ``accuracy_vs_flops.png``, ``accuracy_vs_latency.png``,
   ``layers.png`` and ``plans/`` (each variant's plan and weights: ``rankprune.apply_plan``, then
   ``torch.load(..., weights_only=True)``).

The demo trains because it is the user here (the library's verbs never own a loop): ``rankprune.training``.
"""
import copy
import dataclasses
import json
import os
import re
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import data, models, report, scoring
from ._inputs import iter_batches, resolve_dtype
from .demo_verdict import (DATA_AWARE, DEFAULT_PIPELINE, DENSE, HYBRID, LATENCY_TARGETED, TRP, WEIGHT_SVD,
                           chance_threshold, method_verdict)
from .lowrank import decompose
from .training import evaluate, train
from .trp import TrainedRankPruner

# Fewer criteria and levels than a study would use: the whole demo has to fit 10 minutes on 2 idle CPU cores
# (README gives the measured time). taylor is the one criterion that reads labels; random is left out (the
# default pipeline and the other criteria are the comparisons a user makes).
_CRITERIA = ("l1", "bn_scale", "taylor", "energy")
_WEIGHT_DECAY = 5e-4  # the usual CIFAR ResNet setting


@dataclasses.dataclass
class DemoConfig:
    """Settings of :func:`run`. The defaults fit 10 minutes on 2 idle CPU cores; :meth:`quick` one."""

    model: str = "resnet20"
    width: float = 0.5
    train_size: int = 8000
    test_size: int = 2000
    batch_size: int = 100
    epochs: int = 8
    lr: float = 0.1
    finetune_epochs: int = 0
    finetune_lr: float = 0.02
    criteria: Sequence[str] = _CRITERIA
    flops: Sequence[float] = (0.6, 0.4)
    # prune(data=..., target_latency=t) beside them: about the latencies the FLOPs levels give on a CPU at batch 1
    latency_targets: Sequence[float] = (0.8, 0.7)
    compress: bool = True
    energy: float = 0.9
    trp: bool = False
    trp_epochs: int = 2
    trp_lam: float = 3e-4
    calibration_batches: int = 8
    latency_batch_size: int = 1
    latency_repeats: int = 20
    latency_rounds: int = 7
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    out: str = "rankprune-demo"
    progress: bool = True

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """Within a minute on 2 CPU cores: fewer images and epochs, one criterion, one FLOPs level."""
        # baseline training was half of a measured --quick run at 1000 images x 3 epochs: 800 x 2 here
        settings = dict(train_size=800, test_size=500, epochs=2, criteria=("l1",), flops=(0.5,), latency_targets=(),
                        trp_epochs=1, calibration_batches=2, latency_repeats=10, latency_rounds=3)
        settings.update(overrides)
        return cls(**settings)

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        positive = ("train_size", "test_size", "batch_size", "epochs", "calibration_batches",
                    "latency_batch_size", "latency_repeats", "latency_rounds")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("finetune_epochs", "trp_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.width <= 4:
            raise ValueError(f"width must be in (0, 4], got {self.width}")
        if not self.flops:
            raise ValueError("flops must name at least one level")
        for name in ("flops", "latency_targets"):
            for level in getattr(self, name):
                if not 0 < level < 1:
                    raise ValueError(f"{name} must be fractions in (0, 1), got {level}")
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.compress and self.calibration_batches < 2:
            raise ValueError("calibration_batches must be >= 2 with compress (it holds some out to choose a split), "
                             f"got {self.calibration_batches}")
        unknown = [c for c in self.criteria if c not in scoring.CRITERIA]
        if unknown:
            raise ValueError(f"unknown criteria {unknown}; choose from {', '.join(sorted(scoring.CRITERIA))}")


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


def variant_name(method: str, level: float) -> str:
    """File-safe name of ``method``'s variant at FLOPs ``level``, e.g. ``prune-bn-scale-0.6``."""
    return f"{re.sub(r'[^a-z0-9]+', '-', method.lower()).strip('-')}-{level:g}"


class _Session:
    """What the demo's stages share: the settings, the data, and every variant measured so far (its row,
    its model)."""

    def __init__(self, config: DemoConfig, echo: Callable[[str], None]):
        self.config = config
        self.echo = echo
        self.device = torch.device(config.device)
        self.stages = _Stages(echo)
        self.notes: List[str] = []
        self.variants: List[Dict[str, object]] = []
        self.built: Dict[str, nn.Module] = {}

    def load_data(self) -> None:
        config, device = self.config, self.device
        with self.stages("data"):
            train_set = data.synthetic_cifar("train", n=config.train_size, seed=config.seed)
            test_set = data.synthetic_cifar("test", n=config.test_size, seed=config.seed)
            self.train_loader = data.batch_loader(train_set, config.batch_size, shuffle=True, seed=config.seed)
            self.test_loader = data.batch_loader(test_set, 250)
            self.example = next(iter(data.batch_loader(train_set, 1)))[0].to(device)
            # Labelled batches: taylor needs the labels; the other verbs use the images.
            loader = data.batch_loader(train_set, config.batch_size)
            self.calibration = [(x.to(device), y.to(device)) for x, y in
                                iter_batches(loader, config.calibration_batches)]

    def save(self, name: str, model: nn.Module, plan: Optional[dict]) -> Dict[str, str]:
        """Write the plan and the weights of a variant under ``plans/``; their paths in the report folder."""
        stem = os.path.join(self.config.out, "plans", name)
        files = {}
        if plan is not None:
            with open(stem + ".json", "w") as f:
                json.dump(plan, f, indent=1)
            files["plan"] = os.path.relpath(stem + ".json", self.config.out)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, stem + ".pt")  # loads without a GPU
        files["weights"] = os.path.relpath(stem + ".pt", self.config.out)
        return files

    def add(self, name: str, method: str, model: nn.Module, plan: Optional[dict] = None, **extra) -> None:
        """Measure a variant (params, FLOPs, test accuracy; fine-tuned with ``finetune_epochs`` unless it is the
        baseline), save it and add its row."""
        config = self.config
        model = model.to(self.device).eval()
        stats = report.model_stats(model, (self.example,))
        row = {"variant": name, "method": method, "params": int(stats["params"]), "flops": int(stats["flops"]),
               **extra}
        row["flops_kept"] = row["flops"] / self.variants[0]["flops"] if self.variants else 1.0
        row["accuracy"] = evaluate(model, self.test_loader, self.device)
        if method != DENSE and config.finetune_epochs:
            row["accuracy_returned"] = row["accuracy"]
            train(model, self.train_loader, config.finetune_epochs, config.finetune_lr, self.device,
                  weight_decay=_WEIGHT_DECAY, progress=config.progress, desc=name)
            row["accuracy"] = evaluate(model.eval(), self.test_loader, self.device)
        row["chance"] = row["accuracy"] <= chance_threshold(config.test_size)
        row.update(self.save(name, model, plan))
        self.variants.append(row)
        self.built[name] = model
        self.echo(f"    {name}: accuracy {100 * row['accuracy']:.1f}%{' (chance level)' if row['chance'] else ''}, "
                  f"{row['params']:,} params, {row['flops'] / 1e6:.1f} MFLOPs ({row['flops_kept']:.0%})")


def run(config: DemoConfig, echo: Callable[[str], None] = print) -> Dict[str, object]:
    """Run the whole demo with ``config``, write the report folder ``config.out`` and return the results
    (what ``results.json`` holds). Raises ValueError for settings out of range."""
    from .benchmark import environment

    config.check()
    torch.manual_seed(config.seed)
    session = _Session(config, echo)
    os.makedirs(os.path.join(config.out, "plans"), exist_ok=True)
    session.load_data()
    baseline = _train_baseline(session)
    for level in config.flops:
        _compress_to(session, baseline, level)
    for target in config.latency_targets:
        _prune_to_latency(session, baseline, target)
    trp_ranks = _trp_variant(session, baseline) if config.trp else {}
    with session.stages(f"latency: {config.latency_rounds} interleaved rounds"):
        _measure_latency(session)

    stages = session.stages
    results = {
        "config": dataclasses.asdict(config),
        "environment": environment(session.device),
        "stages_s": stages.seconds,
        "total_s": round(sum(stages.seconds.values()), 1),
        "rows": session.variants,
        "layers": _layer_table(baseline, session.built, min(config.flops), trp_ranks),
        "verdict": method_verdict(session.variants, config.test_size,
                                  f"after {config.finetune_epochs} fine-tune epoch(s)" if config.finetune_epochs
                                  else "as the library returns them, without fine-tuning"),
        "notes": session.notes,
    }
    write_report(results, config.out, echo)
    return results


def _train_baseline(session: _Session) -> nn.Module:
    config = session.config
    with session.stages(f"train baseline {config.model} (width {config.width}), {config.epochs} epochs"):
        baseline = models.build(config.model, num_classes=data.NUM_CLASSES, width=config.width)
        train(baseline, session.train_loader, config.epochs, config.lr, session.device, weight_decay=_WEIGHT_DECAY,
              progress=config.progress, desc="baseline")
        session.add("baseline", DENSE, baseline)
    return baseline


def _compress_to(session: _Session, baseline: nn.Module, level: float) -> None:
    """Every method of the config at ``level`` of the baseline's FLOPs, each called as a user would."""
    from .hybrid import compress
    from .pruning import prune  # at call time: channel pruning needs torch-pruning

    config = session.config
    example, calibration, progress = (session.example,), session.calibration, config.progress
    builders: List[Tuple[str, Callable[[], tuple]]] = [
        (f"prune: {c}", lambda c=c: prune(baseline, example, c, data=calibration, target_flops=level,
                                          progress=progress)) for c in config.criteria]
    builders += [
        (DEFAULT_PIPELINE, lambda: prune(baseline, example, data=calibration, target_flops=level, progress=progress)),
        (DATA_AWARE, lambda: decompose(baseline, data=calibration, target_flops=level, example_inputs=example,
                                       progress=progress)[:2]),
        (WEIGHT_SVD, lambda: decompose(baseline, target_flops=level, example_inputs=example, progress=progress)[:2]),
    ]
    if config.compress:
        builders.append((HYBRID, lambda: compress(baseline, example, data=calibration, target_flops=level,
                                                  progress=progress)[:2]))
    for method, build in builders:
        with session.stages(f"{method} to {level:.0%} of the FLOPs"):
            model, plan = build()
            # compress's chosen split: at 1 it pruned alone (then it is the default pruning's model)
            split = {"prune_share": plan["prune_share"]} if method == HYBRID else {}
            session.add(variant_name(method, level), method, model, plan, target_flops=level, **split)


def _prune_to_latency(session: _Session, baseline: nn.Module, target: float) -> None:
    """The default pruning to ``target`` of the baseline's latency, measured as the demo measures every variant
    (eager, its batch size); a target this machine cannot reach is said in one line and left out."""
    from .pruning import prune  # at call time: channel pruning needs torch-pruning

    config = session.config
    x = session.example.expand(config.latency_batch_size, *session.example.shape[1:]).contiguous()
    with session.stages(f"{LATENCY_TARGETED} to {target:.0%} of the dense latency"):
        try:
            model, plan = prune(baseline, (x,), data=session.calibration, target_latency=target, runtime="eager",
                                measure_latency=False, progress=config.progress)
        except ValueError as exc:
            if "cannot be met" not in str(exc):
                raise
            session.echo(f"    {LATENCY_TARGETED} to {target:.0%}: left out: {exc}")
            return
        session.add(variant_name(LATENCY_TARGETED, target), LATENCY_TARGETED, model, plan, target_flops=None,
                    target_latency=target)


def _trp_variant(session: _Session, baseline: nn.Module) -> Dict[str, int]:
    """Train a copy of the baseline with TRP, decompose it at the trained ranks; returns those ranks."""
    config = session.config
    with session.stages(f"train with TRP (energy {config.energy}) {config.trp_epochs} epoch(s), decompose"):
        trained = copy.deepcopy(baseline)
        pruner = TrainedRankPruner(trained, energy=config.energy, lam=config.trp_lam)
        train(trained, session.train_loader, config.trp_epochs, config.finetune_lr, session.device, pruner=pruner,
              weight_decay=_WEIGHT_DECAY, progress=config.progress, desc="trp")
        trp_model, plan = pruner.finalize(example_inputs=(session.example,), progress=config.progress)
        session.add("trp", TRP, trp_model, plan, energy=config.energy)
    return {k: int(v) for k, v in pruner.ranks().items()}


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles, min and max of ``values`` (the rounds of a latency measurement)."""
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1],
            "rounds": len(ordered)}


def _measure_latency(session: _Session) -> None:
    """Each variant's latency in ``latency_rounds`` rounds, each round timing every variant and the baseline
    in a rotated order, so that a change of machine load between rounds shifts the baseline with the variants
    and cancels in their ratio; stores ``latency_ms`` and ``latency_ratio`` (to the baseline of the same round)
    as :func:`spread` dicts."""
    from tqdm.auto import tqdm

    from .benchmark import latency

    config = session.config
    dtype = resolve_dtype(config.dtype)
    x = session.example.expand(config.latency_batch_size, *session.example.shape[1:]).contiguous().to(dtype=dtype)
    timed = {row["variant"]: copy.deepcopy(session.built[row["variant"]]).to(dtype=dtype) for row in session.variants}
    names = list(timed)
    medians: Dict[str, List[float]] = {name: [] for name in names}
    for r in tqdm(range(config.latency_rounds), desc="latency", disable=not config.progress, leave=False,
                  unit="round"):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            medians[name].append(latency(timed[name], (x,), warmup=2, repeats=config.latency_repeats).median_ms)
    for row in session.variants:
        times = medians[row["variant"]]
        row["latency_ms"] = spread(times)
        row["latency_ratio"] = spread([t / b for t, b in zip(times, medians["baseline"])])
    session.notes.append(f"latency on {session.device.type} ({config.dtype}, batch {config.latency_batch_size}): per "
                         f"round the median of {config.latency_repeats} timed forward passes; shown as the median "
                         f"and interquartile range over {config.latency_rounds} rounds")


def _layer_table(baseline: nn.Module, built: Dict[str, nn.Module], level: float, trp_ranks: Dict[str, int]
                 ) -> List[Dict[str, object]]:
    """Per conv layer of the baseline, for the variants at FLOPs ``level``: the rank of each method that
    factors layers (None where it kept the layer dense), the output channels each pruning method kept, and the
    TRP ranks."""
    factored = [m for m in (DATA_AWARE, WEIGHT_SVD, HYBRID) if variant_name(m, level) in built]
    pruned = [m for m in (DEFAULT_PIPELINE, HYBRID) if variant_name(m, level) in built]
    modules = {m: dict(built[variant_name(m, level)].named_modules()) for m in set(factored + pruned)}
    rows = []
    for name, conv in baseline.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        full = min(conv.out_channels, conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1])
        row = {"layer": name, "out_channels": conv.out_channels, "full_rank": full,
               "ranks": {m: getattr(modules[m].get(name), "rank", None) for m in factored},
               "channels": {m: getattr(modules[m].get(name), "out_channels", None) for m in pruned}}
        if name in trp_ranks:
            row["trp_rank"] = trp_ranks[name]
        rows.append(row)
    return rows


def _spread_text(value: Optional[Dict[str, float]], digits: int) -> Optional[str]:
    if value is None:
        return None
    return f"{value['median']:.{digits}f} ({value['q1']:.{digits}f}-{value['q3']:.{digits}f})"


def summary_table(results: Dict[str, object]) -> str:
    """The demo's one table: FLOPs, params, accuracy (chance level marked; as returned and after fine-tuning
    when the demo fine-tuned) and latency, median and interquartile range, of every variant (Markdown)."""
    from rankprune.benchmark import markdown_table

    rows = results["rows"]
    tuned = any("accuracy_returned" in r for r in rows)
    headers = (["variant", "method", "FLOPs kept", "MFLOPs", "params"] + (["returned %"] if tuned else [])
               + ["accuracy %", "latency ms (IQR)", "x dense (IQR)"])
    body = []
    for r in rows:
        accuracy = f"{100 * r['accuracy']:.1f}" + (" (chance)" if r["chance"] else "")
        returned = [None if r.get("accuracy_returned") is None else 100 * r["accuracy_returned"]] if tuned else []
        body.append([r["variant"], r["method"], f"{r['flops_kept']:.0%}", r["flops"] / 1e6, r["params"], *returned,
                     accuracy, _spread_text(r.get("latency_ms"), 3), _spread_text(r.get("latency_ratio"), 2)])
    return markdown_table(headers, body)


def _rank_panel(layers: List[Dict[str, object]]) -> Dict[str, object]:
    """Ranks per layer: the full rank, each factoring method's rank only where it factored the layer (its
    layers kept dense marked apart, at their full rank), TRP's energy rank."""
    panel: Dict[str, object] = {"ylabel": "rank", "series": {"full rank": [row["full_rank"] for row in layers]},
                                "points": []}
    for method in (layers[0]["ranks"] if layers else {}):
        ranks = [row["ranks"][method] for row in layers]
        panel["series"][f"{method}: rank"] = ranks
        dense = [row["full_rank"] if rank is None else None for row, rank in zip(layers, ranks)]
        if any(v is not None for v in dense):
            panel["series"][f"{method}: kept dense"] = dense
            panel["points"].append(f"{method}: kept dense")
    if any("trp_rank" in row for row in layers):
        panel["series"]["TRP energy rank"] = [row.get("trp_rank") for row in layers]
    return panel


def _accuracy_points(rows: List[Dict[str, object]], x_key: str) -> List[Dict[str, object]]:
    """Scatter points of the rows that have ``x_key`` (``flops_kept`` or ``latency_ratio``) for
    ``plots.accuracy_scatter``."""
    points = []
    for r in rows:
        if x_key not in r:
            continue
        point = {"series": r["method"], "accuracy": r["accuracy"]}
        if isinstance(r[x_key], dict):  # a spread: the median, with the interquartile range as error bar
            point.update(x=r[x_key]["median"], x_low=r[x_key]["q1"], x_high=r[x_key]["q3"])
        else:
            point["x"] = r[x_key]
        points.append(point)
    return points


def write_report(results: Dict[str, object], out: str, echo: Callable[[str], None] = print) -> None:
    """Write ``results.json``, ``report.md`` and the plots into ``out`` and print the summary table."""
    from rankprune import plots

    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = summary_table(results)
    env = results["environment"]
    rows, verdict = results["rows"], results["verdict"]
    cfg = results["config"]
    title = f"{cfg['model']} (width {cfg['width']}) on synthetic CIFAR"
    chance = verdict["chance_threshold"]
    budget = verdict["equal_latency"].get("budget")
    made = {
        "accuracy_vs_flops.png": plots.accuracy_scatter(
            _accuracy_points(rows, "flops_kept"), os.path.join(out, "accuracy_vs_flops.png"),
            f"{title}: equal FLOPs", "FLOPs kept (fraction of the dense model's; methods shifted a few points "
            "sideways)", chance, offset_series=True),
        "accuracy_vs_latency.png": plots.accuracy_scatter(
            _accuracy_points(rows, "latency_ratio"), os.path.join(out, "accuracy_vs_latency.png"),
            f"{title}: equal latency", "latency / dense latency (median, IQR)", chance,
            [(1.0, "dense latency")] + ([(budget, "common budget")] if budget is not None else [])),
    }
    layers = results["layers"]
    panels = [_rank_panel(layers)]
    if layers and layers[0]["channels"]:
        panels.append({"ylabel": "output channels", "series": {
            "dense": [row["out_channels"] for row in layers],
            **{f"{m}: kept": [row["channels"][m] for row in layers] for m in layers[0]["channels"]}}})
    made["layers.png"] = plots.layer_profile([row["layer"] for row in layers], panels, os.path.join(out, "layers.png"),
                                             f"{title}: per conv layer at {min(cfg['flops']):.0%} of the FLOPs")
    notes = list(results["notes"])
    if None in made.values():
        notes.append("plots skipped: matplotlib is not installed (pip install matplotlib)")
    stage_lines = "\n".join(f"- {k}: {v:.1f} s" for k, v in results["stages_s"].items())
    md = [f"# rankprune demo: {title}", "", f"Measured on {env['device']}; {env['date']}; torch {env['torch']}; "
          f"commit {env['commit']}.", "", "## Verdict", "", verdict["text"], "", table, "",
          "Every method was asked for the same fractions of the dense model's FLOPs; `FLOPs kept` is what each "
          f"delivered. Accuracy on the test images, of the models {verdict['stage']}; `(chance)` marks accuracies "
          f"at or below {100 * chance:.1f}% (1/{data.NUM_CLASSES} plus the noise of {cfg['test_size']} test images). "
          "Latency: per round the median of repeated forward passes (`rankprune.benchmark.latency`), every "
          "variant and the dense model timed in the same rounds; shown as the median over the rounds with the "
          "interquartile range, in ms and as a ratio to the dense model's time in the same round. The "
          "baseline's weights are `plans/baseline.pt`.", ""]
    md += [f"![{name}]({name})\n" for name, path in made.items() if path]
    md += ["## Stages", "", "Wall-clock time of each stage, each run once (no spread).", "", stage_lines,
           f"- total: {results['total_s']:.1f} s", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md))
    echo("")
    echo(table)
    echo("")
    echo(verdict["text"].replace("**", ""))
    for n in notes:
        echo(f"note: {n}")
    echo(f"total {results['total_s']:.1f} s; report in {out}/ (report.md, results.json, "
         + "".join(f"{name}, " for name, path in made.items() if path) + "plans/)")
