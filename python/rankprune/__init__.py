"""rankprune: compress PyTorch networks by energy and rank.

Ops (batched singular values, truncated SVD, fused low-rank convolution) live in `rankprune.ops`;
the model-level verbs are re-exported here.
"""
import importlib

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import data, export, lowrank, models, nn, ops, report, scoring, training, trp
from .export import export_onnx, onnx_translation_table, to_plain
from .lowrank import decompose
from .plans import apply_plan
from ._version import __version__
from .training import recalibrate
from .trp import TrainedRankPruner

__all__ = [
    "ops", "nn", "data", "models", "report", "scoring", "training", "trp", "lowrank", "decompose", "prune",
    "recalibrate", "apply_plan", "apply_prune_plan", "TrainedRankPruner", "export", "to_plain", "export_onnx",
    "onnx_translation_table", "__version__",
]

# Channel pruning runs on Torch-Pruning's dependency graph, so `rankprune.pruning` imports torch_pruning at its
# top. It is loaded on first use (PEP 562) so that the ops, scoring, decomposition and TRP work on a machine
# without torch-pruning (a bare GPU box, say); torch-pruning stays a declared dependency.
_LAZY = {"pruning": None, "prune": "pruning", "apply_prune_plan": "pruning"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(".pruning", __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
