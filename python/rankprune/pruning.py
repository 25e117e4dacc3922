"""Structural channel pruning on Torch-Pruning's dependency graph, driven by ``rankprune.scoring`` scores.

``prune(model, example_inputs, criterion_or_scores, ratio=... | target_flops=...)`` physically removes
output channels of convolutions together with everything coupled to them (the BatchNorm after a conv, the
input channels of the next conv or Linear, every branch joined by a residual addition, concatenations,
depthwise convs) and returns ``(pruned_model, plan)``.

What the numbers mean:

- A *group* is a set of channels that must be removed together (Torch-Pruning's ``Group``): one conv's
  outputs and the inputs it feeds, or all convs tied by residual additions. A channel of a group is
  scored by the mean, over the group's scored convs, of each conv's score divided by that conv's mean
  score (so that convs with different scales compare).
- ``ratio``: the fraction of channels removed, from every prunable group (``global_ranking=False``), or
  from all prunable channels together, the least important first (``global_ranking=True``).
  It is a fraction of *channels*: removing a fraction p of the channels of two consecutive convs removes
  about 1-(1-p)^2 of the FLOPs between them.
- ``target_flops``: the fraction of the original FLOPs (``torch.utils.flop_counter`` on
  ``example_inputs``) that the pruned model keeps, e.g. 0.6 to remove 40%. The channel ratio that meets it
  is found in a few tries (1-3 on ResNet-20, MobileNetV3, EfficientNet-B0), each pruning a fresh copy: the
  first at ``1 - sqrt(target)``, then secant steps on sqrt(FLOPs kept), bisection as a fallback (see
  ``_search_flops``); the result lands within 2% of the target
  (relative) unless the channel granularity forbids it, in which case the closest is returned. With local
  ranking the search rounds each group's channel count at a different point (``_prune_by_ratio``'s
  ``dither``) so that FLOPs can be met finely; the plan's ``ratio`` is then the nominal ratio.
- ``data`` with ``recalibrate=True`` (the default): after the channels are removed, every BatchNorm of the
  pruned model gets running statistics re-estimated on ``data`` (:func:`rankprune.recalibrate`; the
  FLOP-target search only counts FLOPs and recalibrates once, on the final model).

The plan is plain JSON-able data::

    {"method": "prune", "version": 1,
     "layers": {module_name: {"out_channels_kept": [original indices, ascending],
                              "in_channels_kept": [...]}},      # each key only where that side shrank
     "criterion": ..., "ratio": ..., "target_flops": ..., "global_ranking": ..., "round_to": ...,
     "ignored_layers": [...], "recalibrated": bool, "flops": [before, after], "params": [before, after]}

A ``layers`` key may also name a parameter that is not part of a standard layer (e.g. ConvNeXt's
``layer_scale``): ``{"dim": d, "channels_kept": [...]}``, sliced along ``dim``.

``apply_prune_plan(fresh_model, plan)`` slices every listed module to the kept indices (Torch-Pruning's
per-layer pruning functions, no graph tracing), so that a state_dict saved from the pruned model loads with
``load_state_dict`` / ``torch.load(..., weights_only=True)``.

Grouped convolutions (``1 < groups``, not depthwise, e.g. RegNet, ResNeXt) are pruned group-consistently:
every group of the conv loses the same number of channels, chosen by score within each group, so that
``groups`` stays and each group keeps an equal share. A group of channels that cannot be pruned so (its
channels reach a grouped conv through a concatenation or reshape, or each conv group holds one channel) is
left unpruned, and ``prune`` says which, once, in a warning.

Failures inside Torch-Pruning (a model it cannot trace, such as ShuffleNet's channel shuffle) are raised as
:class:`PruningError` (a ValueError) naming the layer and the reason, never as Torch-Pruning's own exception.
"""
import contextlib
import copy
import math
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning import _helpers as tp_helpers
from torch_pruning.dependency.node import Node as _TPNode
from torch_pruning.pruner import function as tp_function

from . import scoring
from ._inputs import call_model
from .plans import PLAN_VERSION, plan_layers
from .report import count_flops
from .training import recalibrate as recalibrate_batchnorm

Scores = Dict[str, Tensor]

# TP pruning functions that remove a conv's output channels (the ones our scores describe).
_CONV_OUT_FNS = {tp_function.prune_conv_out_channels, tp_function.prune_depthwise_conv_out_channels}


class PruningError(ValueError):
    """Channel pruning cannot handle this model or layer; the message names the layer and the reason."""


def _failing_node(exc: BaseException) -> Optional[_TPNode]:
    """A Torch-Pruning graph node held by the innermost frame ``exc`` went through that holds one (a reshape
    node when there is one)."""
    nodes: List[_TPNode] = []
    tb = exc.__traceback__
    while tb is not None:
        in_frame = [v for v in tb.tb_frame.f_locals.values() if isinstance(v, _TPNode)]
        nodes = in_frame or nodes
        tb = tb.tb_next
    reshapes = [n for n in nodes if n.type == tp.ops.OPTYPE.RESHAPE]  # the usual culprit
    return (reshapes or nodes or [None])[0]


def _nearest_module_name(node: _TPNode, names: Dict[Any, str]) -> Optional[str]:
    """The name of the closest module upstream of ``node`` (itself included), breadth first."""
    seen, frontier = set(), [node]
    while frontier:
        nxt = []
        for n in frontier:
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.module in names:
                return names[n.module]
            nxt.extend(n.inputs)
        frontier = nxt
    return None


@contextlib.contextmanager
def _torch_pruning_errors(model: nn.Module, doing: str):
    """Re-raise any exception from Torch-Pruning while ``doing`` as a :class:`PruningError` that names the
    graph node (and the nearest layer before it) where it happened."""
    try:
        yield
    except PruningError:
        raise
    except Exception as exc:
        node = _failing_node(exc)
        where = ""
        if node is not None:
            names = {m: n for n, m in model.named_modules()}
            near = _nearest_module_name(node, names)
            where = f" at {node.name.split(' (')[0]}" + (f" after layer {near!r}" if near else "")
            if node.type == tp.ops.OPTYPE.RESHAPE:
                where += (" (a reshape of the channel dimension, such as a channel shuffle or a view/transpose"
                          " between channels and groups, whose channel mapping Torch-Pruning cannot follow)")
        raise PruningError(f"cannot prune {type(model).__name__}: Torch-Pruning failed while {doing}{where}: "
                           f"{type(exc).__name__}: {exc}") from exc


def _grouped_conv_groups(module: Any) -> int:
    """``groups`` of a grouped convolution that is not depthwise (1 for every other module)."""
    if isinstance(module, nn.Conv2d) and module.groups > 1 and not (
            module.groups == module.in_channels == module.out_channels):
        return module.groups
    return 1


def _prune_grouped_conv_in(conv: nn.Conv2d, removed: Sequence[int]) -> None:
    """Remove input channels ``removed`` of a grouped conv, the same number from each of its groups: the
    weight ``[out, in/groups, kh, kw]`` keeps, for the outputs of group g, the columns of g's kept inputs
    (Torch-Pruning's conv pruner slices the same columns for every group, which is only right for depthwise
    convs)."""
    groups = conv.groups
    per_group = conv.in_channels // groups
    removed_set = set(int(i) for i in removed)
    kept = [[j for j in range(per_group) if g * per_group + j not in removed_set] for g in range(groups)]
    if len({len(k) for k in kept}) != 1 or not kept[0]:
        raise PruningError(f"input channels of grouped conv (groups={groups}) can only be removed in equal "
                           f"numbers from each group, keeping at least one per group; got {sorted(removed_set)}")
    out_per_group = conv.out_channels // groups
    columns = torch.tensor(kept, dtype=torch.long, device=conv.weight.device).repeat_interleave(out_per_group, 0)
    index = columns[:, :, None, None].expand(-1, -1, *conv.weight.shape[2:])
    weight = nn.Parameter(torch.gather(conv.weight.detach(), 1, index), requires_grad=conv.weight.requires_grad)
    if conv.weight.grad is not None:
        weight.grad = torch.gather(conv.weight.grad, 1, index)
    conv.weight = weight
    conv.in_channels = len(kept[0]) * groups


def _normalized(s: Tensor) -> Tensor:
    mean = s.mean()
    return s / mean if mean > 0 else s


def _root_positions(item) -> Optional[List[int]]:
    """Where the channels of one group item sit among the group root's channels.

    A group from ``DependencyGraph.get_pruning_group`` holds *plain* indices (the item's own channel
    positions) in ``item.idxs`` and the matching root positions in ``item.root_idxs``; they differ when the
    item is reached through an index mapping, e.g. a conv whose output enters ``torch.cat`` at offset k
    (root position k + i for its channel i). Hybrid indices (a group assembled before Torch-Pruning
    flattens them) carry both. ``None`` when the root position is unknown (Torch-Pruning skips such items).
    """
    root = getattr(item, "root_idxs", None)
    if root is None:
        idxs = item.idxs
        if len(idxs) and not isinstance(idxs[0], tp_helpers._HybridIndex):
            raise ValueError("ScoreImportance: a group item without root indices (build groups with "
                             "DependencyGraph.get_pruning_group / get_all_groups)")
        root = tp_helpers.to_root_idxs(idxs)
    if any(r is None for r in root):
        return None
    return list(root)


class ScoreImportance(tp.importance.Importance):
    """Torch-Pruning importance from rankprune scores: ``imp(group) -> [channels of the group]``.

    ``scores_or_criterion`` is a scores dict ``{conv_name: [out_channels]}`` of the *unpruned* model, or a
    criterion (name or :class:`rankprune.scoring.Criterion`) that is evaluated on the graph's model (with
    ``data``) at the first call. A group's importance is the mean over its scored convs of each conv's
    scores divided by their mean (see the module doc); groups without a scored conv give ``None``, which
    Torch-Pruning pruners skip. Scores refer to channel positions of the unpruned model, so use it for
    one-shot pruning (``iterative_steps=1``) or re-create it after each step.

    Example::

        imp = ScoreImportance("energy", data=calib_loader)
        pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.3,
                                      ignored_layers=[model.fc])
        pruner.step()
    """

    def __init__(self, scores_or_criterion: Union[Scores, str, scoring.Criterion] = "energy",
                 data: Optional[Iterable] = None):
        if isinstance(scores_or_criterion, dict):
            self.scores: Optional[Scores] = {k: torch.as_tensor(v, dtype=torch.float64)
                                             for k, v in scores_or_criterion.items()}
            self.criterion = None
        else:
            self.scores = None
            self.criterion = scoring.get(scores_or_criterion)
        self.data = data
        self._names: Dict[nn.Module, str] = {}

    def bind(self, model: nn.Module) -> "ScoreImportance":
        """Compute the scores on ``model`` now (if a criterion was given) and learn its module names."""
        if self.scores is None:
            self.scores = self.criterion.scores(model, self.data)
        self.scores = scoring.check_scores(model, self.scores)
        self._names = {m: n for n, m in model.named_modules()}
        return self

    @torch.no_grad()
    def __call__(self, group) -> Optional[Tensor]:
        if self.scores is None or not self._names:
            self.bind(group._DG.model)
        total = None
        count = None
        for item in group.items:
            dep = item.dep
            if dep.handler not in _CONV_OUT_FNS:
                continue
            name = self._names.get(dep.target.module)
            if name not in self.scores:
                continue
            root_idxs = _root_positions(item)
            if root_idxs is None:
                continue
            plain = torch.as_tensor(tp_helpers.to_plain_idxs(item.idxs), dtype=torch.long)
            root = torch.as_tensor(root_idxs, dtype=torch.long)
            if total is None:
                n = len(group[0].idxs)
                total = torch.zeros(n, dtype=torch.float64)
                count = torch.zeros(n, dtype=torch.float64)
            total.scatter_add_(0, root, _normalized(self.scores[name])[plain])
            count.scatter_add_(0, root, torch.ones(len(root), dtype=torch.float64))
        if total is None:
            return None
        return total / count.clamp_min(1)


def _output_layers(model: nn.Module, example_inputs: Any) -> List[nn.Module]:
    """Conv/Linear layers whose output is the model's output (the classifier), by one probe forward;
    the last such layer called if the output went through functional ops after it."""
    called: List[Tuple[nn.Module, Tensor]] = []
    handles = [m.register_forward_hook(lambda m, i, o: called.append((m, o)))
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            out = call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    outs = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
    ids = {id(t) for t in outs if isinstance(t, Tensor)}
    direct = [m for m, o in called if id(o) in ids]
    if direct:
        return direct
    return [called[-1][0]] if called else []


def _group_blocks(group, names: Dict[Any, str], graph_is_out) -> Tuple[int, Optional[str]]:
    """Into how many equal contiguous blocks of channels the group must be pruned evenly, so that every
    grouped conv in it keeps equal groups (the lcm of their ``groups``; 1 without grouped conv), or ``(0,
    reason)`` when that cannot be done."""
    n = len(group[0].idxs)
    blocks = 1
    for dep, idxs in group:
        groups = _grouped_conv_groups(dep.target.module)
        if groups == 1:
            continue
        name = names.get(dep.target.module)
        module = dep.target.module
        size = module.out_channels if graph_is_out(dep.handler) else module.in_channels
        if tp_helpers.to_plain_idxs(idxs) != tp_helpers.to_root_idxs(idxs) or len(idxs) != size:
            return 0, (f"its channels reach grouped conv {name!r} (groups={groups}) through a concatenation or "
                       "reshape, where whole groups cannot be kept equal")
        blocks = math.lcm(blocks, groups)
    if n % blocks or n == blocks:
        return 0, (f"its {n} channels feed grouped convs needing {blocks} equal groups of at least 2 channels "
                   "to remove one from each")
    return blocks, None


def _block_removal(imp: Tensor, keep: int, blocks: int) -> Tensor:
    """Indices to remove so that each of ``blocks`` contiguous blocks keeps ``ceil(keep / blocks)`` channels,
    its least important ones removed."""
    size = len(imp) // blocks
    per_block = min(size, max(1, -(-keep // blocks)))
    removed = [b * size + imp[b * size:(b + 1) * size].argsort()[: size - per_block] for b in range(blocks)]
    return torch.cat(removed)


def _keep_count(n: int, n_prune: int, round_to: Optional[int], min_keep: int) -> int:
    keep = n - n_prune
    if round_to:
        keep = keep - keep % round_to if keep >= round_to else min(round_to, n)
    return min(n, max(keep, min_keep, 1))


def _prune_by_ratio(model: nn.Module, example_inputs: Any, scores: Scores, ratio: float, global_ranking: bool,
                    ignored: List[nn.Module], round_to: Optional[int], max_layer_ratio: float,
                    dither: bool = False, unpruned: Optional[Dict[str, str]] = None):
    """Prune ``model`` in place; returns the per-module kept indices ``{name: {"out"|"in": [..]}}``.
    Groups left unpruned because of their structure are added to ``unpruned`` as ``{layer: reason}``.

    With ``dither`` (local ranking only), group ``g`` of ``G`` removes ``floor(n * ratio + g / G)``
    channels instead of ``floor(n * ratio)``: the groups round at different ratios, so FLOPs fall in many
    small steps as the ratio grows instead of a few large ones (used by the FLOP-target search).
    """
    with _torch_pruning_errors(model, "tracing the dependency graph"):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
        groups = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]))
    importance = ScoreImportance(scores).bind(model)
    names = {m: n for n, m in model.named_modules()}
    candidates = []
    for group in groups:
        with _torch_pruning_errors(model, "scoring a channel group"):
            imp = importance(group)
        if imp is None:
            continue
        blocks, reason = _group_blocks(group, names, graph.is_out_channel_pruning_fn)
        if reason is not None:
            if unpruned is not None:
                unpruned[names[group[0].dep.target.module]] = reason
            continue
        candidates.append((group[0].dep.target.module, group[0].dep.handler, imp, blocks))
    if not candidates:
        raise ValueError("no prunable channel group: every conv is ignored, unscored, or tied to an ignored layer")

    plan_prune: List[Tuple[nn.Module, Any, Tensor]] = []
    if global_ranking:
        everything = torch.cat([imp for _, _, imp, _ in candidates])
        n_prune = int(math.floor(len(everything) * ratio))
        threshold = everything.sort().values[n_prune - 1] if n_prune > 0 else -math.inf
    for g, (module, handler, imp, blocks) in enumerate(candidates):
        n = len(imp)
        min_keep = math.ceil(n * (1 - max_layer_ratio))
        if global_ranking:
            n_prune = int((imp <= threshold).sum())
        else:
            n_prune = int(math.floor(n * ratio + (g / len(candidates) if dither and ratio > 0 else 0.0)))
        keep = _keep_count(n, n_prune, round_to, min_keep)
        if keep < n:
            removed = imp.argsort()[: n - keep] if blocks == 1 else _block_removal(imp, keep, blocks)
            if len(removed):
                plan_prune.append((module, handler, removed))

    alive: Dict[Tuple[str, str], List[int]] = {}
    param_dims: Dict[str, int] = {}
    for module, handler, idxs in plan_prune:
        with _torch_pruning_errors(model, f"collecting the channels coupled to {names[module]!r}"):
            group = graph.get_pruning_group(module, handler, idxs.tolist())
        grouped_inputs = []
        for dep, dep_idxs in group:
            target = dep.target.module
            name = names.get(target)
            if name is None and dep.target.type == tp.ops.OPTYPE.PARAMETER:
                name = graph._param_to_name[target]  # an unwrapped parameter (ConvNeXt's layer_scale)
                param_dims[name] = dep.target.pruning_dim
            if name is None:  # graph-only nodes (additions, concatenations, ...)
                continue
            side = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
            if (name, side) not in alive:
                size = graph.get_out_channels(target) if side == "out" else graph.get_in_channels(target)
                alive[(name, side)] = list(range(size))
            removed = set(int(i) for i in tp_helpers.to_plain_idxs(dep_idxs))
            alive[(name, side)] = [c for pos, c in enumerate(alive[(name, side)]) if pos not in removed]
            if side == "in" and _grouped_conv_groups(target) > 1:
                grouped_inputs.append((dep, sorted(removed)))
        for dep, removed in grouped_inputs:
            _prune_grouped_conv_in(dep.target.module, removed)
            group.items.remove(next(item for item in group.items if item.dep is dep))
        with _torch_pruning_errors(model, f"pruning the channels coupled to {names[module]!r}"):
            group.prune()
    kept: Dict[str, Dict[str, Any]] = {}
    for (name, side), channels in sorted(alive.items()):
        if name in param_dims:
            kept[name] = {"dim": param_dims[name], "channels_kept": channels}
        else:
            kept.setdefault(name, {})[f"{side}_channels_kept"] = channels
    return kept


def _resolve_ignored(model: nn.Module, ignored_layers) -> List[nn.Module]:
    if ignored_layers is None:
        return []
    modules = dict(model.named_modules())
    out = []
    for item in ignored_layers:
        if isinstance(item, str):
            if item not in modules:
                raise ValueError(f"ignored_layers: {item!r} is not a module of the model")
            out.append(modules[item])
        elif isinstance(item, nn.Module):
            out.append(item)
        else:
            raise TypeError(f"ignored_layers must hold module names or modules, got {type(item).__name__}")
    return out


def _check_fraction(name: str, value, lo_open: bool, hi_open: bool, lo=0.0, hi=1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    bad = (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi)
    if bad or not math.isfinite(value):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


def prune(
    model: nn.Module,
    example_inputs: Any,
    criterion_or_scores: Union[str, scoring.Criterion, Scores] = "energy",
    *,
    data: Optional[Iterable] = None,
    ratio: Optional[float] = None,
    target_flops: Optional[float] = None,
    global_ranking: bool = False,
    ignored_layers: Optional[Sequence[Union[str, nn.Module]]] = None,
    ignore_output_layer: bool = True,
    round_to: Optional[int] = None,
    max_layer_ratio: float = 0.9,
    recalibrate: bool = True,
    inplace: bool = False,
    progress: bool = True,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Remove the least important conv output channels (and everything coupled to them).

    Args:
        model: the network; pruned in place when ``inplace``, else a deep copy is pruned.
        example_inputs: inputs for one forward (tensor, tuple or dict) to trace the dependency graph and
            count FLOPs; a batch of 1 is enough.
        criterion_or_scores: a criterion name (see ``rankprune.scoring``), a Criterion, or precomputed
            scores ``{conv_name: [out_channels]}`` of this model.
        data: calibration batches (a list or DataLoader; see :func:`rankprune.recalibrate` for the batch
            forms): scored by data-driven criteria (energy, hrank, taylor), then, with ``recalibrate``, used
            to re-estimate the BatchNorm statistics of the pruned model. Iterated twice in that case, so a
            one-shot iterator is refused.
        ratio: fraction of channels to remove, in [0, 1) (see the module doc).
        target_flops: fraction of the original FLOPs to keep, in (0, 1]; exclusive with ``ratio``.
        global_ranking: rank all groups together (a single threshold) instead of pruning each group by
            ``ratio``.
        ignored_layers: modules or module names never pruned (nor anything tied to their output channels).
        ignore_output_layer: also ignore the layer(s) producing the model output (the classifier).
        round_to: keep a multiple of this many channels in each pruned group.
        max_layer_ratio: no group loses more than this fraction of its channels (and at least one stays).
        recalibrate: when ``data`` is given, re-estimate every BatchNorm's running statistics of the pruned
            model on it (:func:`rankprune.recalibrate`), once, after the FLOP-target search. Removing
            channels shifts the statistics of the layers after them; without recalibration the pruned
            model keeps the original network's statistics and loses far more accuracy.
        inplace: prune ``model`` itself (else ``model`` is left as it was: weights, buffers, flags). A copy is
            pruned first either way, so a refusal (``PruningError``) leaves ``model`` as it was.
        progress: progress bars (scoring, FLOP-target search).

    Returns:
        ``(pruned_model, plan)``; the plan is plain data (module doc) for :func:`apply_prune_plan`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if (ratio is None) == (target_flops is None):
        raise ValueError("give exactly one of ratio (fraction of channels to remove) and target_flops "
                         "(fraction of FLOPs to keep)")
    if ratio is not None:
        ratio = _check_fraction("ratio", ratio, lo_open=False, hi_open=True)
    if target_flops is not None:
        target_flops = _check_fraction("target_flops", target_flops, lo_open=True, hi_open=False)
    max_layer_ratio = _check_fraction("max_layer_ratio", max_layer_ratio, lo_open=False, hi_open=True)
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    scoring.conv_layers(model)  # a model without convs is refused here, before any work
    recalibrate = bool(recalibrate) and data is not None
    crit = None if isinstance(criterion_or_scores, dict) else scoring.get(criterion_or_scores)
    if recalibrate and crit is not None and crit.needs_data and iter(data) is data:
        raise ValueError("data: a one-shot iterator cannot be both scored and used for BatchNorm recalibration; "
                         "pass a list of batches or a DataLoader (or recalibrate=False)")

    if crit is None:
        criterion_name = "scores"
        scores = scoring.check_scores(model, criterion_or_scores)
    else:
        if hasattr(crit, "progress"):
            crit.progress = crit.progress and progress
        criterion_name = crit.name
        scores = scoring.check_scores(model, crit.scores(model, data))

    was_training = model.training
    model.eval()
    try:
        base_flops = count_flops(model, example_inputs)
        base_params = sum(p.numel() for p in model.parameters())
        ignored_modules = set(_resolve_ignored(model, ignored_layers))
        if ignore_output_layer:
            ignored_modules.update(_output_layers(model, example_inputs))
        ignored_names = [n for n, m in model.named_modules() if m in ignored_modules]

        unpruned: Dict[str, str] = {}

        def attempt(r: float, target: nn.Module, dither: bool = False):
            ignored = [target.get_submodule(n) for n in ignored_names]
            kept = _prune_by_ratio(target, example_inputs, scores, r, global_ranking, ignored, round_to,
                                   max_layer_ratio, dither, unpruned)
            return kept, _pruned_flops(target, example_inputs)

        if ratio is not None:
            pruned = copy.deepcopy(model)
            kept, flops = attempt(ratio, pruned)
        else:
            pruned, kept, flops, ratio = _search_flops(model, attempt, base_flops, target_flops, max_layer_ratio,
                                                       progress)
        if inplace:  # the caller's model is cut only once a copy was pruned without error
            apply_prune_plan(model, {"method": "prune", "version": PLAN_VERSION, "layers": kept})
            pruned = model
    finally:
        model.train(was_training)
    pruned.train(was_training)
    _warn_unpruned(unpruned)
    _warn_tied(scores, kept)
    if recalibrate:
        recalibrate_batchnorm(pruned, data, progress=progress)
    plan = {
        "method": "prune",
        "version": PLAN_VERSION,
        "layers": kept,
        "criterion": criterion_name,
        "ratio": ratio,
        "target_flops": target_flops,
        "global_ranking": bool(global_ranking),
        "round_to": round_to,
        "ignored_layers": ignored_names,
        "recalibrated": recalibrate,
        "flops": [base_flops, flops],
        "params": [base_params, sum(p.numel() for p in pruned.parameters())],
    }
    return pruned, plan


def _pruned_flops(pruned: nn.Module, example_inputs: Any) -> int:
    """FLOPs of the pruned model; a forward that now fails is a PruningError (a channel count kept as a
    plain attribute, such as torchvision ViT's ``hidden_dim``, no longer matches the sliced layers)."""
    try:
        return count_flops(pruned, example_inputs)
    except Exception as exc:
        raise PruningError(
            f"the pruned {type(pruned).__name__} no longer runs ({type(exc).__name__}: {exc}); the model probably "
            "keeps a channel count outside its layers (an attribute or constant used in forward, like "
            "torchvision ViT's hidden_dim): pass the layers that set it as ignored_layers") from exc


def _warn_unpruned(unpruned: Dict[str, str]) -> None:
    if unpruned:
        lines = "".join(f"\n  {name}: {reason}" for name, reason in sorted(unpruned.items()))
        warnings.warn(f"prune: {len(unpruned)} channel group(s) left unpruned (named by their first layer):{lines}",
                      stacklevel=3)


def _warn_tied(scores: Scores, kept: Dict[str, Dict[str, Any]]) -> None:
    """Warn once about pruned layers whose scores are all equal: which of their channels go is arbitrary."""
    tied = sorted(name for name, s in scores.items()
                  if len(s) > 1 and bool((s == s[0]).all()) and "out_channels_kept" in kept.get(name, {}))
    if tied:
        warnings.warn(f"prune: the scores of {len(tied)} pruned layer(s) are all equal, so which of their channels "
                      f"were removed is arbitrary (a criterion that cannot tell them apart, e.g. bn_scale without a "
                      f"BatchNorm, or dead layers): {', '.join(tied)}", stacklevel=3)


def _search_flops(model, attempt, base_flops: int, target: float, max_layer_ratio: float, progress: bool):
    """The channel ratio whose pruned model keeps the fraction of ``base_flops`` closest to ``target`` (within
    2% relative, else the closest of the tries). Each try prunes a copy, so tries are few: a conv's FLOPs scale
    with its input times its output channels, so sqrt(FLOPs kept) is close to linear in the ratio. The first
    try is ``1 - sqrt(target)``, the next ones secant steps on sqrt(FLOPs kept), kept inside the bracket of
    the tries so far (bisection when a step would leave it)."""
    best = None

    def consider(r):
        nonlocal best
        candidate = copy.deepcopy(model)
        kept, flops = attempt(r, candidate, dither=True)
        err = abs(flops / base_flops - target)
        if best is None or err < best[0]:
            best = (err, candidate, kept, flops, r)
        return flops / base_flops

    lo, hi = 0.0, max_layer_ratio
    steps = range(24)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"searching ratio for {100 * target:.1f}% FLOPs", leave=False)
    if target >= 1.0:
        consider(0.0)
    else:
        tries = [(0.0, 1.0)]  # (ratio, sqrt(FLOPs kept)): nothing removed keeps everything
        r = min(max(1.0 - math.sqrt(target), 1e-3), hi)
        for _ in steps:
            kept_fraction = consider(r)
            if abs(kept_fraction / target - 1) <= 0.02:
                break
            if kept_fraction > target:
                lo = r
            else:
                hi = r
            if hi - lo < 1e-4:
                break
            tries.append((r, math.sqrt(kept_fraction)))
            (r1, s1), (r2, s2) = tries[-2], tries[-1]
            r = r2 + (math.sqrt(target) - s2) * (r2 - r1) / (s2 - s1) if s2 != s1 else lo
            if not lo < r < hi:
                r = 0.5 * (lo + hi)
    _, pruned, kept, flops, r = best
    return pruned, kept, flops, r


def apply_prune_plan(model: nn.Module, plan: Dict[str, Any]) -> nn.Module:
    """Slice ``model`` (an unpruned instance of the architecture the plan was made on) to the plan's kept
    channels, in place, and return it. Weights are sliced too, so applying the plan to the original trained
    model reproduces the pruned model; applying it to a fresh model gives the right shapes for
    ``load_state_dict`` of the pruned weights."""
    layers = plan_layers(plan, "prune", "{'out_channels_kept': [...], ...}")
    modules = dict(model.named_modules())
    for name, entry in layers.items():
        module = modules.get(name)
        if module is None and "dim" in entry:
            _apply_parameter_entry(model, name, entry)
            continue
        if module is None:
            raise ValueError(f"plan: model has no module {name!r}")
        pruner = tp_function.PrunerBox.get(tp.ops.module2type(module))
        if pruner is None:
            raise ValueError(f"plan: cannot prune module {name!r} of type {type(module).__name__}")
        for side in ("out", "in"):
            kept = entry.get(f"{side}_channels_kept")
            if kept is None:
                continue
            current = pruner.get_out_channels(module) if side == "out" else pruner.get_in_channels(module)
            if current == len(kept):  # already sliced (a depthwise conv's in/out move together)
                continue
            if not kept or max(kept) >= current or min(kept) < 0 or len(set(kept)) != len(kept):
                raise ValueError(f"plan: {side}_channels_kept of {name!r} does not fit its {current} channels")
            removed = sorted(set(range(current)) - set(kept))
            if side == "in" and _grouped_conv_groups(module) > 1:
                _prune_grouped_conv_in(module, removed)
            elif side == "out":  # the pruning functions themselves: some pruners' check() differs in signature
                pruner.prune_out_channels(module, removed)
            else:
                pruner.prune_in_channels(module, removed)
    return model


def _apply_parameter_entry(model: nn.Module, name: str, entry: Dict[str, Any]) -> None:
    """Slice the unwrapped parameter ``name`` to ``entry["channels_kept"]`` along ``entry["dim"]``."""
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        owner = None
    param = getattr(owner, attr, None) if owner is not None else None
    if not isinstance(param, nn.Parameter):
        raise ValueError(f"plan: model has no module or parameter {name!r}")
    dim, kept = entry["dim"], entry.get("channels_kept")
    if not isinstance(dim, int) or not -param.dim() <= dim < param.dim():
        raise ValueError(f"plan: dim {dim!r} of parameter {name!r} does not fit its shape {tuple(param.shape)}")
    size = param.shape[dim]
    if size == len(kept or ()):
        return
    if not kept or max(kept) >= size or min(kept) < 0 or len(set(kept)) != len(kept):
        raise ValueError(f"plan: channels_kept of parameter {name!r} does not fit its {size} channels")
    index = torch.tensor(kept, dtype=torch.long, device=param.device)
    setattr(owner, attr, nn.Parameter(param.detach().index_select(dim, index), requires_grad=param.requires_grad))


__all__ = ["prune", "apply_prune_plan", "ScoreImportance", "PruningError", "PLAN_VERSION"]
