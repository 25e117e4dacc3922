"""The calibration passes of a data-aware decomposition, run by the calibration engine
(:mod:`rankprune.calibration`):

1. **statistics** (one full pass): each layer's float64 input covariance ``X X^T`` of its calibration columns,
   its first call in execution order, its refit stage, and (for the refit) its dense columns, kept within the
   engine's cache budget;
2. **sensitivity** (on a probe of the first batch): the change of the model's output with only one layer
   decomposed, each layer's pass starting from the cached outputs of the modules before it;
3. **refit** (one stage pass per stage, each starting from the frontier cache): ``H H^T`` and ``H Y^T`` of the
   inputs ``H`` the layer gets once the layers before it are decomposed and the dense outputs ``Y = W X`` at
   the same sampled columns; the layers of a stage are refitted and replaced at its end.
"""
import math
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

from .._inputs import batch_size, first_samples, progress, raise_non_finite
from ..calibration import Calibration, SameInputStages
from ..columns import column_generator, input_columns
from ..fidelity import output_tensor
from .cost import Candidate
from .factoring import lowrank_module

# Layers whose input dimension d exceeds this keep weight SVD even with data: the float64 covariance is d^2
# (8192: 512 MiB).
MAX_COVARIANCE_DIM = 8192
# Layers with at least this many inputs form each batch's products (X^T X, H^T H, H^T Y) in the model's dtype
# before adding them to the float64 accumulators: these GEMMs (rows x d^2 per call) dominate the statistics
# of large layers (ResNet-50's 4608-input convolutions), and float32 runs them twice as fast on CPUs. The
# rounding (about 1e-7 * sqrt(rows) of an entry) stays far below the default damping (1e-4 of the mean
# diagonal); smaller layers, which cost little, keep float64 products (exact enough for damping=0 fits).
FLOAT64_PRODUCT_MAX_DIM = 1024
# Inputs per block of a blocked Gram product (``_accumulate_gram``): smaller blocks skip more of the product but
# run below the GEMM's peak.
GRAM_BLOCK = 1024
# The sensitivity probe runs 1/PROBE_SHARE of the calibration samples (``probe_samples``).
PROBE_SHARE = 16


def _columns(layer: Candidate, batch: int, call: int, x: Tensor) -> Tensor:
    return input_columns(layer.module, x, column_generator(layer.index, batch, call))


def collect_statistics(engine: Calibration, layers: List[Candidate], keep_dense_rows: bool) -> None:
    """The statistics pass (see the module docstring). Layers the data never reaches keep ``samples == 0``."""
    device = engine.device
    stages = SameInputStages()
    for layer in layers:
        d = layer.in_dim
        layer.covariance = torch.zeros(d, d, dtype=torch.float64, device=device)
        layer.samples = 0
    order = [0]

    def capture(layer: Candidate) -> Callable[[int, int, Tensor], None]:
        def hook(batch: int, call: int, x: Tensor) -> None:
            if batch == 0 and call == 0:
                layer.order = order[0]
                order[0] += 1
                stages.assign(layer, x)
            rows = _columns(layer, batch, call, x)
            _accumulate_gram(layer.covariance, rows)
            layer.samples += rows.shape[0]
            if keep_dense_rows:
                _keep_dense_rows(engine, layer, batch, call, rows)
        return hook

    with engine.phase("statistics"):
        engine.trace({layer.module: capture(layer) for layer in layers}, "statistics")
        engine.all_reduce([layer.covariance for layer in layers])
        if engine.distributed:
            counts = torch.tensor([float(layer.samples) for layer in layers], dtype=torch.float64)
            engine.all_reduce([counts])
            for layer, count in zip(layers, counts.tolist()):
                layer.samples = int(count)
    # A NaN or Inf input leaves its layer's float64 covariance non-finite, its diagonal (the sums of squares of
    # each input) among the first: one check of the diagonals after the pass, then the diagnosis names where it
    # first appears (the weights were checked before any data ran).
    bad = [layer for layer in layers if not bool(torch.isfinite(layer.covariance.diagonal()).all())]
    if bad:
        raise_non_finite(engine.model, engine.data, "decompose", f"the input covariance of layer {bad[0].name!r}")
    for layer in layers:
        if layer.samples == 0:
            layer.covariance = None


def _product_dtype(a: Tensor) -> torch.dtype:
    """The dtype ``a``'s products are formed in (see ``FLOAT64_PRODUCT_MAX_DIM``)."""
    return torch.float64 if a.shape[1] < FLOAT64_PRODUCT_MAX_DIM else a.dtype


def _accumulate(total: Tensor, a: Tensor, b: Tensor) -> None:
    """``total += a^T b`` (float64 ``total``; the product in ``_product_dtype(a)``)."""
    if _product_dtype(a) == torch.float64:
        total.addmm_(a.T.to(torch.float64), b.to(torch.float64))
    else:
        total += (a.T @ b.to(a.dtype)).to(torch.float64)


def _accumulate_gram(total: Tensor, a: Tensor) -> None:
    """``total += a^T a``. From ``GRAM_BLOCK`` inputs on, only the blocks on and above the diagonal are multiplied
    (each off-diagonal one added twice, transposed), which saves up to half of the product (torch has no
    symmetric rank-k update): 5 blocks of a 4608-input layer cost 15/25 of the full product."""
    d = a.shape[1]
    if d < GRAM_BLOCK:
        _accumulate(total, a, a)
        return
    a = a.to(_product_dtype(a))
    edges = [round(i * d / math.ceil(d / GRAM_BLOCK)) for i in range(math.ceil(d / GRAM_BLOCK) + 1)]
    blocks = list(zip(edges[:-1], edges[1:]))
    for i, (r0, r1) in enumerate(blocks):
        for c0, c1 in blocks[i:]:
            product = (a[:, r0:r1].mT @ a[:, c0:c1]).to(torch.float64)
            total[r0:r1, c0:c1] += product
            if c0 != r0:
                total[c0:c1, r0:r1] += product.mT


def _keep_dense_rows(engine: Calibration, layer: Candidate, batch: int, call: int, rows: Tensor) -> None:
    """Keep the dense columns of one call for the refit (or ``W X``, where the layer has fewer outputs than
    inputs), if the engine's budget has room; a layer that misses one loses all and is recomputed."""
    if layer.dense_rows is None:
        return
    weight = layer.matrix()
    layer.dense_rows_are_outputs = weight.shape[0] < rows.shape[1]
    kept = rows @ weight.T.to(rows.dtype) if layer.dense_rows_are_outputs else rows
    if engine.hold(layer.dense_rows, (batch, call), kept.contiguous()):
        return
    layer.dense_rows = None
    engine.notes.append(f"the dense inputs of layer {layer.name!r} do not fit the cache budget: recomputed "
                        "in its refit stage")


def drop_dense_rows(engine: Calibration, layer: Candidate) -> None:
    """Free the dense columns kept for ``layer`` (once it is replaced) and give their bytes back to the budget."""
    if layer.dense_rows:
        engine.release_held(layer.dense_rows)
    layer.dense_rows = {}


# ----------------------------------------------------------------------------------------------- sensitivity
def probe_samples(engine: Calibration) -> int:
    """Samples of the first batch that the sensitivity probe uses: a sixteenth of the calibration samples, at
    least 4. The probe costs about half a forward pass of them per layer, so about ``L / 32`` passes over the
    calibration data for ``L`` layers (2.8 of ResNet-50's 8.9 extra passes at 256 images with an eighth)."""
    return max(4, math.ceil(engine.samples / PROBE_SHARE))


def measure_sensitivities(engine: Calibration, model: nn.Module, layers: List[Candidate], probes: Dict[str, int],
                          set_module: Callable[[str, nn.Module], None]) -> Dict[str, float]:
    """``{name: sensitivity}`` for the layers in ``probes`` (name -> probe rank) whose discarded energy at that
    rank is positive: the relative squared change of the model's output on the probe (the first samples of
    the first batch, see ``probe_samples``) with only that layer decomposed at the probe rank, over the
    layer's normalised discarded energy there. Each layer's forward starts from the cached outputs of the
    modules that finish before it; under ``torch.distributed`` the ranks' measurements are averaged."""
    first = next(iter(engine.batches()))[1]
    probe = first_samples(first, min(probe_samples(engine), batch_size(first)))
    measured: Dict[str, float] = {}
    with engine.phase("sensitivity"):
        runner = Calibration(model, [probe], cache_bytes=engine.cache_bytes, progress=False, distributed=False,
                             name=engine.name)
        dense = []
        runner.trace({}, "sensitivity", outputs=dense)
        dense = output_tensor(dense[0]) if dense else None
        if dense is None:
            return measured
        dense = dense.double()
        scale = float(dense.square().sum())
        values = torch.zeros(len(layers), dtype=torch.float64)
        for i, layer in enumerate(engine_progress(engine, layers, "sensitivity")):
            rank = probes.get(layer.name)
            lost = layer.discarded(rank) if rank is not None else 0.0
            if rank is None or not lost > 0 or scale == 0:
                continue
            set_module(layer.name, lowrank_module(layer, rank))
            try:
                changed = output_tensor(runner.outputs_from(layer.module, "sensitivity")[0]).double()
            finally:
                set_module(layer.name, layer.module)
            values[i] = float((changed - dense).square().sum()) / scale / lost
            measured[layer.name] = i
        engine.all_reduce([values])
        if engine.distributed:
            values /= torch.distributed.get_world_size()
    return {name: float(values[i]) for name, i in measured.items()}


def engine_progress(engine: Calibration, items, desc: str):
    """``items`` in a progress bar of the engine's verb, when the engine shows progress."""
    return progress(items, f"{engine.name}: {desc}", engine.show_progress, unit="layer")


# ------------------------------------------------------------------------------------------------------ refit
class _RefitStatistics:
    """``H H^T`` and ``H Y^T`` of one layer over the calibration batches (float64, streaming)."""

    def __init__(self, layer: Candidate, device):
        self.weight = layer.matrix().to(torch.float64)  # converted once, not per batch and call
        d, n = layer.in_dim, self.weight.shape[0]
        self.inputs = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.outputs_cross = torch.zeros(d, n, dtype=torch.float64, device=device)
        self.dense: Dict[Tuple[int, int], Tensor] = {}  # recomputed dense columns of the current batch

    def add(self, layer: Candidate, batch: int, call: int, x: Tensor) -> None:
        h = _columns(layer, batch, call, x)
        y = layer.dense_rows[(batch, call)] if layer.dense_rows is not None else self.dense.pop((batch, call))
        if not layer.dense_rows_are_outputs:
            y = y.to(torch.float64) @ self.weight.T
        _accumulate_gram(self.inputs, h)
        _accumulate(self.outputs_cross, h, y)


def refit_stage(engine: Calibration, stage: List[Candidate], dense_modules: Dict[str, nn.Module],
                set_module: Callable[[str, nn.Module], None], desc: str) -> Dict[str, _RefitStatistics]:
    """One stage pass accumulating the refit statistics of ``stage``'s layers. Dense columns that were not
    kept are recomputed per batch by a forward through the dense layers (``dense_modules``, swapped in for
    it), which starts from the model's inputs."""
    stats = {layer.name: _RefitStatistics(layer, engine.device) for layer in stage}
    missing = [layer for layer in stage if layer.dense_rows is None]

    def dense_capture(layer: Candidate):
        def hook(batch: int, call: int, x: Tensor) -> None:
            rows = _columns(layer, batch, call, x)
            stats[layer.name].dense[(batch, call)] = rows
            layer.dense_rows_are_outputs = False
        return hook

    def recompute(index: int, inputs) -> None:
        current = {name: engine.model.get_submodule(name) for name in dense_modules}
        for name, module in dense_modules.items():
            set_module(name, module)
        try:
            engine.forward_uncached(index, inputs, {l.module: dense_capture(l) for l in missing})
        finally:
            for name, module in current.items():
                set_module(name, module)

    captures = {layer.module: (lambda b, c, x, layer=layer: stats[layer.name].add(layer, b, c, x)) for layer in stage}
    engine.stage_pass(captures, desc, before_batch=recompute if missing else None)
    engine.all_reduce([t for s in stats.values() for t in (s.inputs, s.outputs_cross)])
    return stats
