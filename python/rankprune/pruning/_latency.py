"""The latency side of ``prune``: the channel ratio that meets a measured latency budget (``target_latency``).

The dense model's layers are timed in ``runtime`` on the model's device (``rankprune.latency.LatencyModel``: in
context, cached on disk); each tried ratio prunes a copy with the scores already computed, and the latency
model predicts the copy's time from the measured times of its new channel counts (measured on first use). The
search keeps the least pruning whose prediction meets the target. With measurement on, the copy pruned at that
ratio is timed end to end against dense and the search redone on a corrected goal where it missed
(``rankprune.latency.meet_measured``); ``prune`` then prunes at the chosen ratio for real (reconstruction,
recalibration) and measures the result against dense."""
import copy
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from ..latency import LatencyModel, meet_measured
from ..latency.runtimes import Timer

# Bisection steps over the channel ratio in [0, max_layer_ratio]: the ratio to within max_layer_ratio / 2**7.
LATENCY_STEPS = 7

# attempt(ratio, model): prune ``model`` in place at the channel ratio (the pruner of ``prune``).
Attempt = Callable[[float, nn.Module], object]


def ratio_for_latency(model: nn.Module, attempt: Attempt, latency_model: LatencyModel, target_latency: float,
                      max_layer_ratio: float) -> Tuple[float, Dict[str, object]]:
    """The smallest channel ratio whose pruned copy of ``model`` the latency model predicts within
    ``target_latency`` (a fraction of the dense model's measured latency), and the search's record (each
    try's ratio and predicted fraction, the runtime, the dense milliseconds). ValueError naming the closest
    predicted latency when even ``max_layer_ratio`` misses the target."""
    tries: List[Dict[str, float]] = []

    def predicted(ratio: float) -> float:
        candidate = copy.deepcopy(model)
        attempt(ratio, candidate)
        fraction = latency_model.predict(candidate) / latency_model.dense_ms
        tries.append({"ratio": ratio, "predicted_ratio": fraction})
        return fraction

    low, high = 0.0, max_layer_ratio
    closest = predicted(high)
    if closest > target_latency:
        raise ValueError(
            f"target_latency={target_latency} cannot be met on runtime {latency_model.runtime!r}: the closest "
            f"reachable latency is {closest:.3f} of dense (predicted with max_layer_ratio={max_layer_ratio} of the "
            f"channels removed, {latency_model.dense_ms:.4g} ms dense measured); raise max_layer_ratio, prune "
            "fewer ignored_layers, or decompose (rankprune.compress) to reach further")
    for _ in range(LATENCY_STEPS):
        middle = 0.5 * (low + high)
        if predicted(middle) <= target_latency:
            high = middle
        else:
            low = middle
    record = {"runtime": latency_model.runtime, "device": latency_model.device_name,
              "dense_ms": latency_model.dense_ms, "tries": tries, "ratio": high,
              "predicted_ratio": next(t["predicted_ratio"] for t in reversed(tries) if t["ratio"] == high)}
    return high, record


def measured_ratio_for_latency(model: nn.Module, example_inputs: Any, attempt: Attempt, latency_model: LatencyModel,
                               target_latency: float, max_layer_ratio: float, dense_timer: Optional[Timer]
                               ) -> Tuple[float, Dict[str, object]]:
    """:func:`ratio_for_latency` on the prediction, then, when ``dense_timer`` (the dense model's timer) is given,
    closed on measurements of the pruned copies against it (``meet_measured``): the chosen ratio and the
    search's record, with ``"measured_tries"`` (each goal, ratio, predicted and measured fraction) when
    measured."""
    if dense_timer is None:
        return ratio_for_latency(model, attempt, latency_model, target_latency, max_layer_ratio)
    searches: Dict[float, Dict[str, object]] = {}

    def build(goal: float):
        ratio, record = ratio_for_latency(model, attempt, latency_model, goal, max_layer_ratio)
        searches.setdefault(ratio, record)
        candidate = copy.deepcopy(model)
        attempt(ratio, candidate)
        return candidate, ratio, {"ratio": ratio, "predicted_ratio": record["predicted_ratio"]}

    ratio, tries = meet_measured(build, model, example_inputs, latency_model.runtime, target_latency,
                                 threads=latency_model.threads, reference=dense_timer)
    return ratio, {**searches[ratio], "measured_tries": tries}
