"""rankprune: compress PyTorch networks by energy and rank.

Ops (batched singular values, truncated SVD, fused low-rank convolution) live in `rankprune.ops`;
the model-level verbs are re-exported here. Plans of every verb are applied by :func:`apply_plan`.
"""
import importlib

from ._version import __version__

# Every submodule and re-exported name is imported on first use (PEP 562): `import rankprune` and the CLI's
# `--help` load neither torch nor the extension, and each verb loads only what it needs. Channel pruning runs
# on Torch-Pruning's dependency graph, so `rankprune.pruning` (which imports torch_pruning at its top) is only
# loaded by `prune` / `apply_prune_plan`: the ops, scoring, decomposition and TRP work on a machine without
# torch-pruning (a bare GPU box, say); torch-pruning stays a declared dependency.
_SUBMODULES = ("ops", "nn", "data", "models", "report", "scoring", "training", "trp", "lowrank", "export",
               "pruning", "plans", "calibration", "benchmark", "fidelity", "hybrid", "latency")
_NAMES = {  # re-exported name -> the submodule that defines it
    "decompose": "lowrank", "prune": "pruning", "apply_prune_plan": "pruning", "recalibrate": "training",
    "apply_plan": "plans", "TrainedRankPruner": "trp", "export_onnx": "export", "to_plain": "export",
    "onnx_translation_table": "export", "compress": "hybrid",
}

__all__ = [
    "ops", "nn", "data", "models", "report", "scoring", "training", "trp", "lowrank", "decompose", "prune",
    "compress", "recalibrate", "apply_plan", "apply_prune_plan", "TrainedRankPruner", "export", "to_plain",
    "export_onnx", "onnx_translation_table", "__version__",
]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it as an attribute too
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_NAMES))
