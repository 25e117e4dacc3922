"""The calibration passes of a data-aware decomposition, run by the calibration engine
(:mod:`rankprune.calibration`):

1. **statistics** (one full pass): each layer's float64 input covariance ``X X^T`` of its calibration columns
   (or the columns themselves, where they are no more than its inputs: ``statistics.ColumnStatistics``),
   its first call in execution order, its refit stage, and (for the refit) its dense columns, kept within the
   engine's cache budget;
2. **sensitivity** (on a probe of the first batch): the change of the model's output with only one layer
   decomposed, each layer's pass starting from the cached outputs of the modules before it;
3. **refit** (one stage pass per stage, each starting from the frontier cache): ``H H^T`` and ``H Y^T`` of the
   inputs ``H`` the layer gets once the layers before it are decomposed and the dense outputs ``Y = W X`` at
   the same sampled columns (or ``H`` and ``Y`` themselves, likewise); the layers of a stage are refitted and
   replaced at its end.
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
from .factoring import lowrank_module, sample_space_factors, whitened_factors
from .statistics import ColumnStatistics

# Layers whose input dimension d exceeds this keep weight SVD even with data: the float64 covariance is d^2
# (8192: 512 MiB).
MAX_COVARIANCE_DIM = 8192
# The sensitivity probe runs 1/PROBE_SHARE of the calibration samples (``probe_samples``).
PROBE_SHARE = 16


def _columns(layer: Candidate, batch: int, call: int, x: Tensor) -> Tensor:
    return input_columns(layer.module, x, column_generator(layer.index, batch, call))


def collect_statistics(engine: Calibration, layers: List[Candidate], keep_dense_rows: bool) -> None:
    """The statistics pass (see the module docstring). Layers the data never reaches keep ``samples == 0``."""
    device = engine.device
    stages = SameInputStages()
    for layer in layers:
        layer.covariance = ColumnStatistics(layer.in_dim, 0, device, keep_columns=not engine.distributed)
    order = [0]

    def capture(layer: Candidate) -> Callable[[int, int, Tensor], None]:
        def hook(batch: int, call: int, x: Tensor) -> None:
            if batch == 0 and call == 0:
                layer.order = order[0]
                order[0] += 1
                stages.assign(layer, x)
            rows = _columns(layer, batch, call, x)
            layer.covariance.add(rows)
            if keep_dense_rows:
                _keep_dense_rows(engine, layer, batch, call, rows)
        return hook

    with engine.phase("statistics"):
        engine.trace({layer.module: capture(layer) for layer in layers}, "statistics")
        engine.all_reduce([t for layer in layers for t in layer.covariance.products()])  # products, if distributed
        if engine.distributed:
            counts = torch.tensor([float(layer.covariance.samples) for layer in layers], dtype=torch.float64)
            engine.all_reduce([counts])
            for layer, count in zip(layers, counts.tolist()):
                layer.covariance.samples = int(count)
    # A NaN or Inf input leaves its layer's float64 covariance non-finite, its diagonal (the sums of squares of
    # each input) among the first: one check of the diagonals after the pass, then the diagnosis names where it
    # first appears (the weights were checked before any data ran).
    bad = [layer for layer in layers if not bool(torch.isfinite(layer.covariance.diagonal()).all())]
    if bad:
        raise_non_finite(engine.model, engine.data, "decompose", f"the input covariance of layer {bad[0].name!r}")
    for layer in layers:
        layer.samples = layer.covariance.samples
        if layer.samples == 0:
            layer.covariance = None


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
        # Differences and sums in float32 (at least): the difference of two float32 outputs is exact where
        # they are close, and a float64 copy of each output cost a third of GPT-2's probe (vocabulary 8192).
        dense = dense.float() if dense.element_size() < 4 else dense
        scale = float(dense.square().sum())
        values = torch.zeros(len(layers), dtype=torch.float64)
        for i, layer in enumerate(engine_progress(engine, layers, "sensitivity")):
            rank = probes.get(layer.name)
            lost = layer.discarded(rank) if rank is not None else 0.0
            if rank is None or not lost > 0 or scale == 0:
                continue
            set_module(layer.name, lowrank_module(layer, rank))
            try:
                changed = output_tensor(runner.outputs_from(layer.module, "sensitivity")[0]).to(dense.dtype)
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
    """A layer's refit statistics over the calibration batches: ``H H^T`` and ``H Y^T`` of the inputs ``H`` it gets
    in the partly decomposed model and the dense outputs ``Y`` (a ``ColumnStatistics``: the columns themselves
    while there are no more of them than inputs, for ``sample_space_factors``)."""

    def __init__(self, layer: Candidate, device, keep_columns: bool):
        self.layer = layer
        self.weight = layer.matrix().to(torch.float64)  # converted once, not per batch and call
        m = self.weight.shape[0]
        # the sample-space fit takes m <= d: its m x m eigenproblem then costs no more than the d x d one
        self.products = ColumnStatistics(layer.in_dim, m, device, keep_columns and m <= layer.in_dim)
        self.dense: Dict[Tuple[int, int], Tensor] = {}  # recomputed dense columns of the current batch

    def add(self, layer: Candidate, batch: int, call: int, x: Tensor) -> None:
        h = _columns(layer, batch, call, x)
        y = layer.dense_rows[(batch, call)] if layer.dense_rows is not None else self.dense.pop((batch, call))
        y = y.to(torch.float64) if layer.dense_rows_are_outputs else y.to(torch.float64) @ self.weight.T
        self.products.add(h, y)

    def fit(self, damping: float, rank: int) -> Tuple[Tensor, Tensor, Tensor]:
        """The refit's factors at ``damping``, of which rank ``rank`` is used (see ``refit_factors``)."""
        if self.products.in_sample_space:
            h, y = self.products.rows()
            return sample_space_factors(h, y, damping, self.layer.name, self.products.kernel())
        return whitened_factors(self.layer, damping, rank, self.products.cross, self.products.gram)


def refit_stage(engine: Calibration, stage: List[Candidate], dense_modules: Dict[str, nn.Module],
                set_module: Callable[[str, nn.Module], None], desc: str) -> Dict[str, _RefitStatistics]:
    """One stage pass accumulating the refit statistics of ``stage``'s layers. Dense columns that were not
    kept are recomputed per batch by a forward through the dense layers (``dense_modules``, swapped in for
    it), which starts from the model's inputs."""
    stats = {layer.name: _RefitStatistics(layer, engine.device, keep_columns=not engine.distributed)
             for layer in stage}
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
    engine.all_reduce([t for s in stats.values() for t in s.products.products()])  # products, if distributed
    return stats
