"""Choosing ranks: by a given rank per layer, an energy or rank ratio, or a FLOPs / parameter budget allocated
across the layers by (measured-sensitivity-weighted) discarded energy per unit of cost saved."""
import heapq
import math
from typing import Dict, List, Optional, Union

from ..nn import select_rank
from .cost import Candidate

# Default smallest rank a layer may get, as a fraction of its full rank: keeps any budget from collapsing a
# layer to rank 1 (issue 12).
DEFAULT_MIN_RANK = 0.25


def check_min_rank(min_rank) -> None:
    """TypeError/ValueError unless ``min_rank`` is an int >= 1 or a fraction in (0, 1]."""
    if isinstance(min_rank, bool) or not isinstance(min_rank, (int, float)):
        raise TypeError(f"min_rank must be an int >= 1 or a fraction of the full rank in (0, 1], got {min_rank!r}")
    if isinstance(min_rank, int) and min_rank < 1 or isinstance(min_rank, float) and not 0.0 < min_rank <= 1.0:
        raise ValueError(f"min_rank must be an int >= 1 or a fraction of the full rank in (0, 1], got {min_rank!r}")


def resolve_min_rank(min_rank: Union[int, float], full_rank: int) -> int:
    """``min_rank`` as a rank: an int as is, a fraction of ``full_rank`` rounded up (at least 1)."""
    if isinstance(min_rank, float):
        return max(1, math.ceil(min_rank * full_rank - 1e-9))
    return min_rank



def needed_rank(layer: Candidate, ranks: Optional[Dict[str, int]], rank_ratio: Optional[float]) -> Optional[int]:
    """The one rank a layer needs when it is known before its SVD (``ranks`` or ``rank_ratio``), else None."""
    if ranks is not None:
        needed = ranks.get(layer.name)
        if needed is not None and needed > layer.full_rank:
            raise ValueError(f"ranks[{layer.name!r}] = {needed} exceeds the layer's full rank {layer.full_rank}")
        return needed
    if rank_ratio is not None:
        return layer.allowed(max(1, round(rank_ratio * layer.full_rank)))
    return None


def probe_ranks(layers: List[Candidate], min_flop_saving: float) -> Dict[str, int]:
    """The rank at which each data-aware layer's sensitivity is measured: halfway through its allowed
    FLOP-saving ranks."""
    probes = {}
    for layer in layers:
        low, high = layer.lowest_rank(), layer.max_saving_rank(min_flop_saving)
        if layer.data_aware and high >= low:
            probes[layer.name] = low + (high - low) // (2 * layer.rank_multiple) * layer.rank_multiple
    return probes


def weigh(layers: List[Candidate], measured: Dict[str, float]) -> None:
    """Set the measured sensitivities; weight-only layers get their median (1.0 where none was measured)."""
    for layer in layers:
        if layer.name in measured:
            layer.sensitivity = measured[layer.name]
    if measured:
        values = sorted(measured.values())
        median = values[len(values) // 2]
        for layer in layers:
            if not layer.data_aware:
                layer.sensitivity = median


def fixed_ranks(layers: List[Candidate], ranks: Optional[Dict[str, int]], energy: Optional[float],
                rank_ratio: Optional[float]) -> Dict[str, int]:
    """Ranks that need no allocation: as given, by energy kept, or by rank ratio."""
    if ranks is not None:
        return {l.name: ranks[l.name] for l in layers}
    if energy is not None:
        return {l.name: l.allowed(select_rank(l.S, None, energy)) for l in layers}
    return {l.name: l.allowed(max(1, round(rank_ratio * l.full_rank))) for l in layers}


def allocate(layers: List[Candidate], cost_kind: str, budget: float, total: float, min_flop_saving: float,
              arg: str) -> Dict[str, int]:
    """Ranks minimising the summed normalised discarded energy with total cost <= budget.

    The normalised discarded energy of a layer is ``sum_{i>r} s_i^2 / sum_i s_i^2`` of the singular values of
    its factored matrix: for a data-aware layer (``W L``) its relative output error on the calibration data,
    for a weight-SVD layer its relative weight error. Greedy on a heap: each move is either switching a dense
    layer to its largest allowed FLOP-saving rank, or lowering a decomposed layer by ``rank_multiple``, never
    below its lowest allowed rank; the move with the least discarded energy per unit of cost saved goes first.
    The discarded energy of a layer is convex in its rank (singular values descend), so the rank-lowering moves
    of each layer come in the right order and the result misses the budget by at most one move.
    """
    def cost(layer: Candidate, rank: Optional[int]) -> float:
        return layer.flops(rank) if cost_kind == "flops" else layer.params(rank)

    ranks: Dict[str, Optional[int]] = {l.name: None for l in layers}
    energy2 = {l.name: (l.S.double() ** 2) / max(float((l.S.double() ** 2).sum()), 1e-300) for l in layers}
    heap = []

    def push(layer: Candidate) -> None:
        rank = ranks[layer.name]
        if rank is None:
            target = layer.max_saving_rank(min_flop_saving)
            if target < 1:
                return
            saving = cost(layer, None) - cost(layer, target)
            lost = layer.sensitivity * layer.discarded(target)
        else:
            target = rank - layer.rank_multiple
            if target < layer.lowest_rank():
                return
            saving = cost(layer, rank) - cost(layer, target)
            lost = layer.sensitivity * float(energy2[layer.name][target:rank].sum())
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
            f"{total:.4g}, the budget {budget:.4g} (lower min_rank or rank_multiple, or include more layers)"
        )
    return {name: rank for name, rank in ranks.items() if rank is not None}
