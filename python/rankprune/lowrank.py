"""Decompose a model's Conv2d/Linear layers into low-rank layers, choosing ranks per layer or by a budget.

Without calibration data each layer's weight matrix ``W`` is truncated by its own SVD (minimising
``||W - W_r||_F``). With ``data`` the factors minimise the error of the layer's *output* on the calibration
inputs ``X``: with ``C = X X^T + damping * mean(diag) * I = L L^T`` (Cholesky), the best rank-r weight is
``(W L)_r L^{-1}``, and the discarded squared singular values of ``W L`` are the output error
``||(W - W_r) X||_F^2`` of every rank, which puts all layers on one scale for the rank allocation
(see docs/lowrank.md).

``decompose`` returns the model, a plan (plain JSON: per layer kind, scheme and rank) and a report. The plan
rebuilds the architecture with ``apply_decompose_plan`` so that a state_dict saved after decomposition (and
fine-tuning) loads with ``torch.load(..., weights_only=True)``.

Costs are counted like ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add, convolutions
and matrix products only; ``rankprune.ops.lowrank_conv2d`` counts as its two convolutions), so a budget
check against FlopCounterMode agrees with the allocation.
"""
import copy
import fnmatch
import heapq
import math
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from . import ops, training
from ._inputs import batch_inputs, call_model, to_device
from .nn import (
    SCHEMES,
    LowRankConv2d,
    LowRankLinear,
    _explicit_padding,
    check_decomposable_conv,
    select_rank,
    weight_matrix,
)
from .plans import PLAN_VERSION, plan_layers

# Default smallest rank a layer may get, as a fraction of its full rank: keeps any budget from collapsing a
# layer to rank 1 (issue 12).
DEFAULT_MIN_RANK = 0.25
# Default damping of the input covariance, relative to its mean diagonal (SVD-LLM, ASVD use 1e-6..1e-2).
DEFAULT_DAMPING = 1e-4
# Calibration columns (im2col patches / tokens) kept per batch and layer: the covariance costs d^2 per column,
# so large feature maps are subsampled (uniformly, seeded).
MAX_SAMPLES_PER_BATCH = 4096
# A layer is factored by the randomized ops.svd_lowrank instead of the full ops.svd when the rank it needs is
# known in advance (ranks=, rank_ratio=) and at most this fraction of min(m, n), for min(m, n) >= 256.
LOWRANK_SVD_MAX_FRACTION = 0.25
LOWRANK_SVD_MIN_DIM = 256
# An asymmetric refit regresses the dense layer's outputs on the inputs of the partly decomposed model. Where
# those inputs span fewer directions than the layer has inputs (fewer calibration samples than features, e.g.
# a classifier on pooled features), the regression interpolates the calibration set with a weight far larger
# than the dense one: MobileNetV2's classifier came out 23.7x the dense norm, and one fine-tune epoch then fell
# from 71% to 46%. The refit's damping is raised tenfold (REFIT_DAMPING_STEPS times at most) until the rank-r
# weight is at most MAX_REFIT_GROWTH times the dense weight's Frobenius norm; failing that the layer keeps its
# symmetric fit, which projects the dense weight and never grows it.
MAX_REFIT_GROWTH = 2.0
REFIT_DAMPING_STEPS = 3
# Layers whose input dimension d exceeds this keep weight SVD even with data: the float64 covariance is d^2
# (8192: 512 MiB).
MAX_COVARIANCE_DIM = 8192


@dataclass
class _Layer:
    """One candidate layer: its shapes on the example inputs and its SVD."""

    name: str
    module: nn.Module
    kind: str  # "conv2d" | "linear"
    scheme: str
    inputs: List[Tensor] = field(default_factory=list)
    outputs: List[Tensor] = field(default_factory=list)
    S: Optional[Tensor] = None
    factors: Optional[Tuple[Tensor, Tensor, Tensor]] = None
    # data-aware: the float64 input covariance X X^T (None: weight SVD) and the number of columns in it
    covariance: Optional[Tensor] = None
    samples: int = 0
    order: float = math.inf  # position of its first call in a calibration pass
    # measured: relative squared change of the model's output per unit of the layer's normalised discarded
    # energy (1: not measured); weighs the layer's errors in the budget allocation
    sensitivity: float = 1.0
    # squared Frobenius norm of the factored matrix when S is truncated (randomized SVD), else None
    energy: Optional[float] = None
    min_rank: int = 1
    rank_multiple: int = 1

    @property
    def full_rank(self) -> int:
        return min(self.matrix().shape)

    def flops(self, rank: Optional[int]) -> int:
        """FLOPs over every call on the example inputs at ``rank`` (None: the dense layer)."""
        return sum(self._flops_one(rank, x.shape) for x in self.inputs)

    def flop_ratio(self, rank: int) -> float:
        """FLOPs at ``rank`` over dense FLOPs, for one call (unit spatial size when never called)."""
        shape = self.inputs[0].shape if self.inputs else None
        return self._flops_one(rank, shape) / self._flops_one(None, shape)

    def _flops_one(self, rank: Optional[int], shape) -> int:
        m = self.module
        if self.kind == "linear":
            rows = math.prod(shape[:-1]) if shape is not None else 1
            n_out, n_in = _linear_features(m)
            per_row = n_in * n_out if rank is None else rank * (n_in + n_out)
            return 2 * rows * per_row
        n, c, kh, kw = m.weight.shape
        if shape is None:
            b, h_in, w_in = 1, 1, 1
            h_out = w_out = 1
        else:
            b, _, h_in, w_in = shape
            pad = _explicit_padding(m)
            h_out, w_out = (
                (size + 2 * p - d * (k - 1) - 1) // s + 1
                for size, p, d, k, s in zip((h_in, w_in), pad, m.dilation, (kh, kw), m.stride)
            )
        if rank is None:
            return 2 * b * h_out * w_out * n * c * kh * kw
        if self.scheme == "channel":
            return 2 * b * h_out * w_out * rank * (c * kh * kw + n)
        # spatial: the kh x 1 convolution keeps the input width, the 1 x kw one makes the output width.
        return 2 * b * rank * (h_out * w_in * c * kh + h_out * w_out * n * kw)

    def params(self, rank: Optional[int]) -> int:
        """Weight parameters at ``rank`` (None: dense); the bias is the same either way."""
        w = self.module.weight
        if rank is None:
            return w.numel()
        if self.kind == "linear":
            return rank * (w.shape[0] + w.shape[1])
        n, c, kh, kw = w.shape
        return rank * (c * kh * kw + n) if self.scheme == "channel" else rank * (c * kh + n * kw)

    def discarded(self, rank: Optional[int]) -> float:
        """Normalised discarded energy: sum of the squared singular values past ``rank`` over their total."""
        if rank is None:
            return 0.0
        s2 = self.S.double() ** 2
        if self.energy is None:
            total = float(s2.sum())
            return float(s2[rank:].sum()) / total if total > 0 else 0.0
        # truncated SVD: the discarded energy is what the kept singular values leave of the total
        return max(self.energy - float(s2[:rank].sum()), 0.0) / self.energy if self.energy > 0 else 0.0

    @property
    def data_aware(self) -> bool:
        return self.covariance is not None

    def matrix(self) -> Tensor:
        """The factored matrix: ``weight_matrix`` of the weight (a Hugging Face Conv1D's ``[in, out]`` weight
        transposed to ``[out, in]``)."""
        w = self.module.weight.detach()
        return w.T if _is_hf_conv1d(self.module) else weight_matrix(w, self.scheme)

    @property
    def in_dim(self) -> int:
        """Inputs per output of the channel-scheme matrix: ``C*kh*kw`` of a Conv2d, ``in`` of a Linear."""
        w = self.module.weight
        return w.shape[0] if _is_hf_conv1d(self.module) else w[0].numel()

    def lowest_rank(self) -> int:
        """The smallest allowed rank: ``min_rank`` rounded up to a multiple of ``rank_multiple``."""
        return -(-self.min_rank // self.rank_multiple) * self.rank_multiple

    def allowed(self, rank: int) -> int:
        """``rank`` raised to the lowest allowed rank and up to a multiple of ``rank_multiple`` (at most the
        full rank, which never saves FLOPs)."""
        rank = max(rank, self.lowest_rank())
        return min(-(-rank // self.rank_multiple) * self.rank_multiple, self.full_rank)

    def max_saving_rank(self, min_flop_saving: float) -> int:
        """Largest allowed rank (see ``allowed``) whose FLOPs are below dense and at most
        ``1 - min_flop_saving`` of dense (0: none)."""
        best = 0  # FLOPs grow linearly with the rank
        rank = self.lowest_rank()
        while rank < self.full_rank and self.saves(rank, min_flop_saving):
            best, rank = rank, rank + self.rank_multiple
        return best

    def saves(self, rank: int, min_flop_saving: float) -> bool:
        ratio = self.flop_ratio(rank)
        return ratio < 1.0 and ratio <= 1.0 - min_flop_saving


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _patterns(value, arg: str) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{arg} must be a module name pattern or a list of them (fnmatch style), got {value!r}")


def _warn_unmatched(model: nn.Module, include: Optional[List[str]]) -> None:
    """Warn once about ``include`` patterns that match no Conv2d/Linear layer of the model (likely a typo)."""
    names = [name for name, m in model.named_modules() if _kind(m) is not None]
    unmatched = [p for p in include or () if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        warnings.warn(f"decompose: include pattern(s) {unmatched} match no Conv2d or Linear layer of "
                      f"{type(model).__name__}", stacklevel=3)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2): a Linear whose weight is ``[in, out]``
    (``y = x @ weight + bias``), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _linear_features(module: nn.Module) -> Tuple[int, int]:
    """``(out_features, in_features)`` of an nn.Linear or a Hugging Face Conv1D."""
    if _is_hf_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        return "linear"
    return None


def _unreplaceable(model: nn.Module) -> Dict[str, str]:
    """Layers that cannot be swapped for a low-rank module, by name, with the reason: the projections of an
    ``nn.MultiheadAttention`` (it reads ``out_proj.weight`` itself instead of calling the module) and layers
    whose weight is shared with another module (tied embeddings and heads: replacing one would untie them)."""
    reasons: Dict[str, str] = {}
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child, _ in module.named_children():
                reasons[f"{name}.{child}" if name else child] = (
                    "nn.MultiheadAttention uses its projection weights directly, not through the module")
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{name}.{pname}" if name else pname)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and len(owners.get(id(weight), ())) > 1:
            others = [o for o in owners[id(weight)] if o != f"{name}.weight"]
            reasons.setdefault(name, f"its weight is shared with {', '.join(others)} (tied weights)")
    return reasons


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _run(model: nn.Module, example_inputs, layers: Dict[str, _Layer], record: bool) -> Tuple[object, int]:
    """One forward pass in eval mode without gradients (training flags restored): the output and its
    FlopCounterMode FLOPs; with ``record``, each layer's inputs and outputs are kept."""
    handles = []
    if record:
        for layer in layers.values():
            def hook(module, args, output, layer=layer):
                layer.inputs.append(args[0].detach())
                layer.outputs.append(output.detach())

            handles.append(layer.module.register_forward_hook(hook))
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            output = call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.train(t)
    return output, counter.get_total_flops()


def _layer_columns(layer: _Layer, x: Tensor, generator: torch.Generator) -> Tensor:
    """The calibration columns of one call as rows ``[n, d]``: the input features of a Linear (every leading
    dimension is a sample), the im2col patches of a Conv2d with its own stride, padding and dilation, at most
    ``MAX_SAMPLES_PER_BATCH`` of them (a uniform subsample of the pixels of large maps)."""
    m = layer.module
    if layer.kind == "linear":
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > MAX_SAMPLES_PER_BATCH:
            rows = rows[_subsample(rows.shape[0], generator).to(rows.device)]
        return rows
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    ph, pw = _explicit_padding(m)
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    count = batch * out_h * out_w
    if count <= MAX_SAMPLES_PER_BATCH:
        patches = nn.functional.unfold(x, m.kernel_size, m.dilation, (ph, pw), m.stride)  # [B, d, L]
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    # Only the sampled patches, gathered from the padded input: im2col of the whole batch costs more than the
    # covariance itself. The rows are those of unfold's patches at the same sampled positions, in its order
    # (channel, kernel row, kernel column).
    keep = _subsample(count, generator).to(x.device)
    image, pixel = keep // (out_h * out_w), keep % (out_h * out_w)
    rows_at = (pixel // out_w)[:, None] * sh + torch.arange(kh, device=x.device) * dh  # [n, kh]
    cols_at = (pixel % out_w)[:, None] * sw + torch.arange(kw, device=x.device) * dw  # [n, kw]
    padded = nn.functional.pad(x, (pw, pw, ph, ph))
    patches = padded[image[:, None, None], :, rows_at[:, :, None], cols_at[:, None, :]]  # [n, kh, kw, C]
    return patches.permute(0, 3, 1, 2).reshape(keep.shape[0], -1)


def _subsample(count: int, generator: torch.Generator) -> Tensor:
    """``MAX_SAMPLES_PER_BATCH`` distinct indices in ``range(count)``, uniformly at random."""
    return torch.randperm(count, generator=generator, device=generator.device)[:MAX_SAMPLES_PER_BATCH]


def _collect_covariances(model: nn.Module, data, layers: List[_Layer], progress: bool) -> None:
    """Stream ``data`` through ``model`` (eval mode, no gradients, training flags restored) and accumulate each
    layer's float64 input covariance ``sum_n x_n x_n^T`` on the layer's device (memory d^2 per layer,
    independent of the number of batches). Raises ValueError for empty data and for NaN/Inf activations."""
    device = next(iter(model.parameters())).device
    generator = torch.Generator(device=device).manual_seed(0)
    called = []
    for layer in layers:
        d = layer.in_dim
        layer.covariance = torch.zeros(d, d, dtype=torch.float64, device=layer.module.weight.device)
        layer.samples = 0

    def hook(module, args, output, layer):
        x = args[0].detach()
        if not torch.isfinite(x).all():
            raise ValueError(f"decompose: the calibration data gives NaN or Inf inputs to layer {layer.name!r}")
        if layer.samples == 0 and layer.order == math.inf:
            layer.order = len(called)
            called.append(layer.name)
        rows = _layer_columns(layer, x, generator).to(torch.float64)
        layer.covariance.addmm_(rows.T, rows)
        layer.samples += rows.shape[0]

    handles = [l.module.register_forward_hook(lambda m, a, o, l=l: hook(m, a, o, l)) for l in layers]
    training = {m: m.training for m in model.modules()}
    model.eval()
    batches = 0
    try:
        with torch.no_grad():
            for batch in tqdm(data, desc="decompose: calibration", unit="batch", leave=False, disable=not progress):
                call_model(model, to_device(batch_inputs(batch), device))
                batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.train(t)
    if batches == 0:
        raise ValueError("decompose: data holds no batches (empty calibration data)")


def _factor(layer: _Layer, matrix: Tensor, rank: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """SVD ``(U, S, V)`` of the float64 ``matrix``: the randomized rank-``rank`` ``ops.svd_lowrank`` when that is
    a small part of a large matrix (recording the total energy in ``layer.energy``), else the full ``ops.svd``."""
    k = min(matrix.shape)
    if rank is not None and k >= LOWRANK_SVD_MIN_DIM and rank <= LOWRANK_SVD_MAX_FRACTION * k:
        layer.energy = float(matrix.square().sum())
        generator = torch.Generator(device=matrix.device).manual_seed(0)
        return ops.svd_lowrank(matrix, rank, generator=generator)
    return ops.svd(matrix)


def _cholesky(C: Tensor, damping: float, name: str) -> Tensor:
    """Lower ``L`` with ``L L^T = C + damping * mean(diag C) * I`` (the damping raised tenfold until the
    factorisation succeeds: dead inputs make C singular); the identity for an all-zero C."""
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    scale = float(C.diagonal().mean())
    if not scale > 0:  # the layer only ever saw zeros: every rank gives the same (zero) output error
        return eye
    for attempt in range(8):
        L, info = torch.linalg.cholesky_ex(C + (damping * 10 ** attempt) * scale * eye)
        if int(info) == 0:
            return L
    raise ValueError(f"decompose: the input covariance of layer {name!r} is not positive definite even with "
                     f"damping {damping * 10 ** 7:g}; it cannot be factored on this data")


def _whitened_factors(layer: _Layer, damping: float, rank: Optional[int] = None, cross: Optional[Tensor] = None,
                      inputs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(U, S, V)`` such that ``U_r S_r V_r^T`` is the rank-r weight with the least output error.

    Symmetric (default): the error ``||(W - W_r) X||_F`` on the layer's calibration inputs ``X``
    (``layer.covariance = X X^T = L L^T`` up to the damping): the SVD ``W L = U S V_L^T`` and ``V = L^{-T} V_L``;
    ``S`` are then the singular values of ``W L``. Asymmetric (``inputs = H H^T``, ``cross = H X^T`` with ``H``
    the inputs the layer gets in the partly decomposed model): the error ``||W X - W_r H||_F``, minimised by
    the same whitened SVD of ``W X H^T L_H^{-T}`` with ``H H^T = L_H L_H^T`` (reduced-rank regression).
    ``rank``: the only rank needed, if known (see ``_factor``)."""
    W = layer.matrix().to(torch.float64)
    if inputs is None:
        L = _cholesky(layer.covariance, damping, layer.name)
        target = W @ L
    else:
        L = _cholesky(inputs, damping, layer.name)
        target = torch.linalg.solve_triangular(L, (W @ cross.mT).mT, upper=False).mT
    U, S, V = _factor(layer, target, rank)
    return U, S, torch.linalg.solve_triangular(L.mT, V, upper=True)


class _Reached(Exception):
    """Raised by a hook to stop a forward pass once the layer of interest has been called."""


def _layer_inputs(model: nn.Module, name: str, inputs) -> Tensor:
    """The input of module ``name`` at its first call in ``model(inputs)`` (the rest of the pass is skipped)."""
    seen = []

    def hook(module, args):
        seen.append(args[0].detach())
        raise _Reached

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        call_model(model, inputs)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0]


def _asymmetric_factors(layer: _Layer, dense: nn.Module, model: nn.Module, data, damping: float, rank: int
                        ) -> Tuple[Optional[Tuple[Tensor, Tensor, Tensor]], Optional[float]]:
    """Factors of ``layer`` fitted to the dense model's outputs of the layer from the inputs it gets in
    ``model``, where the layers before it are already decomposed (Zhang et al.'s asymmetric reconstruction):
    one pass over ``data`` through both models, each stopped at the layer (eval mode, no gradients).
    Returns ``(factors, damping)`` with the damping that keeps the rank-``rank`` weight within
    ``MAX_REFIT_GROWTH`` of the dense weight, or ``(None, None)`` when none does (see ``MAX_REFIT_GROWTH``)."""
    device = layer.module.weight.device
    d = layer.in_dim
    inputs = torch.zeros(d, d, dtype=torch.float64, device=device)
    cross = torch.zeros(d, d, dtype=torch.float64, device=device)
    with torch.no_grad():
        for index, batch in enumerate(data):
            batch = to_device(batch_inputs(batch), device)
            # the same seed for both: the same pixels are subsampled from the two inputs
            x = _layer_columns(layer, _layer_inputs(dense, layer.name, batch),
                               torch.Generator(device=device).manual_seed(index)).to(torch.float64)
            h = _layer_columns(layer, _layer_inputs(model, layer.name, batch),
                               torch.Generator(device=device).manual_seed(index)).to(torch.float64)
            inputs.addmm_(h.T, h)
            cross.addmm_(h.T, x)
    energy = layer.energy  # the allocation's (symmetric) energy stays what energy_kept reports
    limit = MAX_REFIT_GROWTH * float(layer.matrix().to(torch.float64).norm())
    try:
        for step in range(REFIT_DAMPING_STEPS + 1):
            U, S, V = _whitened_factors(layer, damping * 10 ** step, rank, cross, inputs)
            # ||U_r S_r V_r^T||_F = ||V_r S_r||_F: U's columns are orthonormal, so no m x n product is formed
            if float((V[:, :rank] * S[:rank]).norm()) <= limit:
                return (U, S, V), damping * 10 ** step
        return None, None
    finally:
        layer.energy = energy


def _calibration_error(layer: _Layer, rank: int) -> Tuple[float, float]:
    """``(||(W - W_r) X||_F^2, ||W X||_F^2)`` on the calibration inputs (float64, from the covariance)."""
    U, S, V = layer.factors
    W = layer.matrix().to(torch.float64)
    E = W - (U[:, :rank] * S[:rank]) @ V[:, :rank].T
    C = layer.covariance
    return float(((E @ C) * E).sum()), float(((W @ C) * W).sum())


def _rel_error(got, want) -> Optional[float]:
    if not isinstance(got, Tensor) or not isinstance(want, Tensor):
        return None
    want64 = want.double()
    denom = float(want64.norm())
    return float((got.double() - want64).norm()) / denom if denom > 0 else float((got.double()).norm())


def _allocate(layers: List[_Layer], cost_kind: str, budget: float, total: float, min_flop_saving: float,
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
    def cost(layer: _Layer, rank: Optional[int]) -> float:
        return layer.flops(rank) if cost_kind == "flops" else layer.params(rank)

    ranks: Dict[str, Optional[int]] = {l.name: None for l in layers}
    energy2 = {l.name: (l.S.double() ** 2) / max(float((l.S.double() ** 2).sum()), 1e-300) for l in layers}
    heap = []

    def push(layer: _Layer) -> None:
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


def _check_fraction(value, arg: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
        raise ValueError(f"{arg} must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_min_rank(min_rank) -> None:
    if isinstance(min_rank, bool) or not isinstance(min_rank, (int, float)):
        raise TypeError(f"min_rank must be an int >= 1 or a fraction of the full rank in (0, 1], got {min_rank!r}")
    if isinstance(min_rank, int) and min_rank < 1 or isinstance(min_rank, float) and not 0.0 < min_rank <= 1.0:
        raise ValueError(f"min_rank must be an int >= 1 or a fraction of the full rank in (0, 1], got {min_rank!r}")


def _resolve_min_rank(min_rank: Union[int, float], full_rank: int) -> int:
    if isinstance(min_rank, float):
        return max(1, math.ceil(min_rank * full_rank - 1e-9))
    return min_rank


def _lowrank_module(layer: _Layer, rank: int) -> nn.Module:
    """The low-rank module of ``layer`` at ``rank`` from its factors."""
    U, S, V = layer.factors
    # Whitened factors (V = L^{-T} V_L) do not have unit columns: fold each column's norm into S so that
    # from_factors splits every rank-1 term evenly between the two layers (the product is unchanged).
    # Otherwise the scale of the whitening lands on one side (measured ~70x apart on ResNet-20), and SGD on
    # the pair diverges in the first fine-tune epoch. Weight-SVD columns have unit norm: a no-op there.
    norms = V[:, :rank].norm(dim=0)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    U, S, V = U[:, :rank], S[:rank] * norms, V[:, :rank] / norms
    if layer.kind == "conv2d":
        return LowRankConv2d.from_factors(layer.module, U, S, V, rank, layer.scheme)
    out_features, in_features = _linear_features(layer.module)
    # from_factors reads the shapes, device, dtype and bias: an HF Conv1D passes as such a Linear
    linear = layer.module if isinstance(layer.module, nn.Linear) else SimpleNamespace(
        in_features=in_features, out_features=out_features, weight=layer.module.weight, bias=layer.module.bias)
    return LowRankLinear.from_factors(linear, U, S, V, rank)


def _output_tensor(output) -> Optional[Tensor]:
    """The tensor a model's output is judged by: the output itself, ``.logits`` (Hugging Face), or the first
    tensor of a tuple/list/dict."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, Tensor)), None)


def _measure_sensitivities(model: nn.Module, layers: List[_Layer], inputs, min_flop_saving: float,
                           progress: bool) -> None:
    """Set each data-aware layer's ``sensitivity``: the relative squared change of the model's output on
    ``inputs`` with only that layer decomposed, at a probe rank halfway through its allowed FLOP-saving ranks,
    over the layer's normalised discarded energy at that rank. Weight-only layers get the median."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    measured = []
    try:
        with torch.no_grad():
            dense = _output_tensor(call_model(model, inputs))
            if dense is None:
                return
            dense = dense.double()
            scale = float(dense.square().sum())
            for layer in tqdm(layers, desc="decompose: sensitivity", unit="layer", leave=False,
                              disable=not progress):
                low, high = layer.lowest_rank(), layer.max_saving_rank(min_flop_saving)
                if not layer.data_aware or high < low or scale == 0:
                    continue
                probe = low + (high - low) // (2 * layer.rank_multiple) * layer.rank_multiple
                lost = layer.discarded(probe)
                if not lost > 0:
                    continue
                _set_submodule(model, layer.name, _lowrank_module(layer, probe))
                try:
                    changed = _output_tensor(call_model(model, inputs)).double()
                finally:
                    _set_submodule(model, layer.name, layer.module)
                layer.sensitivity = float((changed - dense).square().sum()) / scale / lost
                measured.append(layer.sensitivity)
    finally:
        for m, t in flags.items():
            m.train(t)
    if measured:
        median = sorted(measured)[len(measured) // 2]
        for layer in layers:
            if not layer.data_aware:
                layer.sensitivity = median


def _replace(layer: _Layer, rank: Optional[int], model: nn.Module, dense: Optional[nn.Module], data,
             damping: float, training: bool, min_flop_saving: float, skipped: Dict[str, str],
             planned: Dict[str, dict], report_layers: Dict[str, dict], weight_only: Dict[str, str]) -> None:
    """Put the rank-``rank`` layer in place of ``layer`` in ``model`` (or record why it stays dense) and fill
    its plan and report entries. With ``dense`` (asymmetric), a data-aware layer is refitted first on the
    inputs it gets in ``model`` as decomposed so far."""
    if rank is None:
        skipped[layer.name] = (
            "keeping it dense costs less discarded energy within the budget" if layer.max_saving_rank(
                min_flop_saving) else f"no allowed rank (min_rank {layer.lowest_rank()}, multiple of "
            f"{layer.rank_multiple}) saves FLOPs (min_flop_saving={min_flop_saving})")
        return
    if not layer.saves(rank, min_flop_saving):
        skipped[layer.name] = (f"rank {rank} would keep {layer.flop_ratio(rank):.1%} of the layer's FLOPs "
                               f"(min_flop_saving={min_flop_saving})")
        return
    fit_damping, refitted = (damping if layer.data_aware else None), False
    if dense is not None and layer.data_aware and planned:  # the first decomposed layer sees dense inputs
        factors, refit_damping = _asymmetric_factors(layer, dense, model, data, damping, rank)
        if factors is not None:
            layer.factors, fit_damping, refitted = factors, refit_damping, True
    new = _lowrank_module(layer, rank)
    rel_error = None
    if layer.inputs:
        with torch.no_grad():
            errors = [(_rel_error(new(x), y), float(y.double().norm())) for x, y in zip(layer.inputs,
                                                                                       layer.outputs)]
        weight = sum(w for _, w in errors)
        rel_error = sum(e * w for e, w in errors) / weight if weight > 0 else errors[0][0]
    new.train(training)
    output_error, output_energy = _calibration_error(layer, rank) if layer.data_aware else (None, None)
    _set_submodule(model, layer.name, new)
    planned[layer.name] = {"kind": layer.kind, "scheme": layer.scheme, "rank": rank,
                           "data_aware": layer.data_aware}
    report_layers[layer.name] = {
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
        "rel_error": rel_error,
        "output_error": output_error,
        "output_energy": output_energy,
        "sensitivity": layer.sensitivity,
        "refitted": refitted,
        "damping": fit_damping,
    }
    if layer.name in weight_only:
        report_layers[layer.name]["weight_only_reason"] = weight_only[layer.name]


def decompose(
    model: nn.Module,
    *,
    ranks: Optional[Dict[str, int]] = None,
    energy: Optional[float] = None,
    rank_ratio: Optional[float] = None,
    target_flops: Optional[float] = None,
    target_params: Optional[float] = None,
    scheme: str = "channel",
    include: Union[str, Sequence[str], None] = None,
    exclude: Union[str, Sequence[str], None] = None,
    min_flop_saving: float = 0.0,
    example_inputs=None,
    data=None,
    recalibrate: Optional[bool] = None,
    min_rank: Union[int, float] = DEFAULT_MIN_RANK,
    rank_multiple: int = 1,
    damping: float = DEFAULT_DAMPING,
    asymmetric: bool = True,
    sensitivity: bool = True,
    inplace: bool = False,
    progress: bool = True,
) -> Tuple[nn.Module, dict, dict]:
    """Replace Conv2d/Linear layers of ``model`` by ``LowRankConv2d``/``LowRankLinear``.

    Exactly one way of choosing ranks:

    - ``ranks={name: rank}``: these layers at these ranks (taken as given: ``min_rank`` and ``rank_multiple``
      do not apply);
    - ``energy``: per layer the smallest rank keeping ``energy`` (in (0, 1]) of the squared singular values
      (with ``data``: of the layer's output energy on the calibration inputs);
    - ``rank_ratio``: per layer ``round(rank_ratio * full_rank)``;
    - ``target_flops`` / ``target_params``: a fraction in (0, 1] of the whole model's FLOPs (on
      ``example_inputs``, counted like FlopCounterMode) / parameters to keep; ranks are allocated across
      the layers to minimise the total normalised discarded energy ``sum_l sum_{i>r_l} s_i^2 / sum_i s_i^2``
      within the budget (greedy, within one rank step of it). With ``data`` that is the sum of the layers'
      relative output errors on the calibration inputs, each weighted (``sensitivity=True``, default) by the
      layer's measured sensitivity: the relative squared change of the model's output on the first
      calibration batch with only that layer decomposed at a probe rank, over its relative output error (one
      forward pass per layer); without data, of their relative weight errors.

    ``energy``, ``rank_ratio`` and the budgets never give a layer less than ``min_rank`` (an int, or a fraction
    of the layer's full rank, rounded up; default 0.25) and only ranks that are multiples of ``rank_multiple``
    (e.g. 8 for tensor cores; a layer whose smallest allowed rank saves no FLOPs stays dense).

    ``data`` (an iterable of calibration batches: tensors, ``(inputs, target)`` tuples whose first item is
    used, or dicts of keyword inputs; moved to the model's device) makes the decomposition data-aware: each
    layer's float64 input covariance ``C`` (im2col patches of a Conv2d with its stride, padding and dilation,
    subsampled to ``MAX_SAMPLES_PER_BATCH`` per batch; the input features of a Linear) is accumulated in one
    streaming pass, and the factors minimise the layer's output error ``||(W - W_r) X||_F`` through the
    SVD of ``W L``, ``C + damping * mean(diag C) * I = L L^T``. The spatial scheme stays weight-only (its second
    factor mixes the horizontal taps, so its output error is not one whitened SVD), as do layers with more
    than ``MAX_COVARIANCE_DIM`` inputs and layers the data never reaches; ``report["layers"][name]["method"]``
    says which. With ``asymmetric=True`` (default) each data-aware layer is then refitted, in forward order, to
    the dense layer's outputs from the inputs it receives once the layers before it are decomposed
    (``min ||W X - W_r H||_F``, Zhang et al.'s asymmetric reconstruction): one more pass over ``data`` per
    decomposed layer, each stopped at that layer. With ``data`` and ``recalibrate=True`` the BatchNorm statistics of
    the decomposed model are then re-estimated on ``data`` (``rankprune.training.recalibrate``; a model without
    BatchNorm is left as is and ``report["recalibrated"]`` is False). ``recalibrate=None`` (default)
    recalibrates unless data-aware factors were refitted (``asymmetric=True``): the refit makes each
    layer reproduce the dense layer's outputs, for which the existing statistics are the right ones, and each
    refit is computed on the inputs those statistics produce; re-estimating them afterwards undoes part of it.
    Measured (README, exp_quality): better without on ResNet-20 and MobileNetV2, worse without on the built-in
    concatenation model at 50% of the FLOPs; compare on validation data where it matters. A one-shot iterator
    is read into a list first (it is used twice). Without ``example_inputs`` the first batch of ``data`` serves as them.

    Candidates are the ``nn.Conv2d`` (groups=1, zero padding) and ``nn.Linear`` modules whose names match an
    ``include`` pattern (all when None) and no ``exclude`` pattern (fnmatch style, e.g. ``"layer1.*"``); with
    ``ranks`` the candidates are its keys. A layer is skipped (and reported) when its rank would not save FLOPs,
    or would save less than ``min_flop_saving`` of its FLOPs. ``scheme`` ("channel" or "spatial") applies to
    convolutions; linear layers have one scheme ("channel"). ``example_inputs`` (a tensor, a tuple of
    positional arguments or a dict of keyword arguments) are needed for ``target_flops`` and for the FLOPs and
    errors of the report; the passes over inputs and data run in eval mode without gradients and leave the
    model's training flags as they were. ``inplace=False`` works on a deep copy: the caller's model is not
    changed, even when an error is raised. ``progress`` shows progress bars.

    Returns ``(model, plan, report)``: ``plan = {"method": "decompose", "version": 1, "layers": {name:
    {"kind": "conv2d"|"linear", "scheme": ..., "rank": r, "data_aware": bool}}}`` and ``report = {"layers":
    {name: {kind, scheme, method, rank, full_rank, energy_kept, params_dense, params, flops_dense, flops,
    rel_error, output_error, output_energy, sensitivity, refitted, damping}}, "skipped": {name: reason},
    "total": {params_dense, params, flops_dense, flops, output_rel_error}, "recalibrated": bool}``.
    ``refitted`` says whether the asymmetric refit was kept; ``damping`` is the damping of the layer's data-aware
    fit (None for weight SVD): raised tenfold, up to ``REFIT_DAMPING_STEPS`` times, when the refit would make
    the weight more than ``MAX_REFIT_GROWTH`` times the dense one (an under-determined regression, e.g. a
    classifier with fewer calibration images than features), and the symmetric fit kept when that does not
    suffice. ``output_error`` and ``output_energy``
    (data-aware layers, else None) are ``||(W - W_r) X||_F^2`` and ``||W X||_F^2`` summed over the
    calibration columns (the dense model's inputs), in float64; ``sensitivity`` is the measured weight (1.0
    when not measured); ``energy_kept`` is ``1 - `` the normalised discarded energy above;
    ``rel_error`` is the layer's relative output error on ``example_inputs``. FLOPs and ``rel_error`` are None
    without example inputs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    chosen = [k for k, v in dict(ranks=ranks, energy=energy, rank_ratio=rank_ratio, target_flops=target_flops,
                                  target_params=target_params).items() if v is not None]
    if len(chosen) != 1:
        raise ValueError("give exactly one of ranks, energy, rank_ratio, target_flops, target_params; got "
                         + (", ".join(chosen) if chosen else "none"))
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if not isinstance(min_flop_saving, (int, float)) or not 0.0 <= min_flop_saving < 1.0:
        raise ValueError(f"min_flop_saving must be a number in [0, 1), got {min_flop_saving!r}")
    _check_min_rank(min_rank)
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be an int >= 1, got {rank_multiple!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0.0:
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    if energy is not None:
        _check_fraction(energy, "energy")
    if rank_ratio is not None:
        _check_fraction(rank_ratio, "rank_ratio")
    for arg, value in (("target_flops", target_flops), ("target_params", target_params)):
        if value is not None:
            _check_fraction(value, arg)
    if data is not None:
        if isinstance(data, (Tensor, dict)) or not hasattr(data, "__iter__"):
            raise TypeError("data must be an iterable of calibration batches (e.g. a DataLoader or a list of "
                            f"tensors), got {type(data).__name__}")
        if iter(data) is data:  # a one-shot iterator: read it once, it is used for covariances and recalibration
            data = list(data)
    if isinstance(example_inputs, (tuple, list)) and not example_inputs:
        example_inputs = None  # an empty tuple: no inputs to run
    if example_inputs is None and data is not None:
        first = next(iter(data), None)
        if first is None:
            raise ValueError("decompose: data holds no batches (empty calibration data)")
        example_inputs = batch_inputs(first)
        params = list(model.parameters())
        if params:
            example_inputs = to_device(example_inputs, params[0].device)
    has_inputs = example_inputs is not None
    if target_flops is not None and not has_inputs:
        raise ValueError("target_flops needs example_inputs (or data) to count FLOPs")
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    _warn_unmatched(model, include_p)

    if not inplace:
        model = copy.deepcopy(model)
    skipped: Dict[str, str] = {}
    layers: Dict[str, _Layer] = {}
    unreplaceable = _unreplaceable(model)
    if ranks is not None:
        if not isinstance(ranks, dict):
            raise TypeError(f"ranks must be a dict {{module name: rank}}, got {type(ranks).__name__}")
        modules = dict(model.named_modules())
        for name, rank in ranks.items():
            if name not in modules:
                raise ValueError(f"ranks names {name!r}, which is not a module of the model")
            kind = _kind(modules[name])
            if kind is None:
                raise ValueError(f"ranks names {name!r}, a {type(modules[name]).__name__}; only Conv2d and "
                                 "Linear layers can be decomposed")
            if kind == "conv2d":
                check_decomposable_conv(modules[name])
            if name in unreplaceable:
                raise ValueError(f"ranks names {name!r}, which cannot be decomposed: {unreplaceable[name]}")
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(f"ranks[{name!r}] must be a positive int, got {rank!r}")
            layers[name] = _Layer(name, modules[name], kind, scheme if kind == "conv2d" else "channel")
    else:
        for name, module in model.named_modules():
            kind = _kind(module)
            if kind is None or not name:
                continue
            if (include_p is not None and not _matches(name, include_p)) or (
                exclude_p is not None and _matches(name, exclude_p)
            ):
                continue
            if name in unreplaceable:
                skipped[name] = unreplaceable[name]
                continue
            if kind == "conv2d":
                try:
                    check_decomposable_conv(module)
                except ValueError as exc:
                    skipped[name] = str(exc)
                    continue
            layers[name] = _Layer(name, module, kind, scheme if kind == "conv2d" else "channel")

    weight_only: Dict[str, str] = {}  # data given, but this layer keeps weight SVD: why
    if data is not None:
        covariance_layers = []
        for layer in layers.values():
            d = layer.in_dim
            if layer.scheme == "spatial":
                weight_only[layer.name] = "the spatial scheme is factored by weight SVD"
            elif d > MAX_COVARIANCE_DIM:
                weight_only[layer.name] = (f"{d} inputs: the covariance would exceed {MAX_COVARIANCE_DIM}^2 "
                                           "entries")
            else:
                covariance_layers.append(layer)
        _collect_covariances(model, data, covariance_layers, progress)
        for layer in covariance_layers:
            if layer.samples == 0:
                layer.covariance = None
                weight_only[layer.name] = "the calibration data never reaches it"

    dense_output, flops_dense = _run(model, example_inputs, layers, record=True) if has_inputs else (None, None)
    params_dense = sum(p.numel() for p in model.parameters())

    for layer in tqdm(layers.values(), desc="decompose: SVD", unit="layer", leave=False, disable=not progress):
        layer.min_rank = _resolve_min_rank(min_rank, layer.full_rank)
        layer.rank_multiple = rank_multiple
        # the one rank needed, when known before the SVD
        needed = ranks.get(layer.name) if ranks is not None else (
            layer.allowed(max(1, round(rank_ratio * layer.full_rank))) if rank_ratio is not None else None)
        if needed is not None and needed > layer.full_rank:
            raise ValueError(f"ranks[{layer.name!r}] = {needed} exceeds the layer's full rank {layer.full_rank}")
        if layer.data_aware:
            layer.factors = _whitened_factors(layer, damping, needed)
        else:
            layer.factors = _factor(layer, layer.matrix().to(torch.float64), needed)
        layer.S = layer.factors[1]

    candidates = list(layers.values())
    if ranks is not None:
        chosen_ranks = {l.name: ranks[l.name] for l in candidates}
    elif energy is not None:
        chosen_ranks = {l.name: l.allowed(select_rank(l.S, None, energy)) for l in candidates}
    elif rank_ratio is not None:
        chosen_ranks = {l.name: l.allowed(max(1, round(rank_ratio * l.full_rank))) for l in candidates}
    else:
        if target_flops is not None:
            kind, fraction, total = "flops", target_flops, float(flops_dense)
        else:
            kind, fraction, total = "params", target_params, float(params_dense)
        if data is not None and sensitivity:
            probe_inputs = to_device(batch_inputs(next(iter(data))), next(iter(model.parameters())).device)
            _measure_sensitivities(model, candidates, probe_inputs, min_flop_saving, progress)
        chosen_ranks = _allocate(candidates, kind, fraction * total, total, min_flop_saving,
                                 "target_flops" if kind == "flops" else "target_params")

    planned: Dict[str, dict] = {}
    report_layers: Dict[str, dict] = {}
    # asymmetric: refit each data-aware layer, in forward order, on the inputs it gets once the layers before
    # it are decomposed, against the outputs of the dense model (a copy kept for that)
    dense = copy.deepcopy(model).eval() if data is not None and asymmetric else None
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for layer in sorted(candidates, key=lambda l: l.order):
            _replace(layer, chosen_ranks.get(layer.name), model, dense, data, damping, flags[layer.module],
                     min_flop_saving, skipped, planned, report_layers, weight_only)
    finally:
        for m, t in flags.items():
            m.train(t)
    del dense
    report_layers = {l.name: report_layers[l.name] for l in candidates if l.name in report_layers}
    planned = {l.name: planned[l.name] for l in candidates if l.name in planned}
    for layer in candidates:  # drop the recorded activations and covariances
        layer.inputs.clear()
        layer.outputs.clear()
        layer.covariance = None

    if recalibrate is None:  # refitted factors keep the statistics they were fitted with (see the docstring)
        recalibrate = not (asymmetric and any(entry["data_aware"] for entry in planned.values()))
    recalibrated = (data is not None and recalibrate and bool(planned)
                    and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()))
    if recalibrated:
        training.recalibrate(model, data, progress=progress)
    output, flops = _run(model, example_inputs, {}, record=False) if has_inputs else (None, None)
    report = {
        "layers": report_layers,
        "skipped": skipped,
        "total": {
            "params_dense": params_dense,
            "params": sum(p.numel() for p in model.parameters()),
            "flops_dense": flops_dense,
            "flops": flops,
            "output_rel_error": _rel_error(output, dense_output) if has_inputs else None,
        },
        "recalibrated": recalibrated,
    }
    plan = {"method": "decompose", "version": PLAN_VERSION, "layers": planned}
    return model, plan, report


def apply_decompose_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Replace, in place, the layers named by a ``decompose`` plan with low-rank layers of the planned ranks
    (weights uninitialised in the sense of a fresh module: load the state_dict saved after decomposition).
    Returns ``model``. Raises ValueError when the plan does not fit the model."""
    entries = plan_layers(plan, "decompose", "{kind, scheme, rank[, data_aware]}")
    modules = dict(model.named_modules())
    for name, entry in entries.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"plan names {name!r}, which is not a module of the model")
        kind, scheme, rank = entry.get("kind"), entry.get("scheme"), entry.get("rank")
        if _kind(module) != kind:
            raise ValueError(f"plan says {name!r} is a {kind}, the model has a {type(module).__name__}")
        w = module.weight
        if kind == "conv2d":
            check_decomposable_conv(module)
            new = LowRankConv2d(module.in_channels, module.out_channels, module.kernel_size, rank, module.stride,
                                _explicit_padding(module), module.dilation, bias=module.bias is not None, scheme=scheme,
                                device=w.device, dtype=w.dtype)
        else:
            out_features, in_features = _linear_features(module)
            new = LowRankLinear(in_features, out_features, rank, bias=module.bias is not None,
                                device=w.device, dtype=w.dtype)
        new.train(module.training)
        _set_submodule(model, name, new)
    return model


__all__ = ["decompose", "apply_decompose_plan"]
