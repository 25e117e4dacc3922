"""The main job, end to end on the built-in data: what ``rankprune demo`` runs.

1. train a small CIFAR ResNet on ``rankprune.data.synthetic_cifar`` (the baseline; its weights are saved as
   ``plans/baseline.pt`` next to the compressed variants);
2. score its channels by each criterion (energy, l1, bn_scale, taylor, random by default) on a few
   calibration batches of the training images;
3. prune with each criterion at each ratio and measure the pruned model three times: as it comes out of
   ``prune``, after BatchNorm recalibration on the calibration batches (``rankprune.recalibrate``: what
   ``prune(data=...)`` does by default) and after a short fine-tune;
4. decompose the baseline into low-rank layers within a FLOP budget (``decompose_flops``) twice, measured the
   same way: data-aware (``decompose(data=...)``: each layer factored to minimise the error of its output on
   the calibration batches, ranks allocated across layers by that output error; fine-tuned as it comes out,
   its refitted factors keeping their BatchNorm statistics) and, for comparison, from the weights alone
   (weight SVD, ``decompose()`` without data);
5. with ``trp=True``: continue training the baseline with Trained Rank Pruning (weights kept near their
   ``energy`` rank), decompose it at the trained ranks, recalibrate, fine-tune;
6. measure inference latency of every variant on the CPU (and the GPU when there is one);
7. write a report folder: ``results.json``, ``report.md`` (which criterion won, and why),
   ``accuracy_vs_flops.png``, ``layers.png`` and ``plans/``: the baseline's weights (``baseline.pt``) and,
   for every compressed variant, its plan (``<variant>.json``) and weights (``<variant>.pt``, loads with
   ``torch.load(..., weights_only=True)`` after ``rankprune.apply_plan``).

The demo trains because it is the user here (the library's verbs never own a loop); it uses
``rankprune.training`` (``train``: SGD, cosine schedule, TRP's two calls around the step; ``evaluate``;
``recalibrate``).
"""
import copy
import dataclasses
import json
import math
import os
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from . import data, models, report, scoring
from ._inputs import iter_batches, resolve_dtype
from .lowrank import decompose
from .training import evaluate, recalibrate, train
from .trp import TrainedRankPruner

_CRITERIA = ("energy", "l1", "bn_scale", "taylor", "random")
_WEIGHT_DECAY = 5e-4  # the usual CIFAR ResNet setting
# Why a criterion can win: what it looks at (for the report's verdict).
_WHAT_IT_SEES = {
    "energy": "keeps the channels whose feature maps carry the most energy (nuclear norm of the H x W map, "
              "averaged over the calibration images): large, structured responses",
    "hrank": "keeps the channels whose feature maps have the highest rank on the calibration images",
    "weight_energy": "keeps the filters with the largest nuclear norm (data-free)",
    "l1": "keeps the filters with the largest L1 norm (data-free): the weights training made large",
    "l2": "keeps the filters with the largest L2 norm (data-free)",
    "bn_scale": "keeps the channels whose BatchNorm scale |gamma| is largest (data-free): |gamma| is the "
                "channel's standard deviation after normalisation, its variation over images and positions, "
                "which is what the next layers lose when it goes (recalibration re-centres the constant part), "
                "and which a filter norm cannot see because BatchNorm undoes the filter's scale",
    "taylor": "keeps the channels whose removal would change the loss most to first order, measured on "
              "labelled calibration batches: the only criterion here that looks at the labels",
    "random": "keeps a random subset of channels: when it wins, the other criteria did not single out the "
              "channels this model needs at this ratio, and fine-tuning repaired the damage either way",
}
_DATA_AWARE, _WEIGHT_SVD = "decomposed", "decomposed-svd"
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "later")


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
    ratios: Sequence[float] = (0.5,)  # one ratio for five criteria keeps the run under 10 min on 2 CPU cores
    decompose_flops: float = 0.5
    energy: float = 0.9
    trp: bool = False
    trp_epochs: int = 2
    trp_lam: float = 3e-4
    calibration_batches: int = 8
    latency_batch_size: int = 1
    latency_repeats: int = 50
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    out: str = "rankprune-demo"
    progress: bool = True

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """About a minute on 2 CPU cores: fewer images and epochs, two criteria."""
        settings = dict(train_size=1000, test_size=500, epochs=3, finetune_epochs=1, criteria=("energy", "l1"),
                        trp_epochs=1, calibration_batches=2, latency_repeats=20)
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


class _Session:
    """What the demo's stages share: the settings, the data, and every variant measured so far (its row,
    its model, its decomposition report)."""

    def __init__(self, config: DemoConfig, echo: Callable[[str], None]):
        self.config = config
        self.echo = echo
        self.device = torch.device(config.device)
        self.stages = _Stages(echo)
        self.notes: List[str] = []
        self.variants: List[Dict[str, object]] = []
        self.built: Dict[str, nn.Module] = {}
        self.reports: Dict[str, dict] = {}
        self.steps = f"recalibrate BN, fine-tune {config.finetune_epochs} epoch(s)"

    def load_data(self) -> None:
        config, device = self.config, self.device
        with self.stages("data"):
            train_set = data.synthetic_cifar("train", n=config.train_size, seed=config.seed)
            test_set = data.synthetic_cifar("test", n=config.test_size, seed=config.seed)
            self.train_loader = data.batch_loader(train_set, config.batch_size, shuffle=True, seed=config.seed)
            self.test_loader = data.batch_loader(test_set, 250)
            self.example = next(iter(data.batch_loader(train_set, 1)))[0].to(device)
            # Labelled batches: taylor needs the labels; recalibration and data-aware decomposition use the images.
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

    def add(self, name: str, model: nn.Module, stage: str, plan: Optional[dict] = None, **extra) -> None:
        """Measure a variant (params, FLOPs, test accuracy), save it and add its row."""
        model = model.to(self.device).eval()
        stats = report.model_stats(model, (self.example,))
        row = {"variant": name, "stage": stage, "params": int(stats["params"]), "flops": int(stats["flops"]),
               "accuracy": evaluate(model, self.test_loader, self.device), **extra, **self.save(name, model, plan)}
        self.variants.append(row)
        self.built[name] = model
        self.echo(f"    {name}: accuracy {100 * row['accuracy']:.1f}%, {row['params']:,} params, "
                  f"{row['flops'] / 1e6:.1f} MFLOPs")

    def recalibrate_and_finetune(self, name: str, model: nn.Module, stage: str, plan: dict, from_raw: bool = False,
                                 **extra) -> None:
        """Measure a compressed model as it comes out and after BN recalibration, then fine-tune it: from the
        recalibrated model, or with ``from_raw`` from the model as it came out (data-aware decomposition,
        whose refitted factors keep the statistics they were fitted with)."""
        raw = evaluate(model, self.test_loader, self.device)
        start = copy.deepcopy(model) if from_raw else model
        recalibrate(model, self.calibration)
        recalibrated = evaluate(model, self.test_loader, self.device)
        model = start
        self.finetune(model, name)
        self.add(name, model, stage, plan, accuracy_raw=raw, accuracy_recalibrated=recalibrated, **extra)

    def finetune(self, model: nn.Module, desc: str) -> None:
        config = self.config
        if config.finetune_epochs:
            train(model, self.train_loader, config.finetune_epochs, config.finetune_lr, self.device,
                  weight_decay=_WEIGHT_DECAY, progress=config.progress, desc=desc)


def _conv_names(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def run(config: DemoConfig, echo: Callable[[str], None] = print) -> Dict[str, object]:
    """Run the whole demo with ``config``, write the report folder ``config.out`` and return the results
    (what ``results.json`` holds). Raises ValueError for settings out of range."""
    config.check()
    torch.manual_seed(config.seed)
    session = _Session(config, echo)
    os.makedirs(os.path.join(config.out, "plans"), exist_ok=True)
    session.load_data()
    baseline = _train_baseline(session)
    scores = _score_channels(session, baseline)
    _prune_variants(session, baseline, scores)
    _decompose_variants(session, baseline)
    trp_ranks = _trp_variant(session, baseline) if config.trp else {}
    with session.stages("latency"):
        _measure_latency(session.variants, session.built, session.example, config, session.notes)

    stages = session.stages
    results = {
        "config": dataclasses.asdict(config),
        "environment": _environment(session.device),
        "stages_s": stages.seconds,
        "total_s": round(sum(stages.seconds.values()), 1),
        "rows": session.variants,
        "layers": _layer_table(baseline, session.built, scores.get("energy"), trp_ranks),
        "verdict": criterion_verdict(session.variants, config.test_size),
        "notes": session.notes,
    }
    write_report(results, config.out, echo)
    return results


def _train_baseline(session: _Session) -> nn.Module:
    config = session.config
    with session.stages(f"train baseline {config.model} (width {config.width}), {config.epochs} epochs"):
        baseline = models.build(config.model, num_classes=10, width=config.width)
        train(baseline, session.train_loader, config.epochs, config.lr, session.device, weight_decay=_WEIGHT_DECAY,
              progress=config.progress, desc="baseline")
        session.add("baseline", baseline, "train")
    return baseline


def _score_channels(session: _Session, baseline: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """The baseline's channel scores by every criterion of the config (on the calibration batches)."""
    config = session.config
    scores = {}
    with session.stages(f"score channels by {', '.join(config.criteria)} on {config.calibration_batches} "
                        f"calibration batch(es)"):
        for criterion in config.criteria:
            options = {"seed": config.seed} if criterion == "random" else {}
            crit = scoring.get(criterion, **options)
            if hasattr(crit, "progress"):
                crit.progress = config.progress
            scores[criterion] = crit.scores(baseline, session.calibration if crit.needs_data else None)
    return scores


def _prune_variants(session: _Session, baseline: nn.Module, scores: Dict[str, Dict[str, torch.Tensor]]) -> None:
    from .pruning import prune  # at call time: channel pruning needs torch-pruning

    config = session.config
    for ratio in config.ratios:
        for criterion in config.criteria:
            name = f"pruned-{criterion}-{ratio:g}"
            with session.stages(f"prune {ratio:.0%} of channels by {criterion}, {session.steps}"):
                pruned, plan = prune(baseline, (session.example,), scores[criterion], ratio=ratio,
                                     progress=config.progress)
                session.recalibrate_and_finetune(name, pruned, "prune", plan, criterion=criterion, ratio=ratio)


def _decompose_variants(session: _Session, baseline: nn.Module) -> None:
    """Data-aware decomposition and weight SVD of the baseline at the config's FLOP budget."""
    config = session.config
    for name, label, data_kwargs in ((_DATA_AWARE, "data-aware", {"data": session.calibration}),
                                     (_WEIGHT_SVD, "weight SVD", {})):
        with session.stages(f"decompose ({label}) to {config.decompose_flops:.0%} of the FLOPs, {session.steps}"):
            decomposed, plan, session.reports[name] = decompose(
                baseline, target_flops=config.decompose_flops, example_inputs=(session.example,),
                progress=config.progress, **data_kwargs)
            session.recalibrate_and_finetune(name, decomposed, "decompose", plan, from_raw=name == _DATA_AWARE,
                                             method=label, target_flops=config.decompose_flops,
                                             dense_layers=sorted(session.reports[name].get("skipped", {})))


def _trp_variant(session: _Session, baseline: nn.Module) -> Dict[str, int]:
    """Train a copy of the baseline with TRP, decompose it at the trained ranks; returns those ranks."""
    config = session.config
    with session.stages(f"train with TRP (energy {config.energy}) {config.trp_epochs} epoch(s), decompose, "
                        f"{session.steps}"):
        trained = copy.deepcopy(baseline)
        pruner = TrainedRankPruner(trained, energy=config.energy, lam=config.trp_lam)
        train(trained, session.train_loader, config.trp_epochs, config.finetune_lr, session.device, pruner=pruner,
              weight_decay=_WEIGHT_DECAY, progress=config.progress, desc="trp")
        trp_model, plan = pruner.finalize(example_inputs=(session.example,), progress=config.progress)
        trp_ranks = {k: int(v) for k, v in pruner.ranks().items()}
        session.recalibrate_and_finetune("trp", trp_model, "trp", plan, energy=config.energy)
    return trp_ranks


def _environment(device: torch.device) -> Dict[str, object]:
    from rankprune.benchmark import environment

    env = {"cpu": environment("cpu")}
    if torch.cuda.is_available():
        env["cuda"] = environment("cuda")
    return env


def _measure_latency(rows: List[Dict[str, object]], built: Dict[str, nn.Module], example: torch.Tensor,
                     config: DemoConfig, notes: List[str]) -> None:
    from rankprune.benchmark import latency
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
    """Per conv layer of the baseline: channels, mean channel energy, full rank, the rank of each decomposed
    variant (None where that variant kept the layer dense), TRP ranks, channels kept by energy pruning."""
    rows = []
    for name in _conv_names(baseline):
        conv = baseline.get_submodule(name)
        full = min(conv.out_channels, conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1])
        row = {"layer": name, "out_channels": conv.out_channels, "full_rank": full}
        if energy_scores is not None and name in energy_scores:
            row["energy"] = float(torch.as_tensor(energy_scores[name]).float().mean())
        for variant, key in ((_DATA_AWARE, "decomposed_rank"), (_WEIGHT_SVD, "decomposed_svd_rank")):
            if variant in built:
                row[key] = getattr(_get(built[variant], name), "rank", None)
        if name in trp_ranks:
            row["trp_rank"] = trp_ranks[name]
        for variant, model in built.items():
            if variant.startswith("pruned-energy-"):
                sub = _get(model, name)
                row[f"kept_{variant[len('pruned-energy-'):]}"] = getattr(sub, "out_channels", None)
        rows.append(row)
    return rows


def criterion_verdict(rows: List[Dict[str, object]], test_size: int) -> List[str]:
    """Which pruning criterion won at each ratio (after fine-tuning), what it looks at, whether it already
    led before fine-tuning, and whether its margin exceeds the noise of one run on ``test_size`` images."""
    lines = []
    ratios = sorted({r["ratio"] for r in rows if r["stage"] == "prune"})
    for ratio in ratios:
        mine = sorted((r for r in rows if r["stage"] == "prune" and r["ratio"] == ratio),
                      key=lambda r: r["accuracy"], reverse=True)
        if len(mine) < 2:
            continue
        win, second = mine[0], mine[1]
        by_recal = max(mine, key=lambda r: r["accuracy_recalibrated"])
        others = ", ".join(f"{r['criterion']} {100 * r['accuracy']:.1f}" for r in mine[1:])
        p = win["accuracy"]
        # 95% half-width of the difference of two accuracies near p on the same number of test images.
        noise = 100 * 1.96 * math.sqrt(2 * p * (1 - p) / test_size)
        margin = 100 * (win["accuracy"] - second["accuracy"])
        gain = sum(r["accuracy_recalibrated"] - r["accuracy_raw"] for r in mine) / len(mine)
        text = (f"At {ratio:.0%} of the channels, **{win['criterion']}** won: {100 * win['accuracy']:.1f}% after "
                f"fine-tuning ({others}). It {_WHAT_IT_SEES.get(win['criterion'], 'is a custom criterion')}. ")
        if by_recal is win:
            text += (f"It already led after recalibration alone ({100 * win['accuracy_recalibrated']:.1f}%), so "
                     "the channels it chose, not the fine-tuning, decided it. ")
        else:
            text += (f"Before fine-tuning (recalibrated) {by_recal['criterion']} led "
                     f"({100 * by_recal['accuracy_recalibrated']:.1f}% against "
                     f"{100 * win['accuracy_recalibrated']:.1f}%): fine-tuning reordered them. ")
        text += (f"Its margin over {second['criterion']}, {margin:.1f} points, is "
                 + ("within" if margin < noise else "beyond")
                 + f" the noise of one run on {test_size} test images (about {noise:.1f} points at 95%)"
                 + (": treat them as tied. " if margin < noise else ". ")
                 + f"Recalibrating BatchNorm alone recovered {100 * gain:+.1f} points on average over the criteria.")
        energy = next((i for i, r in enumerate(mine) if r["criterion"] == "energy"), None)
        if energy:  # present and not the winner
            text += (f" Energy came {_ORDINALS[min(energy, len(_ORDINALS) - 1)]}: it measures how large a "
                     "channel's maps are, but recalibration absorbs the constant part of what a removed channel "
                     "contributed, so what is lost is its variation, which |gamma| and Taylor measure more "
                     "directly (docs/pruning.md).")
        lines.append(text)
    return lines


def _get(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def summary_table(results: Dict[str, object]) -> str:
    """The demo's one table: params, FLOPs, accuracy (as compressed, after BN recalibration, after
    fine-tuning) and latency of every variant (Markdown)."""
    from rankprune.benchmark import markdown_table

    rows = results["rows"]
    base = rows[0]
    has_gpu = any("cuda_ms" in r for r in rows)
    headers = ["variant", "params", "MFLOPs", "FLOPs kept", "compressed %", "recalibrated %", "fine-tuned %",
               "CPU ms"] + (["GPU ms"] if has_gpu else [])

    def percent(value):
        return None if value is None else 100 * value

    body = []
    for r in rows:
        line = [r["variant"], r["params"], r["flops"] / 1e6, r["flops"] / base["flops"],
                percent(r.get("accuracy_raw")), percent(r.get("accuracy_recalibrated")), 100 * r["accuracy"],
                r.get("cpu_ms")]
        if has_gpu:
            line.append(r.get("cuda_ms"))
        body.append(line)
    return markdown_table(headers, body)


def _rank_panel(layers: List[Dict[str, object]]) -> Dict[str, object]:
    """Ranks per layer: the full rank, each decomposed variant's rank only where it factored the layer (its
    layers kept dense marked apart, at their full rank), TRP's energy rank."""
    panel: Dict[str, object] = {"ylabel": "rank", "series": {"full rank": [row["full_rank"] for row in layers]},
                                "points": []}
    for key, label in (("decomposed_rank", "data-aware decomposition"), ("decomposed_svd_rank", "weight SVD")):
        if not any(key in row for row in layers):
            continue
        panel["series"][f"{label}: rank"] = [row.get(key) for row in layers]
        dense = [row["full_rank"] if key in row and row[key] is None else None for row in layers]
        if any(v is not None for v in dense):
            panel["series"][f"{label}: kept dense"] = dense
            panel["points"].append(f"{label}: kept dense")
    if any("trp_rank" in row for row in layers):
        panel["series"]["TRP energy rank"] = [row.get("trp_rank") for row in layers]
    return panel


def write_report(results: Dict[str, object], out: str, echo: Callable[[str], None] = print) -> None:
    """Write ``results.json``, ``report.md`` and the plots into ``out`` and print the summary table."""
    from rankprune import plots

    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = summary_table(results)
    env = results["environment"]["cpu"]
    where = f"CPU: {env['device']}" + (f"; GPU: {results['environment']['cuda']['device']}"
                                        if "cuda" in results["environment"] else "")
    rows = results["rows"]
    points = [{"series": "baseline", "flops": rows[0]["flops"], "accuracy": rows[0]["accuracy"]}]
    points += [{"series": f"prune: {r['criterion']}", "flops": r["flops"], "accuracy": r["accuracy"]}
               for r in rows if r["stage"] == "prune"]
    points += [{"series": f"decompose: {r['method']}" if r["stage"] == "decompose" else r["stage"],
                "flops": r["flops"], "accuracy": r["accuracy"]}
               for r in rows if r["stage"] in ("decompose", "trp")]
    cfg = results["config"]
    title = f"{cfg['model']} (width {cfg['width']}) on synthetic CIFAR"
    made = [plots.accuracy_vs_flops(points, os.path.join(out, "accuracy_vs_flops.png"),
                                    title + ", after fine-tuning")]
    layers = results["layers"]
    panels = [_rank_panel(layers)]
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
          "Accuracy on the test images as each model comes out of `prune` / `decompose` (compressed), after "
          "re-estimating its BatchNorm statistics on the calibration batches (recalibrated: what "
          "`prune(data=...)` returns by default), and after fine-tuning (from the recalibrated model; the "
          "data-aware decomposition from the model as `decompose(data=...)` returns it, not recalibrated). The "
          "baseline's weights are `plans/baseline.pt`. Latency: median of repeated single-image forward "
          "passes (`rankprune.benchmark.latency`).", ""]
    verdict = results.get("verdict") or []
    if verdict:
        md += ["## Which criterion won", ""] + [f"- {line}" for line in verdict] + [""]
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
    for line in verdict:
        echo(line.replace("**", ""))
    for n in notes:
        echo(f"note: {n}")
    echo(f"total {results['total_s']:.1f} s; report in {out}/ (report.md, results.json"
         + (", accuracy_vs_flops.png, layers.png" if None not in made else "") + ", plans/)")
