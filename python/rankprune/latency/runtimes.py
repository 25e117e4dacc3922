"""Where a model or a layer is timed (the runtimes), and the end-to-end check of a compressed model against the
dense one it came from: interleaved rounds, medians and spreads, a warning naming the gap.

Runtimes: ``"eager"`` (PyTorch on the model's device, CPU or CUDA), ``"cuda_graph"`` (PyTorch on CUDA, each
call captured into a CUDA graph and replayed: no launch overhead) and ``"onnxruntime"`` (the module exported
to ONNX and run by an ONNX Runtime CPU session).
"""
import os
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .._inputs import batch_size, caller_stacklevel, model_device_dtype
from .._version import __version__
from ..benchmark import Timing, environment, latency, measure, spread

RUNTIMES = ("eager", "cuda_graph", "onnxruntime")
ORT_INSTALL = "pip install onnxruntime onnx"
# Rounds of the end-to-end comparison: dense and compressed alternate, so that load on a shared machine hits
# both alike; the ratio is taken per round.
DEFAULT_ROUNDS = 7

Timer = Callable[[int, int], Timing]  # (warmup, repeats) -> Timing


def check_runtime(runtime, device: torch.device, arg: str = "runtime") -> None:
    """ValueError for an unknown runtime or one the device cannot run; ImportError with the install line when
    ``runtime="onnxruntime"`` and ONNX Runtime (or the ONNX exporter's ``onnx``) is missing."""
    if runtime not in RUNTIMES:
        raise ValueError(f"{arg} must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"{arg}='cuda_graph' needs a model on a CUDA device, got one on {device.type}")
    if runtime == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(f"{arg}='onnxruntime' times ONNX Runtime on the CPU: move the model to the CPU first")
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"{arg}='onnxruntime' needs ONNX Runtime and onnx: {ORT_INSTALL}") from exc


def runtime_versions(runtime: str) -> Dict[str, str]:
    """The library versions a timing in ``runtime`` depends on (cache keys, reports)."""
    versions = {"torch": torch.__version__, "rankprune": __version__}
    if runtime == "onnxruntime":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    return versions


def runtime_threads(runtime: str, threads: Optional[int]) -> int:
    """The intra-op thread count a runtime runs with: PyTorch's own for eager and CUDA graphs (set it with
    ``torch.set_num_threads``); for ONNX Runtime ``threads``, else PyTorch's, so that both use the same cores."""
    return threads if runtime == "onnxruntime" and threads else torch.get_num_threads()


def make_timer(module: nn.Module, inputs, runtime: str, device: torch.device, threads: int) -> Timer:
    """A function timing ``module(*inputs)`` in ``runtime`` (see :func:`rankprune.benchmark.latency`, whose
    timing rules apply); for ONNX Runtime the module is exported once, here (ValueError when it does not
    export)."""
    if runtime != "onnxruntime":
        graph = runtime == "cuda_graph"
        return lambda warmup, repeats: latency(module, inputs, device=device, warmup=warmup, repeats=repeats,
                                               cuda_graph=graph)
    session, feeds = _onnx_runner(module, inputs, threads)
    return lambda warmup, repeats: measure(lambda: session.run(None, feeds), "cpu", warmup=warmup, repeats=repeats)


def _onnx_runner(module: nn.Module, inputs, threads: int):
    from ..export import export_onnx, onnx_session  # at call time: only ONNX Runtime timing needs the exporter

    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs) if isinstance(inputs, (tuple, list)) else ()
    kwargs = inputs if isinstance(inputs, dict) else {}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "module.onnx")
        try:
            # The TorchScript exporter: ~10 ms per layer against seconds for the torch.export-based one, and the
            # same standard Conv/Gemm nodes for these modules.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                was_training = module.training
                module.eval()
                try:
                    export_onnx(module, args, path, kwargs=kwargs, dynamo=False, verbose=False)
                finally:
                    module.train(was_training)
        except Exception as exc:  # any exporter failure: one clear error naming the module
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"runtime='onnxruntime': {type(module).__name__} does not export to ONNX "
                             f"({type(exc).__name__}: {first_line})") from exc
        # Idle threads block instead of spinning: after its calls, a session's threads spin-wait for more work
        # and take the cores from the next session timed in the same process. Dense against pruned ResNet-18,
        # batch 1, 2 threads, interleaved: 0.84x, 1.06x and 0.92x in three comparisons with spinning (p10-p90
        # up to 0.43 wide), 0.69x each time without; each model in a session of its own measured 0.66x.
        session = onnx_session(path, threads, spinning=False)
    tensors = list(args) + list(kwargs.values())
    names = [i.name for i in session.get_inputs()]
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)}
    return session, feeds


def interleaved(timers: Dict[str, Timer], rounds: int, repeats: int, warmup: int = 2) -> Dict[str, List[Timing]]:
    """Each timer's Timing in each of ``rounds`` rounds; within a round the timers run one after the other
    (A B C, A B C, ...), so that a slow moment of the machine falls on all of them. The first round warms up
    with ``warmup`` untimed calls, later ones with one."""
    results: Dict[str, List[Timing]] = {name: [] for name in timers}
    for round_index in range(rounds):
        for name, timer in timers.items():
            results[name].append(timer(warmup if round_index == 0 else 1, repeats))
    return results


def pooled(timings: List[Timing]) -> Timing:
    """One Timing from the rounds' medians: their median, 10th and 90th percentiles."""
    median, p10, p90 = spread([t.median_ms for t in timings])
    return Timing(median_ms=median, p10_ms=p10, p90_ms=p90, repeats=sum(t.repeats for t in timings))


def round_ratios(dense: List[Timing], other: List[Timing]) -> Dict[str, float]:
    """``{"ratio", "ratio_p10", "ratio_p90"}``: the median over rounds of ``other``'s time over ``dense``'s in the
    same round (``interleaved``), with its 10th and 90th percentiles."""
    ratio, p10, p90 = spread([o.median_ms / d.median_ms for d, o in zip(dense, other)])
    return {"ratio": ratio, "ratio_p10": p10, "ratio_p90": p90}


def compare(dense: nn.Module, compressed: nn.Module, example_inputs, runtime: str = "eager", *,
            threads: Optional[int] = None, rounds: int = DEFAULT_ROUNDS, repeats: int = 5,
            dense_timer: Optional[Timer] = None) -> Dict[str, object]:
    """Measured end-to-end latency of ``compressed`` against ``dense`` on ``example_inputs``: ``rounds`` rounds
    alternating the two (``repeats`` timed calls each), in ``runtime`` on the models' device. ``dense_timer``:
    ``dense``'s timer from an earlier comparison (:func:`reference_timer`), reused (ONNX Runtime then exports the
    dense model once for all of them).

    Returns ``{"runtime", "device", "batch", "threads", "dense": Timing dict, "compressed": Timing dict, "ratio",
    "ratio_p10", "ratio_p90", "rounds"}``: the Timings pool the rounds' medians; ``ratio`` is the median over
    rounds of compressed / dense (each round's own pair), with its 10th and 90th percentiles. Neither model is
    changed (each runs in eval mode, its training flags restored)."""
    device, threads = _timing_settings(dense, example_inputs, runtime, threads)
    timers = {"dense": dense_timer or make_timer(dense, example_inputs, runtime, device, threads),
              "compressed": make_timer(compressed, example_inputs, runtime, device, threads)}
    results = interleaved(timers, rounds, repeats)
    return {
        "runtime": runtime,
        "device": environment(device)["device"],
        "batch": batch_size(example_inputs),
        "threads": threads,
        "dense": pooled(results["dense"]).as_dict(),
        "compressed": pooled(results["compressed"]).as_dict(),
        **round_ratios(results["dense"], results["compressed"]),
        "rounds": rounds,
    }


def _timing_settings(dense: nn.Module, example_inputs, runtime: str, threads: Optional[int]
                     ) -> Tuple[torch.device, int]:
    """The device a comparison runs on (checked against ``runtime``) and its threads."""
    device = _device_of(dense, example_inputs)
    check_runtime(runtime, device)
    return device, runtime_threads(runtime, threads)


def reference_timer(dense: nn.Module, example_inputs, runtime: str, threads: Optional[int] = None) -> Timer:
    """``dense``'s timer for :func:`compare` (``dense_timer=``), made once for several comparisons. What it
    builds to time (an ONNX Runtime session, a captured CUDA graph) is built at its first call, so that a
    compression can make it before its work and hold nothing until it measures."""
    device, threads = _timing_settings(dense, example_inputs, runtime, threads)
    built: List[Timer] = []

    def timer(warmup: int, repeats: int) -> Timing:
        if not built:
            built.append(make_timer(dense, example_inputs, runtime, device, threads))
        return built[0](warmup, repeats)

    return timer


def warn_if_slow(measured: Dict[str, object], target: Optional[float], verb: str) -> Optional[str]:
    """Warn (and return the message) when the measured model is not faster than dense, or, with ``target`` (a
    fraction of dense latency), slower than the target; None when neither."""
    ratio, low, high = measured["ratio"], measured["ratio_p10"], measured["ratio_p90"]
    where = (f"{measured['runtime']} on {measured['device']}, batch {measured['batch']}: "
             f"{measured['compressed']['median_ms']:.3g} ms against {measured['dense']['median_ms']:.3g} ms dense, "
             f"p10-p90 of the ratio {low:.3f}-{high:.3f}")
    if ratio >= 1.0:
        message = f"{verb}: the compressed model is not faster than dense: measured {ratio:.3f}x ({where})"
    elif target is not None and ratio > target:
        message = (f"{verb}: target_latency={target} missed by {ratio - target:.3f}: measured {ratio:.3f}x dense "
                   f"({where})")
    else:
        return None
    warnings.warn(message, stacklevel=caller_stacklevel())
    return message


def verify(dense: nn.Module, compressed: nn.Module, example_inputs, runtime: str = "eager", *,
           target: Optional[float] = None, verb: str = "compress", threads: Optional[int] = None,
           rounds: int = DEFAULT_ROUNDS, dense_timer: Optional[Timer] = None) -> Dict[str, object]:
    """:func:`compare`, then a warning naming the gap when ``compressed`` is not faster than ``dense`` or misses
    ``target`` (a fraction of dense latency); returns the comparison with ``"target"`` and ``"warning"`` (the
    message, or None) added. Call it at the end of any compression that promises speed; ``dense_timer``: the
    one its closed loop (:func:`meet_measured`) used, if any."""
    measured = compare(dense, compressed, example_inputs, runtime, threads=threads, rounds=rounds,
                       dense_timer=dense_timer)
    measured["target"] = target
    measured["warning"] = warn_if_slow(measured, target, verb)
    return measured


# The closed loop of a latency target (``meet_measured``): structures built and measured end to end at most, the
# window below the target that ends it (a model more compressed than that gives away accuracy), and the rounds
# of each measurement.
MEASURED_TRIES = 4
TARGET_WINDOW = 0.05
LOOP_ROUNDS = 5

# build(goal) -> (candidate module, decision, record): the structure the latency model predicts at ``goal`` (a
# fraction of dense), what the caller needs to build it for real (compared with ==), and what to report of it.
Build = Callable[[float], Tuple[nn.Module, object, Dict[str, object]]]


def meet_measured(build: Build, dense: nn.Module, example_inputs, runtime: str, target: float, *,
                  threads: Optional[int] = None, reference: Optional[Timer] = None
                  ) -> Tuple[object, List[Dict[str, object]]]:
    """Meet ``target`` (a fraction of ``dense``'s latency) as measured, not as predicted: the structure built for
    the predicted ``target`` is timed against ``dense`` (:func:`compare`); until one measures within
    ``[(1 - TARGET_WINDOW) * target, target]``, the goal handed to ``build`` is corrected toward the middle of
    that window and the new structure measured, up to ``MEASURED_TRIES`` structures (one already measured ends
    the loop). The correction (:func:`next_goal`) scales the goal by the measured error while all tries fall
    on one side of the window, and interpolates between the closest tries on either side once they bracket it
    (the measured ratio is a step function of the goal: scaling alone can jump back and forth over it).

    ``reference``: ``dense``'s timer (:func:`reference_timer`), for a caller that times the result against
    ``dense`` again afterwards (:func:`verify`); by default one is made at the first comparison. Either way
    every try is timed against the same one (ONNX Runtime exports the dense model once).

    Returns ``(decision, tries)``: the decision of the least compressed structure measured within the target
    (none within: the fastest measured), and every try's goal, record, measured ratio and spread, the chosen
    one marked ``"chosen": True``. ``build``'s ValueError (goal unreachable) propagates on the first goal and
    ends the loop on a later one (recorded)."""
    tries: List[Dict[str, object]] = []
    decisions: List[Tuple[int, object]] = []
    goal = target
    for _ in range(MEASURED_TRIES):
        try:
            candidate, decision, record = build(goal)
        except ValueError as exc:
            if not tries:
                raise
            tries.append({"goal": goal, "unreachable": str(exc).splitlines()[0]})
            break
        if any(decision == seen for _, seen in decisions):  # the same structure again: nothing new to measure
            break
        reference = reference or reference_timer(dense, example_inputs, runtime, threads)
        measured = compare(dense, candidate, example_inputs, runtime, threads=threads, rounds=LOOP_ROUNDS,
                           dense_timer=reference)
        del candidate
        decisions.append((len(tries), decision))
        tries.append({"goal": goal, **record, "measured_ratio": measured["ratio"],
                      "measured_p10": measured["ratio_p10"], "measured_p90": measured["ratio_p90"]})
        if (1.0 - TARGET_WINDOW) * target <= measured["ratio"] <= target:
            break
        goal = next_goal([(t["goal"], t["measured_ratio"]) for t in tries], target)  # all measured so far
    within = [(i, d) for i, d in decisions if tries[i]["measured_ratio"] <= target]
    index, decision = (max(within, key=lambda pair: tries[pair[0]]["measured_ratio"]) if within
                       else min(decisions, key=lambda pair: tries[pair[0]]["measured_ratio"]))
    tries[index]["chosen"] = True
    return decision, tries


def next_goal(measured: List[Tuple[float, float]], target: float) -> float:
    """The next goal of :func:`meet_measured` from the ``(goal, measured ratio)`` pairs so far, aiming at the middle
    of the window below ``target``: the last goal scaled by aim / measured while every try is on one side, else
    the linear interpolation between the highest goal measured below the aim and the lowest measured above it."""
    aim = (1.0 - TARGET_WINDOW / 2) * target
    below = [pair for pair in measured if pair[1] < aim]
    above = [pair for pair in measured if pair[1] >= aim]
    if not below or not above:
        goal, ratio = measured[-1]
        return min(goal * aim / ratio, 1.0)
    (g0, r0), (g1, r1) = max(below), min(above)
    return g0 + (aim - r0) * (g1 - g0) / (r1 - r0)  # r0 < aim <= r1


def _device_of(model: nn.Module, example_inputs) -> torch.device:
    for p in model.parameters():
        return p.device
    tensors = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(
        example_inputs.values() if isinstance(example_inputs, dict) else example_inputs)
    return next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))


def latency_settings(model: nn.Module, target_flops: Optional[float], target_latency: Optional[float],
                     runtime: Optional[str], measure_latency: Optional[bool], example_inputs) -> Tuple[str, bool]:
    """For any verb that can time its result: ``(runtime, whether to time the result against dense)``: ``runtime`` defaults to "eager";
    ``measure_latency=None`` measures whenever a speed is asked for (``target_flops``, ``target_latency`` or a
    ``runtime`` named) and there are example inputs to time. Checks the runtime first (ValueError, or
    ImportError with the install line for a missing ONNX Runtime)."""
    if measure_latency not in (None, True, False):
        raise TypeError(f"measure_latency must be True, False or None, got {measure_latency!r}")
    if measure_latency is None:
        asked = target_flops is not None or target_latency is not None or runtime is not None
        measure_latency = asked and example_inputs is not None
    if measure_latency and example_inputs is None:
        raise ValueError("measure_latency=True needs example_inputs (or data) to time the model")
    runtime = "eager" if runtime is None else runtime
    check_runtime(runtime, model_device_dtype(model)[0])
    return runtime, measure_latency
