"""Everything rankprune reaches in Torch-Pruning beyond its documented API, in one place.

The rest of the pruning package calls these functions and never imports Torch-Pruning's private modules
(``torch_pruning._helpers``, ``torch_pruning.dependency.node``, ``torch_pruning.pruner.function``) nor reads
an underscored attribute of its objects; a Torch-Pruning upgrade that moves them is fixed here. Imported by
``rankprune.pruning`` only, which ``rankprune`` loads on first use, so that the rest of the library works
without torch-pruning installed.
"""
from typing import Any, Dict, List, Optional, Sequence

import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers as tp_helpers
from torch_pruning.dependency.node import Node
from torch_pruning.pruner import function as tp_function

Importance = tp.importance.Importance

# TP pruning functions that remove a conv's output channels (the ones our scores describe).
CONV_OUT_FNS = {tp_function.prune_conv_out_channels, tp_function.prune_depthwise_conv_out_channels}


def build_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced on one forward of ``example_inputs``."""
    return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)


def group_model(group) -> nn.Module:
    """The model of the dependency graph a group was taken from."""
    return group._DG.model


def is_reshape(node: Node) -> bool:
    return node.type == tp.ops.OPTYPE.RESHAPE


def is_parameter(node: Node) -> bool:
    return node.type == tp.ops.OPTYPE.PARAMETER


def parameter_name(graph: tp.DependencyGraph, parameter: nn.Parameter) -> str:
    """The name of an unwrapped parameter node's parameter (e.g. ConvNeXt's ``layer_scale``)."""
    return graph._param_to_name[parameter]


def plain_idxs(idxs: Sequence) -> List[int]:
    """The item's own channel positions of a group item's indices."""
    return tp_helpers.to_plain_idxs(idxs)


def root_idxs(idxs: Sequence) -> List[Optional[int]]:
    """The root positions of a group item's indices (None where unknown)."""
    return tp_helpers.to_root_idxs(idxs)


def are_hybrid(idxs: Sequence) -> bool:
    """Whether a group item's indices carry both plain and root positions (Torch-Pruning's hybrid indices)."""
    return len(idxs) > 0 and isinstance(idxs[0], tp_helpers._HybridIndex)


def layer_pruner(module: nn.Module):
    """Torch-Pruning's per-layer pruning functions for ``module`` (``prune_out_channels``,
    ``get_in_channels``, ...), or None for a module type it cannot prune."""
    return tp_function.PrunerBox.get(tp.ops.module2type(module))


def failing_node(exc: BaseException) -> Optional[Node]:
    """A Torch-Pruning graph node held by the innermost frame ``exc`` went through that holds one (a reshape
    node when there is one)."""
    nodes: List[Node] = []
    tb = exc.__traceback__
    while tb is not None:
        in_frame = [v for v in tb.tb_frame.f_locals.values() if isinstance(v, Node)]
        nodes = in_frame or nodes
        tb = tb.tb_next
    reshapes = [n for n in nodes if is_reshape(n)]  # the usual culprit
    return (reshapes or nodes or [None])[0]


def nearest_module_name(node: Node, names: Dict[Any, str]) -> Optional[str]:
    """The name of the closest module upstream of ``node`` (itself included), breadth first."""
    seen, frontier = set(), [node]
    while frontier:
        nxt = []
        for n in frontier:
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.module in names:
                return names[n.module]
            nxt.extend(n.inputs)
        frontier = nxt
    return None
