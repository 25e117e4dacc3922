"""Least-squares reconstruction after channel removal (``prune(..., reconstruct=True)``).

Removing channels leaves every layer that consumed them (the conv or Linear whose *input* channels were cut)
fitted to inputs it no longer gets. Each such *consumer* is refitted so that its output on the calibration
inputs matches the dense model's output at the same layer (He et al. 2017; ThiNet):

- **Targets.** One pass of the dense model (the caller's, untouched) over the calibration data keeps, for
  every consumer, its dense output ``Y = W X + b`` at sampled positions (``columns.input_columns``: im2col
  patches of a conv, feature rows of a Linear); what does not fit the engine's cache budget is recomputed per
  stage through the dense model.
- **Inputs.** The pruned model runs through the calibration engine in stages, in execution order: each
  stage's consumers see the inputs ``H`` that the pruned model, with every earlier consumer already refitted,
  gives them (same sampled positions). Consumers reading the same tensor share a stage.
- **Fit.** Streaming float64 statistics of ``[H, 1]`` (``[H,1]^T [H,1]`` and ``[H,1]^T Y``), then the ridge
  solution ``[W', b'] = argmin ||Y - W' H - b'||^2 + damping * mean(diag(H^T H)) * ||W'||^2``: the intercept is
  the bias compensation (a removed channel that is constant on the data is folded into the bias exactly, for
  Linear layers and convs whose patches never reach the zero padding). A consumer with a bias gets ``b'``; one
  without whose output goes straight into a BatchNorm has ``b'`` folded into that BatchNorm's running mean;
  one with neither gains a bias (the plan says so, and ``apply_prune_plan`` adds it).
- **Never worse.** The last quarter of the calibration batches (every fourth sampled row when there is one
  batch) is held out: where the refitted layer's output error there exceeds the plain pruned layer's (its
  sliced dense weight, with the best intercept), the plain layer is kept. The chosen fit is then solved again
  on all the data.
- **Never blown up.** Where the layer has few calibration rows per input (fewer than
  ``UNDERDETERMINED_ROWS_PER_INPUT``: a classifier on pooled features gets one row per image), least squares
  can interpolate the calibration set with a weight far larger than the dense one, which hurts fine-tuning;
  there the damping is chosen among tenfold steps by the error on the held-out rows.

Not reconstructed, with the reason in the plan (``plan["reconstruction"]["fallback"]``): grouped convs
(``1 < groups``, depthwise ones pass channels through and are never consumers: the next dense layer is),
modules other than ``nn.Conv2d``/``nn.Linear``, layers with more than ``MAX_INPUT_DIM`` inputs (a float64 Gram
of that size), and layers the calibration data never reaches.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .._inputs import call_model, eval_mode, first_samples, holds_non_finite, raise_non_finite, removed_after
from .._linalg import damped_cholesky
from ..calibration import Calibration, SameInputStages
from ..columns import column_generator, input_columns

# Relative ridge damping of the reconstruction (times the mean diagonal of H^T H), as in the data-aware
# decomposition: small enough to leave well-conditioned fits exact to ~1e-4, large enough for dead inputs.
DEFAULT_DAMPING = 1e-4
# Consumers with more inputs than this (C * kh * kw) are not refitted: the float64 Gram is d^2 (512 MiB).
MAX_INPUT_DIM = 8192
# Share of the calibration batches held out to check that a refit beats the plain pruned layer.
HOLDOUT_SHARE = 0.25
# Fits with fewer rows than this per input (a classifier on pooled features: one row per image) can interpolate
# the calibration set with a weight far larger than the dense one (MobileNetV2's classifier came out 24.7x the
# dense norm, and one fine-tune epoch then lost 5 points); their damping is chosen among RIDGE_STEPS tenfold
# steps by the error on the held-out rows (cross-validated ridge). Capping the weight's norm instead (as the
# decomposition's refit does) cost MobileNetV2 pruned to 60% with allocation 20 points before fine-tuning.
UNDERDETERMINED_ROWS_PER_INPUT = 4
RIDGE_STEPS = 5


@dataclass
class _Statistics:
    """``[H,1]^T [H,1]``, ``[H,1]^T Y`` and ``||Y||^2`` of one consumer over a set of rows (float64)."""

    gram: Tensor
    cross: Tensor
    target_energy: float = 0.0
    rows: int = 0

    @classmethod
    def zeros(cls, inputs: int, outputs: int, device) -> "_Statistics":
        return cls(torch.zeros(inputs + 1, inputs + 1, dtype=torch.float64, device=device),
                   torch.zeros(inputs + 1, outputs, dtype=torch.float64, device=device))

    def add(self, h: Tensor, y: Tensor) -> None:
        h = torch.cat([h.to(torch.float64), torch.ones(h.shape[0], 1, dtype=torch.float64, device=h.device)], 1)
        y = y.to(torch.float64)
        self.gram.addmm_(h.T, h)
        self.cross.addmm_(h.T, y)
        self.target_energy += float(y.square().sum())
        self.rows += h.shape[0]

    def plus(self, other: "_Statistics") -> "_Statistics":
        return _Statistics(self.gram + other.gram, self.cross + other.cross,
                           self.target_energy + other.target_energy, self.rows + other.rows)

    def error(self, weight: Tensor) -> float:
        """``||Y - [W, b] [H, 1]^T||^2`` of an augmented weight ``[out, d + 1]``."""
        return (self.target_energy - 2 * float((weight * self.cross.T).sum())
                + float(((weight @ self.gram) * weight).sum()))


@dataclass
class _Consumer:
    name: str
    index: int
    dense: nn.Module
    pruned: nn.Module
    dense_weight: Tensor  # [kept outputs, dense inputs], float64
    dense_bias: Optional[Tensor]
    stage: int = -1
    targets: Optional[Dict[Tuple[int, int], Tensor]] = field(default_factory=dict)
    fit: Optional[_Statistics] = None
    holdout: Optional[_Statistics] = None

    @property
    def inputs(self) -> int:
        return self.pruned.weight[0].numel()


def _matrix(module: nn.Module) -> Tensor:
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def consumers_of(pruned: nn.Module, kept: Dict[str, Dict[str, Any]]) -> Tuple[List[str], Dict[str, str]]:
    """The names of the layers to refit (input channels cut, a plain conv or Linear) and, for the other layers
    whose inputs were cut, why they are not refitted."""
    names, fallback = [], {}
    for name, entry in kept.items():
        if "in_channels_kept" not in entry:
            continue
        module = pruned.get_submodule(name)
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            if module.groups != module.in_channels:  # depthwise: passes channels on, never a consumer
                fallback[name] = "grouped convolution (refitting per group is not implemented)"
        elif not isinstance(module, (nn.Conv2d, nn.Linear)):
            fallback[name] = f"{type(module).__name__} is not an nn.Conv2d or nn.Linear"
        elif module.weight[0].numel() > MAX_INPUT_DIM:
            fallback[name] = f"{module.weight[0].numel()} inputs, above MAX_INPUT_DIM={MAX_INPUT_DIM}"
        else:
            names.append(name)
    return names, fallback


def reconstruct(dense: nn.Module, pruned: nn.Module, kept: Dict[str, Dict[str, Any]], data: Iterable, *,
                damping: float = DEFAULT_DAMPING, cache_bytes: Optional[int] = None,
                progress: bool = True) -> Dict[str, Any]:
    """Refit, in place, the layers of ``pruned`` that consume removed channels (module doc), so that their
    outputs on ``data`` match ``dense``'s. ``kept`` is the plan's ``layers``. Returns plain data for the plan:
    ``{"damping", "layers": {name: {"refit": bool, "error_plain", "error_refit", ["bias": "added" |
    "batchnorm"]}}, "fallback": {name: reason}}``; errors are relative squared output errors on the held-out
    rows."""
    names, fallback = consumers_of(pruned, kept)
    result: Dict[str, Any] = {"damping": damping, "layers": {}, "fallback": fallback}
    if not names:
        return result
    dense_engine = Calibration(dense, data, cache_bytes=cache_bytes, progress=progress, name="prune")
    consumers = [_consumer(name, i, dense, pruned, kept[name]) for i, name in enumerate(names)]
    with dense_engine.phase("dense targets"):
        dense_engine.trace({c.dense: _keep_target(dense_engine, c) for c in consumers}, "dense targets")
    unreached = [c for c in consumers if not c.targets and c.targets is not None]
    for c in unreached:
        fallback[c.name] = "the calibration data never reaches it"
    consumers = [c for c in consumers if c not in unreached]
    engine = Calibration(pruned, dense_engine.data, cache_bytes=max(dense_engine.cache_bytes - dense_engine.reserved,
                                                                    0), progress=progress, name="prune")
    holdout = _holdout_rule(len(dense_engine.fingerprints))
    stages = SameInputStages()
    with engine.phase("structure"):
        engine.trace({c.pruned: (lambda b, k, x, c=c: stages.assign(c, x) if b == 0 and k == 0 else None)
                      for c in consumers}, "structure")
    batchnorm_after = _batchnorm_after(pruned, dense_engine, consumers)
    by_stage: Dict[int, List[_Consumer]] = {}
    for c in consumers:
        by_stage.setdefault(c.stage, []).append(c)
    with engine.phase("reconstruction"):
        for number, stage in enumerate(sorted(by_stage.values(), key=lambda s: s[0].stage)):
            _stage_statistics(engine, dense_engine, stage, holdout, f"refit {number + 1}/{len(by_stage)}")
            for c in stage:
                if any(holds_non_finite(t) for s in (c.fit, c.holdout) for t in (s.gram, s.cross)):
                    raise_non_finite(dense, dense_engine.data, "prune",
                                     f"the reconstruction statistics of layer {c.name!r}")
                result["layers"][c.name] = _refit(c, damping, batchnorm_after.get(c.name))
                if c.targets:
                    dense_engine.release_held(c.targets)
                c.targets, c.fit, c.holdout = {}, None, None
    return result


def _consumer(name: str, index: int, dense: nn.Module, pruned: nn.Module, entry: Dict[str, Any]) -> _Consumer:
    module = dense.get_submodule(name)
    weight, bias = _matrix(module).to(torch.float64), module.bias
    rows = entry.get("out_channels_kept")
    if rows is not None:
        index_rows = torch.as_tensor(rows, dtype=torch.long, device=weight.device)
        weight = weight[index_rows]
        bias = bias[index_rows] if bias is not None else None
    return _Consumer(name, index, module, pruned.get_submodule(name), weight,
                     bias.detach().to(torch.float64) if bias is not None else None)


def _rows(c: _Consumer, module: nn.Module, batch: int, call: int, x: Tensor) -> Tensor:
    """The same sampled positions in the dense and the pruned model's input of a consumer."""
    return input_columns(module, x, column_generator(c.index, batch, call))


def _dense_outputs(c: _Consumer, batch: int, call: int, x: Tensor) -> Tensor:
    y = _rows(c, c.dense, batch, call, x).to(torch.float64) @ c.dense_weight.T
    return y + c.dense_bias if c.dense_bias is not None else y


def _keep_target(engine: Calibration, c: _Consumer):
    """A capture keeping the consumer's dense outputs at the sampled positions, while the budget has room; a
    consumer that misses one keeps none (``targets = None``) and has them recomputed in its stage."""
    def capture(batch: int, call: int, x: Tensor) -> None:
        if c.targets is None:  # dropped: recomputed in the stage, not here
            return
        if engine.hold(c.targets, (batch, call), _dense_outputs(c, batch, call, x).to(x.dtype)):
            return
        c.targets = None
        engine.notes.append(f"the dense outputs of layer {c.name!r} do not fit the cache budget: recomputed in "
                            "its reconstruction stage")
    return capture


def _holdout_rule(batches: int):
    """Whether row ``i`` of batch ``b`` is held out: the last quarter of the batches, or every fourth row of
    a single batch."""
    if batches >= 2:
        first_held = batches - max(1, int(math.ceil(HOLDOUT_SHARE * batches)))
        return lambda batch, rows: torch.full((rows,), batch >= first_held, dtype=torch.bool)
    return lambda batch, rows: torch.arange(rows) % 4 == 3


def _stage_statistics(engine: Calibration, dense_engine: Calibration, stage: List[_Consumer], holdout,
                      desc: str) -> None:
    """One stage pass of the pruned model: every consumer's fit and held-out statistics."""
    device = engine.device
    for c in stage:
        outputs = c.dense_weight.shape[0]
        c.fit, c.holdout = _Statistics.zeros(c.inputs, outputs, device), _Statistics.zeros(c.inputs, outputs, device)
    missing = [c for c in stage if c.targets is None]
    recomputed: Dict[Tuple[str, int, int], Tensor] = {}

    def recompute(index: int, inputs: Any) -> None:
        captures = {c.dense: (lambda b, k, x, c=c: recomputed.__setitem__((c.name, b, k), _dense_outputs(c, b, k, x)))
                    for c in missing}
        dense_engine.forward_uncached(index, inputs, captures)

    def capture(c: _Consumer):
        def hook(batch: int, call: int, x: Tensor) -> None:
            h = _rows(c, c.pruned, batch, call, x)
            y = recomputed.pop((c.name, batch, call)) if c.targets is None else c.targets[(batch, call)]
            held = holdout(batch, h.shape[0]).to(h.device)
            if bool(held.any()):
                c.holdout.add(h[held], y[held])
            if not bool(held.all()):
                c.fit.add(h[~held], y[~held])
        return hook

    engine.stage_pass({c.pruned: capture(c) for c in stage}, desc, before_batch=recompute if missing else None)
    engine.all_reduce([t for c in stage for s in (c.fit, c.holdout) for t in (s.gram, s.cross)])


def ridge_cholesky(gram: Tensor, damping: float, name: str, damped: Optional[int] = None) -> Tensor:
    """Lower ``L`` with ``L L^T = gram + r * mean(diag) * I`` on the first ``damped`` diagonal entries (all by
    default): ``r = damping``, raised tenfold (9 times at most) until the factorization succeeds (dead or
    duplicate inputs make the Gram singular; with ``damping=0`` the escalation starts at 1e-11)."""
    d = gram.shape[0] if damped is None else damped
    mean_diagonal = float(gram.diagonal()[:d].mean()) if d else 0.0
    unit = mean_diagonal if mean_diagonal > 0 else 1.0
    ratios = (damping * 10 ** attempt if damping > 0 else (1e-12 * 10 ** attempt if attempt else 0.0)
              for attempt in range(10))
    return damped_cholesky(gram, (r * unit for r in ratios), f"prune: the input statistics of layer {name!r}",
                           damped=d)[0]


def _solve(stats: _Statistics, damping: float, name: str) -> Tensor:
    """The ridge solution ``[W', b']`` (module doc) from augmented statistics, float64; the intercept is never
    damped."""
    L = ridge_cholesky(stats.gram, damping, name, damped=stats.gram.shape[0] - 1)
    return torch.cholesky_solve(stats.cross, L).T


def _plain_weight(c: _Consumer, stats: _Statistics) -> Tensor:
    """The plain pruned layer ``[W, b*]`` with the intercept that fits it best on ``stats``."""
    weight = _matrix(c.pruned).to(torch.float64)
    mean_h = stats.gram[-1, :-1] / max(stats.rows, 1)
    mean_y = stats.cross[-1] / max(stats.rows, 1)
    return torch.cat([weight, (mean_y - weight @ mean_h)[:, None]], 1)


def _refit(c: _Consumer, damping: float, batchnorm: Optional[nn.Module]) -> Dict[str, Any]:
    """Choose between the refit and the plain layer on the held-out rows, solve the choice on all rows, and write
    it into the pruned layer; the plan entry."""
    fit, held = (c.fit, c.holdout) if c.fit.rows and c.holdout.rows else (c.fit.plus(c.holdout),) * 2
    everything = c.fit.plus(c.holdout)
    scale = max(held.target_energy, 1e-300)
    error_plain = held.error(_plain_weight(c, fit)) / scale
    dampings = [damping]
    if fit.rows < UNDERDETERMINED_ROWS_PER_INPUT * c.inputs:  # few rows per input: choose by held-out error
        base = damping if damping > 0 else DEFAULT_DAMPING
        dampings += [base * 10 ** step for step in range(1, RIDGE_STEPS + 1)]
    error_refit, used = min((held.error(_solve(fit, d, c.name)) / scale, d) for d in dampings)
    refit = error_refit <= error_plain
    weight = _solve(everything, used, c.name) if refit else _plain_weight(c, everything)
    entry: Dict[str, Any] = {"refit": bool(refit), "error_plain": error_plain, "error_refit": error_refit,
                             "damping": used}
    module = c.pruned
    with torch.no_grad():
        module.weight.copy_(weight[:, :-1].reshape(module.weight.shape).to(module.weight.dtype))
        bias = weight[:, -1]
        if module.bias is not None:
            module.bias.copy_(bias.to(module.bias.dtype))
        elif batchnorm is not None and batchnorm.running_mean is not None:
            batchnorm.running_mean.sub_(bias.to(batchnorm.running_mean.dtype))  # BN(x + b) = BN with mean - b
            entry["bias"] = "batchnorm"
        else:
            module.bias = nn.Parameter(bias.to(module.weight.dtype), requires_grad=module.weight.requires_grad)
            entry["bias"] = "added"
    return entry


def _batchnorm_after(pruned: nn.Module, engine: Calibration, consumers: List[_Consumer]) -> Dict[str, nn.Module]:
    """``{consumer name: the BatchNorm that takes its output as it is}`` for consumers without a bias, by one
    forward of the first calibration sample."""
    wanted = {c.pruned: c.name for c in consumers if c.pruned.bias is None}
    if not wanted:
        return {}
    outputs: Dict[int, str] = {}
    found: Dict[str, nn.Module] = {}

    def output_hook(module, args, output):
        if isinstance(output, Tensor):
            outputs[output.data_ptr()] = wanted[module]

    def batchnorm_hook(module, args):
        if args and isinstance(args[0], Tensor) and args[0].data_ptr() in outputs:
            found.setdefault(outputs[args[0].data_ptr()], module)

    handles = [m.register_forward_hook(output_hook) for m in wanted]
    handles += [m.register_forward_pre_hook(batchnorm_hook) for m in pruned.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with removed_after(handles):
        first = next(iter(engine.batches()))[1]
        with eval_mode(pruned):
            call_model(pruned, first_samples(first, 1))
    return found
