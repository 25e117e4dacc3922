"""Linear algebra shared by decomposition and pruning."""
from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor


def damped_cholesky(matrix: Tensor, shifts: Iterable[float], what: str,
                    damped: Optional[int] = None) -> Tuple[Tensor, float]:
    """``(L, shift)``: the lower Cholesky factor of ``matrix + shift * I`` for the first of ``shifts`` with which
    it succeeds (dead or duplicate inputs make a covariance singular; the callers raise the damping tenfold at
    each try). The shift goes on the first ``damped`` diagonal entries only (all by default); no ``d x d``
    identity is formed. Raises ValueError naming ``what`` when every shift fails."""
    d = matrix.shape[0] if damped is None else damped
    shift = 0.0
    for shift in shifts:
        shifted = matrix.clone()
        shifted.diagonal()[:d].add_(shift)
        L, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            return L, shift
    raise ValueError(f"{what} is not positive definite even with a shift of {shift:g} on its diagonal; it cannot "
                     "be factored on this data")
