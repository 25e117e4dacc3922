"""``compress``: channel pruning and low-rank decomposition together, at one FLOPs or latency budget.

Pruning removes whole channels (the structure every runtime speeds up); decomposition removes the directions a
layer's output does not use. Which pays more differs from layer to layer and model to model, so ``compress``
measures it: it tries splits of the budget between the two, each a ``prune(data=...)`` (output-error
selection, reconstruction, allocation across layers by output error per FLOP) to a fraction ``p`` of the
FLOPs, then a data-aware ``decompose`` of the pruned model to the rest (ranks allocated by output error per
FLOP; layers where a low-rank pair would not pay stay dense), from ``p = 1`` (decomposition alone) to ``p =
target`` (pruning alone). Within each step every layer is thus pruned, factored or left dense by output error
per FLOP saved; across the two steps the split is chosen by the divergence of each candidate's outputs from the
dense model's on held-out calibration batches (``rankprune.fidelity``), and the chosen split is run again on
all the data. Pruning alone is the reference: another split is chosen only where it is clearly closer
(``fidelity.clearly_closer``: a mean divergence lower by more than ``fidelity.SIGNIFICANCE_Z`` standard errors
of the paired per-sample difference, and closer on clearly more samples than not; then the lowest mean of
those). Pruned layers stay plain convolutions, which every runtime runs at least as fast per FLOP as a
low-rank pair, and splits chosen on weaker evidence did not hold on test data (exp_quality at 40%: concatnet,
decomposition chosen by a 7% lower KL, 2.4 points less accurate; MobileNetV2 seed 2, decomposition 2.1
standard errors lower in mean but closer on only 53% of the samples, 1.6 points less accurate).
One plan (``{"method": "compress", "steps": [prune plan, decompose plan]}``) rebuilds the architecture with
``rankprune.apply_plan``; ``rankprune.to_plain`` / ``export_onnx`` export it as any other.

With ``target_latency`` instead (a fraction of the dense model's measured latency in ``runtime``) the split is
of the latency's log: ``prune(target_latency=t**share)``, then ``decompose(target_latency=...)`` of the pruned
model to the rest of the way (relative to the pruned model's predicted latency); a split that cannot reach
its part (a ``ValueError`` of either step) is recorded as unreachable and left out of the comparison. The
splits are compared on the latency model's prediction alone (each step with ``measure_latency=False``). The
chosen split's run on all the data is then closed on measurements as ``prune`` and ``decompose`` close
theirs (``rankprune.latency.meet_measured``): its result is timed end to end against the dense model and,
where it misses the window below the target, the split is run again for a goal corrected by the measured
error (up to ``MEASURED_TRIES`` results, kept in memory until one is chosen; ``plan["latency_search"]``
records every try). ``measure_latency=False`` keeps the prediction's result, which can miss the target by
the prediction's error.
"""
from typing import Any, Dict, Iterable, Optional, Tuple

from torch import nn

from ._inputs import check_finite_weights, check_fraction, first_samples, model_inputs, reusable
from ._inputs import progress as progress_bar
from .fidelity import RULE, divergences, select, split_holdout
from .latency import latency_settings, meet_measured, reference_timer, verify
from .lowrank import decompose
from .plan_format import PLAN_VERSION
from .report import count_flops

# Fractions of the budget's log given to pruning: 0 is decomposition alone, 1 pruning alone (p = target^share).
PRUNE_SHARES = (0.0, 1 / 3, 2 / 3, 1.0)


def compress(model: nn.Module, example_inputs: Any = None, *, data: Iterable, target_flops: Optional[float] = None,
             target_latency: Optional[float] = None, shares: Tuple[float, ...] = PRUNE_SHARES, cache_bytes: Optional[int] = None,
             runtime: Optional[str] = None, measure_latency: Optional[bool] = None, progress: bool = True) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    """Prune and decompose ``model`` to ``target_flops`` of its FLOPs, the split chosen by measured fidelity
    (module doc).

    Args:
        model: the network, left as it was (the result is a new model: it holds other layer types).
        example_inputs: one example for FLOP counting and graph tracing (default: the first sample of the first
            calibration batch).
        data: calibration batches (at least 2: the last quarter is held out to compare the splits).
        target_flops: fraction of the FLOPs to keep, in (0, 1].
        target_latency: instead of ``target_flops``, the fraction of the dense model's latency to reach, in
            (0, 1], measured in ``runtime`` on ``example_inputs`` (module doc). ValueError when no split
            reaches it.
        shares: the splits tried, as the share of ``log(target_flops)`` (or of ``log(target_latency)``) given to
            pruning (0: decomposition alone, 1: pruning alone).
        cache_bytes: memory each calibration engine may keep (``rankprune.calibration``).
        runtime: where the result's latency is measured against the dense model's (``rankprune.latency``:
            ``"eager"`` by default, ``"cuda_graph"``, ``"onnxruntime"``).
        measure_latency: time the result against the dense model and put it in ``plan["latency"]`` (median,
            spread, runtime, device, batch), with a warning when it is not faster or misses ``target_latency``;
            with ``target_latency``, the chosen split is also closed on measurements (module doc,
            ``plan["latency_search"]``) (None: yes).
        progress: progress bars.

    Returns:
        ``(compressed model, plan, report)``: the plan for ``rankprune.apply_plan``; the report holds every
        split's divergence and whether it was clearly closer than the reference (module doc), the reference,
        the chosen split, and each step's plan FLOPs.
    """
    budget, target = _check_arguments(model, target_flops, target_latency, shares)
    data = reusable(data)
    fit, held = split_holdout(data, "compress")
    if example_inputs is None:
        example_inputs = first_samples(model_inputs(fit[0], model), 1)
    runtime, measure_latency = latency_settings(model, target_flops, target_latency, runtime, measure_latency,
                                                example_inputs)
    split = _Split(model, example_inputs, budget, target, runtime, cache_bytes)
    # one timer of the dense model for the closed loop and the final check (ONNX Runtime: one export)
    dense_timer = reference_timer(model, example_inputs, runtime) if measure_latency else None
    compared, unreachable, per_sample = [], [], {}
    for share in progress_bar(sorted(set(float(s) for s in shares)), "compress: comparing splits", progress,
                              unit="split"):
        try:
            candidate, _ = split.run(share, fit)
        except ValueError as exc:  # a latency part that cannot be reached; any other error is the caller's
            if budget == "flops" or "cannot be met" not in str(exc):
                raise
            unreachable.append({"prune_share": share, "error": str(exc)})
            continue
        per_sample[share] = divergences(model, candidate, held)
        compared.append({"prune_share": share, "pruned_to": target ** share, "budget": budget,
                         "divergence": float(per_sample[share].mean())})
        del candidate
    if not compared:
        raise ValueError(f"target_latency={target} cannot be met on runtime {runtime!r} by any split of pruning and "
                         "decomposition: " + "; ".join(f"share {u['prune_share']:.2f}: {u['error']}" for u in unreachable))
    best, reference = _choose(compared, per_sample)
    latency_search = None
    if budget == "latency" and measure_latency:
        compressed, steps, latency_search = _measured_split(split, best["prune_share"], fit + held, runtime,
                                                            dense_timer)
    else:
        compressed, steps = split.run(best["prune_share"], fit + held)
    plan = {"method": "compress", "version": PLAN_VERSION, "steps": steps, "target_flops": target_flops,
            "target_latency": target_latency, "prune_share": best["prune_share"],
            "flops": [count_flops(model, example_inputs), count_flops(compressed, example_inputs)]}
    if latency_search is not None:
        plan["latency_search"] = latency_search
    if measure_latency:
        plan["latency"] = verify(model, compressed, example_inputs, runtime, target=target_latency, verb="compress",
                                 dense_timer=dense_timer)
    report = {"candidates": compared, "unreachable": unreachable, "chosen": best, "held_out_batches": len(held),
              "measure": "mean KL(dense || compressed) of the output logits per held-out sample",
              "reference": reference, "rule": RULE,
              "steps": [{"method": s["method"], "flops": s.get("flops")} for s in steps]}
    return compressed, plan, report


def _choose(compared: list, per_sample: Dict[float, Any]) -> Tuple[dict, float]:
    """``(chosen candidate, reference share)``: pruning alone (share 1) where it was compared, else the closest
    split, unless others are clearly closer (``fidelity.select``). Each candidate records whether it was."""
    shares = [c["prune_share"] for c in compared]
    reference = 1.0 if 1.0 in shares else min(compared, key=lambda c: c["divergence"])["prune_share"]
    chosen, closer = select([per_sample[s] for s in shares], shares.index(reference))
    for c, flag in zip(compared, closer):
        c["clearly_closer"] = flag
    return compared[chosen], reference


def _measured_split(split: "_Split", share: float, batches, runtime: str, dense_timer
                    ) -> Tuple[nn.Module, list, Dict[str, Any]]:
    """The split at ``share`` run on ``batches`` for the target as measured (``meet_measured``, each try timed
    against ``dense_timer``): the chosen result, its steps' plans and the search's record (``{"runtime",
    "measured_tries"}``)."""
    built: Dict[Tuple, Tuple[nn.Module, list]] = {}

    def build(goal: float):
        candidate, steps = split.run(share, batches, target=goal)
        # the structure, whatever the weights: a goal that gives the same shapes again ends the loop
        structure = tuple((name, tuple(p.shape)) for name, p in candidate.named_parameters())
        built[structure] = (candidate, steps)
        return candidate, structure, {"prune_share": share}

    structure, tries = meet_measured(build, split.model, split.example_inputs, runtime, split.target,
                                     reference=dense_timer)
    compressed, steps = built[structure]
    return compressed, steps, {"runtime": runtime, "measured_tries": tries}


def _check_arguments(model: nn.Module, target_flops: Optional[float], target_latency: Optional[float],
                     shares: Tuple[float, ...]) -> Tuple[str, float]:
    """``("flops" | "latency", the target)``, after refusing bad arguments and non-finite weights."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if (target_flops is None) == (target_latency is None):
        raise ValueError("give exactly one of target_flops (fraction of FLOPs to keep) and target_latency "
                         "(fraction of the dense latency to reach)")
    budget = "flops" if target_flops is not None else "latency"
    target = check_fraction(f"target_{budget}", target_flops if budget == "flops" else target_latency)
    if not shares or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0
                         for s in shares):
        raise ValueError(f"shares must be fractions in [0, 1], got {shares!r}")
    check_finite_weights(model, "compress")
    return budget, target


class _Split:
    """One split of the budget: ``prune`` to ``target ** share``, then ``decompose`` of the pruned model for the
    rest of the way (FLOPs, or latency relative to the pruned model's predicted latency)."""

    def __init__(self, model: nn.Module, example_inputs: Any, budget: str, target: float, runtime: str,
                 cache_bytes: Optional[int]):
        self.model, self.example_inputs, self.budget, self.target = model, example_inputs, budget, target
        self.cache_bytes = cache_bytes
        self.timing = {} if budget == "flops" else {"runtime": runtime}

    def run(self, share: float, batches, target: Optional[float] = None) -> Tuple[nn.Module, list]:
        """``(compressed model, steps' plans)`` for ``target`` (default: the budget's)."""
        from .pruning import prune  # at call time: rankprune.pruning needs torch-pruning

        target = self.target if target is None else target
        pruned_to, steps, current = target ** share, [], self.model
        if share > 0:
            current, pruned_plan = prune(self.model, self.example_inputs, data=batches,
                                         **{f"target_{self.budget}": pruned_to}, cache_bytes=self.cache_bytes,
                                         measure_latency=False, progress=False, **self.timing)
            steps.append(pruned_plan)
            pruned_to = (pruned_plan["flops"][1] / pruned_plan["flops"][0] if self.budget == "flops"
                         else pruned_plan["latency_search"]["predicted_ratio"])
        if share < 1 and target < pruned_to:
            current, decomposed_plan, _ = decompose(current, data=batches,
                                                    **{f"target_{self.budget}": target / pruned_to},
                                                    example_inputs=self.example_inputs, cache_bytes=self.cache_bytes,
                                                    measure_latency=False, progress=False, **self.timing)
            steps.append(decomposed_plan)
        return current, steps
