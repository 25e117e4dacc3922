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
    of each layer come in the right order and the walk passes the budget by at most one move. That last move can
    save far more than was still needed (a layer's first move saves its whole dense-to-low-rank difference), so
    the walk then gives back what fits under the budget (``_refill``): the cost left unspent is then less than
    any one step back, instead of up to one whole move.
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
    _refill(layers, ranks, cost, energy2, budget - total, min_flop_saving)
    return {name: rank for name, rank in ranks.items() if rank is not None}


def _refill(layers: List[Candidate], ranks: Dict[str, Optional[int]], cost, energy2: Dict, room: float,
            min_flop_saving: float) -> None:
    """Spend ``room`` (the budget ``allocate``'s walk left unspent) on steps back, in place: a decomposed layer's
    rank raised by ``rank_multiple`` up to its largest FLOP-saving rank, or from there back to dense. The
    step that recovers the most weighted energy per unit of cost goes first (by convexity, each layer's next
    step recovers less per unit than its last); a step that does not fit ends that layer's steps (its next rank
    steps would cost as much: FLOPs and parameters grow linearly with the rank)."""
    heap = []

    def push(layer: Candidate) -> None:
        rank = ranks[layer.name]
        if rank is None:
            return
        higher = rank + layer.rank_multiple
        if higher <= layer.max_saving_rank(min_flop_saving):
            added, recovered = cost(layer, higher) - cost(layer, rank), float(energy2[layer.name][rank:higher].sum())
        else:
            higher, added, recovered = None, cost(layer, None) - cost(layer, rank), layer.discarded(rank)
        if added > 0:
            heapq.heappush(heap, (-layer.sensitivity * recovered / added, layer.name, higher, added))

    by_name = {l.name: l for l in layers}
    for layer in layers:
        push(layer)
    while heap:
        _, name, higher, added = heapq.heappop(heap)
        if added <= room:
            ranks[name] = higher
            room -= added
            push(by_name[name])


def rank_grid(layer: Candidate, min_flop_saving: float, count: int) -> List[int]:
    """The ranks a latency budget may give ``layer``: at most ``count`` allowed ranks (multiples of
    ``rank_multiple``) spread evenly from its lowest allowed rank to its largest FLOP-saving one, both included
    (empty when no allowed rank saves FLOPs). Only these are measured, and only these can be chosen."""
    low, high = layer.lowest_rank(), layer.max_saving_rank(min_flop_saving)
    if high < low:
        return []
    steps = (high - low) // layer.rank_multiple
    picks = {round(i * steps / (count - 1)) for i in range(count)} if count > 1 and steps else {0}
    return sorted(low + s * layer.rank_multiple for s in picks | {steps})


def allocate_latency(layers: List[Candidate], times: Dict[str, Dict[Optional[int], float]], target_latency: float,
                     dense_ms: float, runtime: str) -> Dict[str, int]:
    """Ranks minimising the summed (sensitivity-weighted) normalised discarded energy with the predicted
    latency ``dense_ms - sum of measured layer savings <= target_latency * dense_ms`` (milliseconds).

    ``times[name]`` maps ``None`` (dense) and each measured rank to the layer's measured milliseconds. A layer's
    useful ranks form the lower convex hull of (time, discarded energy) among the ranks faster than dense:
    a rank that is slower than a higher one only loses accuracy, and the hull makes each layer's successive
    moves cost more error per millisecond saved, so a greedy walk takes them in order. Each move goes to the
    next hull point of one layer; the move with the least energy lost per millisecond saved goes first. A
    layer with no rank faster than dense stays dense. ValueError naming the closest reachable latency when the
    budget cannot be met.
    """
    budget, total = target_latency * dense_ms, dense_ms
    hulls = {l.name: _hull(l, times[l.name]) for l in layers}
    heap = []
    position = {l.name: 0 for l in layers}

    def push(name: str) -> None:
        hull = hulls[name]
        at = position[name]
        if at + 1 < len(hull):
            (t0, e0, _), (t1, e1, rank) = hull[at], hull[at + 1]
            heapq.heappush(heap, ((e1 - e0) / (t0 - t1), name, rank, t0 - t1))

    for name in hulls:
        push(name)
    ranks: Dict[str, int] = {}
    while total > budget and heap:
        _, name, rank, saving = heapq.heappop(heap)
        ranks[name] = rank
        position[name] += 1
        total -= saving
        push(name)
    if total > budget * 1.0000001:
        raise ValueError(f"target_latency={target_latency} cannot be met on runtime {runtime!r}: the closest "
                         f"reachable latency is {total / dense_ms:.3f} of dense ({total:.4g} ms of {dense_ms:.4g} ms "
                         "measured; lower min_rank or include more layers to reach further)")
    return ranks


def monotone_in_rank(times: Dict[int, float]) -> Dict[int, float]:
    """``{rank: ms}`` made non-decreasing in the rank by pooling adjacent violators (isotonic regression,
    equal weights): among aligned ranks a higher rank is never faster, so a lower rank measured slower than a
    higher one is timing noise; left as measured, the allocator would pick the ranks that happened to be timed
    fast."""
    blocks: List[List[float]] = []  # [mean, count] per pooled block, in rank order
    for rank in sorted(times):
        blocks.append([times[rank], 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (mean2, n2), (mean1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(mean1 * n1 + mean2 * n2) / (n1 + n2), n1 + n2])
    values = [mean for mean, count in blocks for _ in range(int(count))]
    return dict(zip(sorted(times), values))


def _hull(layer: Candidate, times: Dict[Optional[int], float]):
    """``[(ms, weighted discarded energy, rank)]`` from dense (rank None) along the lower convex hull of the
    ranks faster than dense, fastest last."""
    dense_ms = times[None]
    points = sorted(((ms, layer.sensitivity * layer.discarded(rank), rank) for rank, ms in times.items()
                     if rank is not None and ms < dense_ms), key=lambda p: (-p[0], p[1]))
    hull = [(dense_ms, 0.0, None)]
    for point in points:
        if point[0] >= hull[-1][0]:  # as slow as the last kept point, with no less error (the sort order)
            continue
        while len(hull) > 1 and point[1] <= hull[-1][1]:  # faster with no more error: the last point is useless
            hull.pop()
        while len(hull) > 1 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], point):
            hull.pop()
        hull.append(point)
    return hull


def _slope(a, b) -> float:
    """Energy lost per millisecond saved from hull point ``a`` to the strictly faster point ``b``."""
    return (b[1] - a[1]) / (a[0] - b[0])
