"""Module surgery: putting a low-rank module in a layer's place, and recording what was done in the plan and
the report."""
from typing import Optional

from torch import nn

from .cost import Candidate
from .factoring import calibration_error, lowrank_module
from .measure import layer_rel_error


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def dense_reason(layer: Candidate, rank: Optional[int], min_flop_saving: float) -> Optional[str]:
    """Why ``layer`` stays dense at ``rank`` (None: no allocated rank), or None when it is decomposed."""
    if rank is None:
        if layer.max_saving_rank(min_flop_saving):
            return "keeping it dense costs less discarded energy within the budget"
        return (f"no allowed rank (min_rank {layer.lowest_rank()}, multiple of {layer.rank_multiple}) saves "
                f"FLOPs (min_flop_saving={min_flop_saving})")
    if not layer.saves(rank, min_flop_saving):
        return (f"rank {rank} would keep {layer.flop_ratio(rank):.1%} of the layer's FLOPs "
                f"(min_flop_saving={min_flop_saving})")
    return None


def replace(model: nn.Module, layer: Candidate, rank: int, training: bool) -> nn.Module:
    """Build the rank-``rank`` module from ``layer.factors`` (in the layer's own training mode) and put it in
    the layer's place; returns it."""
    new = lowrank_module(layer, rank)
    new.train(training)
    set_submodule(model, layer.name, new)
    return new


def plan_entry(layer: Candidate, rank: int) -> dict:
    """The plan's record of one decomposed layer: what ``apply_decompose_plan`` needs to rebuild it."""
    return {"kind": layer.kind, "scheme": layer.scheme, "rank": rank, "data_aware": layer.data_aware}


def report_entry(layer: Candidate, rank: int, new: nn.Module, refitted: bool, damping: Optional[float],
                 weight_only_reason: Optional[str]) -> dict:
    """The report's record of one decomposed layer (see ``decompose``'s docstring)."""
    output_error, output_energy = calibration_error(layer, rank) if layer.data_aware else (None, None)
    entry = {
        "kind": layer.kind,
        "scheme": layer.scheme,
        "method": "data-aware" if layer.data_aware else "weight",
        "rank": rank,
        "full_rank": layer.full_rank,
        "energy_kept": 1.0 - layer.discarded(rank),
        "params_dense": layer.params(None),
        "params": layer.params(rank),
        "flops_dense": layer.flops(None) if layer.inputs else None,
        "flops": layer.flops(rank) if layer.inputs else None,
        "rel_error": layer_rel_error(layer, new),
        "output_error": output_error,
        "output_energy": output_energy,
        "sensitivity": layer.sensitivity,
        "refitted": refitted,
        "damping": damping,
    }
    if weight_only_reason is not None:
        entry["weight_only_reason"] = weight_only_reason
    return entry
