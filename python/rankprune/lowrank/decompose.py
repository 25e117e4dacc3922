"""``decompose``: the pipeline of a decomposition, each step in a module of this package (selection, the
calibration passes, factoring, allocation, surgery), and its argument checks."""
import copy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import training
from .._inputs import (batch_inputs, check_finite_weights, check_fraction, first_samples, model_device_dtype,
                      reusable, to_device)
from ..calibration import Calibration, PhaseClock
from ..latency import LatencyModel, latency_settings, reference_timer
from ..nn import SCHEMES
from ..plan_format import PLAN_VERSION
from . import allocation
from .allocation import DEFAULT_MIN_RANK, allocate, check_min_rank, resolve_min_rank
from .cost import Candidate
from .factoring import DEFAULT_DAMPING, factor, refit_factors, whitened_factors
from .latency_budget import NOT_FASTER, measured_latency, measured_latency_ranks, not_faster
from .measure import rel_error, run_example
from .passes import MAX_COVARIANCE_DIM, collect_statistics, drop_dense_rows, measure_sensitivities, refit_stage
from .selection import select
from .surgery import dense_reason, plan_entry, replace, report_entry, set_submodule


def decompose(  # long: a 100-line docstring documents every argument; the body is the pipeline, ~65 lines
    model: nn.Module,
    *,
    ranks: Optional[Dict[str, int]] = None,
    energy: Optional[float] = None,
    rank_ratio: Optional[float] = None,
    target_flops: Optional[float] = None,
    target_params: Optional[float] = None,
    target_latency: Optional[float] = None,
    runtime: Optional[str] = None,
    measure_latency: Optional[bool] = None,
    scheme: str = "channel",
    include: Union[str, Sequence[str], None] = None,
    exclude: Union[str, Sequence[str], None] = None,
    min_flop_saving: float = 0.0,
    example_inputs=None,
    data=None,
    recalibrate: Optional[bool] = None,
    min_rank: Union[int, float] = DEFAULT_MIN_RANK,
    rank_multiple: Optional[int] = None,
    damping: float = DEFAULT_DAMPING,
    asymmetric: bool = True,
    sensitivity: bool = True,
    cache_bytes: Optional[int] = None,
    inplace: bool = False,
    progress: bool = True,
) -> Tuple[nn.Module, dict, dict]:
    """Replace Conv2d/Linear layers of ``model`` by ``LowRankConv2d``/``LowRankLinear``.

    Exactly one way of choosing ranks:

    - ``ranks={name: rank}``: these layers at these ranks (taken as given: ``min_rank`` and ``rank_multiple``
      do not apply);
    - ``energy``: per layer the smallest rank keeping ``energy`` (in (0, 1]) of the squared singular values
      (with ``data``: of the layer's output energy on the calibration inputs);
    - ``rank_ratio``: per layer ``round(rank_ratio * full_rank)``;
    - ``target_flops`` / ``target_params``: a fraction in (0, 1] of the whole model's FLOPs (on
      ``example_inputs``, counted like FlopCounterMode) / parameters to keep; ranks are allocated across
      the layers to minimise the total normalised discarded energy ``sum_l sum_{i>r_l} s_i^2 / sum_i s_i^2``
      within the budget (greedy, within one rank step of it). With ``data`` that is the sum of the layers'
      relative output errors on the calibration inputs, each weighted (``sensitivity=True``, default) by the
      layer's measured sensitivity: the relative squared change of the model's output on a probe (the first
      samples of the first calibration batch, an eighth of all samples and at least 4) with only that layer
      decomposed at a probe rank, over its relative output error; without data, of their relative weight
      errors.
    - ``target_latency``: a fraction in (0, 1] of the dense model's latency measured in ``runtime``
      (:class:`rankprune.latency.LatencyModel`: each layer's candidate ranks timed alone at its input shape on
      ``example_inputs``, cached on disk); the same errors are allocated per measured millisecond saved
      (``allocation.allocate_latency``), among at most ``latency_budget.RANKS_PER_LAYER`` measured ranks per
      layer; layers with no rank faster than the dense layer stay dense. ValueError naming the closest
      reachable latency when the target is below it. Unless ``measure_latency=False``, the structure of the
      allocation is timed end to end against dense and, where it missed the target (or beat it by more
      than 5%), the allocation is redone on a goal corrected by the measured error (at most 4 structures,
      ``rankprune.latency.meet_measured``; ``report["latency_search"] = plan["latency_search"]``).

    ``energy``, ``rank_ratio`` and the budgets never give a layer less than ``min_rank`` (an int, or a fraction
    of the layer's full rank, rounded up; default 0.25) and only ranks that are multiples of ``rank_multiple``
    (e.g. 8 for tensor cores; a layer whose smallest allowed rank saves no FLOPs stays dense). ``rank_multiple``
    None (default) is 1, or with ``target_latency`` the multiple a measured sweep of ranks finds rewarded
    (``LatencyModel.rank_multiple``).

    ``runtime`` (None: "eager", PyTorch on the model's device; "cuda_graph"; "onnxruntime", the exported model
    in ONNX Runtime on the CPU, needs onnxruntime: ImportError with the install line) is where latency is
    measured. ``measure_latency`` (None: whenever ``target_flops``, ``target_latency`` or ``runtime`` is given
    and there are example inputs; True / False: always / never) times the result against the dense model
    (:func:`rankprune.latency.verify`: interleaved rounds) into ``report["latency"]`` and ``plan["latency"]``
    and warns, naming the gap, when it is not faster than dense or misses ``target_latency``.

    ``data`` (an iterable of calibration batches: tensors, ``(inputs, target)`` tuples whose first item is
    used, or dicts of keyword inputs; moved to the model's device) makes the decomposition data-aware: each
    layer's float64 input covariance ``C`` (im2col patches of a Conv2d with its stride, padding and dilation,
    subsampled to ``MAX_SAMPLES_PER_BATCH`` per batch; the input features of a Linear) is accumulated in one
    streaming pass, and the factors minimise the layer's output error ``||(W - W_r) X||_F`` through the
    SVD of ``W L``, ``C + damping * mean(diag C) * I = L L^T``. The spatial scheme stays weight-only (its second
    factor mixes the horizontal taps, so its output error is not one whitened SVD), as do layers with more
    than ``MAX_COVARIANCE_DIM`` inputs and layers the data never reaches; ``report["layers"][name]["method"]``
    says which. With ``asymmetric=True`` (default) each data-aware layer is then refitted, in forward order, to
    the dense layer's outputs from the inputs it receives once the layers before it are decomposed
    (``min ||W X - W_r H||_F``, Zhang et al.'s asymmetric reconstruction), in stages of layers that read the
    same input; each stage pass starts from cached outputs and stops at the stage's last input (see
    :mod:`rankprune.calibration`). ``cache_bytes`` bounds the memory the calibration engine keeps (default: a
    quarter of the memory available on the model's device, at most 8 GiB); what does not fit is recomputed.
    With ``data`` and ``recalibrate=True`` the BatchNorm statistics of
    the decomposed model are then re-estimated on ``data`` (``rankprune.training.recalibrate``; a model without
    BatchNorm is left as is and ``report["recalibrated"]`` is False). ``recalibrate=None`` (default)
    recalibrates unless data-aware factors were refitted (``asymmetric=True``): the refit makes each
    layer reproduce the dense layer's outputs, for which the existing statistics are the right ones, and each
    refit is computed on the inputs those statistics produce; re-estimating them afterwards undoes part of it.
    Measured (README, exp_quality): better without on ResNet-20 and MobileNetV2, worse without on the built-in
    concatenation model at 50% of the FLOPs; compare on validation data where it matters. A one-shot iterator
    is read into a list first (every pass must see the same batches; data that change between passes raise
    ValueError). Without ``example_inputs`` the first sample of the first batch of ``data`` serves as them,
    so FLOPs are per example, as ``prune`` counts them.

    Candidates are the ``nn.Conv2d`` (groups=1, zero padding) and ``nn.Linear`` modules whose names match an
    ``include`` pattern (all when None) and no ``exclude`` pattern (fnmatch style, e.g. ``"layer1.*"``); with
    ``ranks`` the candidates are its keys. A layer is skipped (and reported) when its rank would not save FLOPs,
    or would save less than ``min_flop_saving`` of its FLOPs. ``scheme`` ("channel" or "spatial") applies to
    convolutions; linear layers have one scheme ("channel"). ``example_inputs`` (a tensor, a tuple of
    positional arguments or a dict of keyword arguments) are needed for ``target_flops`` and for the FLOPs and
    errors of the report; the passes over inputs and data run in eval mode without gradients and leave the
    model's training flags as they were. ``inplace=False`` works on a deep copy: the caller's model is not
    changed, even when an error is raised. ``progress`` shows progress bars.

    Returns ``(model, plan, report)``: ``plan = {"method": "decompose", "version": 1, "layers": {name:
    {"kind": "conv2d"|"linear", "scheme": ..., "rank": r, "data_aware": bool}}}`` and ``report = {"layers":
    {name: {kind, scheme, method, rank, full_rank, energy_kept, params_dense, params, flops_dense, flops,
    rel_error, output_error, output_energy, sensitivity, refitted, damping}}, "skipped": {name: reason},
    "total": {params_dense, params, flops_dense, flops, output_rel_error}, "recalibrated": bool}``, plus,
    when latency is measured, ``report["latency"] = plan["latency"] = {runtime, device, batch, threads, dense,
    compressed (Timing dicts), ratio, ratio_p10, ratio_p90, rounds, target, warning}`` (with ``target_latency``
    also ``predicted_ms``, ``predicted_ratio``, ``profiling_s``, ``layers_measured``, ``layers_cached``).
    ``refitted`` says whether the asymmetric refit was kept; ``damping`` is the damping of the layer's data-aware
    fit (None for weight SVD): raised tenfold, up to ``REFIT_DAMPING_STEPS`` times, when the refit would make
    the weight more than ``MAX_REFIT_GROWTH`` times the dense one (an under-determined regression, e.g. a
    classifier with fewer calibration images than features), and the symmetric fit kept when that does not
    suffice. ``output_error`` and ``output_energy``
    (data-aware layers, else None) are ``||(W - W_r) X||_F^2`` and ``||W X||_F^2`` summed over the
    calibration columns (the dense model's inputs), in float64; ``sensitivity`` is the measured weight (1.0
    when not measured); ``energy_kept`` is ``1 - `` the normalised discarded energy above;
    ``rel_error`` is the layer's relative output error on ``example_inputs``. FLOPs and ``rel_error`` are None
    without example inputs. ``report["calibration"]`` gives the seconds, batches and peak memory of each phase
    (``statistics``, ``factorization``, ``sensitivity``, ``refit`` (stage passes), ``refit factorization``,
    ``replace``, ``recalibration``) and, with data, the cache budget, the number of batches and samples and
    notes (see :mod:`rankprune.calibration`).

    Raises ValueError for non-finite weights (named) before any data are run, for NaN or Inf in the calibration
    data or the activations (naming the batch that holds it, or the first module whose output does), and for
    empty data.
    """
    _check_arguments(model, ranks, energy, rank_ratio, target_flops, target_params, target_latency, scheme,
                     min_flop_saving, min_rank, rank_multiple, damping)
    data = None if data is None else reusable(data)
    example_inputs = _example_inputs(model, example_inputs, data)
    for arg, value in (("target_flops", target_flops), ("target_latency", target_latency)):
        if value is not None and example_inputs is None:
            raise ValueError(f"{arg} needs example_inputs (or data) to count FLOPs and time the model")
    runtime, measure_latency = latency_settings(model, target_flops, target_latency, runtime, measure_latency,
                                                example_inputs)
    dense = (model if not inplace else copy.deepcopy(model)) if measure_latency else None
    # one timer of the dense model for the closed loop and the final check (ONNX Runtime: one export)
    dense_timer = reference_timer(dense, example_inputs, runtime) if measure_latency else None
    model = model if inplace else copy.deepcopy(model)
    check_finite_weights(model, "decompose")
    layers, skipped = select(model, ranks, include, exclude, scheme, example_inputs)
    latency_model = latency_search = None
    if target_latency is not None:  # the dense model and its layers' shapes, timed before any change
        latency_model = LatencyModel.measure(model, example_inputs, runtime, layers=list(layers), progress=progress)
        if rank_multiple is None:
            rank_multiple = latency_model.rank_multiple(list(latency_model.layers))
    rank_multiple = rank_multiple or 1
    engine = None if data is None else Calibration(model, data, cache_bytes=cache_bytes, progress=progress,
                                                   name="decompose")
    clock = engine.clock if engine is not None else PhaseClock(model)
    weight_only = _calibrate(engine, list(layers.values()), asymmetric)
    dense_output, flops_dense = (run_example(model, example_inputs, layers, record=True)
                                 if example_inputs is not None else (None, None))
    params_dense = sum(p.numel() for p in model.parameters())
    with clock.phase("factorization"):
        _factor_all(list(layers.values()), ranks, rank_ratio, min_rank, rank_multiple, damping, progress)
    candidates = list(layers.values())
    if ranks is not None or energy is not None or rank_ratio is not None:
        chosen = allocation.fixed_ranks(candidates, ranks, energy, rank_ratio)
    else:
        if engine is not None and sensitivity:
            probes = allocation.probe_ranks(candidates, min_flop_saving)
            allocation.weigh(candidates, measure_sensitivities(
                engine, model, candidates, probes, lambda name, m: set_submodule(model, name, m)))
        if target_latency is not None:
            chosen, latency_search = measured_latency_ranks(candidates, latency_model, target_latency,
                                                            min_flop_saving, dense, example_inputs, dense_timer)
        else:
            kind, fraction, total = (("flops", target_flops, float(flops_dense)) if target_flops is not None
                                     else ("params", target_params, float(params_dense)))
            chosen = allocate(candidates, kind, fraction * total, total, min_flop_saving,
                              "target_flops" if kind == "flops" else "target_params")
    planned, report_layers = _replace_all(model, candidates, chosen, engine, clock, asymmetric, damping,
                                          min_flop_saving, skipped, weight_only)
    if latency_model is not None:
        skipped.update({name: NOT_FASTER for name in not_faster(candidates, latency_model, chosen)})
    for layer in candidates:  # drop the recorded activations and statistics
        layer.inputs.clear()
        layer.outputs.clear()
        layer.covariance = None
    if recalibrate is None:  # refitted factors keep the statistics they were fitted with (see the docstring)
        recalibrate = not (asymmetric and any(entry["data_aware"] for entry in planned.values()))
    recalibrated = (data is not None and recalibrate and bool(planned)
                    and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()))
    if recalibrated:
        with clock.phase("recalibration"):
            training.recalibrate(model, data, progress=progress)
    output, flops = run_example(model, example_inputs, {}, record=False) if example_inputs is not None else (None, None)
    report = {
        "layers": report_layers,
        "skipped": skipped,
        "total": {
            "params_dense": params_dense,
            "params": sum(p.numel() for p in model.parameters()),
            "flops_dense": flops_dense,
            "flops": flops,
            "output_rel_error": rel_error(output, dense_output) if example_inputs is not None else None,
        },
        "recalibrated": recalibrated,
        "calibration": clock.summary() if engine is None else engine.summary(),
    }
    plan = {"method": "decompose", "version": PLAN_VERSION, "layers": planned}
    if measure_latency:
        report["latency"] = plan["latency"] = measured_latency(dense, model, example_inputs, runtime,
                                                               target_latency, latency_model, dense_timer)
    if latency_search is not None:
        report["latency_search"] = plan["latency_search"] = latency_search
    return model, plan, report


def _check_arguments(model, ranks, energy, rank_ratio, target_flops, target_params, target_latency, scheme,
                     min_flop_saving, min_rank, rank_multiple, damping) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    chosen = [k for k, v in dict(ranks=ranks, energy=energy, rank_ratio=rank_ratio, target_flops=target_flops,
                                  target_params=target_params, target_latency=target_latency).items()
              if v is not None]
    if len(chosen) != 1:
        raise ValueError("give exactly one of ranks, energy, rank_ratio, target_flops, target_params, "
                         "target_latency; got "
                         + (", ".join(chosen) if chosen else "none"))
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    check_fraction("min_flop_saving", min_flop_saving, low_open=False, high_open=True)
    check_min_rank(min_rank)
    if rank_multiple is not None and (isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int)
                                      or rank_multiple < 1):
        raise ValueError(f"rank_multiple must be an int >= 1 or None, got {rank_multiple!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0.0:
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    for arg, value in (("energy", energy), ("rank_ratio", rank_ratio), ("target_flops", target_flops),
                       ("target_params", target_params), ("target_latency", target_latency)):
        if value is not None:
            check_fraction(arg, value)


def _example_inputs(model: nn.Module, example_inputs, data):
    """The inputs FLOPs and the report are measured on: ``example_inputs`` as given, else the first sample of
    the first calibration batch (FLOPs are per example, as ``prune`` counts them), else None."""
    if isinstance(example_inputs, (tuple, list)) and not example_inputs:
        example_inputs = None  # an empty tuple: no inputs to run
    if example_inputs is not None or data is None:
        return example_inputs
    first = next(iter(data), None)
    if first is None:
        raise ValueError("decompose: data holds no batches (empty calibration data)")
    device, dtype = model_device_dtype(model)
    return first_samples(to_device(batch_inputs(first), device, dtype), 1)


def _calibrate(engine: Optional[Calibration], layers: List[Candidate], asymmetric: bool) -> Dict[str, str]:
    """The statistics pass over the data (data-aware layers: all but the spatial scheme, inputs wider than
    ``MAX_COVARIANCE_DIM`` and layers the data never reaches); ``{name: why it stays weight-only}``."""
    weight_only: Dict[str, str] = {}
    if engine is None:
        return weight_only
    aware = []
    for layer in layers:
        if layer.scheme == "spatial":
            weight_only[layer.name] = "the spatial scheme is factored by weight SVD"
        elif layer.in_dim > MAX_COVARIANCE_DIM:
            weight_only[layer.name] = (f"{layer.in_dim} inputs: the covariance would exceed "
                                       f"{MAX_COVARIANCE_DIM}^2 entries")
        else:
            aware.append(layer)
    collect_statistics(engine, aware, keep_dense_rows=asymmetric)
    for layer in aware:
        if layer.samples == 0:
            weight_only[layer.name] = "the calibration data never reaches it"
    return weight_only


def _factor_all(layers: List[Candidate], ranks, rank_ratio, min_rank, rank_multiple: int, damping: float,
                progress: bool) -> None:
    """Each layer's factors: the whitened SVD (data-aware) or the weight SVD, truncated where only one rank is
    needed (``ranks``, ``rank_ratio``)."""
    for layer in tqdm(layers, desc="decompose: SVD", unit="layer", leave=False, disable=not progress):
        layer.min_rank = resolve_min_rank(min_rank, layer.full_rank)
        layer.rank_multiple = rank_multiple
        needed = allocation.needed_rank(layer, ranks, rank_ratio)
        if layer.data_aware:
            layer.factors = whitened_factors(layer, damping, needed)
        else:
            layer.factors = factor(layer, layer.matrix().to(torch.float64), needed)
        layer.S = layer.factors[1]


def _replace_all(model: nn.Module, layers: List[Candidate], chosen: Dict[str, int], engine: Optional[Calibration],
                 clock: PhaseClock, asymmetric: bool, damping: float, min_flop_saving: float, skipped: Dict[str, str],
                 weight_only: Dict[str, str]) -> Tuple[Dict[str, dict], Dict[str, dict]]:
    """Replace the layers that get a FLOP-saving rank, stage by stage in execution order; with ``asymmetric``
    and data, each data-aware layer after the first decomposed one is refitted first on the inputs it gets in
    the partly decomposed model (one stage pass per stage). Returns the plan and report entries, in the
    candidates' order. Phases: ``refit`` (the stage passes), ``refit factorization`` and ``replace`` (building
    the modules and their report entries)."""
    replaced: Dict[str, nn.Module] = {}  # name -> dense module of every layer replaced so far
    planned, reported = {}, {}
    stages: Dict[int, List[Candidate]] = {}
    for layer in sorted(layers, key=lambda l: l.order):
        reason = dense_reason(layer, chosen.get(layer.name), min_flop_saving)
        if reason is None:
            stages.setdefault(layer.stage, []).append(layer)
        else:
            skipped[layer.name] = reason
    bar = tqdm(stages.values(), desc="decompose: refit" if engine is not None and asymmetric else "decompose: replace",
               unit="stage", leave=False, disable=engine is None or not engine.show_progress)
    for number, stage in enumerate(bar, 1):
        refits = {}
        refit = [l for l in stage if engine is not None and asymmetric and l.data_aware and replaced]
        if refit:
            with clock.phase("refit"):
                stats = refit_stage(engine, refit, replaced, lambda name, m: set_submodule(model, name, m),
                                    f"refit stage {number}/{len(stages)}")
            with clock.phase("refit factorization"):
                refits = {l.name: refit_factors(l, stats[l.name].fit, damping, chosen[l.name]) for l in refit}
        with clock.phase("replace"):
            _replace_stage(model, stage, chosen, refits, engine, damping, replaced, planned, reported, weight_only)
    order = [l.name for l in layers]
    return ({n: planned[n] for n in order if n in planned}, {n: reported[n] for n in order if n in reported})


def _replace_stage(model: nn.Module, stage: List[Candidate], chosen: Dict[str, int], refits: dict,
                   engine: Optional[Calibration], damping: float, replaced: Dict[str, nn.Module], planned: dict,
                   reported: dict, weight_only: Dict[str, str]) -> None:
    """Build and put in place the modules of one stage (refitted factors where ``refits`` has them), recording
    each in ``planned`` and ``reported`` and its dense module in ``replaced``."""
    for layer in stage:
        rank = chosen[layer.name]
        factors, fit_damping = refits.get(layer.name, (None, None))
        if factors is not None:
            layer.factors = factors
        else:
            fit_damping = damping if layer.data_aware else None
        new = replace(model, layer, rank, layer.module.training)
        replaced[layer.name] = layer.module
        if engine is not None:
            engine.substitute(layer.module, new)
            drop_dense_rows(engine, layer)
        planned[layer.name] = plan_entry(layer, rank)
        reported[layer.name] = report_entry(layer, rank, new, factors is not None, fit_damping,
                                            weight_only.get(layer.name))
