"""Replaying a prune plan on a fresh model (:func:`apply_prune_plan`)."""
from typing import Any, Dict

import torch
from torch import nn

from ..plan_format import plan_layers
from . import _torch_pruning as tpa
from ._grouped import grouped_conv_groups, prune_grouped_conv_in


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
        pruner = tpa.layer_pruner(module)
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
            if side == "in" and grouped_conv_groups(module) > 1:
                prune_grouped_conv_in(module, removed)
            elif side == "out":  # the pruning functions themselves: some pruners' check() differs in signature
                pruner.prune_out_channels(module, removed)
            else:
                pruner.prune_in_channels(module, removed)
        if entry.get("bias_added") and getattr(module, "bias", None) is None:
            # the reconstruction's bias compensation gave this layer a bias it did not have
            module.bias = nn.Parameter(torch.zeros(module.weight.shape[0], dtype=module.weight.dtype,
                                                   device=module.weight.device))
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
