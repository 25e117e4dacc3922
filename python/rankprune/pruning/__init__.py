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
  ``_prune._search_flops``); the result lands within 2% of the target
  (relative) unless the channel granularity forbids it, in which case the closest is returned. With local
  ranking the search rounds each group's channel count at a different point (``_by_ratio.prune_by_ratio``'s
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

Layout: ``_prune`` (:func:`prune` and its FLOP-target search), ``_by_ratio`` (one pass at a channel ratio),
``_importance`` (:class:`ScoreImportance`), ``_grouped`` (grouped convolutions), ``_plan``
(:func:`apply_prune_plan`), ``_errors`` (:class:`PruningError`) and ``_torch_pruning``, the one file that
reaches into Torch-Pruning beyond its documented API.
"""
from ..plan_format import PLAN_VERSION
from ._errors import PruningError
from ._importance import ScoreImportance
from ._output_error import OutputError
from ._plan import apply_prune_plan
from ._prune import prune

__all__ = ["prune", "apply_prune_plan", "ScoreImportance", "OutputError", "PruningError", "PLAN_VERSION"]
