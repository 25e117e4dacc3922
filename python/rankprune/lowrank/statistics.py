"""The float64 statistics a data-aware decomposition accumulates over a layer's calibration columns ``X``
(``[d, n]``: ``d`` inputs, ``n`` columns over all batches) and, for the refit, the dense outputs ``Y``
(``[m, n]``) at the same columns: the covariance ``X X^T`` and the cross product ``X Y^T``.

Where a layer sees no more columns than it has inputs (``n <= d``: ResNet-18's 4608-input convolutions see 1568
columns at 32 images), the columns themselves are kept instead: every quantity the factoring needs then costs
``n d`` per column instead of ``d^2`` (the products ``W X``, the ``n x n`` kernel ``X^T X``), and they take no
more memory than the products would. The first batch that takes the count past ``d`` folds the kept columns
into the products, which are then accumulated as usual."""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

# Layers with at least this many inputs form each batch's products (X^T X, H^T H, H^T Y, and the sample-space
# products W X, X^T X) in the model's dtype before adding them to the float64 accumulators: these GEMMs (rows x
# d^2 per call) dominate the statistics of large layers (ResNet-50's 4608-input convolutions), and float32 runs
# them twice as fast on CPUs. The rounding (about 1e-7 * sqrt(rows) of an entry) stays far below the default
# damping (1e-4 of the mean diagonal); smaller layers, which cost little, keep float64 products (exact enough
# for damping=0 fits).
FLOAT64_PRODUCT_MAX_DIM = 1024
# Inputs per block of a blocked Gram product (``accumulate_gram``): smaller blocks skip more of the product but
# run below the GEMM's peak.
GRAM_BLOCK = 1024


def product_dtype(a: Tensor) -> torch.dtype:
    """The dtype the products of ``a`` (``[n, d]``) are formed in (see ``FLOAT64_PRODUCT_MAX_DIM``)."""
    return torch.float64 if a.shape[1] < FLOAT64_PRODUCT_MAX_DIM else a.dtype


def accumulate(total: Tensor, a: Tensor, b: Tensor) -> None:
    """``total += a^T b`` (float64 ``total``; the product in ``product_dtype(a)``)."""
    if product_dtype(a) == torch.float64:
        total.addmm_(a.T.to(torch.float64), b.to(torch.float64))
    else:
        total += (a.T @ b.to(a.dtype)).to(torch.float64)


def accumulate_gram(total: Tensor, a: Tensor) -> None:
    """``total += a^T a``. From ``GRAM_BLOCK`` inputs on, only the blocks on and above the diagonal are multiplied
    (each off-diagonal one added twice, transposed), which saves up to half of the product (torch has no
    symmetric rank-k update): 5 blocks of a 4608-input layer cost 15/25 of the full product."""
    d = a.shape[1]
    if d < GRAM_BLOCK:
        accumulate(total, a, a)
        return
    a = a.to(product_dtype(a))
    edges = [round(i * d / math.ceil(d / GRAM_BLOCK)) for i in range(math.ceil(d / GRAM_BLOCK) + 1)]
    blocks = list(zip(edges[:-1], edges[1:]))
    for i, (r0, r1) in enumerate(blocks):
        for c0, c1 in blocks[i:]:
            product = (a[:, r0:r1].mT @ a[:, c0:c1]).to(torch.float64)
            total[r0:r1, c0:c1] += product
            if c0 != r0:
                total[c0:c1, r0:r1] += product.mT


class ColumnStatistics:
    """``C = X X^T`` (and, with ``outputs > 0``, ``X Y^T``) of the rows ``X^T`` ``[n, d]`` (and ``Y^T`` ``[n, m]``)
    added batch by batch: as the float64 products, or, with ``keep_columns`` while ``n <= d``, as the rows
    themselves (see the module docstring). Under ``torch.distributed`` the caller passes
    ``keep_columns=False``: the ranks sum the products (``products``)."""

    def __init__(self, inputs: int, outputs: int, device, keep_columns: bool):
        self.d, self.m, self.device = inputs, outputs, device
        self.samples = 0
        self.gram: Optional[Tensor] = None  # X X^T, [d, d]
        self.cross: Optional[Tensor] = None  # X Y^T, [d, m]
        self._kept: Optional[List[Tuple[Tensor, Optional[Tensor]]]] = [] if keep_columns else None
        self._rows: Optional[Tuple[Tensor, Tensor]] = None  # (X^T, Y^T), joined once
        self._kernel: Optional[Tensor] = None
        if not keep_columns:
            self._allocate()

    def _allocate(self) -> None:
        self.gram = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.device)
        if self.m:
            self.cross = torch.zeros(self.d, self.m, dtype=torch.float64, device=self.device)

    def _accumulate(self, x: Tensor, y: Optional[Tensor]) -> None:
        accumulate_gram(self.gram, x)
        if self.m:
            accumulate(self.cross, x, y)

    def add(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        """Add the rows ``x`` ``[k, d]`` (and their targets ``y`` ``[k, m]``, float64)."""
        self.samples += x.shape[0]
        self._rows = self._kernel = None  # formed from the rows added so far
        if self._kept is not None:
            if self.samples <= self.d:
                self._kept.append((x.to(product_dtype(x)), y))
                return
            self._allocate()  # from here on the products, starting with the rows kept so far
            for kept_x, kept_y in self._kept:
                self._accumulate(kept_x, kept_y)
            self._kept = None
        self._accumulate(x, y)

    @property
    def in_sample_space(self) -> bool:
        """Whether the rows are kept (``rows``) rather than the products (``gram``, ``cross``)."""
        return self._kept is not None

    def products(self) -> List[Tensor]:
        """The accumulated products (to sum over ranks); none while the rows are kept."""
        return [t for t in (self.gram, self.cross) if t is not None]

    def rows(self) -> Tuple[Tensor, Tensor]:
        """``(X^T [n, d], Y^T [n, m] or an empty [n, 0])`` of the kept rows, joined once."""
        if self._rows is None:
            xs = [x for x, _ in self._kept]
            x = torch.cat(xs) if xs else torch.zeros(0, self.d, dtype=torch.float64, device=self.device)
            ys = [y for _, y in self._kept if y is not None]
            y = torch.cat(ys) if ys else torch.zeros(x.shape[0], 0, dtype=torch.float64, device=self.device)
            self._rows = (x, y)
            self._kept = [(x, y)]
        return self._rows

    def kernel(self) -> Tensor:
        """``X^T X`` ``[n, n]`` (float64) of the kept rows, formed once."""
        if self._kernel is None:
            x = self.rows()[0]
            self._kernel = (x @ x.mT).to(torch.float64)
        return self._kernel

    def diagonal(self) -> Tensor:
        """``diag(X X^T)`` (float64)."""
        if self.in_sample_space:
            return self.rows()[0].to(torch.float64).square().sum(0)
        return self.gram.diagonal()

    def times(self, B: Tensor) -> Tensor:
        """``X X^T B`` for a float64 ``B`` ``[d, k]``."""
        if self.in_sample_space:
            x = self.rows()[0].to(torch.float64)
            return x.mT @ (x @ B)
        return self.gram @ B

    def quadratic(self, W: Tensor) -> Tensor:
        """``W X X^T W^T`` for a float64 ``W`` ``[k, d]`` (``k x k``)."""
        if self.in_sample_space:
            x = self.rows()[0]
            outputs = (x @ W.mT.to(x.dtype)).to(torch.float64)  # (W X)^T: [n, k]
            return outputs.mT @ outputs
        return (W @ self.gram) @ W.mT

    def matrix(self) -> Tensor:
        """``X X^T`` ``[d, d]`` (formed from the rows where they are kept)."""
        if self.in_sample_space:
            x = self.rows()[0]
            gram = torch.zeros(self.d, self.d, dtype=torch.float64, device=x.device)
            accumulate_gram(gram, x)
            return gram
        return self.gram
