"""Channel importance criteria: one score per output channel of every ``nn.Conv2d``.

A criterion is a small object; ``criterion.scores(model, data)`` makes (at most) one calibration pass and
returns ``{conv_name: float64 tensor [out_channels]}`` (higher = more important, CPU). Criteria:

====================  ==========================================================================
``energy``            energy-aware pruning (Yeom et al. 2021): mean over images of the nuclear norm
                      (sum of singular values) of the channel's H x W feature map (when to prefer it:
                      :class:`Energy`)
``hrank``             HRank (Lin et al. 2020): mean numerical rank of the feature map
``weight_energy``     data-free: nuclear norm of the filter reshaped to [C_in/groups, kh*kw]
``l1`` / ``l2``       data-free: L1 / L2 norm of the filter
``bn_scale``          data-free, network slimming: |gamma| of the BatchNorm after the conv
``taylor``            first-order Taylor (Molchanov et al. 2017): mean over images of
                      |mean_hw(a * dL/da)| on the conv output; needs labelled batches
``random``            seeded uniform random scores (a baseline)
====================  ==========================================================================

Channel pruning adds a data-aware criterion of its own, ``output_error`` (:class:`rankprune.pruning.OutputError`:
the output error a channel's removal leaves in the layers consuming it after their least-squares refit; it
needs Torch-Pruning's dependency graph, so it lives in the pruning package).

Feature-map criteria (``energy``, ``hrank``) stream batches from any iterable (a DataLoader, a list of
tensors or of ``(inputs, labels)`` pairs) through forward hooks under ``torch.no_grad()`` with the model in
eval mode; each hook reduces its map to per-channel sums at once (``rankprune.ops.feature_energy`` /
``feature_rank``: GPU kernels on CUDA, CPU kernels otherwise), so no activation is kept. Where the map is
read (``tap``):

- ``"auto"`` (default): after the conv's BatchNorm when a BatchNorm module takes the conv output, and after
  the activation module (ReLU, ReLU6, ...) that takes the BatchNorm output, where HRank and EAP read it.
  For ``energy``, when the BatchNorm output is instead added to another branch (a residual connection) and
  the sum goes into an activation module, the map is read after that activation: the block output, which
  is what a channel of the residual group carries and where HRank's code reads the second conv of a block
  (worth +2 and +19 points at 60% of the FLOPs on two trained ResNet-20s against reading the BatchNorm
  output; ``hrank`` keeps reading the BatchNorm output, which measured better for it: ``docs/pruning.md``).
  Activations written as functions in ``forward`` (``F.relu``) cannot be seen; there the map is read after
  the BatchNorm.
- ``"relu"``: as ``"auto"``, but where no activation module follows, ``torch.relu`` is applied to the map
  (HRank's convention for ReLU networks, also for functional ReLUs and additions without an activation).
- ``"bn"``: after the BatchNorm (or the conv when none follows). ``"conv"``: the raw conv output.

The structure is found by one probe forward (with autograd, to see additions) on the first sample of the
first batch, matching tensors by identity (which module consumes which output) and following the autograd
graph through additions, so it needs no tracing and works for any model.

Under ``torch.distributed`` (initialised process group), every rank scores its own shard of the data and
the per-channel sums and sample counts are all-reduced, so all ranks get the mean over all samples, as one
process would on the union of the shards.
"""
import copy
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._inputs import (batch_size, call_model, check_finite_weights, distributed_world, eval_mode, first_samples,
                      iter_batches, model_device_dtype, model_inputs, raise_non_finite, removed_after, to_device)
from ._inputs import progress as progress_bar

Scores = Dict[str, Tensor]

TAPS = ("auto", "relu", "bn", "conv")
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardtanh, nn.PReLU, nn.RReLU,
)
_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)


def conv_layers(model: nn.Module, layers: Optional[Sequence[str]] = None) -> Dict[str, nn.Conv2d]:
    """``{name: conv}`` for the ``nn.Conv2d`` layers of ``model`` (all of them, or those named in ``layers``).

    Raises ValueError when the model has none or a name in ``layers`` is not a Conv2d of the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if not convs:
        raise ValueError(f"model {type(model).__name__} has no nn.Conv2d layer to score")
    if layers is None:
        return convs
    missing = [name for name in layers if name not in convs]
    if missing:
        raise ValueError(f"layers: {missing} are not nn.Conv2d layers of the model")
    return {name: convs[name] for name in layers}


def _calibration_batches(data: Optional[Iterable], max_batches: Optional[int], name: str, enabled: bool):
    """The batches of ``data`` a data-driven criterion reads (at most ``max_batches``), behind a progress bar."""
    if data is None:
        raise ValueError("data: this criterion needs calibration data (an iterable of batches), got None")
    return progress_bar(iter_batches(data, max_batches), f"scoring ({name})", enabled)


class _Tap:
    """Where one conv's map is read: the module whose forward output is hooked, and the activation
    (a non-inplace copy) to apply to that output first, if any."""

    def __init__(self, host: nn.Module, activation: Optional[Callable[[Tensor], Tensor]]):
        self.host = host
        self.activation = activation

    def read(self, output: Tensor) -> Tensor:
        return output if self.activation is None else self.activation(output)


def _non_inplace(act: nn.Module) -> nn.Module:
    if getattr(act, "inplace", False):
        act = copy.copy(act)
        act.inplace = False
    return act


def find_taps(model: nn.Module, example_inputs: Any, convs: Dict[str, nn.Conv2d], tap: str = "auto",
              residual_output: bool = True) -> Dict[str, _Tap]:
    """Locate each conv's BatchNorm and activation by one forward on ``example_inputs`` (see module doc).
    ``residual_output=False``: the terms of a residual addition are read on their BatchNorm output (with
    ``tap="relu"``, through ``torch.relu``) instead of on the block output."""
    if tap not in TAPS:
        raise ValueError(f"tap must be one of {TAPS}, got {tap!r}")
    consumers: Dict[int, List[nn.Module]] = {}  # id(tensor) -> modules taking it as first input, in call order
    outputs: Dict[nn.Module, Tensor] = {}
    producers: Dict[Any, nn.Module] = {}  # autograd node of a module's output (as produced) -> module
    activation_inputs: Dict[nn.Module, Any] = {}  # activation -> autograd node of its input (before in-place)
    keep_alive: List[Any] = []  # hold every tensor so that ids are not reused during the probe

    def hook(module, inputs, output):
        if inputs and isinstance(inputs[0], Tensor):
            consumers.setdefault(id(inputs[0]), []).append(module)
            keep_alive.append(inputs[0])
        if isinstance(output, Tensor) and module not in outputs:
            outputs[module] = output
            keep_alive.append(output)
            if output.grad_fn is not None:  # read now: an in-place activation replaces it
                producers[output.grad_fn] = module

    def activation_pre_hook(module, inputs):
        if inputs and isinstance(inputs[0], Tensor) and module not in activation_inputs:
            activation_inputs[module] = inputs[0].grad_fn

    watched = set(convs.values()) | {m for m in model.modules() if isinstance(m, _NORMS + _ACTIVATIONS)}
    handles = [m.register_forward_hook(hook) for m in watched]
    handles += [m.register_forward_pre_hook(activation_pre_hook) for m in watched if isinstance(m, _ACTIVATIONS)]
    with removed_after(handles):
        # with autograd, so that an addition between a module and an activation shows in the graph
        with torch.enable_grad():
            call_model(model, _requiring_grad(example_inputs))
    residual_activation = _residual_activations(activation_inputs, producers)

    def consumer(module: nn.Module, kinds) -> Optional[nn.Module]:
        out = outputs.get(module)
        if out is None:
            return None
        for m in consumers.get(id(out), []):
            if m is not module and isinstance(m, kinds):
                return m
        return None

    taps = {}
    for name, conv in convs.items():
        if conv not in outputs:
            raise ValueError(f"layer {name!r} is not called by the model's forward on the example inputs")
        host: nn.Module = conv
        activation = None
        if tap != "conv":
            norm = consumer(conv, _NORMS)
            host = norm if norm is not None else conv
            if tap in ("auto", "relu"):
                act = consumer(host, _ACTIVATIONS)
                if act is not None:
                    activation = _non_inplace(act)
                elif residual_output and host in residual_activation:  # the block output: after the addition and its activation
                    host = residual_activation[host]
                elif tap == "relu":
                    activation = torch.relu
        taps[name] = _Tap(host, activation)
    return taps


def _requiring_grad(inputs: Any) -> Any:
    """``inputs`` with every floating tensor a copy in an autograd graph (so that the probe's graph exists
    even when no parameter requires grad); a non-leaf copy, so that a forward that modifies its input in
    place still runs."""
    if isinstance(inputs, Tensor):
        return inputs.detach().requires_grad_().clone() if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _requiring_grad(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_requiring_grad(v) for v in inputs)
    return inputs


def _residual_activations(activation_inputs: Dict[nn.Module, Any], producers: Dict[Any, nn.Module]):
    """``{module: activation}`` for modules whose output is a term of an addition (residual connection,
    nested additions included) that an activation module takes as input."""
    found: Dict[nn.Module, nn.Module] = {}
    for act, node in activation_inputs.items():
        stack = [node]
        while stack:
            node = stack.pop()
            if node is None or type(node).__name__ not in ("AddBackward0", "AddBackward1"):
                continue
            for term, _ in node.next_functions:
                if term in producers:
                    found.setdefault(producers[term], act)
                else:
                    stack.append(term)
    return found


def _finish(sums: Dict[str, Tensor], count: Tensor, saw_batches: bool, distributed: bool) -> Scores:
    """Means ``sums / count``, all-reduced first under ``torch.distributed``. A rank with an empty shard
    still joins the all-reduce (with zeros) so that the other ranks do not hang; only an empty total fails."""
    distributed = distributed and distributed_world()
    if not saw_batches and not distributed:
        raise ValueError("data yielded no batches: nothing to calibrate on")
    if distributed:
        _all_reduce_(list(sums.values()) + [count])
    if count.item() == 0:
        raise ValueError("data held no samples: nothing to calibrate on")
    return {name: (s / count).cpu() for name, s in sums.items()}


def _check_finite(criterion: "Criterion", model: nn.Module, data: Optional[Iterable], scores: Scores) -> Scores:
    """``scores``, unless one is NaN or Inf: then the error names the weight, the calibration batch or the
    layer output where the NaN or Inf first appears (one check of the results: the passes pay nothing)."""
    bad = [name for name, s in scores.items() if not bool(torch.isfinite(s).all())]
    if bad:
        raise_non_finite(model, data, f"scoring ({criterion.name})", f"the scores of layer {bad[0]!r}",
                         max_batches=getattr(criterion, "max_batches", None))
    return scores


def _all_reduce_(tensors: List[Tensor]) -> None:
    """Sum ``tensors`` over the ranks of the default process group in one call."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class Criterion:
    """Base class: a named channel-scoring rule. ``scores(model, data=None) -> {conv_name: [C_out]}``."""

    name = "criterion"
    needs_data = False

    def __init__(self, layers: Optional[Sequence[str]] = None):
        self.layers = list(layers) if layers is not None else None

    def scores(self, model: nn.Module, data: Optional[Iterable] = None) -> Scores:
        """``{conv_name: float64 CPU tensor [out_channels]}`` for ``model`` (higher = more important); ``data``
        is the calibration batches of data-driven criteria."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FeatureMapCriterion(Criterion):
    """Mean over calibration images of a per-map statistic of each channel's feature map (see module doc).

    Args:
        tap: where the map is read: "auto" | "relu" | "bn" | "conv".
        max_batches: stop after this many batches (default: the whole iterable).
        progress: show a tqdm progress bar.
        distributed: all-reduce over an initialised ``torch.distributed`` process group (default True).
        layers: names of the convs to score (default: all ``nn.Conv2d``).
    """

    needs_data = True
    residual_output = True  # the convs of a residual addition read on the block output (module doc)

    def __init__(self, tap: str = "auto", max_batches: Optional[int] = None, progress: bool = True,
                 distributed: bool = True, layers: Optional[Sequence[str]] = None):
        super().__init__(layers)
        if tap not in TAPS:
            raise ValueError(f"tap must be one of {TAPS}, got {tap!r}")
        self.tap = tap
        self.max_batches = max_batches
        self.progress = progress
        self.distributed = distributed

    def statistic(self, maps: Tensor) -> Tensor:
        """Per-channel sum over the batch of the statistic of each map: [N, C, H, W] -> [C]."""
        raise NotImplementedError

    def scores(self, model: nn.Module, data: Optional[Iterable] = None) -> Scores:
        convs = conv_layers(model, self.layers)
        check_finite_weights(model, f"scoring ({self.name})")
        device, _ = model_device_dtype(model)
        sums: Dict[str, Tensor] = {name: torch.zeros(c.out_channels, dtype=torch.float64, device=device)
                                   for name, c in convs.items()}
        count = torch.zeros(1, dtype=torch.float64, device=device)
        handles = []
        with removed_after(handles):
            with eval_mode(model):
                for batch in _calibration_batches(data, self.max_batches, self.name, self.progress):
                    inputs = model_inputs(batch, model)
                    if not handles:  # first batch: find the taps on its first sample, then hook them
                        taps = find_taps(model, first_samples(inputs, 1), convs, self.tap, self.residual_output)
                        handles.extend(tap.host.register_forward_hook(self._hook(sums[name], tap))
                                       for name, tap in taps.items())
                    call_model(model, inputs)
                    count += batch_size(inputs)
        return _check_finite(self, model, data, _finish(sums, count, bool(handles), self.distributed))

    def _hook(self, acc: Tensor, tap: _Tap):
        def hook(module, inputs, output):
            acc.add_(self.statistic(tap.read(output)).to(acc.dtype))
        return hook


class Energy(FeatureMapCriterion):
    """Energy-aware pruning: mean nuclear norm of each channel's H x W map (``ops.feature_energy``).

    When it is the right choice: energy measures how large a channel's maps are on the data. It is the
    label-free, data-driven criterion for convs without a BatchNorm of their own (where ``bn_scale`` gives
    every channel 1), and it scores channels that are dead on the data (all-zero maps) 0 whatever their
    weights. Where every conv has a BatchNorm, BatchNorm recalibration after pruning absorbs the constant
    part of a removed channel, and ``bn_scale`` (and ``taylor`` with labels) predicted the damage better:
    on two trained built-in ResNet-20s at 60% of the FLOPs after recalibration (mean), energy 54.2%,
    bn_scale 61.4%, taylor 63.1%, l1 45.2%, random 38.8% (no variant of the tap, group normalisation,
    ranking or number of images closed the gap; ``docs/pruning.md``, ``benchmarks/exp_energy.py``).
    """

    name = "energy"

    def statistic(self, maps: Tensor) -> Tensor:
        return ops.feature_energy(maps, reduction="sum")


class HRank(FeatureMapCriterion):
    """HRank: mean numerical rank of each channel's map (``ops.feature_rank``; ``rtol`` as there).

    The convs of a residual addition are read on their own BatchNorm output, not on the block output as
    for ``energy``: the block output (a sum of branches after a ReLU) is near full rank in every channel, and
    reading it cost HRank 12 to 14 points on a trained ResNet-20 (``docs/pruning.md``).
    """

    name = "hrank"
    residual_output = False

    def __init__(self, rtol: Optional[float] = None, **kwargs):
        super().__init__(**kwargs)
        self.rtol = rtol

    def statistic(self, maps: Tensor) -> Tensor:
        return ops.feature_rank(maps, rtol=self.rtol, reduction="sum")


class WeightCriterion(Criterion):
    """A data-free rule on each conv's weight [C_out, C_in/groups, kh, kw]."""

    def filter_scores(self, weight: Tensor) -> Tensor:
        """One score per output channel (filter) of a conv weight ``[out, in/groups, kh, kw]``."""
        raise NotImplementedError

    def scores(self, model: nn.Module, data: Optional[Iterable] = None) -> Scores:
        check_finite_weights(model, f"scoring ({self.name})")
        with torch.no_grad():
            return {name: self.filter_scores(conv.weight.detach()).to(torch.float64).cpu()
                    for name, conv in conv_layers(model, self.layers).items()}


class WeightEnergy(WeightCriterion):
    """Nuclear norm of each filter reshaped to [C_in/groups, kh*kw] (``ops.nuclear_norm``)."""

    name = "weight_energy"

    def filter_scores(self, weight: Tensor) -> Tensor:
        return ops.nuclear_norm(weight.flatten(2))


class L1(WeightCriterion):
    """L1 norm of each filter."""

    name = "l1"

    def filter_scores(self, weight: Tensor) -> Tensor:
        return weight.abs().flatten(1).sum(1)


class L2(WeightCriterion):
    """L2 norm of each filter."""

    name = "l2"

    def filter_scores(self, weight: Tensor) -> Tensor:
        return weight.flatten(1).norm(dim=1)


class BNScale(Criterion):
    """Network slimming: |gamma| of the conv's BatchNorm, found as the ``nn.BatchNorm2d`` registered right
    after the conv (in ``model.named_modules()`` order) with ``num_features == out_channels``. A conv
    without one (or with a non-affine BatchNorm) scores 1 for every channel."""

    name = "bn_scale"

    def scores(self, model: nn.Module, data: Optional[Iterable] = None) -> Scores:
        convs = conv_layers(model, self.layers)
        check_finite_weights(model, f"scoring ({self.name})")
        modules = list(model.named_modules())
        out: Scores = {}
        for i, (name, m) in enumerate(modules):
            if name not in convs:
                continue
            following = modules[i + 1][1] if i + 1 < len(modules) else None
            if (isinstance(following, nn.BatchNorm2d) and following.affine
                    and following.num_features == m.out_channels):
                out[name] = following.weight.detach().abs().to(torch.float64).cpu()
            else:
                out[name] = torch.ones(m.out_channels, dtype=torch.float64)
        return out


class Taylor(Criterion):
    """First-order Taylor expansion of the loss (Molchanov et al. 2017): for each conv output map ``a``,
    ``|mean_hw(a * dL/da)|`` averaged over images, with ``L = loss_fn(model(x), y)`` on labelled batches
    ``(x, y)`` (default cross-entropy). Read on the raw conv output (the gradient of a map later modified
    in place by an activation is not the map's own). Gradients are computed, parameters are not changed
    (their ``.grad`` is restored). Distributed like the feature-map criteria."""

    name = "taylor"
    needs_data = True

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 max_batches: Optional[int] = None, progress: bool = True, distributed: bool = True,
                 layers: Optional[Sequence[str]] = None):
        super().__init__(layers)
        self.loss_fn = loss_fn
        self.max_batches = max_batches
        self.progress = progress
        self.distributed = distributed

    def scores(self, model: nn.Module, data: Optional[Iterable] = None) -> Scores:
        convs = conv_layers(model, self.layers)
        check_finite_weights(model, f"scoring ({self.name})")
        device, dtype = model_device_dtype(model)
        sums = {name: torch.zeros(c.out_channels, dtype=torch.float64, device=device) for name, c in convs.items()}
        count = torch.zeros(1, dtype=torch.float64, device=device)
        saved_grads = {p: p.grad for p in model.parameters()}

        def make_hook(acc: Tensor):
            def hook(module, inputs, output):
                if output.requires_grad:
                    activation = output.detach()

                    def accumulate(grad: Tensor) -> None:
                        acc.add_((activation * grad).mean((2, 3)).abs().sum(0).to(acc.dtype))

                    output.register_hook(accumulate)
            return hook

        handles = [conv.register_forward_hook(make_hook(sums[name])) for name, conv in convs.items()]
        seen = 0
        try:
            with removed_after(handles), eval_mode(model, no_grad=False):
                for batch in _calibration_batches(data, self.max_batches, self.name, self.progress):
                    seen += 1
                    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                        raise ValueError("taylor needs labelled batches (inputs, labels)")
                    inputs = to_device(batch[0], device, dtype)
                    labels = to_device(batch[1], device)
                    model.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        self.loss_fn(call_model(model, inputs), labels).backward()
                    count += batch_size(inputs)
        finally:  # the caller's gradients, also on an error
            for p, g in saved_grads.items():
                p.grad = g
        return _check_finite(self, model, data, _finish(sums, count, seen > 0, self.distributed))


class Random(Criterion):
    """Uniform random scores from ``torch.Generator().manual_seed(seed)`` (a baseline)."""

    name = "random"

    def __init__(self, seed: int = 0, layers: Optional[Sequence[str]] = None):
        super().__init__(layers)
        self.seed = seed

    def scores(self, model: nn.Module, data: Optional[Iterable] = None) -> Scores:
        gen = torch.Generator().manual_seed(self.seed)
        return {name: torch.rand(conv.out_channels, generator=gen, dtype=torch.float64)
                for name, conv in conv_layers(model, self.layers).items()}


CRITERIA = {c.name: c for c in (Energy, HRank, WeightEnergy, L1, L2, BNScale, Taylor, Random)}


def get(criterion, **kwargs) -> Criterion:
    """A criterion by name (``"energy"``, ``"hrank"``, ``"weight_energy"``, ``"l1"``, ``"l2"``,
    ``"bn_scale"``, ``"taylor"``, ``"random"``) with constructor ``kwargs``; a Criterion passes through.
    ``prune`` also takes ``"output_error"`` (:class:`rankprune.pruning.OutputError`, which maps channels
    through Torch-Pruning's graph) and ``"auto"``."""
    if isinstance(criterion, Criterion):
        if kwargs:
            raise TypeError("options apply to a criterion given by name, not to a Criterion object")
        return criterion
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}: expected one of {sorted(CRITERIA)}")
    return CRITERIA[criterion](**kwargs)


def score(model: nn.Module, data: Optional[Iterable] = None, criterion="energy", **kwargs) -> Scores:
    """``get(criterion, **kwargs).scores(model, data)``: per-channel scores of every conv of ``model``."""
    return get(criterion, **kwargs).scores(model, data)


def check_scores(model: nn.Module, scores: Scores) -> Scores:
    """Validate ``{conv_name: [out_channels]}`` against ``model`` (names, lengths, finite values);
    returns them as float64 CPU tensors."""
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores must be a non-empty dict {conv_name: tensor [out_channels]}")
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    out = {}
    for name, s in scores.items():
        if name not in convs:
            raise ValueError(f"scores: {name!r} is not an nn.Conv2d layer of the model")
        s = torch.as_tensor(s, dtype=torch.float64).cpu()
        if s.shape != (convs[name].out_channels,):
            raise ValueError(f"scores[{name!r}] has shape {tuple(s.shape)}, expected ({convs[name].out_channels},)")
        if not torch.isfinite(s).all():
            raise ValueError(f"scores[{name!r}] holds NaN or Inf")
        out[name] = s
    return out


__all__ = [
    "Criterion", "FeatureMapCriterion", "WeightCriterion", "Energy", "HRank", "WeightEnergy", "L1", "L2",
    "BNScale", "Taylor", "Random", "CRITERIA", "TAPS", "get", "score", "check_scores", "conv_layers", "find_taps",
]
