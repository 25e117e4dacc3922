"""Loads the compiled extension, which registers the ``rankprune::*`` schemas and kernels."""
import torch  # noqa: F401

try:
    from .. import _C
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "rankprune's compiled extension (rankprune._C) could not be imported. Build it against the torch "
        "you run with: `pip install --no-build-isolation -e .` (see README). Original error: " + str(exc)
    ) from exc


def cuda_kernels_built() -> bool:
    return bool(_C.cuda_kernels_built())
