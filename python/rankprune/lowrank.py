"""Decompose a model's Conv2d/Linear layers into low-rank layers, choosing ranks per layer or by a budget.

``decompose`` returns the model, a plan (plain JSON: per layer kind, scheme and rank) and a report. The plan
rebuilds the architecture with ``apply_decompose_plan`` so that a state_dict saved after decomposition (and
fine-tuning) loads with ``torch.load(..., weights_only=True)``.

Costs are counted like ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add, convolutions
and matrix products only; ``rankprune.ops.lowrank_conv2d`` counts as its two convolutions), so a budget
check against FlopCounterMode agrees with the allocation.
"""
import copy
import fnmatch
import heapq
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ._inputs import call_model
from .nn import (
    SCHEMES,
    LowRankConv2d,
    LowRankLinear,
    _explicit_padding,
    check_decomposable_conv,
    factorize,
    select_rank,
    weight_matrix,
)
from .plans import PLAN_VERSION, plan_layers


@dataclass
class _Layer:
    """One candidate layer: its shapes on the example inputs and its SVD."""

    name: str
    module: nn.Module
    kind: str  # "conv2d" | "linear"
    scheme: str
    inputs: List[Tensor] = field(default_factory=list)
    outputs: List[Tensor] = field(default_factory=list)
    S: Optional[Tensor] = None
    factors: Optional[Tuple[Tensor, Tensor, Tensor]] = None

    @property
    def full_rank(self) -> int:
        return self.S.shape[-1]

    def flops(self, rank: Optional[int]) -> int:
        """FLOPs over every call on the example inputs at ``rank`` (None: the dense layer)."""
        return sum(self._flops_one(rank, x.shape) for x in self.inputs)

    def flop_ratio(self, rank: int) -> float:
        """FLOPs at ``rank`` over dense FLOPs, for one call (unit spatial size when never called)."""
        shape = self.inputs[0].shape if self.inputs else None
        return self._flops_one(rank, shape) / self._flops_one(None, shape)

    def _flops_one(self, rank: Optional[int], shape) -> int:
        m = self.module
        if self.kind == "linear":
            rows = math.prod(shape[:-1]) if shape is not None else 1
            per_row = m.in_features * m.out_features if rank is None else rank * (m.in_features + m.out_features)
            return 2 * rows * per_row
        n, c, kh, kw = m.weight.shape
        if shape is None:
            b, h_in, w_in = 1, 1, 1
            h_out = w_out = 1
        else:
            b, _, h_in, w_in = shape
            pad = _explicit_padding(m)
            h_out, w_out = (
                (size + 2 * p - d * (k - 1) - 1) // s + 1
                for size, p, d, k, s in zip((h_in, w_in), pad, m.dilation, (kh, kw), m.stride)
            )
        if rank is None:
            return 2 * b * h_out * w_out * n * c * kh * kw
        if self.scheme == "channel":
            return 2 * b * h_out * w_out * rank * (c * kh * kw + n)
        # spatial: the kh x 1 convolution keeps the input width, the 1 x kw one makes the output width.
        return 2 * b * rank * (h_out * w_in * c * kh + h_out * w_out * n * kw)

    def params(self, rank: Optional[int]) -> int:
        """Weight parameters at ``rank`` (None: dense); the bias is the same either way."""
        w = self.module.weight
        if rank is None:
            return w.numel()
        if self.kind == "linear":
            return rank * (w.shape[0] + w.shape[1])
        n, c, kh, kw = w.shape
        return rank * (c * kh * kw + n) if self.scheme == "channel" else rank * (c * kh + n * kw)

    def discarded(self, rank: Optional[int]) -> float:
        """Normalised discarded energy: sum of the squared singular values past ``rank`` over their total."""
        if rank is None:
            return 0.0
        s2 = self.S.double() ** 2
        total = float(s2.sum())
        return float(s2[rank:].sum()) / total if total > 0 else 0.0

    def max_saving_rank(self, min_flop_saving: float) -> int:
        """Largest rank whose FLOPs are below dense and at most ``1 - min_flop_saving`` of dense (0: none)."""
        best = 0  # FLOPs grow linearly with the rank
        while best < self.full_rank and self.saves(best + 1, min_flop_saving):
            best += 1
        return best

    def saves(self, rank: int, min_flop_saving: float) -> bool:
        ratio = self.flop_ratio(rank)
        return ratio < 1.0 and ratio <= 1.0 - min_flop_saving


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _patterns(value, arg: str) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{arg} must be a module name pattern or a list of them (fnmatch style), got {value!r}")


def _warn_unmatched(model: nn.Module, include: Optional[List[str]]) -> None:
    """Warn once about ``include`` patterns that match no Conv2d/Linear layer of the model (likely a typo)."""
    names = [name for name, m in model.named_modules() if _kind(m) is not None]
    unmatched = [p for p in include or () if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        warnings.warn(f"decompose: include pattern(s) {unmatched} match no Conv2d or Linear layer of "
                      f"{type(model).__name__}", stacklevel=3)


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _run(model: nn.Module, example_inputs, layers: Dict[str, _Layer], record: bool) -> Tuple[object, int]:
    """One forward pass in eval mode without gradients (training flags restored): the output and its
    FlopCounterMode FLOPs; with ``record``, each layer's inputs and outputs are kept."""
    handles = []
    if record:
        for layer in layers.values():
            def hook(module, args, output, layer=layer):
                layer.inputs.append(args[0].detach())
                layer.outputs.append(output.detach())

            handles.append(layer.module.register_forward_hook(hook))
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            output = call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.train(t)
    return output, counter.get_total_flops()


def _rel_error(got, want) -> Optional[float]:
    if not isinstance(got, Tensor) or not isinstance(want, Tensor):
        return None
    want64 = want.double()
    denom = float(want64.norm())
    return float((got.double() - want64).norm()) / denom if denom > 0 else float((got.double()).norm())


def _allocate(layers: List[_Layer], cost_kind: str, budget: float, total: float, min_flop_saving: float,
              arg: str) -> Dict[str, int]:
    """Ranks minimising the summed normalised discarded energy with total cost <= budget.

    Greedy on a heap: each move is either switching a dense layer to its largest FLOP-saving rank, or dropping
    one more singular value of a decomposed layer; the move with the least discarded energy per unit of cost
    saved goes first. The discarded energy of a layer is convex in its rank (singular values descend), so the
    rank-dropping moves of each layer come in the right order and the result misses the budget by at most one
    move.
    """
    def cost(layer: _Layer, rank: Optional[int]) -> float:
        return layer.flops(rank) if cost_kind == "flops" else layer.params(rank)

    ranks: Dict[str, Optional[int]] = {l.name: None for l in layers}
    energy2 = {l.name: (l.S.double() ** 2) / max(float((l.S.double() ** 2).sum()), 1e-300) for l in layers}
    heap = []

    def push(layer: _Layer) -> None:
        rank = ranks[layer.name]
        if rank is None:
            target = layer.max_saving_rank(min_flop_saving)
            if target < 1:
                return
            saving = cost(layer, None) - cost(layer, target)
            lost = layer.discarded(target)
        else:
            if rank <= 1:
                return
            target = rank - 1
            saving = cost(layer, rank) - cost(layer, target)
            lost = float(energy2[layer.name][rank - 1])
        if saving > 0:
            heapq.heappush(heap, (lost / saving, layer.name, target, saving))

    by_name = {l.name: l for l in layers}
    for layer in layers:
        push(layer)
    while total > budget and heap:
        _, name, target, saving = heapq.heappop(heap)
        ranks[name] = target
        total -= saving
        push(by_name[name])
    if total > budget * 1.0000001:
        raise ValueError(
            f"{arg} cannot be met by decomposing the selected layers: the smallest reachable {cost_kind} is "
            f"{total:.4g}, the budget {budget:.4g}"
        )
    return {name: rank for name, rank in ranks.items() if rank is not None}


def _check_fraction(value, arg: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
        raise ValueError(f"{arg} must be a number in (0, 1], got {value!r}")
    return float(value)


def decompose(
    model: nn.Module,
    *,
    ranks: Optional[Dict[str, int]] = None,
    energy: Optional[float] = None,
    rank_ratio: Optional[float] = None,
    target_flops: Optional[float] = None,
    target_params: Optional[float] = None,
    scheme: str = "channel",
    include: Union[str, Sequence[str], None] = None,
    exclude: Union[str, Sequence[str], None] = None,
    min_flop_saving: float = 0.0,
    example_inputs=None,
    inplace: bool = False,
    progress: bool = True,
) -> Tuple[nn.Module, dict, dict]:
    """Replace Conv2d/Linear layers of ``model`` by ``LowRankConv2d``/``LowRankLinear``.

    Exactly one way of choosing ranks:

    - ``ranks={name: rank}``: these layers at these ranks;
    - ``energy``: per layer the smallest rank keeping ``energy`` (in (0, 1]) of the squared singular values;
    - ``rank_ratio``: per layer ``max(1, round(rank_ratio * full_rank))``;
    - ``target_flops`` / ``target_params``: a fraction in (0, 1] of the whole model's FLOPs (on
      ``example_inputs``, counted like FlopCounterMode) / parameters to keep; ranks are allocated across
      the layers to minimise the total normalised discarded energy ``sum_l sum_{i>r_l} s_i^2 / sum_i s_i^2``
      within the budget (greedy, within one rank step of it).

    Candidates are the ``nn.Conv2d`` (groups=1, zero padding) and ``nn.Linear`` modules whose names match an
    ``include`` pattern (all when None) and no ``exclude`` pattern (fnmatch style, e.g. ``"layer1.*"``); with
    ``ranks`` the candidates are its keys. A layer is skipped (and reported) when its rank would not save FLOPs,
    or would save less than ``min_flop_saving`` of its FLOPs. ``scheme`` ("channel" or "spatial") applies to
    convolutions; linear layers have one scheme ("channel"). ``example_inputs`` (a tensor, a tuple of
    positional arguments or a dict of keyword arguments) are needed for ``target_flops`` and for the FLOPs and errors of the report; the
    passes over them run in eval mode without gradients and leave the model's training flags as they were.
    ``inplace=False`` works on a deep copy. ``progress`` shows a progress bar over the layers' SVDs.

    Returns ``(model, plan, report)``: ``plan = {"method": "decompose", "version": 1, "layers": {name:
    {"kind": "conv2d"|"linear", "scheme": ..., "rank": r}}}`` and ``report = {"layers": {name: {kind, scheme,
    rank, full_rank, energy_kept, params_dense, params, flops_dense, flops, rel_error}}, "skipped": {name:
    reason}, "total": {params_dense, params, flops_dense, flops, output_rel_error}}`` (FLOPs and errors are
    None without example inputs).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    chosen = [k for k, v in dict(ranks=ranks, energy=energy, rank_ratio=rank_ratio, target_flops=target_flops,
                                  target_params=target_params).items() if v is not None]
    if len(chosen) != 1:
        raise ValueError("give exactly one of ranks, energy, rank_ratio, target_flops, target_params; got "
                         + (", ".join(chosen) if chosen else "none"))
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if not isinstance(min_flop_saving, (int, float)) or not 0.0 <= min_flop_saving < 1.0:
        raise ValueError(f"min_flop_saving must be a number in [0, 1), got {min_flop_saving!r}")
    if energy is not None:
        _check_fraction(energy, "energy")
    if rank_ratio is not None:
        _check_fraction(rank_ratio, "rank_ratio")
    for arg, value in (("target_flops", target_flops), ("target_params", target_params)):
        if value is not None:
            _check_fraction(value, arg)
    if isinstance(example_inputs, (tuple, list)) and not example_inputs:
        example_inputs = None  # an empty tuple: no inputs to run
    has_inputs = example_inputs is not None
    if target_flops is not None and not has_inputs:
        raise ValueError("target_flops needs example_inputs to count FLOPs")
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    _warn_unmatched(model, include_p)

    if not inplace:
        model = copy.deepcopy(model)
    skipped: Dict[str, str] = {}
    layers: Dict[str, _Layer] = {}
    if ranks is not None:
        if not isinstance(ranks, dict):
            raise TypeError(f"ranks must be a dict {{module name: rank}}, got {type(ranks).__name__}")
        modules = dict(model.named_modules())
        for name, rank in ranks.items():
            if name not in modules:
                raise ValueError(f"ranks names {name!r}, which is not a module of the model")
            kind = _kind(modules[name])
            if kind is None:
                raise ValueError(f"ranks names {name!r}, a {type(modules[name]).__name__}; only Conv2d and "
                                 "Linear layers can be decomposed")
            if kind == "conv2d":
                check_decomposable_conv(modules[name])
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(f"ranks[{name!r}] must be a positive int, got {rank!r}")
            layers[name] = _Layer(name, modules[name], kind, scheme if kind == "conv2d" else "channel")
    else:
        for name, module in model.named_modules():
            kind = _kind(module)
            if kind is None or not name:
                continue
            if (include_p is not None and not _matches(name, include_p)) or (
                exclude_p is not None and _matches(name, exclude_p)
            ):
                continue
            if kind == "conv2d":
                try:
                    check_decomposable_conv(module)
                except ValueError as exc:
                    skipped[name] = str(exc)
                    continue
            layers[name] = _Layer(name, module, kind, scheme if kind == "conv2d" else "channel")

    dense_output, flops_dense = _run(model, example_inputs, layers, record=True) if has_inputs else (None, None)
    params_dense = sum(p.numel() for p in model.parameters())

    for layer in tqdm(layers.values(), desc="decompose: SVD", unit="layer", leave=False, disable=not progress):
        layer.factors = factorize(weight_matrix(layer.module.weight, layer.scheme))
        layer.S = layer.factors[1]

    candidates = list(layers.values())
    if ranks is not None:
        for layer in candidates:
            if ranks[layer.name] > layer.full_rank:
                raise ValueError(f"ranks[{layer.name!r}] = {ranks[layer.name]} exceeds the layer's full rank "
                                 f"{layer.full_rank}")
        chosen_ranks = {l.name: ranks[l.name] for l in candidates}
    elif energy is not None:
        chosen_ranks = {l.name: select_rank(l.S, None, energy) for l in candidates}
    elif rank_ratio is not None:
        chosen_ranks = {l.name: max(1, round(rank_ratio * l.full_rank)) for l in candidates}
    else:
        if target_flops is not None:
            kind, fraction, total = "flops", target_flops, float(flops_dense)
        else:
            kind, fraction, total = "params", target_params, float(params_dense)
        chosen_ranks = _allocate(candidates, kind, fraction * total, total, min_flop_saving,
                                 "target_flops" if kind == "flops" else "target_params")

    planned: Dict[str, dict] = {}
    report_layers: Dict[str, dict] = {}
    for layer in candidates:
        rank = chosen_ranks.get(layer.name)
        if rank is None:
            skipped[layer.name] = "keeping it dense costs less discarded energy within the budget"
            continue
        if not layer.saves(rank, min_flop_saving):
            skipped[layer.name] = (f"rank {rank} would keep {layer.flop_ratio(rank):.1%} of the layer's FLOPs "
                                   f"(min_flop_saving={min_flop_saving})")
            continue
        U, S, V = layer.factors
        if layer.kind == "conv2d":
            new = LowRankConv2d.from_factors(layer.module, U, S, V, rank, layer.scheme)
        else:
            new = LowRankLinear.from_factors(layer.module, U, S, V, rank)
        new.train(layer.module.training)
        rel_error = None
        if layer.inputs:
            with torch.no_grad():
                errors = [(_rel_error(new(x), y), float(y.double().norm())) for x, y in zip(layer.inputs,
                                                                                           layer.outputs)]
            weight = sum(w for _, w in errors)
            rel_error = sum(e * w for e, w in errors) / weight if weight > 0 else errors[0][0]
        _set_submodule(model, layer.name, new)
        planned[layer.name] = {"kind": layer.kind, "scheme": layer.scheme, "rank": rank}
        report_layers[layer.name] = {
            "kind": layer.kind,
            "scheme": layer.scheme,
            "rank": rank,
            "full_rank": layer.full_rank,
            "energy_kept": 1.0 - layer.discarded(rank),
            "params_dense": layer.params(None),
            "params": layer.params(rank),
            "flops_dense": layer.flops(None) if layer.inputs else None,
            "flops": layer.flops(rank) if layer.inputs else None,
            "rel_error": rel_error,
        }
    for layer in candidates:  # drop the recorded activations
        layer.inputs.clear()
        layer.outputs.clear()

    output, flops = _run(model, example_inputs, {}, record=False) if has_inputs else (None, None)
    report = {
        "layers": report_layers,
        "skipped": skipped,
        "total": {
            "params_dense": params_dense,
            "params": sum(p.numel() for p in model.parameters()),
            "flops_dense": flops_dense,
            "flops": flops,
            "output_rel_error": _rel_error(output, dense_output) if has_inputs else None,
        },
    }
    plan = {"method": "decompose", "version": PLAN_VERSION, "layers": planned}
    return model, plan, report


def apply_decompose_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Replace, in place, the layers named by a ``decompose`` plan with low-rank layers of the planned ranks
    (weights uninitialised in the sense of a fresh module: load the state_dict saved after decomposition).
    Returns ``model``. Raises ValueError when the plan does not fit the model."""
    entries = plan_layers(plan, "decompose", "{kind, scheme, rank}")
    modules = dict(model.named_modules())
    for name, entry in entries.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"plan names {name!r}, which is not a module of the model")
        kind, scheme, rank = entry.get("kind"), entry.get("scheme"), entry.get("rank")
        if _kind(module) != kind:
            raise ValueError(f"plan says {name!r} is a {kind}, the model has a {type(module).__name__}")
        w = module.weight
        if kind == "conv2d":
            check_decomposable_conv(module)
            new = LowRankConv2d(module.in_channels, module.out_channels, module.kernel_size, rank, module.stride,
                                _explicit_padding(module), module.dilation, bias=module.bias is not None, scheme=scheme,
                                device=w.device, dtype=w.dtype)
        else:
            new = LowRankLinear(module.in_features, module.out_features, rank, bias=module.bias is not None,
                                device=w.device, dtype=w.dtype)
        new.train(module.training)
        _set_submodule(model, name, new)
    return model


__all__ = ["decompose", "apply_decompose_plan"]
