"""The latency model (rankprune.latency), the latency budget of decompose and the end-to-end check.

No assertion depends on a measured time: allocations run on fake timing tables (or a fake timer whose
"milliseconds" are a module's parameter count), so the expected ranks are known exactly; tests of real
measurements check structure only."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import rankprune
from rankprune import cli, latency
from rankprune.cli import common as cli_common
from rankprune.benchmark import Timing
from rankprune.latency import DENSE, LatencyModel, Variant, best_multiple
from rankprune.latency import model as latency_model_module
from rankprune.latency import runtimes
from rankprune.lowrank.allocation import allocate_latency, monotone_in_rank, rank_grid
from rankprune.lowrank.cost import Candidate
from rankprune.nn import LowRankConv2d, LowRankLinear


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


X = torch.randn(2, 8, 8, 8)


def fake_ms(module: nn.Module) -> float:
    """The fake timer's milliseconds: a thousandth of the module's parameter count (exact, repeatable)."""
    return sum(p.numel() for p in module.parameters()) / 1000


@pytest.fixture
def fake_timer(monkeypatch):
    def make_timer(module, inputs, runtime, device, threads):
        ms = fake_ms(module)
        return lambda warmup, repeats: Timing(median_ms=ms, p10_ms=ms, p90_ms=ms, repeats=repeats)

    monkeypatch.setattr(runtimes, "make_timer", make_timer)
    monkeypatch.setattr(latency_model_module, "make_timer", make_timer)
    # in context as alone: the fake layer times add up to the layers' share of the fake model time
    monkeypatch.setattr(latency_model_module, "in_context_ms", lambda model, inputs, layers, *rest: sum(
        fake_ms(layer.module) * layer.calls for layer in layers.values()))


@pytest.fixture(autouse=True)
def cache_in_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "latency"


def test_cache_dir_follows_the_environment_variable(cache_in_tmp):
    assert latency.cache_dir() == str(cache_in_tmp)


def test_cache_miss_hit_and_clear(cache_in_tmp):
    lm = LatencyModel.measure(tiny_net(), X, progress=False)
    lm.profile({"0": [Variant(rank=4)], "2": [Variant(rank=8)]})
    assert (lm.measured, lm.cached) == (4, 0)  # dense and one rank of each layer
    assert len(list(cache_in_tmp.glob("*.json"))) == 2  # one file per layer shape
    again = LatencyModel.measure(tiny_net(), X, progress=False)
    again.profile({"0": [Variant(rank=4)], "2": [Variant(rank=8)]})
    assert (again.measured, again.cached) == (0, 4)
    assert again.known("0") == lm.known("0")
    assert latency.clear_cache() == 2
    assert list(cache_in_tmp.glob("*.json")) == []
    fresh = LatencyModel.measure(tiny_net(), X, progress=False)
    fresh.profile({"0": [Variant(rank=4)]})
    assert (fresh.measured, fresh.cached) == (2, 0)


def test_use_cache_false_neither_reads_nor_writes(cache_in_tmp):
    lm = LatencyModel.measure(tiny_net(), X, progress=False, use_cache=False)
    lm.profile({"0": [Variant(rank=4)]})
    assert lm.measured == 2 and not cache_in_tmp.exists()


def test_cache_key_names_device_runtime_versions_layer_shape_dtype_threads():
    lm = LatencyModel.measure(tiny_net(), X, progress=False)
    key = lm.cache_key("2")
    assert key["runtime"] == "eager" and key["torch"] == torch.__version__
    assert key["rankprune"] == rankprune.__version__ and key["threads"] == torch.get_num_threads()
    assert key["device"] == lm.device_name and key["dtype"] == "float32"
    assert key["layer"] == {"type": "Conv2d", "in": 32, "out": 32, "kernel": [3, 3], "stride": [1, 1],
                            "padding": [1, 1], "dilation": [1, 1], "groups": 1, "bias": True}
    assert key["input"] == [2, 32, 8, 8]
    assert lm.cache_key("6")["layer"] == {"type": "Linear", "in": 32, "out": 10, "bias": True}
    assert lm.cache_key("6")["input"] == [2, 32]


def test_layers_are_recorded_at_their_input_shapes_in_call_order():
    lm = LatencyModel.measure(tiny_net(), X, progress=False)
    assert {n: l.input_shape for n, l in lm.layers.items()} == {"0": (2, 8, 8, 8), "2": (2, 32, 8, 8), "6": (2, 32)}
    assert lm.batch == 2 and lm.runtime == "eager" and lm.dense_ms > 0


def test_variant_keys_and_modules():
    assert [v.key for v in (DENSE, Variant(rank=8), Variant(rank=8, scheme="spatial"),
                            Variant(out_channels=16), Variant(out_channels=16, in_channels=8))] == [
        "dense", "rank=8", "rank=8,spatial", "out=16,in=None", "out=16,in=8"]
    conv = nn.Conv2d(32, 64, 3, stride=2, padding=1)
    low, shape = latency_model_module.variant_module(conv, Variant(rank=8), [1, 32, 16, 16])
    assert isinstance(low, LowRankConv2d) and (low.rank, low.stride, low.padding) == (8, (2, 2), (1, 1))
    assert shape == [1, 32, 16, 16]
    pruned, shape = latency_model_module.variant_module(conv, Variant(out_channels=40, in_channels=24),
                                                        [1, 32, 16, 16])
    assert (pruned.in_channels, pruned.out_channels, shape) == (24, 40, [1, 24, 16, 16])
    depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
    thin, shape = latency_model_module.variant_module(depthwise, Variant(out_channels=24), [1, 32, 8, 8])
    assert (thin.groups, thin.in_channels, thin.out_channels, shape) == (24, 24, 24, [1, 24, 8, 8])
    linear, shape = latency_model_module.variant_module(nn.Linear(32, 10), Variant(rank=4), [5, 32])
    assert isinstance(linear, LowRankLinear) and linear.rank == 4 and shape == [5, 32]
    with pytest.raises(ValueError, match="groups=4"):
        latency_model_module.variant_module(nn.Conv2d(32, 32, 3, groups=4), Variant(out_channels=30), [1, 32, 8, 8])


def test_predict_reads_variants_from_models_and_plans(fake_timer):
    net = tiny_net()
    lm = LatencyModel.measure(net, X, progress=False)
    assert lm.dense_ms == pytest.approx(fake_ms(net))
    small, plan, _ = rankprune.decompose(net, ranks={"2": 8}, example_inputs=X, progress=False)
    expected = fake_ms(small)  # the fake time is additive over layers, so the prediction is exact
    assert latency_model_module.model_variants(small, lm.layers) == {"0": DENSE, "2": Variant(rank=8), "6": DENSE}
    assert lm.predict(small) == pytest.approx(expected)
    assert lm.predict(plan) == pytest.approx(expected)
    assert lm.predict(rankprune.to_plain(small)) == pytest.approx(expected)
    thinner = nn.Sequential(nn.Conv2d(8, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 3, padding=1))
    assert latency_model_module.model_variants(thinner, lm.layers) == {
        "0": Variant(out_channels=24), "2": Variant(in_channels=24)}
    with pytest.raises(ValueError, match="decompose plan"):
        lm.predict({"method": "prune", "layers": {}})


def candidate(in_channels=16, out_channels=32, min_rank=4, rank_multiple=4, singular_values=None) -> Candidate:
    conv = nn.Conv2d(in_channels, out_channels, 3)
    layer = Candidate("conv", conv, "conv2d", "channel", inputs=[torch.zeros(1, in_channels, 8, 8)])
    layer.min_rank, layer.rank_multiple = min_rank, rank_multiple
    if singular_values is not None:
        layer.S = torch.tensor(singular_values, dtype=torch.float64)
    return layer


def test_rank_grid_spans_the_allowed_flop_saving_ranks():
    # full rank 32; rank r keeps r * (144 + 32) / (32 * 144) of the FLOPs: below 1 up to r = 26, so 24 with
    # multiples of 4
    layer = candidate()
    assert rank_grid(layer, 0.0, 8) == [4, 8, 12, 16, 20, 24]
    assert rank_grid(layer, 0.0, 3) == [4, 12, 24]
    assert rank_grid(candidate(min_rank=28), 0.0, 8) == []  # no allowed rank saves FLOPs


def test_best_multiple_finds_the_rewarded_alignment():
    aligned8 = {v: 0.1 * v + (0.0 if v % 8 == 0 else 1.0) for v in range(1, 17)}
    assert best_multiple(aligned8) == 8
    flat = {v: 1.0 for v in range(1, 17)}
    assert best_multiple(flat) == 1  # nothing rewarded: the smallest multiple
    assert latency_model_module.sweep_window(512) == (224, 32)
    assert latency_model_module.sweep_window(40) == (8, 8)


def test_measured_times_are_made_monotone_in_the_rank():
    assert monotone_in_rank({8: 1.0, 16: 0.6, 24: 1.4, 32: 1.2, 40: 2.0}) == {
        8: 0.8, 16: 0.8, 24: pytest.approx(1.3), 32: pytest.approx(1.3), 40: 2.0}
    assert monotone_in_rank({4: 1.0, 8: 2.0}) == {4: 1.0, 8: 2.0}


def two_layers():
    a = candidate(singular_values=[4.0, 2.0, 1.0, 1.0])  # discarded at rank 3, 2, 1: 1/22, 2/22, 6/22
    a.name = "a"
    b = candidate(singular_values=[3.0, 3.0, 3.0, 3.0])  # discarded: 1/4, 2/4, 3/4
    b.name = "b"
    times = {"a": {None: 10.0, 3: 9.0, 2: 6.0, 1: 5.5},
             "b": {None: 10.0, 3: 11.0, 2: 7.0, 1: 4.0}}  # b's rank 3 is slower than dense
    return [a, b], times


def test_allocate_latency_walks_the_error_per_millisecond_hull():
    # a's hull: dense -> rank 2 (0.0227 error/ms) -> rank 1 (0.364); rank 3 saves 1 ms at 0.045/ms, worse
    # than going straight to rank 2. b's: dense -> rank 1 (0.125/ms); rank 2 (0.167/ms) is off the hull.
    layers, times = two_layers()
    assert allocate_latency(layers, times, 0.9, 30.0, "eager") == {"a": 2}  # 30 - 4 = 26 <= 27
    assert allocate_latency(layers, times, 0.8, 30.0, "eager") == {"a": 2, "b": 1}  # 30 - 4 - 6 = 20 <= 24
    assert allocate_latency(layers, times, 0.65, 30.0, "eager") == {"a": 1, "b": 1}  # 19.5 <= 19.5


def test_allocate_latency_names_the_closest_reachable_latency():
    layers, times = two_layers()
    with pytest.raises(ValueError, match=r"target_latency=0.5 cannot be met on runtime 'onnxruntime': the closest "
                                         r"reachable latency is 0.650 of dense \(19.5 ms of 30 ms"):
        allocate_latency(layers, times, 0.5, 30.0, "onnxruntime")


def test_allocate_latency_keeps_layers_that_do_not_get_faster_dense():
    layers, times = two_layers()
    times["b"] = {None: 10.0, 3: 10.0, 2: 12.0, 1: 10.5}
    with pytest.raises(ValueError, match="0.850 of dense"):  # only a's 4.5 ms can go
        allocate_latency(layers, times, 0.5, 30.0, "eager")
    assert allocate_latency(layers, times, 0.9, 30.0, "eager") == {"a": 2}


def state(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(before, model: nn.Module):
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_decompose_target_latency_end_to_end(fake_timer):
    net = tiny_net()
    before = state(net)
    small, plan, report = rankprune.decompose(net, target_latency=0.6, example_inputs=X, min_rank=1, progress=False)
    assert_same_state(before, net)
    measured = report["latency"]
    assert plan["latency"] is measured
    assert {"runtime", "device", "batch", "threads", "dense", "compressed", "ratio", "ratio_p10", "ratio_p90",
            "rounds", "target", "warning", "predicted_ms", "predicted_ratio", "profiling_s"} <= set(measured)
    assert (measured["runtime"], measured["batch"], measured["target"], measured["warning"]) == ("eager", 2, 0.6, None)
    assert set(measured["dense"]) == {"median_ms", "p10_ms", "p90_ms", "repeats"}
    assert measured["ratio"] == pytest.approx(fake_ms(small) / fake_ms(net))
    assert measured["predicted_ms"] == pytest.approx(fake_ms(small))
    assert measured["ratio"] <= 0.6
    # fake times are parameter counts: every FLOP-saving rank is faster, the multiple is the sweep's smallest
    assert set(plan["layers"]) <= {"0", "2", "6"} and plan["layers"]
    restored = rankprune.apply_plan(tiny_net(), plan)
    restored.load_state_dict(small.state_dict())


def test_decompose_target_latency_unreachable_names_the_closest(fake_timer):
    net = tiny_net()
    before = state(net)
    with pytest.raises(ValueError, match=r"target_latency=0.05 cannot be met on runtime 'eager': the closest "
                                         r"reachable latency is 0\.\d+ of dense"):
        rankprune.decompose(net, target_latency=0.05, example_inputs=X, progress=False)
    assert_same_state(before, net)


def test_flops_target_warns_when_the_result_is_not_faster(monkeypatch):
    def make_timer(module, inputs, runtime, device, threads):  # the decomposed model is "slower"
        ms = 2.0 if any(isinstance(m, (LowRankConv2d, LowRankLinear)) for m in module.modules()) else 1.0
        return lambda warmup, repeats: Timing(median_ms=ms, p10_ms=ms, p90_ms=ms, repeats=repeats)

    monkeypatch.setattr(runtimes, "make_timer", make_timer)
    with pytest.warns(UserWarning, match=r"decompose: the compressed model is not faster than dense: measured "
                                         r"2.000x \(eager on .*, batch 2: 2 ms against 1 ms dense") as caught:
        _, plan, report = rankprune.decompose(tiny_net(), target_flops=0.5, example_inputs=X, progress=False)
    assert [w.filename for w in caught if "not faster" in str(w.message)] == [__file__]  # names the user's call
    assert report["latency"]["ratio"] == 2.0 and report["latency"]["warning"].startswith("decompose: the compressed")
    _, _, quiet = rankprune.decompose(tiny_net(), target_flops=0.5, example_inputs=X, measure_latency=False,
                                      progress=False)
    assert "latency" not in quiet


def test_prune_target_latency_prunes_least_within_the_predicted_target(fake_timer):
    # Fake milliseconds are parameter counts, and the layers hold every parameter of tiny_net: the prediction is
    # exact, so the measured ratio equals the predicted one and meets the target.
    net = tiny_net()
    pruned, plan = rankprune.prune(net, X, "l1", target_latency=0.6, progress=False)
    search = plan["latency_search"]
    assert plan["target_latency"] == 0.6 and search["runtime"] == "eager"
    assert search["predicted_ratio"] <= 0.6
    # the least pruning that meets it: every smaller ratio tried predicts above the target
    assert all(t["predicted_ratio"] > 0.6 for t in search["tries"] if t["ratio"] < search["ratio"])
    assert plan["latency"]["ratio"] == pytest.approx(fake_ms(pruned) / fake_ms(net))
    assert plan["latency"]["ratio"] == pytest.approx(plan["latency"]["predicted_ratio"])
    assert plan["latency"]["ratio"] <= 0.6 and plan["latency"]["target"] == 0.6 and plan["latency"]["warning"] is None
    # channel counts rounded to the multiple the measured sweep chose
    assert isinstance(plan["round_to"], int) and plan["round_to"] >= 1
    assert all(len(entry["out_channels_kept"]) % plan["round_to"] == 0
               for entry in plan["layers"].values() if entry.get("out_channels_kept"))
    assert fake_ms(net) == fake_ms(tiny_net())  # the caller's model is not changed


class _Structure(nn.Module):
    """A built structure whose measured ratio to dense is known: ``measured`` (a fake compare reads it)."""

    def __init__(self, measured: float):
        super().__init__()
        self.measured = measured


@pytest.fixture
def fake_compare(monkeypatch):
    def compare(dense, candidate, example_inputs, runtime, threads=None, rounds=5, dense_timer=None):
        return {"ratio": candidate.measured, "ratio_p10": candidate.measured, "ratio_p90": candidate.measured}

    monkeypatch.setattr(runtimes, "compare", compare)


def biased_build(measured_of_goal):
    """build(goal) for meet_measured: the structure for ``goal`` measures ``measured_of_goal(goal)``; the
    decision is the goal itself (a new structure per goal)."""
    return lambda goal: (_Structure(measured_of_goal(goal)), round(goal, 9), {"predicted_ratio": goal})


AIM = (1 - runtimes.TARGET_WINDOW / 2) * 0.5  # the middle of the window below a target of 0.5


@pytest.mark.parametrize("bias, goals, chosen", [
    (1.0, [0.5], 0),  # the prediction is right: measured once, within the window
    (1.1, [0.5, AIM / 1.1], 1),  # predicted 10% fast: one corrected goal lands on the aim
    (0.7, [0.5, AIM / 0.7], 1),  # predicted 30% slow (over-compressed): the goal is relaxed to the aim
])
def test_meet_measured_corrects_the_goal_by_the_measured_error(fake_compare, bias, goals, chosen):
    decision, tries = runtimes.meet_measured(biased_build(lambda g: bias * g), nn.Identity(), X, "eager", 0.5)
    assert [t["goal"] for t in tries] == pytest.approx(goals)
    assert [t.get("chosen", False) for t in tries] == [i == chosen for i in range(len(goals))]
    assert decision == pytest.approx(goals[chosen])
    assert (1 - runtimes.TARGET_WINDOW) * 0.5 <= tries[chosen]["measured_ratio"] <= 0.5


def test_meet_measured_keeps_the_fastest_when_none_is_within(fake_compare):
    # an overhead the prediction misses: measured = goal + 0.3 never reaches the window, the fastest is kept
    decision, tries = runtimes.meet_measured(biased_build(lambda g: g + 0.3), nn.Identity(), X, "eager", 0.5)
    assert len(tries) == runtimes.MEASURED_TRIES
    assert [t["measured_ratio"] for t in tries] == sorted((t["measured_ratio"] for t in tries), reverse=True)
    assert tries[-1].get("chosen") and decision == pytest.approx(tries[-1]["goal"])


def test_meet_measured_makes_the_dense_timer_once_for_all_tries(monkeypatch):
    # ONNX Runtime exports the model a timer times: the dense model's timer is made at the first comparison and
    # handed to every later one
    made, handed = [], []
    monkeypatch.setattr(runtimes, "reference_timer", lambda *a, **k: made.append(object()) or made[-1])
    monkeypatch.setattr(runtimes, "compare", lambda dense, candidate, *a, dense_timer=None, **k: handed.append(
        dense_timer) or {"ratio": candidate.measured, "ratio_p10": candidate.measured, "ratio_p90": candidate.measured})
    _, tries = runtimes.meet_measured(biased_build(lambda g: g + 0.3), nn.Identity(), X, "eager", 0.5)
    assert len(tries) == runtimes.MEASURED_TRIES and len(made) == 1
    assert handed == [made[0]] * runtimes.MEASURED_TRIES


def test_meet_measured_interpolates_once_bracketed_and_keeps_the_least_compressed_within(fake_compare):
    # a step function of the goal: 0.40 (too fast), 0.55 (missed), then 0.42 and 0.53 between them
    measured = iter([0.40, 0.55, 0.42, 0.53])
    decision, tries = runtimes.meet_measured(biased_build(lambda g: next(measured)), nn.Identity(), X, "eager", 0.5)
    goals = [t["goal"] for t in tries]
    assert goals[1] == pytest.approx(0.5 * AIM / 0.40)  # all below: scaled
    # bracketed by (0.5, 0.40) and (goals[1], 0.55): the interpolation at the aim
    assert goals[2] == pytest.approx(0.5 + (AIM - 0.40) * (goals[1] - 0.5) / (0.55 - 0.40))
    # the closest below is now (goals[2], 0.42)
    assert goals[3] == pytest.approx(goals[2] + (AIM - 0.42) * (goals[1] - goals[2]) / (0.55 - 0.42))
    assert [t.get("chosen", False) for t in tries] == [False, False, True, False]  # 0.42: least compressed within
    assert decision == pytest.approx(goals[2])


def test_meet_measured_stops_on_a_structure_already_measured(fake_compare):
    built = []

    def build(goal):
        built.append(goal)
        return _Structure(0.6), "the only structure", {}

    decision, tries = runtimes.meet_measured(build, nn.Identity(), X, "eager", 0.5)
    assert len(built) == 2 and len(tries) == 1 and tries[0]["chosen"] and decision == "the only structure"


def test_meet_measured_unreachable_goals(fake_compare):
    def never(goal):
        raise ValueError(f"target_latency={goal} cannot be met\nsecond line")

    with pytest.raises(ValueError, match="target_latency=0.5 cannot be met"):
        runtimes.meet_measured(never, nn.Identity(), X, "eager", 0.5)
    goals = iter([True, False])

    def first_only(goal):
        if next(goals):
            return _Structure(0.6), "first", {}
        raise ValueError(f"target_latency={goal:.3f} cannot be met\nsecond line")

    decision, tries = runtimes.meet_measured(first_only, nn.Identity(), X, "eager", 0.5)
    assert decision == "first" and tries[0]["chosen"]
    assert tries[1] == {"goal": pytest.approx(0.5 * AIM / 0.6),
                        "unreachable": f"target_latency={0.5 * AIM / 0.6:.3f} cannot be met"}


@pytest.fixture
def overhead_timer(fake_timer, monkeypatch):
    """The fake timer, with a whole model costing a fixed 0.2 of the tiny net's fake ms more than its layers:
    an overhead the prediction cannot see, so the structure predicted at a target measures slower than it."""
    make_layer_timer = runtimes.make_timer

    def make_timer(module, inputs, runtime, device, threads):
        if not isinstance(module, nn.Sequential):
            return make_layer_timer(module, inputs, runtime, device, threads)
        ms = fake_ms(module) + 0.2 * fake_ms(tiny_net())
        return lambda warmup, repeats: Timing(median_ms=ms, p10_ms=ms, p90_ms=ms, repeats=repeats)

    monkeypatch.setattr(runtimes, "make_timer", make_timer)


def test_prune_target_latency_closes_the_loop_on_measurements(overhead_timer):
    # the structure predicted at the target measures slower than it (overhead_timer); the corrected goals prune
    # further
    net = tiny_net()
    pruned, plan = rankprune.prune(net, X, "l1", target_latency=0.7, progress=False)
    tries = plan["latency_search"]["measured_tries"]
    assert tries[0]["goal"] == 0.7 and tries[0]["predicted_ratio"] <= 0.7 < tries[0]["measured_ratio"]
    aim = (1 - runtimes.TARGET_WINDOW / 2) * 0.7
    assert tries[1]["goal"] == pytest.approx(0.7 * aim / tries[0]["measured_ratio"])
    chosen = [t for t in tries if t.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["ratio"] == plan["ratio"] == plan["latency_search"]["ratio"]
    assert (1 - runtimes.TARGET_WINDOW) * 0.7 <= chosen[0]["measured_ratio"] <= 0.7
    # the model returned is the structure measured: its final measurement is the chosen try's, within the target
    assert plan["latency"]["ratio"] == pytest.approx(chosen[0]["measured_ratio"])
    assert plan["latency"]["warning"] is None
    _, quiet = rankprune.prune(net, X, "l1", target_latency=0.7, measure_latency=False, progress=False)
    assert "measured_tries" not in quiet["latency_search"] and "latency" not in quiet


def test_reference_timer_builds_what_it_times_at_its_first_call(fake_timer, monkeypatch):
    # made before a compression's work, it holds no ONNX Runtime session or CUDA graph until it measures
    made = []
    make_timer = runtimes.make_timer
    monkeypatch.setattr(runtimes, "make_timer", lambda *a: made.append(a[0]) or make_timer(*a))
    net = tiny_net()
    timer = runtimes.reference_timer(net, X, "eager")
    assert made == []
    assert timer(0, 3).median_ms == timer(1, 2).median_ms == fake_ms(net)
    assert made == [net]


@pytest.mark.filterwarnings("ignore:decompose. target_latency=0.7 missed")  # the overhead the loop cannot beat
@pytest.mark.parametrize("verb", ["prune", "decompose", "compress"])
def test_the_dense_model_is_timed_by_one_timer_for_the_loop_and_the_final_check(overhead_timer, monkeypatch, verb):
    # ONNX Runtime exports the model each timer times: the closed loop (several tries here, overhead_timer) and
    # the final verify share the dense model's one timer
    if verb != "decompose":
        pytest.importorskip("torch_pruning")
    net, timed = tiny_net(), []
    make_timer = runtimes.make_timer
    monkeypatch.setattr(runtimes, "make_timer", lambda module, *a: timed.append(module) or make_timer(module, *a))
    data = [torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    if verb == "prune":
        _, plan = rankprune.prune(net, X, "l1", target_latency=0.7, progress=False)
    elif verb == "decompose":
        _, plan, _ = rankprune.decompose(net, target_latency=0.7, example_inputs=X, min_rank=1, progress=False)
    else:
        _, plan, _ = rankprune.compress(net, X, data=data, target_latency=0.7, shares=(1.0,), progress=False)
    tries = plan["latency_search"]["measured_tries"]
    assert "latency" in plan and len(tries) >= (1 if verb == "decompose" else 2)
    assert sum(module is net for module in timed) == 1
    assert len(timed) == 1 + len(tries) + 1  # the dense model, each try, the result's final check


def test_decompose_target_latency_closes_the_loop_on_measurements(fake_timer):
    net = tiny_net()
    small, plan, report = rankprune.decompose(net, target_latency=0.6, example_inputs=X, min_rank=1, progress=False)
    search = report["latency_search"]
    assert plan["latency_search"] is search and search["runtime"] == "eager"
    chosen = [t for t in search["measured_tries"] if t.get("chosen")]
    # fake times are exact: the measured structure is the model returned, and within the target
    assert len(chosen) == 1 and chosen[0]["measured_ratio"] == pytest.approx(report["latency"]["ratio"])
    assert report["latency"]["ratio"] <= 0.6
    assert chosen[0]["layers_decomposed"] == len(plan["layers"])


def test_compress_target_latency_splits_the_latency_budget(fake_timer):
    pytest.importorskip("torch_pruning")
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 8, 8, 8, generator=g) for _ in range(4)]
    net = tiny_net()
    small, plan, report = rankprune.compress(net, X, data=data, target_latency=0.5, progress=False)
    assert plan["target_latency"] == 0.5 and plan["target_flops"] is None
    assert all(c["budget"] == "latency" for c in report["candidates"])
    # fake milliseconds are parameters: each step's prediction is exact, so the product meets the target
    assert plan["latency"]["ratio"] == pytest.approx(fake_ms(small) / fake_ms(net))
    assert plan["latency"]["ratio"] <= 0.5 + 1e-9 and plan["latency"]["warning"] is None
    rebuilt = rankprune.apply_plan(tiny_net(), plan)
    rebuilt.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(X), small(X))
    with pytest.raises(ValueError, match="give exactly one of target_flops"):
        rankprune.compress(net, X, data=data, target_flops=0.5, target_latency=0.5, progress=False)


def test_compress_target_latency_closes_the_loop_on_measurements(overhead_timer):
    # As for prune (overhead_timer): the splits are compared on the prediction, which cannot see the overhead;
    # the chosen split is run again for corrected goals until its result measures within the window below the
    # target, and that result is the model returned.
    pytest.importorskip("torch_pruning")
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 8, 8, 8, generator=g) for _ in range(4)]
    net = tiny_net()
    small, plan, report = rankprune.compress(net, X, data=data, target_latency=0.7, shares=(1.0,), progress=False)
    tries = plan["latency_search"]["measured_tries"]
    assert plan["latency_search"]["runtime"] == "eager"
    assert tries[0]["goal"] == 0.7 and tries[0]["measured_ratio"] > 0.7 and len(tries) >= 2
    chosen = [t for t in tries if t.get("chosen")]
    assert len(chosen) == 1 and (1 - runtimes.TARGET_WINDOW) * 0.7 <= chosen[0]["measured_ratio"] <= 0.7
    assert plan["latency"]["ratio"] == pytest.approx(chosen[0]["measured_ratio"]) and plan["latency"]["warning"] is None
    rebuilt = rankprune.apply_plan(tiny_net(), plan)
    rebuilt.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(X), small(X))
    _, quiet, _ = rankprune.compress(net, X, data=data, target_latency=0.7, shares=(1.0,), measure_latency=False,
                                     progress=False)
    assert "latency_search" not in quiet and "latency" not in quiet


def test_prediction_of_a_pruned_model_takes_the_rest_of_the_pass_down_with_the_layers_inputs(fake_timer):
    # the fake timer makes the layers' times exact; 10 ms more of dense time are the rest of the pass (BatchNorm,
    # activations): pruning conv 0 to 16 outputs halves conv 2's input, so the rest shrinks with the elements
    # the layers read: (8*64 + 16*64 + 32) of (8*64 + 32*64 + 32) per sample
    lm = LatencyModel.measure(tiny_net(), X, progress=False)
    lm.dense_ms += 10.0
    pruned = tiny_net()
    pruned[0], pruned[2] = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
    saving = sum(fake_ms(a) - fake_ms(b) for a, b in ((tiny_net()[0], pruned[0]), (tiny_net()[2], pruned[2])))
    fraction = (8 * 64 + 16 * 64 + 32) / (8 * 64 + 32 * 64 + 32)
    assert lm.predict(pruned) == pytest.approx(lm.dense_ms - saving - 10.0 * (1 - fraction), rel=1e-12)
    decomposed = rankprune.decompose(tiny_net(), ranks={"2": 4}, progress=False)[0]  # inputs unchanged
    assert lm.predict(decomposed) == pytest.approx(
        lm.dense_ms - (fake_ms(tiny_net()[2]) - fake_ms(decomposed[2])), rel=1e-12)


def test_the_cli_names_every_runtime():
    assert cli_common.RUNTIMES == latency.RUNTIMES  # a copy, so that --help does not import the latency package


def test_prune_target_latency_unreachable_names_the_closest(fake_timer):
    with pytest.raises(ValueError, match=r"target_latency=0.01 cannot be met on runtime 'eager': the closest "
                                         r"reachable latency is 0\.\d+ of dense \(predicted with max_layer_ratio"):
        rankprune.prune(tiny_net(), X, "l1", target_latency=0.01, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_latency=0.5, target_flops=0.5), "give exactly one of ratio"),
    (dict(target_latency=0.0), r"target_latency must be in \(0, 1\]"),
    (dict(target_latency=0.5, runtime="cuda_graph"), "runtime='cuda_graph' needs a model on a CUDA"),
])
def test_prune_target_latency_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rankprune.prune(tiny_net(), X, "l1", progress=False, **kwargs)


def test_verify_names_a_missed_target(fake_timer):
    net = tiny_net()
    small, _, _ = rankprune.decompose(net, ranks={"2": 16}, example_inputs=X, progress=False)
    ratio = fake_ms(small) / fake_ms(net)
    with pytest.warns(UserWarning, match=rf"prune: target_latency=0.1 missed by {ratio - 0.1:.3f}: measured "
                                         rf"{ratio:.3f}x dense"):
        measured = latency.verify(net, small, X, target=0.1, verb="prune")
    assert measured["ratio"] == pytest.approx(ratio) and measured["target"] == 0.1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target_latency=0.5, runtime="tensorrt"), ValueError, r"runtime must be one of \('eager', 'cuda_graph', "
                                                               r"'onnxruntime'\), got 'tensorrt'"),
    (dict(target_latency=0.5, runtime="cuda_graph"), ValueError, "runtime='cuda_graph' needs a model on a CUDA"),
    (dict(target_latency=1.5), ValueError, r"target_latency must be in \(0, 1\], got 1.5"),
    (dict(target_latency=0.5, target_flops=0.5), ValueError, "give exactly one of"),
    (dict(target_flops=0.5, measure_latency="yes"), TypeError, "measure_latency must be True, False or None"),
])
def test_bad_latency_arguments(kwargs, error, match):
    net = tiny_net()
    before = state(net)
    with pytest.raises(error, match=match):
        rankprune.decompose(net, example_inputs=X, progress=False, **kwargs)
    assert_same_state(before, net)


def test_target_latency_needs_example_inputs():
    with pytest.raises(ValueError, match="target_latency needs example_inputs"):
        rankprune.decompose(tiny_net(), target_latency=0.5, progress=False)


def test_missing_onnxruntime_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ImportError, match="runtime='onnxruntime' needs ONNX Runtime and onnx: pip install onnxruntime"):
        rankprune.decompose(tiny_net(), target_latency=0.5, runtime="onnxruntime", example_inputs=X, progress=False)


class RefusesExport(nn.Module):
    """A model whose forward cannot be exported (stands in for any exporter failure)."""

    def __init__(self):
        super().__init__()
        self.body = tiny_net()

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError("this forward has no ONNX form")
        return self.body(x)


def test_a_model_that_does_not_export_is_one_clear_error():
    pytest.importorskip("onnxruntime")
    net = RefusesExport().eval()
    before = state(net)
    with pytest.raises(ValueError, match=r"runtime='onnxruntime': RefusesExport does not export to ONNX "
                                         r"\(RuntimeError: this forward has no ONNX form\)"):
        rankprune.decompose(net, target_latency=0.5, runtime="onnxruntime", example_inputs=X, progress=False)
    assert_same_state(before, net)


def test_onnxruntime_path_on_a_tiny_model():
    pytest.importorskip("onnxruntime")
    net = tiny_net()
    lm = LatencyModel.measure(net, X, "onnxruntime", progress=False)
    lm.profile({"2": [Variant(rank=8), Variant(out_channels=16)]})
    assert set(lm.known("2")) == {"dense", "rank=8", "out=16,in=None"}
    assert lm.cache_key("2")["onnxruntime"] == pytest.importorskip("onnxruntime").__version__
    small, plan, report = rankprune.decompose(net, ranks={"2": 8}, example_inputs=X, runtime="onnxruntime",
                                              progress=False)
    assert report["latency"]["runtime"] == "onnxruntime" and report["latency"]["dense"]["median_ms"] > 0
    assert lm.predict(small) > 0


def test_cli_clear_cache(cache_in_tmp, tmp_path):
    cache_in_tmp.mkdir(parents=True)
    (cache_in_tmp / "x.json").write_text(json.dumps({"key": {}, "timings": {}}))
    env = {**os.environ, latency.CACHE_ENV: str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "rankprune", "bench", "clear-cache"], capture_output=True,
                          text=True, env=env, check=True)
    assert done.stdout.strip() == f"removed 1 cached timing file(s) from {cache_in_tmp}"
    assert list(cache_in_tmp.glob("*.json")) == []


def test_cli_bench_model_predicts_beside_the_measurement(fake_timer, capsys, tmp_path):
    argv = ["bench", "model", "--model", "resnet20", "--variants", "dense,decomposed", "--predict", "--warmup", "1",
            "--repeats", "2", "--device", "cpu", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    assert "predicted ms" in capsys.readouterr().out
    payload = json.loads(next(p for p in (tmp_path / "out").iterdir() if p.suffix == ".json").read_text())
    rows = {r["variant"]: r for r in payload["rows"]}
    # fake milliseconds are parameter counts: the decomposed model is predicted faster by its saved parameters
    assert rows["dense"]["predicted_ms"] == pytest.approx(rows["dense"]["params"] / 1000)
    assert rows["decomposed"]["predicted_ms"] == pytest.approx(rows["decomposed"]["params"] / 1000)


@pytest.mark.cuda
@pytest.mark.parametrize("runtime", ["eager", "cuda_graph"])
def test_cuda_runtimes_measure_layers_and_compare(runtime):
    net = tiny_net().cuda()
    x = X.cuda()
    lm = LatencyModel.measure(net, x, runtime, progress=False)
    lm.profile({"2": [Variant(rank=16)]})
    assert lm.known("2").keys() == {"dense", "rank=16"}
    small, plan, report = rankprune.decompose(net, ranks={"2": 16}, example_inputs=x, runtime=runtime,
                                              progress=False)
    assert report["latency"]["runtime"] == runtime and report["latency"]["compressed"]["median_ms"] > 0


def test_layer_times_are_scaled_to_their_time_inside_the_model(fake_timer, monkeypatch):
    monkeypatch.setattr(latency_model_module, "in_context_ms", lambda model, inputs, layers, *rest: 1.5 * sum(
        fake_ms(layer.module) for layer in layers.values()))
    net = tiny_net()
    lm = LatencyModel.measure(net, X, progress=False)
    assert lm.context_scale == pytest.approx(1.5)
    assert lm.layer_time("2") == pytest.approx(1.5 * fake_ms(net[2]))
    assert lm.known("2")["dense"] == pytest.approx(fake_ms(net[2]))  # as timed alone


def test_in_context_time_of_the_layers_is_measured_by_hooks():
    net = tiny_net()
    lm = LatencyModel.measure(net, X, progress=False)
    assert 0 < lm.context_ms < 1e3 and lm.context_scale > 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_output_error_with_a_latency_model_scores_per_measured_millisecond(fake_timer):
    # Fake milliseconds are parameter counts / 1000: per FLOP, tiny_net's classifier is 65x slower than its
    # convolutions. Each layer's FLOPs are weighted by its time per FLOP over the median layer's (conv0's here),
    # so a group's scores are its per-FLOP scores times (its FLOPs per channel / its weighted FLOPs per channel).
    from rankprune.pruning._output_error import OutputError, _time_per_flop

    net = tiny_net()
    lm = latency.LatencyModel.measure(net, X, "eager", progress=False)
    shapes = {"0": (32, 8, 8), "2": (32, 8, 8), "6": (10,)}
    flops = {"0": 9 * 64 * 8 * 32, "2": 9 * 64 * 32 * 32, "6": 32 * 10}
    per_flop = {name: fake_ms(net.get_submodule(name)) / flops[name] for name in flops}
    weights = _time_per_flop(lm, net, shapes)
    assert {name: weights[name] for name in flops} == pytest.approx(
        {name: value / per_flop["0"] for name, value in per_flop.items()}, rel=1e-12)
    assert weights["not timed"] == 1.0
    data = [torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    by_flops = OutputError(progress=False).scores(net, data)
    by_ms = OutputError(progress=False, latency_model=lm).scores(net, data)
    # conv0's channels cost 9*64*8 FLOPs in conv0 and 9*64*32 in conv2 (its consumer); conv2's 9*64*32 in
    # conv2 and 10 in the classifier
    channel = {"0": {"0": 9 * 64 * 8, "2": 9 * 64 * 32}, "2": {"2": 9 * 64 * 32, "6": 10}}
    for name, costs in channel.items():
        scale = sum(costs.values()) / sum(weights[layer] * cost for layer, cost in costs.items())
        torch.testing.assert_close(by_ms[name], by_flops[name] * scale, rtol=1e-9, atol=0)
    pruned, plan = rankprune.prune(net, X, data=data, target_latency=0.7, progress=False)
    assert plan["criterion"] == "output_error"
    assert plan["latency_search"]["allocation"] == "output error per measured millisecond saved"
    assert rankprune.prune(net, X, "l1", target_latency=0.7, progress=False)[1]["latency_search"][
        "allocation"] == "the scores of l1"
