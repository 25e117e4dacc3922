""":func:`prune`: score, prune a copy at a channel ratio, a FLOP target or a latency target, reconstruct,
recalibrate, describe it in a plan."""
import copy
import math
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import scoring
from .._inputs import call_model, check_data, check_finite_weights, check_fraction, eval_mode, removed_after, reusable
from .._inputs import progress as progress_bar
from ..fidelity import RULE, divergences, select, split_holdout
from ..latency import LatencyModel, latency_settings, reference_timer, verify
from ..plan_format import PLAN_VERSION
from ..report import count_flops
from ..training import recalibrate as recalibrate_batchnorm
from ._by_ratio import prune_by_ratio
from ._errors import PruningError
from ._importance import Scores
from ._latency import measured_ratio_for_latency
from ._output_error import OutputError
from ._plan import apply_prune_plan
from ._reconstruct import DEFAULT_DAMPING, reconstruct as reconstruct_consumers

# The criterion of prune(..., data=...) without one named, and without data (docs/pruning.md has the
# measurements behind the choice).
DEFAULT_CRITERION = "output_error"
DATA_FREE_CRITERION = "l1"
# criterion="auto": the pipelines it compares, (criterion, global_ranking), each with the reconstruction.
AUTO = "auto"
AUTO_CANDIDATES = (("output_error", True), ("output_error", False), ("l1", False), ("bn_scale", False))


def prune(  # long: a 70-line docstring documents every argument; the body is the pipeline, ~55 lines
    model: nn.Module,
    example_inputs: Any,
    criterion_or_scores: Union[str, scoring.Criterion, Scores, None] = None,
    *,
    data: Optional[Iterable] = None,
    ratio: Optional[float] = None,
    target_flops: Optional[float] = None,
    target_latency: Optional[float] = None,
    global_ranking: Optional[bool] = None,
    ignored_layers: Optional[Sequence[Union[str, nn.Module]]] = None,
    ignore_output_layer: bool = True,
    round_to: Optional[int] = None,
    max_layer_ratio: float = 0.9,
    reconstruct: Optional[bool] = None,
    damping: float = DEFAULT_DAMPING,
    recalibrate: bool = True,
    cache_bytes: Optional[int] = None,
    runtime: Optional[str] = None,
    measure_latency: Optional[bool] = None,
    inplace: bool = False,
    progress: bool = True,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Remove the least important conv output channels (and everything coupled to them).

    Args:
        model: the network; pruned in place when ``inplace``, else a deep copy is pruned.
        example_inputs: inputs for one forward (tensor, tuple or dict) to trace the dependency graph and
            count FLOPs; a batch of 1 is enough.
        criterion_or_scores: a criterion name (see ``rankprune.scoring``), a Criterion, or precomputed
            scores ``{conv_name: [out_channels]}`` of this model. Default: ``DEFAULT_CRITERION`` with
            ``data`` (the best pipeline measured, docs/pruning.md), ``DATA_FREE_CRITERION`` without.
            ``"auto"`` prunes with each pipeline of ``AUTO_CANDIDATES`` on the first three quarters of the
            calibration batches, compares them on the last quarter by the divergence of the outputs from the
            dense model's (``rankprune.fidelity``: KL of the logits, label-free), and returns the default
            pipeline (the first) unless another is clearly closer (``fidelity.select``: beyond the noise of
            the held-out samples), run again on all the data; ``plan["auto"]`` holds the comparison.
        data: calibration batches (a list or DataLoader; see :func:`rankprune.recalibrate` for the batch
            forms): scored by data-driven criteria (energy, hrank, taylor), then, with ``recalibrate``, used
            to re-estimate the BatchNorm statistics of the pruned model. Iterated twice in that case, so a
            one-shot iterator (a generator) is read into a list first, as every verb does.
        ratio: fraction of channels to remove, in [0, 1) (see the module doc).
        target_flops: fraction of the original FLOPs to keep, in (0, 1]; exclusive with ``ratio``.
        target_latency: fraction of the dense model's latency to reach, in (0, 1], measured in ``runtime`` on
            the model's device with ``example_inputs`` (their batch size counts); exclusive with ``ratio`` and
            ``target_flops``. The dense model's layers are timed in context (``rankprune.latency``, cached on
            disk), the channel ratio is searched on the latency the timings predict for each pruned structure
            (``pruning._latency``); unless ``measure_latency=False``, the copy pruned at that ratio is timed
            end to end against dense and, where it missed the target (or beat it by more than 5%), the search
            is redone on a goal corrected by the measured error (at most 4 structures measured,
            ``rankprune.latency.meet_measured``). The model is pruned at the chosen ratio and measured end to
            end against dense (``plan["latency"]``, with a warning when the target is missed;
            ``plan["latency_search"]`` holds the search and its ``measured_tries``). ValueError naming the closest predicted latency when ``max_layer_ratio`` cannot reach
            it. ``output_error`` (the default with data) then allocates by output error per measured
            millisecond saved instead of per FLOP (each layer's FLOPs weighted by its measured time per FLOP);
            other criteria keep their scores and allocation.
        global_ranking: rank all groups together (a single threshold) instead of pruning each group by
            ``ratio``. Default: True for criteria whose scores compare across layers (``output_error``: the
            allocation then follows measured output error per FLOP saved), else False (uniform ratios).
        ignored_layers: modules or module names never pruned (nor anything tied to their output channels).
        ignore_output_layer: also ignore the layer(s) producing the model output (the classifier).
        round_to: keep a multiple of this many channels in each pruned group (default: none, or with
            ``target_latency`` the multiple a measured sweep of channel counts finds rewarded, ``plan["round_to"]``).
        max_layer_ratio: no group loses more than this fraction of its channels (and at least one stays).
        reconstruct: refit, by least squares on ``data``, every layer whose input channels were removed so that
            its output matches the dense model's (``pruning._reconstruct``; docs/pruning.md says which layers
            are refitted and which are not). Default: True when ``data`` is given; True without ``data`` is
            an error.
        damping: ridge damping of the reconstruction, relative to the mean diagonal of each layer's input Gram
            (0: exact least squares).
        recalibrate: when ``data`` is given, re-estimate every BatchNorm's running statistics of the pruned
            model on it (:func:`rankprune.recalibrate`), once, after the FLOP-target search. Removing
            channels shifts the statistics of the layers after them; without recalibration the pruned
            model keeps the original network's statistics and loses far more accuracy.
        cache_bytes: memory the reconstruction's calibration engine may keep (``rankprune.calibration``).
        runtime: where the pruned model's latency is measured against the dense model's: ``"eager"``
            (default; the model's device), ``"cuda_graph"`` or ``"onnxruntime"`` (``rankprune.latency``).
        measure_latency: time the pruned model against the dense one on ``example_inputs`` and put the
            result (median, spread, runtime, device, batch) in ``plan["latency"]``, with a warning when it
            is not faster (None: whenever ``target_flops``, ``target_latency`` or ``runtime`` is given);
            False also leaves a latency target on the prediction alone.
        inplace: prune ``model`` itself (else ``model`` is left as it was: weights, buffers, flags). A copy is
            pruned first either way, so a refusal (``PruningError``) leaves ``model`` as it was.
        progress: progress bars (scoring, FLOP-target search).

    Returns:
        ``(pruned_model, plan)``; the plan is plain data (module doc) for :func:`apply_prune_plan`.
    """
    if data is not None:
        check_data(data)  # an empty list or loader fails here, not after the pruning
    ratio, target_flops, target_latency, max_layer_ratio = _check_arguments(
        model, ratio, target_flops, target_latency, max_layer_ratio, round_to)
    if isinstance(criterion_or_scores, str) and criterion_or_scores == AUTO:
        options = dict(ratio=ratio, target_flops=target_flops, target_latency=target_latency,
                       ignored_layers=ignored_layers,
                       ignore_output_layer=ignore_output_layer, round_to=round_to, max_layer_ratio=max_layer_ratio,
                       reconstruct=reconstruct, damping=damping, recalibrate=recalibrate, cache_bytes=cache_bytes)
        return _auto(model, example_inputs, data, global_ranking, inplace, progress, options,
                     dict(runtime=runtime, measure_latency=measure_latency))
    runtime, measure_latency = latency_settings(model, target_flops, target_latency, runtime, measure_latency,
                                                example_inputs)
    dense = copy.deepcopy(model) if measure_latency and inplace else model
    # one timer of the dense model for the closed loop and the final check (ONNX Runtime: one export)
    dense_timer = reference_timer(dense, example_inputs, runtime) if measure_latency else None
    reconstruct = _check_reconstruct(reconstruct, damping, data)
    recalibrate = bool(recalibrate) and data is not None
    if data is not None and (recalibrate or reconstruct):  # read more than once: a generator becomes a list
        data = reusable(data)
    if criterion_or_scores is None:
        criterion_or_scores = DEFAULT_CRITERION if data is not None else DATA_FREE_CRITERION
    latency_model = None
    if target_latency is not None:  # the dense model timed before any change (and, for output_error, scoring)
        with eval_mode(model):
            latency_model = LatencyModel.measure(model, example_inputs, runtime, progress=progress)
    criterion_name, scores, data, comparable = _scores(model, criterion_or_scores, data, recalibrate, progress,
                                                       latency_model)
    if global_ranking is None:
        global_ranking = comparable
    flags = {name: m.training for name, m in model.named_modules()}
    unpruned: Dict[str, str] = {}
    with eval_mode(model, no_grad=False):  # no_grad=False: Torch-Pruning traces the graph through autograd
        base_flops = count_flops(model, example_inputs)
        base_params = sum(p.numel() for p in model.parameters())
        ignored_names = _ignored_names(model, example_inputs, ignored_layers, ignore_output_layer)
        latency_search = None
        if latency_model is not None:  # the ratio that meets the latency target
            if round_to is None:
                round_to = latency_model.channel_multiple([n for n in scores if n in latency_model.layers])
            search_pruner = _pruner(example_inputs, scores, global_ranking, ignored_names, round_to, max_layer_ratio,
                                    {}, normalize=not comparable)
            ratio, latency_search = measured_ratio_for_latency(model, example_inputs, search_pruner, latency_model,
                                                               target_latency, max_layer_ratio, dense_timer)
        attempt = _pruner(example_inputs, scores, global_ranking, ignored_names, round_to, max_layer_ratio,
                          unpruned, normalize=not comparable)
        pruned, kept, flops, ratio = _prune_copy(model, attempt, ratio, target_flops, base_flops, max_layer_ratio,
                                                 progress)
    reconstruction = None
    if reconstruct:  # on the copy, against the caller's (still dense) model
        reconstruction = reconstruct_consumers(model, pruned, kept, data, damping=damping, cache_bytes=cache_bytes,
                                               progress=progress)
        for name, entry in reconstruction["layers"].items():
            if entry.get("bias") == "added":
                kept[name]["bias_added"] = True
        if reconstruction["fallback"]:
            lines = "".join(f"\n  {name}: {why}" for name, why in sorted(reconstruction["fallback"].items()))
            warnings.warn(f"prune: {len(reconstruction['fallback'])} layer(s) whose input channels were removed are "
                          f"not reconstructed (kept as sliced):{lines}", stacklevel=2)
    if recalibrate:  # on the copy too: a failure (NaN in the data) leaves the caller's model as it was
        recalibrate_batchnorm(pruned, data, progress=progress)
    if inplace:  # the caller's model is cut only once a copy was pruned without error
        apply_prune_plan(model, {"method": "prune", "version": PLAN_VERSION, "layers": kept})
        model.load_state_dict(pruned.state_dict())
        pruned = model
    for name, m in pruned.named_modules():  # the copies were made in eval mode: every module's own flag back
        m.training = flags.get(name, m.training)
    _warn_unpruned(unpruned)
    _warn_tied(scores, kept)
    plan = {"method": "prune", "version": PLAN_VERSION, "layers": kept, "criterion": criterion_name,
            "ratio": ratio, "target_flops": target_flops, "target_latency": target_latency,
            "global_ranking": bool(global_ranking),
            "round_to": round_to, "ignored_layers": ignored_names, "reconstruction": reconstruction,
            "recalibrated": recalibrate, "flops": [base_flops, flops],
            "params": [base_params, sum(p.numel() for p in pruned.parameters())]}
    if latency_search is not None:
        latency_search.update(profiling_s=latency_model.profiling_s, layers_measured=latency_model.measured,
                              layers_cached=latency_model.cached,
                              allocation=("output error per measured millisecond saved"
                                          if criterion_name == OutputError.name and isinstance(criterion_or_scores, str)
                                          else f"the scores of {criterion_name}"))
        plan["latency_search"] = latency_search
    if measure_latency:
        plan["latency"] = verify(dense, pruned, example_inputs, runtime, target=target_latency, verb="prune",
                                 dense_timer=dense_timer)
        if latency_model is not None:
            plan["latency"]["predicted_ratio"] = latency_model.predict(pruned) / latency_model.dense_ms
    return pruned, plan


def _auto(model: nn.Module, example_inputs: Any, data: Optional[Iterable], global_ranking: Optional[bool],
          inplace: bool, progress: bool, options: Dict[str, Any], timing: Dict[str, Any]
          ) -> Tuple[nn.Module, Dict[str, Any]]:
    """``criterion="auto"`` (see :func:`prune`); ``timing``: the latency options, for the final run only."""
    if data is None:
        raise ValueError('criterion="auto" needs data: it compares pipelines on held-out calibration batches')
    if global_ranking is not None:
        raise ValueError('criterion="auto" chooses global_ranking with the criterion: leave global_ranking unset')
    fit, held = split_holdout(data, "prune")
    compared, per_sample = [], []
    for criterion, ranking in progress_bar(AUTO_CANDIDATES, "prune: comparing pipelines", progress, unit="pipeline"):
        pruned, _ = prune(model, example_inputs, criterion, data=fit, global_ranking=ranking, progress=False,
                          measure_latency=False, **options)
        per_sample.append(divergences(model, pruned, held))
        compared.append({"criterion": criterion, "global_ranking": ranking,
                         "divergence": float(per_sample[-1].mean())})
        del pruned
    chosen, closer = select(per_sample, 0)  # the default pipeline is the reference
    for c, flag in zip(compared, closer):
        c["clearly_closer"] = flag
    best = compared[chosen]
    pruned, plan = prune(model, example_inputs, best["criterion"], data=fit + held,
                         global_ranking=best["global_ranking"], inplace=inplace, progress=progress, **options, **timing)
    plan["auto"] = {"candidates": compared, "chosen": best["criterion"], "held_out_batches": len(held),
                    "measure": "mean KL(dense || pruned) of the output logits per held-out sample",
                    "reference": compared[0]["criterion"], "rule": RULE}
    return pruned, plan


def _check_reconstruct(reconstruct: Optional[bool], damping: float, data: Optional[Iterable]) -> bool:
    """Whether to reconstruct (default: when there are data); refuses reconstruct=True without data and a bad
    damping before any work."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (math.isfinite(damping)
                                                                                 and damping >= 0):
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    if reconstruct is None:
        return data is not None
    if reconstruct and data is None:
        raise ValueError("reconstruct=True needs data: the calibration batches the pruned layers are refitted on")
    return bool(reconstruct)


def _check_arguments(model: nn.Module, ratio: Optional[float], target_flops: Optional[float],
                     target_latency: Optional[float], max_layer_ratio: float, round_to: Optional[int]
                     ) -> Tuple[Optional[float], Optional[float], Optional[float], float]:
    """Refuse arguments out of range, a model without convs and non-finite weights before any work; the
    fractions as floats."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if sum(x is not None for x in (ratio, target_flops, target_latency)) != 1:
        raise ValueError("give exactly one of ratio (fraction of channels to remove), target_flops (fraction of "
                         "FLOPs to keep) and target_latency (fraction of the dense latency to reach)")
    if ratio is not None:
        ratio = check_fraction("ratio", ratio, low_open=False, high_open=True)
    if target_flops is not None:
        target_flops = check_fraction("target_flops", target_flops)
    if target_latency is not None:
        target_latency = check_fraction("target_latency", target_latency)
    max_layer_ratio = check_fraction("max_layer_ratio", max_layer_ratio, low_open=False, high_open=True)
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    scoring.conv_layers(model)  # a model without convs is refused here, before any work
    check_finite_weights(model, "prune")  # before any score or data can be blamed for a NaN
    return ratio, target_flops, target_latency, max_layer_ratio


def _scores(model: nn.Module, criterion_or_scores, data: Optional[Iterable], recalibrate: bool,
            progress: bool, latency_model: Optional[LatencyModel]) -> Tuple[str, Scores, Optional[Iterable], bool]:
    """The criterion's name (``"scores"`` for precomputed scores), the checked scores of ``model``, ``data``
    (read into a list if it is a one-shot iterator that is both scored and recalibrated on), and whether the
    scores compare across layers (a criterion's ``comparable``). ``output_error`` named with a latency model
    scores per millisecond saved."""
    crit = None if isinstance(criterion_or_scores, dict) else _criterion(criterion_or_scores, latency_model)
    if crit is None:
        return "scores", scoring.check_scores(model, criterion_or_scores), data, False
    if recalibrate and crit.needs_data:
        data = reusable(data)
    if hasattr(crit, "progress"):
        crit.progress = crit.progress and progress
    comparable = bool(getattr(crit, "comparable", False))
    return crit.name, scoring.check_scores(model, crit.scores(model, data)), data, comparable


def _criterion(criterion: Union[str, scoring.Criterion], latency_model: Optional[LatencyModel] = None
               ) -> scoring.Criterion:
    """A criterion by name: ``scoring``'s, or pruning's own ``output_error`` (costs in the milliseconds of
    ``latency_model`` when given)."""
    if isinstance(criterion, str) and criterion == OutputError.name:
        return OutputError(latency_model=latency_model)
    if isinstance(criterion, str) and criterion not in scoring.CRITERIA:
        names = sorted([*scoring.CRITERIA, OutputError.name, AUTO])
        raise ValueError(f"unknown criterion {criterion!r}: expected one of {names}")
    return scoring.get(criterion)


def _ignored_names(model: nn.Module, example_inputs: Any, ignored_layers, ignore_output_layer: bool) -> List[str]:
    """Names of the modules never pruned: ``ignored_layers``, and the output layer(s) if asked."""
    ignored_modules = set(_resolve_ignored(model, ignored_layers))
    if ignore_output_layer:
        ignored_modules.update(_output_layers(model, example_inputs))
    return [n for n, m in model.named_modules() if m in ignored_modules]


def _resolve_ignored(model: nn.Module, ignored_layers) -> List[nn.Module]:
    if ignored_layers is None:
        return []
    modules = dict(model.named_modules())
    out = []
    for item in ignored_layers:
        if isinstance(item, str):
            if item not in modules:
                raise ValueError(f"ignored_layers: {item!r} is not a module of the model")
            out.append(modules[item])
        elif isinstance(item, nn.Module):
            out.append(item)
        else:
            raise TypeError(f"ignored_layers must hold module names or modules, got {type(item).__name__}")
    return out


def _output_layers(model: nn.Module, example_inputs: Any) -> List[nn.Module]:
    """Conv/Linear layers whose output is the model's output (the classifier), by one probe forward;
    the last such layer called if the output went through functional ops after it."""
    called: List[Tuple[nn.Module, Tensor]] = []
    handles = [m.register_forward_hook(lambda m, i, o: called.append((m, o)))
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with removed_after(handles):
        with torch.no_grad():
            out = call_model(model, example_inputs)
    outs = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
    ids = {id(t) for t in outs if isinstance(t, Tensor)}
    direct = [m for m, o in called if id(o) in ids]
    if direct:
        return direct
    return [called[-1][0]] if called else []


def _pruner(example_inputs: Any, scores: Scores, global_ranking: bool, ignored_names: List[str],
            round_to: Optional[int], max_layer_ratio: float, unpruned: Dict[str, str], normalize: bool):
    """``attempt(ratio, model, dither=False) -> (kept indices per layer, FLOPs)``: prunes ``model`` in place at
    the channel ratio; the groups it leaves unpruned are named in ``unpruned``. ``normalize``: see
    ``ScoreImportance``."""
    def attempt(r: float, target: nn.Module, dither: bool = False):
        ignored = [target.get_submodule(n) for n in ignored_names]
        kept = prune_by_ratio(target, example_inputs, scores, r, global_ranking, ignored, round_to,
                              max_layer_ratio, dither, unpruned, normalize)
        return kept, _pruned_flops(target, example_inputs)

    return attempt


def _prune_copy(model: nn.Module, attempt, ratio: Optional[float], target_flops: Optional[float],
                base_flops: int, max_layer_ratio: float, progress: bool):
    """A pruned copy of ``model`` at ``ratio``, or at the ratio that meets ``target_flops``: ``(pruned, kept
    indices per layer, its FLOPs, the ratio)``; ``attempt`` from :func:`_pruner`."""
    if ratio is not None:
        pruned = copy.deepcopy(model)
        kept, flops = attempt(ratio, pruned)
        return pruned, kept, flops, ratio
    return _search_flops(model, attempt, base_flops, target_flops, max_layer_ratio, progress)


def _pruned_flops(pruned: nn.Module, example_inputs: Any) -> int:
    """FLOPs of the pruned model; a forward that now fails is a PruningError (a channel count kept as a
    plain attribute, such as torchvision ViT's ``hidden_dim``, no longer matches the sliced layers)."""
    try:
        return count_flops(pruned, example_inputs)
    except Exception as exc:
        raise PruningError(
            f"the pruned {type(pruned).__name__} no longer runs ({type(exc).__name__}: {exc}); the model probably "
            "keeps a channel count outside its layers (an attribute or constant used in forward, like "
            "torchvision ViT's hidden_dim): pass the layers that set it as ignored_layers") from exc


def _search_flops(model, attempt, base_flops: int, target: float, max_layer_ratio: float, progress: bool):
    """The channel ratio whose pruned model keeps the fraction of ``base_flops`` closest to ``target`` (within
    2% relative, else the closest of the tries). Each try prunes a copy, so tries are few: a conv's FLOPs scale
    with its input times its output channels, so sqrt(FLOPs kept) is close to linear in the ratio. The first
    try is ``1 - sqrt(target)``, the next ones secant steps on sqrt(FLOPs kept), kept inside the bracket of
    the tries so far (bisection when a step would leave it)."""
    best = None

    def consider(r):
        nonlocal best
        candidate = copy.deepcopy(model)
        kept, flops = attempt(r, candidate, dither=True)
        err = abs(flops / base_flops - target)
        if best is None or err < best[0]:
            best = (err, candidate, kept, flops, r)
        return flops / base_flops

    lo, hi = 0.0, max_layer_ratio
    steps = range(24)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"searching ratio for {100 * target:.1f}% FLOPs", leave=False)
    if target >= 1.0:
        consider(0.0)
    else:
        tries = [(0.0, 1.0)]  # (ratio, sqrt(FLOPs kept)): nothing removed keeps everything
        r = min(max(1.0 - math.sqrt(target), 1e-3), hi)
        for _ in steps:
            kept_fraction = consider(r)
            if abs(kept_fraction / target - 1) <= 0.02:
                break
            if kept_fraction > target:
                lo = r
            else:
                hi = r
            if hi - lo < 1e-4:
                break
            tries.append((r, math.sqrt(kept_fraction)))
            (r1, s1), (r2, s2) = tries[-2], tries[-1]
            r = r2 + (math.sqrt(target) - s2) * (r2 - r1) / (s2 - s1) if s2 != s1 else lo
            if not lo < r < hi:
                r = 0.5 * (lo + hi)
    _, pruned, kept, flops, r = best
    return pruned, kept, flops, r


def _warn_unpruned(unpruned: Dict[str, str]) -> None:
    if unpruned:
        lines = "".join(f"\n  {name}: {reason}" for name, reason in sorted(unpruned.items()))
        warnings.warn(f"prune: {len(unpruned)} channel group(s) left unpruned (named by their first layer):{lines}",
                      stacklevel=3)


def _warn_tied(scores: Scores, kept: Dict[str, Dict[str, Any]]) -> None:
    """Warn once about pruned layers whose scores are all equal: which of their channels go is arbitrary."""
    tied = sorted(name for name, s in scores.items()
                  if len(s) > 1 and bool((s == s[0]).all()) and "out_channels_kept" in kept.get(name, {}))
    if tied:
        warnings.warn(f"prune: the scores of {len(tied)} pruned layer(s) are all equal, so which of their channels "
                      f"were removed is arbitrary (a criterion that cannot tell them apart, e.g. bn_scale without a "
                      f"BatchNorm, or dead layers): {', '.join(tied)}", stacklevel=3)
