"""The latency side of ``decompose``: ranks under a measured latency budget (``target_latency``), closed on
end-to-end measurements of the structures they give, and the measured check of the result against the dense
model (``report["latency"]``)."""
from typing import Dict, List, Optional, Tuple

from torch import nn

from ..latency import LatencyModel, Variant, meet_measured, verify
from ..latency.runtimes import Timer
from .allocation import allocate_latency, monotone_in_rank, rank_grid
from .cost import Candidate

# Ranks measured per layer for a latency budget (the lowest allowed, the largest FLOP-saving one and evenly
# spread ones between): the allocator chooses among these only.
RANKS_PER_LAYER = 8
NOT_FASTER = "no measured rank of it is faster than the dense layer"


def latency_ranks(layers: List[Candidate], latency_model: LatencyModel, target_latency: float,
                  min_flop_saving: float) -> Dict[str, int]:
    """Ranks meeting ``target_latency`` (a fraction of the dense model's measured latency): each layer's rank
    grid (:func:`~rankprune.lowrank.allocation.rank_grid`) measured, then allocated by discarded energy per
    millisecond saved (:func:`~rankprune.lowrank.allocation.allocate_latency`)."""
    grids = {l.name: rank_grid(l, min_flop_saving, RANKS_PER_LAYER) for l in layers}
    timed = [l for l in layers if grids[l.name] and l.name in latency_model.layers]
    latency_model.profile({l.name: [Variant(rank=r, scheme=l.scheme) for r in grids[l.name]] for l in timed})
    times = {l.name: {None: latency_model.layer_time(l.name),
                      **monotone_in_rank({r: latency_model.layer_time(l.name, Variant(rank=r, scheme=l.scheme))
                                          for r in grids[l.name]})} for l in timed}
    return allocate_latency(timed, times, target_latency, latency_model.dense_ms, latency_model.runtime)


def measured_latency_ranks(layers: List[Candidate], latency_model: LatencyModel, target_latency: float,
                           min_flop_saving: float, dense: Optional[nn.Module], example_inputs,
                           dense_timer: Optional[Timer] = None) -> Tuple[Dict[str, int], Optional[Dict[str, object]]]:
    """:func:`latency_ranks`, closed on measurements when ``dense`` (the dense model) is given: the structure of
    each allocation (``LatencyModel.shaped``) is timed end to end against ``dense`` (``dense_timer``: its timer,
    made once by the caller) and the allocation redone on a goal corrected by the measured error
    (``rankprune.latency.meet_measured``). Returns the ranks and, when
    measured, the search's record (runtime, device, dense milliseconds, ``measured_tries``)."""
    if dense is None:
        return latency_ranks(layers, latency_model, target_latency, min_flop_saving), None
    schemes = {l.name: l.scheme for l in layers}

    def build(goal: float):
        ranks = latency_ranks(layers, latency_model, goal, min_flop_saving)
        twin = latency_model.shaped(dense, {name: Variant(rank=r, scheme=schemes[name]) for name, r in ranks.items()})
        return twin, ranks, {"layers_decomposed": len(ranks),
                             "predicted_ratio": latency_model.predict(twin) / latency_model.dense_ms}

    ranks, tries = meet_measured(build, dense, example_inputs, latency_model.runtime, target_latency,
                                 threads=latency_model.threads, reference=dense_timer)
    return ranks, {"runtime": latency_model.runtime, "device": latency_model.device_name,
                   "dense_ms": latency_model.dense_ms, "measured_tries": tries}


def not_faster(layers: List[Candidate], latency_model: LatencyModel, chosen: Dict[str, int]) -> List[str]:
    """The layers left dense because none of their measured ranks beat the dense layer."""
    names = []
    for layer in layers:
        known = latency_model.known(layer.name) if layer.name in latency_model.layers else {}
        if layer.name not in chosen and "dense" in known and all(
                ms >= known["dense"] for key, ms in known.items() if key != "dense"):
            names.append(layer.name)
    return names


def measured_latency(dense: nn.Module, compressed: nn.Module, example_inputs, runtime: str,
                     target_latency: Optional[float], latency_model: Optional[LatencyModel],
                     dense_timer: Optional[Timer] = None) -> Dict[str, object]:
    """``report["latency"]``: :func:`rankprune.latency.verify` of ``compressed`` against ``dense`` (a warning
    names the gap when it is not faster or misses ``target_latency``), with the latency model's prediction and
    profiling time when one was used."""
    measured = verify(dense, compressed, example_inputs, runtime, target=target_latency, verb="decompose",
                      dense_timer=dense_timer)
    if latency_model is not None:
        predicted = latency_model.predict(compressed)
        measured.update(predicted_ms=predicted, predicted_ratio=predicted / latency_model.dense_ms,
                        profiling_s=latency_model.profiling_s, layers_measured=latency_model.measured,
                        layers_cached=latency_model.cached)
    return measured
