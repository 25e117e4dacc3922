"""rankprune: compress PyTorch networks by energy and rank.

Ops (batched singular values, truncated SVD, fused low-rank convolution) live in `rankprune.ops`;
the model-level verbs are re-exported here.
"""
import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import data, export, lowrank, models, nn, ops, report, scoring, training, trp
from .export import export_onnx, onnx_translation_table, to_plain
from .lowrank import decompose
from .plans import apply_plan
from .pruning import apply_prune_plan, prune
from .training import recalibrate
from .trp import TrainedRankPruner

__version__ = "0.1.0"

__all__ = [
    "ops", "nn", "data", "models", "report", "scoring", "training", "trp", "lowrank", "decompose", "prune",
    "recalibrate", "apply_plan", "apply_prune_plan", "TrainedRankPruner", "export", "to_plain", "export_onnx",
    "onnx_translation_table", "__version__",
]
