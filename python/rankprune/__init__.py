"""rankprune: compress PyTorch networks by energy and rank.

Ops (batched singular values, truncated SVD, fused low-rank convolution) live in `rankprune.ops`;
the model-level verbs are re-exported here.
"""
import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import ops
from . import trp
from .trp import TrainedRankPruner

__version__ = "0.1.0"

__all__ = ["ops", "trp", "TrainedRankPruner", "__version__"]
