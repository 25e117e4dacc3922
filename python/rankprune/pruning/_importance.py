"""Torch-Pruning importance from rankprune scores (:class:`ScoreImportance`)."""
from typing import Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor, nn

from .. import scoring
from . import _torch_pruning as tpa

Scores = Dict[str, Tensor]


def _normalized(s: Tensor) -> Tensor:
    mean = s.mean()
    return s / mean if mean > 0 else s


def root_positions(item) -> Optional[List[int]]:
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
        if len(idxs) and not tpa.are_hybrid(idxs):
            raise ValueError("ScoreImportance: a group item without root indices (build groups with "
                             "DependencyGraph.get_pruning_group / get_all_groups)")
        root = tpa.root_idxs(idxs)
    if any(r is None for r in root):
        return None
    return list(root)


class ScoreImportance(tpa.Importance):
    """Torch-Pruning importance from rankprune scores: ``imp(group) -> [channels of the group]``.

    ``scores_or_criterion`` is a scores dict ``{conv_name: [out_channels]}`` of the *unpruned* model, or a
    criterion (name or :class:`rankprune.scoring.Criterion`) that is evaluated on the graph's model (with
    ``data``) at the first call. A group's importance is the mean over its scored convs of each conv's
    scores divided by their mean (see the module doc); groups without a scored conv give ``None``, which
    Torch-Pruning pruners skip. Scores refer to channel positions of the unpruned model, so use it for
    one-shot pruning (``iterative_steps=1``) or re-create it after each step. ``normalize=False`` keeps the
    scores as they are, for scores that compare across layers (``output_error``), so that a global ranking
    compares them directly.

    Example::

        imp = ScoreImportance("energy", data=calib_loader)
        pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.3,
                                      ignored_layers=[model.fc])
        pruner.step()
    """

    def __init__(self, scores_or_criterion: Union[Scores, str, scoring.Criterion] = "energy",
                 data: Optional[Iterable] = None, normalize: bool = True):
        if isinstance(scores_or_criterion, dict):
            self.scores: Optional[Scores] = {k: torch.as_tensor(v, dtype=torch.float64)
                                             for k, v in scores_or_criterion.items()}
            self.criterion = None
        else:
            self.scores = None
            self.criterion = scoring.get(scores_or_criterion)
        self.data = data
        self.normalize = normalize
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
            self.bind(tpa.group_model(group))
        total = None
        count = None
        for item in group.items:
            dep = item.dep
            if dep.handler not in tpa.CONV_OUT_FNS:
                continue
            name = self._names.get(dep.target.module)
            if name not in self.scores:
                continue
            root_idxs = root_positions(item)
            if root_idxs is None:
                continue
            plain = torch.as_tensor(tpa.plain_idxs(item.idxs), dtype=torch.long)
            root = torch.as_tensor(root_idxs, dtype=torch.long)
            if total is None:
                n = len(group[0].idxs)
                total = torch.zeros(n, dtype=torch.float64)
                count = torch.zeros(n, dtype=torch.float64)
            values = _normalized(self.scores[name]) if self.normalize else self.scores[name]
            total.scatter_add_(0, root, values[plain])
            count.scatter_add_(0, root, torch.ones(len(root), dtype=torch.float64))
        if total is None:
            return None
        return total / count.clamp_min(1)
