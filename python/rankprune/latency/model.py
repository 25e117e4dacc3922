"""The latency model: each Conv2d/Linear layer of a model, and the candidate shapes a compression may give it,
timed alone at the input shape the layer gets in the model (recorded by hooks on one forward pass: the real
batch size and spatial size), in the runtime the model will run in; the dense model timed end to end.

A compressed model's latency is predicted as the dense model's measured latency less, per layer, the measured
time the layer's new shape saves. Timings are cached on disk (:mod:`rankprune.latency.cache`).
"""
import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .._inputs import batch_size, call_model, eval_mode, removed_after
from ..benchmark import environment
from ..nn import LowRankConv2d, LowRankLinear, _explicit_padding, check_decomposable_conv
from . import cache
from .runtimes import check_runtime, interleaved, make_timer, runtime_threads, runtime_versions

# Rounds per layer measurement (the dense layer and its variants interleaved) and timed calls per variant and
# round. The dense layer's time is its fastest round's median: on a shared machine a slow round is other
# processes' time (a preempted intra-op thread stalls the whole call), not the layer's. A variant's time is
# the dense time times the median over rounds of (variant / dense) in the same round: a slow moment that hits
# one round hits both sides of its ratio.
LAYER_ROUNDS = 5
LAYER_REPEATS = 3
# Forward passes whose per-layer times (hooks) give the layers' in-context time; the fastest pass counts per
# layer.
CONTEXT_PASSES = 5
# Multiples a sweep considers for ranks and channel counts.
MULTIPLES = (1, 2, 4, 8, 16, 32)
# A larger multiple is chosen only when it is this much faster than the best smaller one (timing noise).
MULTIPLE_TOLERANCE = 0.02


@dataclass(frozen=True)
class Variant:
    """A candidate shape of one layer: dense (no field set), the low-rank pair (``LowRankConv2d`` /
    ``LowRankLinear``) at ``rank``, or the layer with ``out_channels`` / ``in_channels`` (None: as dense)."""

    rank: Optional[int] = None
    out_channels: Optional[int] = None
    in_channels: Optional[int] = None
    scheme: str = "channel"

    @property
    def key(self) -> str:
        """How the variant is named in the cache and in reports: ``dense``, ``rank=16``, ``out=32,in=64``."""
        if self.rank is not None:
            return f"rank={self.rank}" + ("" if self.scheme == "channel" else f",{self.scheme}")
        if self.out_channels is None and self.in_channels is None:
            return "dense"
        return f"out={self.out_channels},in={self.in_channels}"


DENSE = Variant()


@dataclass
class LayerShape:
    """A Conv2d/Linear layer of the model as it is called: the module, its input shape, dtype and call count."""

    name: str
    module: nn.Module
    input_shape: Tuple[int, ...]
    dtype: torch.dtype
    calls: int = 1


def _features(module: nn.Module) -> Tuple[int, int]:
    """``(out, in)`` channels of a Conv2d, features of a Linear or a Hugging Face Conv1D (weight ``[in, out]``)."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.weight.shape[1], module.weight.shape[0]


def is_timed_layer(module: nn.Module) -> bool:
    """Conv2d, Linear and Hugging Face Conv1D layers: the layers whose shapes compression changes."""
    return isinstance(module, (nn.Conv2d, nn.Linear)) or (
        type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None)


def describe(module: nn.Module) -> Dict[str, object]:
    """The configuration a layer's timing depends on (cache key)."""
    out_features, in_features = _features(module)
    bias = getattr(module, "bias", None) is not None
    if not isinstance(module, nn.Conv2d):
        return {"type": "Linear", "in": in_features, "out": out_features, "bias": bias}
    return {"type": "Conv2d", "in": in_features, "out": out_features, "kernel": list(module.kernel_size),
            "stride": list(module.stride), "padding": module.padding if isinstance(module.padding, str)
            else list(module.padding), "dilation": list(module.dilation), "groups": module.groups, "bias": bias}


def variant_module(module: nn.Module, variant: Variant, input_shape: Sequence[int]) -> Tuple[nn.Module, List[int]]:
    """The module of ``variant`` (fresh random weights: time does not depend on them) and its input shape."""
    out_features, in_features = _features(module)
    bias = getattr(module, "bias", None) is not None
    conv = isinstance(module, nn.Conv2d)
    shape = list(input_shape)
    if variant.rank is not None:
        if conv:
            check_decomposable_conv(module)
            return LowRankConv2d(in_features, out_features, module.kernel_size, variant.rank, module.stride,
                                 _explicit_padding(module), module.dilation, bias, variant.scheme), shape
        return LowRankLinear(in_features, out_features, variant.rank, bias), shape
    if variant == DENSE:
        return (copy.deepcopy(module) if conv or isinstance(module, nn.Linear)
                else nn.Linear(in_features, out_features, bias)), shape
    new_out, new_in = variant.out_channels or out_features, variant.in_channels or in_features
    shape[1 if conv else -1] = new_in
    if not conv:
        return nn.Linear(new_in, new_out, bias), shape
    groups = module.groups
    if groups > 1 and groups == in_features == out_features:  # depthwise: pruning keeps in = out = groups
        groups = new_in = new_out
        shape[1] = new_in
    elif new_in % groups or new_out % groups:
        raise ValueError(f"variant {variant.key}: channels must be multiples of the layer's groups={groups}")
    return nn.Conv2d(new_in, new_out, module.kernel_size, module.stride, module.padding, module.dilation, groups,
                     bias, module.padding_mode), shape


def best_multiple(times: Mapping[int, float], multiples: Iterable[int] = MULTIPLES,
                  tolerance: float = MULTIPLE_TOLERANCE) -> int:
    """The multiple the hardware rewards, from ``times`` ``{value: ms}`` of consecutive ranks or channel counts
    ``r0 + 1 .. r0 + W`` (``r0`` a multiple of ``W``): for each multiple ``m`` (at most ``W``), the mean over the
    window of ``time(value rounded up to m) / time(value)`` (below 1 where aligned shapes are faster than
    smaller unaligned ones); the smallest multiple within ``tolerance`` of the best score."""
    values = sorted(times)
    width = len(values)
    scores = {}
    for m in multiples:
        if m > width or width % m:
            continue
        scores[m] = statistics.mean(times[-(-v // m) * m] / times[v] for v in values)
    best = min(scores.values())
    return min(m for m, score in scores.items() if score <= best + tolerance)


def sweep_window(full: int) -> Tuple[int, int]:
    """``(r0, W)``: the window ``r0 + 1 .. r0 + W`` of a sweep over values up to ``full``, ``W`` the largest
    power of two of at most 32 and a third of ``full``, ``r0`` the multiple of ``W`` nearest below the middle."""
    width = min(32, 2 ** int(math.log2(max(full // 3, 1))))
    return max(full // 2 - width, 0) // width * width, width


class LatencyModel:
    """Per-layer latencies of a model's Conv2d/Linear layers and of their candidate shapes, measured at the
    model's real input shapes in one runtime, plus the dense model's end-to-end latency.

    Build it with :meth:`measure`; :meth:`profile` measures candidates (cached on disk), :meth:`layer_time`
    gives one (measuring it when needed), :meth:`predict` a compressed model's latency, :meth:`rank_multiple`
    and :meth:`channel_multiple` the multiples the hardware rewards (measured sweeps).
    """

    def __init__(self, runtime: str, device: torch.device, threads: int, layers: Dict[str, LayerShape],
                 dense_ms: float, context_ms: float, batch: int, use_cache: bool = True, progress: bool = True):
        self.runtime, self.device, self.threads = runtime, device, threads
        self.layers, self.dense_ms, self.batch = layers, dense_ms, batch  # dense_ms: end to end
        self.context_ms = context_ms  # the dense layers' summed time inside the model (see in_context_ms)
        self._scale: Optional[float] = None
        self.use_cache, self.progress = use_cache, progress
        self.device_name = environment(device)["device"]
        self.profiling_s = 0.0  # seconds spent measuring, end-to-end and layers
        self.measured = 0  # layer variants timed (not read from the cache)
        self.cached = 0  # layer variants read from the cache
        self._times: Dict[str, Dict[str, float]] = {name: {} for name in layers}

    @classmethod
    def measure(cls, model: nn.Module, example_inputs, runtime: str = "eager", *,
                layers: Optional[Iterable[str]] = None, threads: Optional[int] = None, use_cache: bool = True,
                progress: bool = True, rounds: int = LAYER_ROUNDS) -> "LatencyModel":
        """Record the input shape of every Conv2d/Linear layer (or of the named ``layers``) on one forward pass
        of ``model`` on ``example_inputs`` and time the dense model end to end (``dense_ms``: the fastest of
        ``rounds`` rounds' medians) in ``runtime`` ("eager", "cuda_graph" or "onnxruntime") on the model's
        device. ``threads``: ONNX Runtime's intra-op threads (default PyTorch's). The model is not changed."""
        start = time.perf_counter()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        check_runtime(runtime, device)
        shapes = record_shapes(model, example_inputs, layers)
        threads = runtime_threads(runtime, threads)
        timer = make_timer(model, example_inputs, runtime, device, threads)
        dense_ms = min(t.median_ms for t in interleaved({"dense": timer}, rounds, LAYER_REPEATS)["dense"])
        context_ms = in_context_ms(model, example_inputs, shapes, runtime, device, dense_ms)
        result = cls(runtime, device, threads, shapes, dense_ms, context_ms, batch_size(example_inputs), use_cache,
                     progress)
        result.profiling_s = time.perf_counter() - start
        return result

    def cache_key(self, name: str) -> Dict[str, object]:
        """What a timing of layer ``name`` depends on (see :mod:`rankprune.latency.cache`)."""
        layer = self.layers[name]
        return {"device": self.device_name, "runtime": self.runtime, **runtime_versions(self.runtime),
                "threads": self.threads, "dtype": str(layer.dtype).replace("torch.", ""),
                "layer": describe(layer.module), "input": list(layer.input_shape)}

    def profile(self, candidates: Mapping[str, Iterable[Variant]]) -> None:
        """Time the dense shape and the given variants of each named layer (those neither known nor cached),
        the variants of one layer interleaved; one progress bar over the layers."""
        start = time.perf_counter()
        todo = {name: [DENSE] + [v for v in variants if v != DENSE] for name, variants in candidates.items()}
        for name in todo:
            if name not in self.layers:
                raise KeyError(f"latency model: no Conv2d/Linear layer {name!r} was called on the example inputs")
        bar = tqdm(todo.items(), desc=f"latency ({self.runtime})", unit="layer", leave=False,
                   disable=not self.progress)
        for name, variants in bar:
            self._profile_layer(name, variants)
        self.profiling_s += time.perf_counter() - start

    def _profile_layer(self, name: str, variants: List[Variant]) -> None:
        known = self._times[name]
        key = self.cache_key(name)
        if self.use_cache and any(v.key not in known for v in variants):
            stored = cache.load(key)
            hits = {v.key: stored[v.key]["ms"] for v in variants if v.key not in known and v.key in stored}
            known.update(hits)
            self.cached += len(hits)
        missing = [v for v in variants if v.key not in known]
        if not missing:
            return
        layer = self.layers[name]
        timers = {}
        for variant in [DENSE] + [v for v in missing if v != DENSE]:  # dense: the reference of each round
            module, shape = variant_module(layer.module, variant, layer.input_shape)
            module = module.to(device=self.device, dtype=layer.dtype).eval()
            x = torch.randn(shape, device=self.device, dtype=layer.dtype)
            timers[variant.key] = make_timer(module, x, self.runtime, self.device, self.threads)
        rounds = {k: [t.median_ms for t in ts] for k, ts in interleaved(timers, LAYER_ROUNDS, LAYER_REPEATS).items()}
        dense_rounds = rounds.pop(DENSE.key)
        dense_ms = known.setdefault(DENSE.key, min(dense_rounds))
        ratios = {k: statistics.median(v / d for v, d in zip(ms, dense_rounds)) for k, ms in rounds.items()}
        timings = {k: {"ms": dense_ms * ratio, "ratio_to_dense": ratio, "rounds_ms": rounds[k]}
                   for k, ratio in ratios.items()}
        timings[DENSE.key] = {"ms": dense_ms, "rounds_ms": dense_rounds}
        known.update({k: t["ms"] for k, t in timings.items()})
        self.measured += len(missing)
        if self.use_cache:
            cache.store(key, timings)

    @property
    def context_scale(self) -> float:
        """In-context over isolated time of the dense layers (``context_ms`` over the sum of the dense layers
        timed alone): a layer timed alone runs with its weights and input hot in the caches, inside the model
        its neighbours have evicted them (ResNet-18 at batch 1 in ONNX Runtime: 1.66). Every layer time is
        scaled by it; the dense layers are timed alone on first use."""
        if self._scale is None:
            self.profile({name: [] for name in self.layers})
            isolated = sum(self._times[name][DENSE.key] * layer.calls for name, layer in self.layers.items())
            self._scale = self.context_ms / isolated if isolated > 0 else 1.0
        return self._scale

    def layer_time(self, name: str, variant: Variant = DENSE) -> float:
        """Milliseconds of layer ``name`` in shape ``variant`` over all its calls in one forward pass, in
        context (timed alone, measured now when neither known nor cached, times :attr:`context_scale`)."""
        if variant.key not in self._times.get(name, {}):
            self.profile({name: [variant]})
        return self._times[name][variant.key] * self.layers[name].calls * self.context_scale

    def known(self, name: str) -> Dict[str, float]:
        """``{variant key: ms per call, timed alone}`` measured or read so far for layer ``name``."""
        return dict(self._times[name])

    def predict(self, model_or_plan: Union[nn.Module, Mapping[str, object]]) -> float:
        """Predicted end-to-end milliseconds of a compressed model (or of a decompose plan applied to the
        measured model): the dense measurement less each changed layer's measured saving, and less the part
        of the rest of the pass that pruned channels remove. The rest (``dense_ms - context_ms``: BatchNorm,
        activations, additions, pooling, in eager PyTorch; nothing in ONNX Runtime, which folds them into its
        convolutions) is taken to scale with the elements the layers read, which those operations produce:
        ResNet-18 at batch 1, eager, pruned to 8% of its FLOPs measured 0.35x dense where the layers alone
        predicted 0.50x. Variants not yet known are measured."""
        variants = (plan_variants(model_or_plan) if isinstance(model_or_plan, Mapping)
                    else model_variants(model_or_plan, self.layers))
        saving = sum(self.layer_time(name) - self.layer_time(name, v) for name, v in variants.items()
                     if v != DENSE and name in self.layers)
        rest_ms = max(self.dense_ms - self.context_ms, 0.0)
        return self.dense_ms - saving - rest_ms * (1.0 - self._input_fraction(variants))

    def shaped(self, model: nn.Module, variants: Mapping[str, Variant]) -> nn.Module:
        """A copy of ``model`` (the measured model, or one with the same layer names) in eval mode, each named
        layer replaced by its variant's module with random weights (time does not depend on them): the
        structure of a decomposition, to time before building it for real. Rank variants only: fewer channels
        in one layer would not fit its neighbours."""
        if any(v.rank is None for v in variants.values()):
            raise ValueError("shaped: only rank variants (low-rank pairs) can replace a layer alone")
        twin = copy.deepcopy(model)
        for name, variant in variants.items():
            layer = self.layers[name]
            module, _ = variant_module(layer.module, variant, layer.input_shape)
            twin.set_submodule(name, module.to(device=self.device, dtype=layer.dtype))
        return twin.eval()

    def _input_fraction(self, variants: Mapping[str, Variant]) -> float:
        """The layers' input elements per pass with ``variants`` over the dense model's (pruned input channels
        read fewer)."""
        dense = kept = 0.0
        for name, layer in self.layers.items():
            elements = float(math.prod(layer.input_shape)) * layer.calls
            variant = variants.get(name, DENSE)
            dense += elements
            kept += elements * (variant.in_channels / _features(layer.module)[1] if variant.in_channels else 1.0)
        return kept / dense if dense > 0 else 1.0

    def rank_multiple(self, names: Optional[Iterable[str]] = None) -> int:
        """The rank multiple the hardware rewards: a sweep of consecutive ranks on the slowest decomposable layer
        among ``names`` (default all), scored by :func:`best_multiple`."""
        name, full = self._slowest(names, lambda m: min(_features(m)[0], _features(m)[1] * _kernel_area(m)))
        r0, width = sweep_window(full)
        return self._sweep(name, {r: Variant(rank=r) for r in range(r0 + 1, r0 + width + 1)})

    def channel_multiple(self, names: Optional[Iterable[str]] = None) -> int:
        """The output-channel multiple the hardware rewards (a sweep on the slowest layer among ``names``, see
        :meth:`rank_multiple`); the ``round_to`` of channel pruning."""
        name, full = self._slowest(names, lambda m: _features(m)[0])
        r0, width = sweep_window(full)
        return self._sweep(name, {c: Variant(out_channels=c) for c in range(r0 + 1, r0 + width + 1)})

    def _slowest(self, names, full_of) -> Tuple[str, int]:
        names = [n for n in (names if names is not None else self.layers) if _sweepable(self.layers[n].module)]
        if not names:
            raise ValueError("latency model: no layer to sweep (a Conv2d with groups=1 or a Linear is needed)")
        self.profile({n: [] for n in names})
        name = max(names, key=self.layer_time)
        return name, full_of(self.layers[name].module)

    def _sweep(self, name: str, variants: Dict[int, Variant]) -> int:
        if len(variants) < 2:
            return 1
        self.profile({name: list(variants.values())})
        return best_multiple({value: self.layer_time(name, v) for value, v in variants.items()})


def _kernel_area(module: nn.Module) -> int:
    return math.prod(module.kernel_size) if isinstance(module, nn.Conv2d) else 1


def _sweepable(module: nn.Module) -> bool:
    return not isinstance(module, nn.Conv2d) or module.groups == 1


def record_shapes(model: nn.Module, example_inputs, names: Optional[Iterable[str]]) -> Dict[str, LayerShape]:
    """``{name: LayerShape}`` of the Conv2d/Linear layers (or the named ones) called on one forward pass, in
    the order of their first call; a layer called more than once counts its calls at its first input shape."""
    wanted = set(names) if names is not None else None
    shapes: Dict[str, LayerShape] = {}
    handles = []
    for name, module in model.named_modules():
        if not name or not is_timed_layer(module) or (wanted is not None and name not in wanted):
            continue

        def hook(module, args, name=name):
            if name in shapes:
                shapes[name].calls += 1
            else:
                shapes[name] = LayerShape(name, module, tuple(args[0].shape), args[0].dtype)

        handles.append(module.register_forward_pre_hook(hook))
    with removed_after(handles):
        with eval_mode(model):
            call_model(model, example_inputs)
    return shapes


def in_context_ms(model: nn.Module, example_inputs, layers: Mapping[str, LayerShape], runtime: str,
                  device: torch.device, dense_ms: float) -> float:
    """The summed time of ``layers`` inside the dense model. PyTorch: forward hooks time each layer on
    ``CONTEXT_PASSES`` passes (CUDA synchronized at each hook); in the fastest pass, the layers' share of the
    pass, times ``dense_ms`` (a share taken within one pass holds when the machine's load changes between
    passes). ONNX Runtime: ``dense_ms``, the whole graph, since it folds BatchNorm and activations into its
    Conv nodes and the layers are nearly all of its time."""
    if runtime == "onnxruntime":
        return dense_ms
    modules = dict(model.named_modules())
    spent = {name: 0.0 for name in layers}
    best_pass, best_share = math.inf, 1.0
    started: Dict[str, float] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def before(module, args, name):
        sync()
        started[name] = time.perf_counter()

    def after(module, args, output, name):
        sync()
        spent[name] += time.perf_counter() - started.pop(name)

    handles = []
    for name in layers:
        handles.append(modules[name].register_forward_pre_hook(lambda m, a, name=name: before(m, a, name)))
        handles.append(modules[name].register_forward_hook(lambda m, a, o, name=name: after(m, a, o, name)))
    with removed_after(handles):
        with eval_mode(model), torch.inference_mode():
            for _ in range(CONTEXT_PASSES):
                spent.update({name: 0.0 for name in spent})
                sync()
                start = time.perf_counter()
                call_model(model, example_inputs)
                sync()
                elapsed = time.perf_counter() - start
                if elapsed < best_pass:
                    best_pass, best_share = elapsed, sum(spent.values()) / elapsed
    return dense_ms * best_share


def plan_variants(plan: Mapping[str, object]) -> Dict[str, Variant]:
    """The variant of each layer of a decompose plan (other plans: ValueError)."""
    if plan.get("method") != "decompose":
        raise ValueError(f"predict: a plan must be a decompose plan (prune plans: pass the pruned model), got "
                         f"method {plan.get('method')!r}")
    return {name: Variant(rank=entry["rank"], scheme=entry.get("scheme", "channel"))
            for name, entry in plan["layers"].items()}


def model_variants(model: nn.Module, layers: Mapping[str, LayerShape]) -> Dict[str, Variant]:
    """The variant found at each measured layer's name in ``model``: a low-rank layer (or its ``to_plain``
    pair) at its rank, a layer with other channel counts, or dense."""
    modules = dict(model.named_modules())
    found = {}
    for name, layer in layers.items():
        module = modules.get(name)
        if isinstance(module, (LowRankConv2d, LowRankLinear)):
            found[name] = Variant(rank=module.rank, scheme=getattr(module, "scheme", "channel"))
        elif isinstance(module, nn.Sequential) and {"first", "second"} <= set(dict(module.named_children())):
            first = module.first
            spatial = isinstance(first, nn.Conv2d) and first.kernel_size != getattr(layer.module, "kernel_size", None)
            found[name] = Variant(rank=_features(first)[0], scheme="spatial" if spatial else "channel")
        elif module is not None and is_timed_layer(module):
            (out_now, in_now), (out_dense, in_dense) = _features(module), _features(layer.module)
            found[name] = Variant(out_channels=out_now if out_now != out_dense else None,
                                  in_channels=in_now if in_now != in_dense else None)
    return found
