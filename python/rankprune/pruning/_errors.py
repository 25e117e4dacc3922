"""The one exception channel pruning raises for a model or layer it cannot handle."""
import contextlib

from torch import nn

from . import _torch_pruning as tpa


class PruningError(ValueError):
    """Channel pruning cannot handle this model or layer; the message names the layer and the reason."""


@contextlib.contextmanager
def torch_pruning_errors(model: nn.Module, doing: str):
    """Re-raise any exception from Torch-Pruning while ``doing`` as a :class:`PruningError` that names the
    graph node (and the nearest layer before it) where it happened."""
    try:
        yield
    except PruningError:
        raise
    except Exception as exc:
        node = tpa.failing_node(exc)
        where = ""
        if node is not None:
            names = {m: n for n, m in model.named_modules()}
            near = tpa.nearest_module_name(node, names)
            where = f" at {node.name.split(' (')[0]}" + (f" after layer {near!r}" if near else "")
            if tpa.is_reshape(node):
                where += (" (a reshape of the channel dimension, such as a channel shuffle or a view/transpose"
                          " between channels and groups, whose channel mapping Torch-Pruning cannot follow)")
        raise PruningError(f"cannot prune {type(model).__name__}: Torch-Pruning failed while {doing}{where}: "
                           f"{type(exc).__name__}: {exc}") from exc
