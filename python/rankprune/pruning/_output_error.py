"""The ``output_error`` criterion: a channel is as important as the output error its removal leaves in the
layers that consume it, after they are refitted, weighted by how much that error moves the model's output and
divided by the FLOPs the channel costs.

For a consumer with weight ``W`` (``[out, d]``, im2col columns of a conv) and input Gram ``S = X X^T`` on the
calibration data, removing the columns ``B`` of one input channel and refitting the rest by least squares
leaves the output error ``tr(W_B ((S^-1)_BB)^-1 W_B^T)`` (the Schur complement identity, as in Optimal Brain
Surgeon; ``S`` damped as the reconstruction is). Per channel of a Torch-Pruning group (all the convs tied by
residual additions, concatenations and depthwise convs), the criterion sums over the group's consumers

    sensitivity_c * error_c(channel) / ||W_c X_c||^2,

where ``sensitivity_c`` is measured: the relative change of the model's output (on a probe of the first
batch) when noise of a known relative energy is added to consumer ``c``'s output. Divided by the channel's
FLOPs (its producers' output and its consumers' input share), the scores of different layers compare, so
``prune`` ranks them globally by default with this criterion: the allocation across layers follows the
measured output error per FLOP saved. Each channel is scored as if removed alone (no interaction between
removed channels of one layer); the reconstruction then refits the layers for the set actually removed.

With a latency model (``prune(target_latency=...)`` builds one), a channel's cost is the measured time it
saves instead of its FLOPs: each layer's FLOPs weighted by that layer's measured milliseconds per FLOP in
context (``rankprune.latency``), so the allocation follows output error per millisecond saved and cuts first
where a FLOP costs the most time (memory-bound layers: depthwise convolutions, large feature maps).

Layers fed only by consumers that cannot be scored (grouped convs, modules other than Conv2d/Linear, more
than ``MAX_INPUT_DIM`` inputs, the model's output layer) get no score, so their groups are not pruned.
"""
import collections
import math
import statistics
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import scoring
from .._inputs import (batch_size, call_model, eval_mode, first_samples, holds_non_finite, model_inputs,
                       raise_non_finite, removed_after)
from ..calibration import Calibration
from ..columns import column_generator, input_columns
from ..fidelity import output_tensor
from . import _torch_pruning as tpa
from ._errors import torch_pruning_errors
from ._importance import root_positions
from ._reconstruct import DEFAULT_DAMPING, MAX_INPUT_DIM, ridge_cholesky

# Relative energy of the noise added to a consumer's output to measure its sensitivity (small enough to stay
# in the linear regime of the rest of the network, large enough to be far above float32 rounding).
PROBE_NOISE = 1e-2
# Images of the first batch that the sensitivity probe runs.
PROBE_IMAGES = 32


class OutputError(scoring.Criterion):
    """Scores ``{conv: [out_channels]}`` by output error per FLOP, or per millisecond saved (module doc);
    comparable across layers.

    Args:
        damping: ridge damping of each consumer's input Gram, relative to its mean diagonal.
        progress: show progress bars.
        cache_bytes: memory the calibration engine may keep (``rankprune.calibration``).
        layers: names of the convs to score (default: all).
        latency_model: a ``rankprune.latency.LatencyModel`` of the model: costs in measured milliseconds
            instead of FLOPs (module doc).
    """

    name = "output_error"
    needs_data = True
    comparable = True

    def __init__(self, damping: float = DEFAULT_DAMPING, progress: bool = True, cache_bytes: Optional[int] = None,
                 layers=None, latency_model=None):
        super().__init__(layers)
        self.damping, self.progress, self.cache_bytes = damping, progress, cache_bytes
        self.latency_model = latency_model

    def scores(self, model: nn.Module, data: Optional[Iterable] = None) -> scoring.Scores:
        engine = Calibration(model, data, cache_bytes=self.cache_bytes, progress=self.progress, name="output_error")
        example = first_samples(model_inputs(next(iter(engine.data)), model), 1)
        with eval_mode(model, no_grad=False), torch_pruning_errors(model, "tracing the dependency graph"):
            graph = tpa.build_graph(model, example)
            groups = list(graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))
        names = {m: n for n, m in model.named_modules()}
        consumers = _consumers(groups, graph, names)
        shapes = _output_shapes(model, example)
        grams = _statistics(engine, consumers)
        sensitivity = _sensitivities(engine, consumers, shapes)
        wanted = set(scoring.conv_layers(model, self.layers))
        weights = _time_per_flop(self.latency_model, model, shapes)
        scores: Dict[str, Tensor] = {}
        for group in groups:
            flops = _group_flops(group, graph, names, shapes, weights)
            per_flop = _group_scores(group, graph, names, consumers, grams, sensitivity, self.damping, flops)
            if per_flop is None:
                continue
            for item in group.items:
                name = names.get(item.dep.target.module)
                if name not in wanted or not graph.is_out_channel_pruning_fn(item.dep.handler):
                    continue
                root = root_positions(item)
                if root is None:
                    continue
                out = scores.setdefault(name, torch.zeros(model.get_submodule(name).out_channels, dtype=torch.float64))
                out[torch.as_tensor(tpa.plain_idxs(item.idxs))] = per_flop[torch.as_tensor(root)]
        if not scores:
            raise ValueError("output_error: no conv feeds a layer that can be scored (a plain nn.Conv2d or nn.Linear "
                             f"with at most {MAX_INPUT_DIM} inputs)")
        return scores


def _consumers(groups: list, graph, names: Dict[nn.Module, str]) -> Dict[str, nn.Module]:
    """``{name: module}`` of the layers whose input channels some group removes and that can be scored."""
    found = {}
    for group in groups:
        for item in group.items:
            module = item.dep.target.module
            if graph.is_out_channel_pruning_fn(item.dep.handler) or module not in names:
                continue
            plain_conv = isinstance(module, nn.Conv2d) and module.groups == 1
            if (plain_conv or isinstance(module, nn.Linear)) and module.weight[0].numel() <= MAX_INPUT_DIM:
                found[names[module]] = module
    return found


def _output_shapes(model: nn.Module, example) -> Dict[str, Tuple[int, ...]]:
    """``{name: output shape per example}`` of every Conv2d and Linear, by one forward of ``example``."""
    shapes: Dict[str, Tuple[int, ...]] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            shapes.setdefault(name, tuple(output.shape[1:]))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with removed_after(handles):
        with eval_mode(model):
            call_model(model, example)
    return shapes


def _statistics(engine: Calibration, consumers: Dict[str, nn.Module]) -> Dict[str, Tensor]:
    """One pass: each consumer's float64 input Gram ``X X^T`` over its sampled columns."""
    grams = {name: torch.zeros(m.weight[0].numel(), m.weight[0].numel(), dtype=torch.float64, device=engine.device)
             for name, m in consumers.items()}

    def capture(name: str, module: nn.Module):
        def hook(batch: int, call: int, x: Tensor) -> None:
            rows = input_columns(module, x, column_generator(0, batch, call)).to(torch.float64)
            grams[name].addmm_(rows.T, rows)
        return hook

    with engine.phase("statistics"):
        engine.trace({m: capture(n, m) for n, m in consumers.items()}, "statistics")
        engine.all_reduce(list(grams.values()))
    for name, gram in grams.items():
        if holds_non_finite(gram):
            raise_non_finite(engine.model, engine.data, "output_error", f"the input Gram of layer {name!r}")
    return grams


def _sensitivities(engine: Calibration, consumers: Dict[str, nn.Module], shapes) -> Dict[str, float]:
    """``{consumer: relative squared change of the model output / relative energy of the noise added to the
    consumer's output}`` on a probe of the first batch (see ``PROBE_NOISE``), each consumer's forward starting
    from the cached outputs of the modules before it."""
    first = next(iter(engine.batches()))[1]
    probe = first_samples(first, min(PROBE_IMAGES, batch_size(first)))
    runner = Calibration(engine.model, [probe], cache_bytes=engine.cache_bytes, progress=False, distributed=False,
                         name=engine.name)
    measured: Dict[str, float] = {}
    with engine.phase("sensitivity"):
        dense: List = []
        runner.trace({}, "sensitivity", outputs=dense)
        reference = output_tensor(dense[0]) if dense else None
        if reference is None:
            return {name: 1.0 for name in consumers}
        reference = reference.double()
        scale = max(float(reference.square().sum()), 1e-300)
        for index, (name, module) in enumerate(consumers.items()):
            generator = torch.Generator().manual_seed(index)  # on the CPU: the same noise on every device

            def add_noise(mod, args, output):
                noise = torch.randn(output.shape, generator=generator, dtype=output.dtype).to(output.device)
                ratio = math.sqrt(PROBE_NOISE * float(output.double().square().sum())
                                  / max(float(noise.double().square().sum()), 1e-300))
                return output + ratio * noise

            with removed_after([module.register_forward_hook(add_noise)]):
                changed = output_tensor(runner.outputs_from(module, "sensitivity")[0]).double()
            measured[name] = float((changed - reference).square().sum()) / scale / PROBE_NOISE
    values = torch.tensor([measured[n] for n in consumers], dtype=torch.float64)
    engine.all_reduce([values])
    if engine.distributed:
        values /= torch.distributed.get_world_size()
    return {name: float(v) for name, v in zip(consumers, values)}


class _Fit:
    """One consumer's least-squares state during the greedy removal: its weight ``W`` (refitted as channels
    go), the inverse ``P`` of its damped input Gram (downdated as they go), its scale (sensitivity over output
    energy) and the columns of each root channel it reads, batched by block size."""

    def __init__(self, name: str, module: nn.Module, gram: Tensor, columns: Dict[int, List[int]], damping: float,
                 sensitivity: float):
        self.weight = module.weight.detach().reshape(module.weight.shape[0], -1).to(gram)
        self.dead = not float(gram.diagonal().mean()) > 0  # the layer only saw zeros: removing costs nothing
        self.precision = torch.cholesky_inverse(ridge_cholesky(gram, damping, name))
        self.scale = sensitivity / max(float(((self.weight @ gram) * self.weight).sum()), 1e-300)
        self.columns = {r: torch.tensor(c, device=gram.device) for r, c in columns.items()}
        by_size: Dict[int, List[int]] = {}
        for r, c in columns.items():
            by_size.setdefault(len(c), []).append(r)
        # (root channels [R], their columns [R, size], which of them are still there [R])
        self.blocks = [(torch.tensor(roots), torch.stack([self.columns[r] for r in roots]),
                        torch.ones(len(roots), dtype=torch.bool)) for roots in by_size.values()]

    def add_costs(self, total: Tensor) -> None:
        """Add to ``total[root]`` the (scaled) output error of removing each remaining root next, the rest
        refitted: ``tr(W_B (P_BB)^-1 W_B^T)``."""
        if self.dead:
            return
        for roots, index, alive in self.blocks:
            if not bool(alive.any()):
                continue
            index = index[alive.to(index.device)]
            w = self.weight[:, index].permute(1, 2, 0)  # [R, size, out]
            if index.shape[1] == 1:  # 1x1 convs and Linear layers: scalar blocks
                values = w.square().sum((1, 2)) / self.precision[index[:, 0], index[:, 0]]
            else:
                blocks = self.precision[index[:, :, None], index[:, None, :]]
                values = (w * torch.linalg.solve(blocks, w)).sum((1, 2))
            total.index_add_(0, roots[alive], (values * self.scale).cpu())

    def remove(self, root: int) -> None:
        """Remove ``root``'s columns: refit the weight on the rest (OBS update) and downdate the inverse."""
        if root not in self.columns:
            return
        b = self.columns.pop(root)
        for roots, _, alive in self.blocks:
            alive &= roots != root
        if self.dead:
            return
        inverse = torch.linalg.inv(self.precision[b][:, b])
        rows = self.precision[b]  # [size, d]
        self.weight -= (self.weight[:, b] @ inverse) @ rows
        self.precision -= rows.T @ inverse @ rows


def _group_scores(group, graph, names, consumers: Dict[str, nn.Module], grams: Dict[str, Tensor],
                  sensitivity: Dict[str, float], damping: float, flops: Tensor) -> Optional[Tensor]:
    """Per root channel of ``group``: its score, from a greedy removal (module doc) that each time takes the
    channel whose removal adds the least sensitivity-weighted output error to the group's consumers, refitted:
    the running maximum of the added error per FLOP along the removal order (so that a single threshold
    across groups removes each group's channels in its greedy order). None when no consumer is scored."""
    fits = []
    for item in group.items:
        name = names.get(item.dep.target.module)
        if name not in consumers or graph.is_out_channel_pruning_fn(item.dep.handler):
            continue
        root = root_positions(item)
        if root is None:
            continue
        module = consumers[name]
        per_channel = module.weight[0].numel() // (module.in_channels if isinstance(module, nn.Conv2d)
                                                    else module.in_features)
        columns: Dict[int, List[int]] = {}
        for plain, r in zip(tpa.plain_idxs(item.idxs), root):
            columns.setdefault(r, []).extend(range(plain * per_channel, (plain + 1) * per_channel))
        fits.append(_Fit(name, module, grams[name], columns, damping, sensitivity.get(name, 1.0)))
    if not fits:
        return None
    count = len(group[0].idxs)
    remaining = torch.zeros(count, dtype=torch.bool)
    for fit in fits:
        remaining[list(fit.columns)] = True
    scores = torch.zeros(count, dtype=torch.float64)
    level = 0.0
    for _ in range(int(remaining.sum())):
        costs = torch.zeros(count, dtype=torch.float64)
        for fit in fits:
            fit.add_costs(costs)
        costs = torch.where(remaining, costs / flops.clamp_min(1.0), torch.full_like(costs, math.inf))
        root = int(costs.argmin())
        level = max(level, float(costs[root]))
        scores[root] = level
        remaining[root] = False
        for fit in fits:
            fit.remove(root)
    return scores


def _layer_flops(module: nn.Module, out_shape: Tuple[int, ...]) -> int:
    """Multiply-adds of one call of a Conv2d or Linear with output shape ``out_shape`` (per example)."""
    if isinstance(module, nn.Conv2d):
        taps = module.kernel_size[0] * module.kernel_size[1]
        return taps * math.prod(out_shape[1:]) * (module.in_channels // module.groups) * module.out_channels
    return math.prod(out_shape[:-1]) * module.in_features * module.out_features


def _time_per_flop(latency_model, model: nn.Module, shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, float]:
    """``{layer: weight}`` turning a layer's FLOPs into its cost: 1 for every layer without a latency model;
    with one, the layer's measured milliseconds in context per FLOP over the median layer's (so costs stay in
    FLOPs of the median layer), and 1 for a layer it did not time (neither favoured nor spared)."""
    weights = collections.defaultdict(lambda: 1.0)
    if latency_model is None:
        return weights
    per_flop = {}
    for name, layer in latency_model.layers.items():
        if name in shapes:
            flops = _layer_flops(model.get_submodule(name), shapes[name]) * layer.calls
            if flops > 0:
                per_flop[name] = latency_model.layer_time(name) / flops
    median = statistics.median(per_flop.values()) if per_flop else 0.0
    if median > 0:
        weights.update({name: value / median for name, value in per_flop.items()})
    return weights


def _group_flops(group, graph, names, shapes: Dict[str, Tuple[int, ...]], weights: Dict[str, float]) -> Tensor:
    """Per root channel of ``group``: the multiply-adds per example it costs in the convs and Linear layers of
    the group (a producer's output channel, a consumer's input channel; a depthwise conv once), each layer's
    weighted by ``weights[name]`` (``_time_per_flop``)."""
    flops = torch.zeros(len(group[0].idxs), dtype=torch.float64)
    for item in group.items:
        module = item.dep.target.module
        name = names.get(module)
        root = root_positions(item)
        if root is None or name is None or not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        out_shape = shapes.get(name)
        if out_shape is None:
            continue
        positions = math.prod(out_shape[1:]) if isinstance(module, nn.Conv2d) else math.prod(out_shape[:-1])
        is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
        if isinstance(module, nn.Conv2d):
            taps = module.kernel_size[0] * module.kernel_size[1]
            depthwise = module.groups == module.in_channels and module.groups > 1
            if depthwise and not is_out:
                continue  # counted on its output side
            cost = taps * positions * (1 if depthwise else module.in_channels // module.groups if is_out
                                       else module.out_channels // module.groups)
        else:
            cost = positions * (module.in_features if is_out else module.out_features)
        cost = float(cost) * weights[name]
        flops.index_add_(0, torch.as_tensor(root), torch.full((len(root),), cost, dtype=torch.float64))
    return flops
