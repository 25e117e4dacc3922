"""The cost model of a decomposition candidate: a Conv2d or Linear layer with its shapes on the example inputs,
its factors, and what each rank costs (FLOPs counted like ``torch.utils.flop_counter.FlopCounterMode``: 2 per
multiply-add, convolutions and matrix products only; ``rankprune.ops.lowrank_conv2d`` counts as its two
convolutions) and loses (the normalised discarded energy of its factored matrix)."""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

from ..nn import _explicit_padding as explicit_padding
from ..nn import weight_matrix
from .statistics import ColumnStatistics


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2): a Linear whose weight is ``[in, out]``
    (``y = x @ weight + bias``), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_features(module: nn.Module) -> Tuple[int, int]:
    """``(out_features, in_features)`` of an nn.Linear or a Hugging Face Conv1D."""
    if is_hf_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def layer_kind(module: nn.Module) -> Optional[str]:
    """"conv2d", "linear" (nn.Linear or a Hugging Face Conv1D), or None for anything else."""
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "linear"
    return None


@dataclass
class Candidate:
    """One candidate layer: its shapes on the example inputs, its factors and the statistics they came from."""

    name: str
    module: nn.Module
    kind: str  # "conv2d" | "linear"
    scheme: str
    inputs: List[Tensor] = field(default_factory=list)
    outputs: List[Tensor] = field(default_factory=list)
    S: Optional[Tensor] = None
    factors: Optional[Tuple[Tensor, Tensor, Tensor]] = None
    # data-aware: the float64 input covariance X X^T (None: weight SVD) and the number of columns in it
    covariance: Optional[ColumnStatistics] = None
    samples: int = 0
    # data-aware: tr(W C W^T), the dense layer's output energy on the calibration inputs (set with the factors)
    output_energy: Optional[float] = None
    order: float = math.inf  # position of its first call in a calibration pass
    # measured: relative squared change of the model's output per unit of the layer's normalised discarded
    # energy (1: not measured); weighs the layer's errors in the budget allocation
    sensitivity: float = 1.0
    # squared Frobenius norm of the factored matrix when S is truncated (randomized SVD), else None
    energy: Optional[float] = None
    min_rank: int = 1
    rank_multiple: int = 1
    index: int = 0  # position among the candidates: seeds the subsample of its calibration columns
    stage: int = 0  # refit stage (layers of one stage read the same input tensor)
    # dense inputs kept for the refit, per (batch, call): the columns X, or W X where that is smaller
    dense_rows: Dict[Tuple[int, int], Tensor] = field(default_factory=dict)
    dense_rows_are_outputs: bool = False

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
            n_out, n_in = linear_features(m)
            per_row = n_in * n_out if rank is None else rank * (n_in + n_out)
            return 2 * rows * per_row
        n, c, kh, kw = m.weight.shape
        if shape is None:
            b, h_in, w_in = 1, 1, 1
            h_out = w_out = 1
        else:
            b, _, h_in, w_in = shape
            pad = explicit_padding(m)
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
        return w.T if is_hf_conv1d(self.module) else weight_matrix(w, self.scheme)

    @property
    def in_dim(self) -> int:
        """Inputs per output of the channel-scheme matrix: ``C*kh*kw`` of a Conv2d, ``in`` of a Linear."""
        w = self.module.weight
        return w.shape[0] if is_hf_conv1d(self.module) else w[0].numel()

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
        """Whether ``rank`` keeps fewer FLOPs than dense, and at most ``1 - min_flop_saving`` of them."""
        ratio = self.flop_ratio(rank)
        return ratio < 1.0 and ratio <= 1.0 - min_flop_saving

