"""One pruning pass at a given channel ratio: trace the graph, rank the channel groups, remove channels."""
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _torch_pruning as tpa
from ._errors import torch_pruning_errors
from ._grouped import block_removal, group_blocks, grouped_conv_groups, prune_grouped_conv_in
from ._importance import ScoreImportance, Scores

# (root module, its Torch-Pruning pruning function, importance of its channels, equal blocks to keep)
Candidate = Tuple[nn.Module, Any, Tensor, int]


def prune_by_ratio(model: nn.Module, example_inputs: Any, scores: Scores, ratio: float, global_ranking: bool,
                   ignored: List[nn.Module], round_to: Optional[int], max_layer_ratio: float,
                   dither: bool = False, unpruned: Optional[Dict[str, str]] = None, normalize: bool = True
                   ) -> Dict[str, Dict[str, Any]]:
    """Prune ``model`` in place; returns the per-module kept indices ``{name: {"out"|"in": [..]}}``.
    Groups left unpruned because of their structure are added to ``unpruned`` as ``{layer: reason}``.

    With ``dither`` (local ranking only), group ``g`` of ``G`` removes ``floor(n * ratio + g / G)``
    channels instead of ``floor(n * ratio)``: the groups round at different ratios, so FLOPs fall in many
    small steps as the ratio grows instead of a few large ones (used by the FLOP-target search).
    ``normalize``: see :class:`ScoreImportance` (False for scores that compare across layers).
    """
    with torch_pruning_errors(model, "tracing the dependency graph"):
        graph = tpa.build_graph(model, example_inputs)
        groups = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]))
    names = {m: n for n, m in model.named_modules()}
    candidates = _candidates(model, graph, groups, scores, names, unpruned, normalize)
    removals = _removals(candidates, ratio, global_ranking, round_to, max_layer_ratio, dither)
    alive, param_dims = _remove(model, graph, removals, names)
    kept: Dict[str, Dict[str, Any]] = {}
    for (name, side), channels in sorted(alive.items()):
        if name in param_dims:
            kept[name] = {"dim": param_dims[name], "channels_kept": channels}
        else:
            kept.setdefault(name, {})[f"{side}_channels_kept"] = channels
    return kept


def _candidates(model: nn.Module, graph, groups: list, scores: Scores, names: Dict[nn.Module, str],
                unpruned: Optional[Dict[str, str]], normalize: bool) -> List[Candidate]:
    """The groups that can be pruned, with their channels' importance; the others are skipped (those left
    unpruned because of their structure are named in ``unpruned``)."""
    importance = ScoreImportance(scores, normalize=normalize).bind(model)
    candidates = []
    for group in groups:
        with torch_pruning_errors(model, "scoring a channel group"):
            imp = importance(group)
        if imp is None:
            continue
        blocks, reason = group_blocks(group, names, graph.is_out_channel_pruning_fn)
        if reason is not None:
            if unpruned is not None:
                unpruned[names[group[0].dep.target.module]] = reason
            continue
        candidates.append((group[0].dep.target.module, group[0].dep.handler, imp, blocks))
    if not candidates:
        raise ValueError("no prunable channel group: every conv is ignored, unscored, or tied to an ignored layer")
    return candidates


def _keep_count(n: int, n_prune: int, round_to: Optional[int], min_keep: int) -> int:
    keep = n - n_prune
    if round_to:
        keep = keep - keep % round_to if keep >= round_to else min(round_to, n)
    return min(n, max(keep, min_keep, 1))


def _removals(candidates: List[Candidate], ratio: float, global_ranking: bool, round_to: Optional[int],
              max_layer_ratio: float, dither: bool) -> List[Tuple[nn.Module, Any, Tensor]]:
    """``(root module, pruning function, channels to remove)`` of every candidate group that loses some."""
    removals: List[Tuple[nn.Module, Any, Tensor]] = []
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
            removed = imp.argsort()[: n - keep] if blocks == 1 else block_removal(imp, keep, blocks)
            if len(removed):
                removals.append((module, handler, removed))
    return removals


def _remove(model: nn.Module, graph, removals: List[Tuple[nn.Module, Any, Tensor]], names: Dict[nn.Module, str]
            ) -> Tuple[Dict[Tuple[str, str], List[int]], Dict[str, int]]:
    """Remove the channels of every removal with everything coupled to them. Returns the original indices of
    the channels each side of each module keeps, ``{(name, "out"|"in"): [..]}``, and the pruned dimension of
    each unwrapped parameter among them."""
    alive: Dict[Tuple[str, str], List[int]] = {}
    param_dims: Dict[str, int] = {}
    for module, handler, idxs in removals:
        with torch_pruning_errors(model, f"collecting the channels coupled to {names[module]!r}"):
            group = graph.get_pruning_group(module, handler, idxs.tolist())
        grouped_inputs = []
        for dep, dep_idxs in group:
            target = dep.target.module
            name = names.get(target)
            if name is None and tpa.is_parameter(dep.target):
                name = tpa.parameter_name(graph, target)  # an unwrapped parameter (ConvNeXt's layer_scale)
                param_dims[name] = dep.target.pruning_dim
            if name is None:  # graph-only nodes (additions, concatenations, ...)
                continue
            side = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
            if (name, side) not in alive:
                size = graph.get_out_channels(target) if side == "out" else graph.get_in_channels(target)
                alive[(name, side)] = list(range(size))
            removed = set(int(i) for i in tpa.plain_idxs(dep_idxs))
            alive[(name, side)] = [c for pos, c in enumerate(alive[(name, side)]) if pos not in removed]
            if side == "in" and grouped_conv_groups(target) > 1:
                grouped_inputs.append((dep, sorted(removed)))
        for dep, removed in grouped_inputs:
            prune_grouped_conv_in(dep.target.module, removed)
            group.items.remove(next(item for item in group.items if item.dep is dep))
        with torch_pruning_errors(model, f"pruning the channels coupled to {names[module]!r}"):
            group.prune()
    return alive, param_dims
