"""Deploying compressed models without rankprune: plain PyTorch modules and ONNX.

- :func:`to_plain` replaces every ``LowRankConv2d`` / ``LowRankLinear`` by an ``nn.Sequential`` of the two
  plain ``nn.Conv2d`` / ``nn.Linear`` layers it holds (children named ``first`` and ``second``, so the
  state_dict keys do not change). The result computes the same numbers with stock PyTorch ops only, so
  ``torch.export`` programs of it load where rankprune is not installed, and every ONNX exporter handles it.
- :func:`export_onnx` exports a model that still holds ``LowRankConv2d`` layers: the fused op
  ``rankprune::lowrank_conv2d`` becomes two ONNX ``Conv`` nodes, through :func:`onnx_translation_table`
  for the ``torch.export``-based exporter (``dynamo=True``, the default) or through
  :func:`register_onnx_symbolic` for the legacy TorchScript exporter (``dynamo=False``).
- :func:`onnx_max_abs_diff` runs an ONNX file in ONNX Runtime (CPU) and compares it with the PyTorch model.

ONNX export needs the optional packages ``onnx`` and ``onnxscript`` (and ``onnxruntime`` to run the file).
"""
import contextlib
import copy
import inspect
import logging
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.utils._pytree as pytree
from torch import nn

from ._inputs import call_model
from .nn import LowRankConv2d, LowRankLinear

_LOWRANK_TYPES = (LowRankConv2d, LowRankLinear)


def _plain_pair(layer: nn.Module) -> nn.Sequential:
    # The children keep their names, so ``layer.first.weight`` stays ``<name>.first.weight``.
    return nn.Sequential(OrderedDict(first=layer.first, second=layer.second))


def to_plain(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every ``LowRankConv2d`` and ``LowRankLinear`` replaced by ``nn.Sequential(first,
    second)`` of its two plain ``nn.Conv2d`` / ``nn.Linear`` layers: the same function, the same parameters
    and state_dict keys, built from stock PyTorch modules only (the channel scheme's fused op becomes its two
    convolutions).

    Use it before ``torch.export.save`` or ``torch.save`` of a model that must load without rankprune, or for
    runtimes that do not know rankprune's op. ``inplace=False`` (default) returns a converted deep copy and
    leaves ``model`` untouched; ``inplace=True`` converts ``model`` itself and returns it (a model that *is* a
    low-rank layer is returned as a new ``nn.Sequential`` either way).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_plain expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, _LOWRANK_TYPES):
        return _plain_pair(model)
    # Collect first: replacing children while named_modules() walks them would skip or revisit modules.
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, _LOWRANK_TYPES)]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _plain_pair(layer))
    return model


def _onnx_conv_pads(padding) -> List[int]:
    # ONNX Conv pads are [top, left, bottom, right]; the low-rank layers pad symmetrically.
    return [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])]


def _lowrank_conv2d_onnx(x, w1, w2, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """ONNX translation of ``rankprune::lowrank_conv2d`` for the ``torch.export``-based exporter: the k x k
    convolution to ``r`` channels, then the 1x1 convolution holding the bias."""
    from onnxscript import opset18 as op

    mid = op.Conv(x, w1, strides=[int(s) for s in stride], pads=_onnx_conv_pads(padding),
                  dilations=[int(d) for d in dilation])
    return op.Conv(mid, w2) if bias is None else op.Conv(mid, w2, bias)


def onnx_translation_table() -> Dict[Callable, Callable]:
    """``{torch.ops.rankprune.lowrank_conv2d.default: translation}`` for
    ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``: the fused op becomes two ONNX
    ``Conv`` nodes (no custom domain, so any ONNX runtime runs the file). Merge it with your own table if you
    have one; :func:`export_onnx` passes it for you."""
    return {torch.ops.rankprune.lowrank_conv2d.default: _lowrank_conv2d_onnx}


def _lowrank_conv2d_symbolic(g, x, w1, w2, bias, stride, padding, dilation):
    from torch.onnx import symbolic_helper

    stride, padding, dilation = (symbolic_helper._parse_arg(v, "is") for v in (stride, padding, dilation))
    mid = g.op("Conv", x, w1, strides_i=stride, pads_i=_onnx_conv_pads(padding), dilations_i=dilation)
    return g.op("Conv", mid, w2) if symbolic_helper._is_none(bias) else g.op("Conv", mid, w2, bias)


def register_onnx_symbolic(opset_version: int = 9) -> None:
    """Teach the legacy TorchScript ONNX exporter (``torch.onnx.export(..., dynamo=False)``) to write
    ``rankprune::lowrank_conv2d`` as two ONNX ``Conv`` nodes, for opsets from ``opset_version`` on.

    Not done at import: PyTorch deprecates ``register_custom_op_symbolic`` together with that exporter, and
    most users never need it. :func:`export_onnx` calls it when given ``dynamo=False``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        torch.onnx.register_custom_op_symbolic("rankprune::lowrank_conv2d", _lowrank_conv2d_symbolic, opset_version)


def export_onnx(model: nn.Module, args: Any, path: str, **export_kwargs):
    """``torch.onnx.export(model, args, path, **export_kwargs)`` that also translates rankprune's fused
    low-rank convolution (into two ONNX ``Conv`` nodes), so a model decomposed by ``rankprune.decompose`` or
    ``TrainedRankPruner.finalize`` exports as it is. Returns what ``torch.onnx.export`` returns.

    ``args`` is a tensor or a tuple of positional inputs (keyword inputs go in ``kwargs=``, as for
    ``torch.onnx.export``). With ``dynamo=True`` (the default) :func:`onnx_translation_table` is merged under
    any ``custom_translation_table`` you pass; with ``dynamo=False`` :func:`register_onnx_symbolic` is called
    first. Put the model in ``eval()`` mode first, as for any inference export. The exported file uses only
    standard ONNX operators; :func:`to_plain` gives the same graph from plain modules. A model in training mode
    is exported as it is (BatchNorm on batch statistics, dropout active), with a warning.

    Files: the ``dynamo=True`` exporter writes the weights next to the graph, in ``path + ".data"`` (e.g.
    ``model.onnx.data``, ONNX's external-data format); keep both files together (ONNX Runtime and ``onnx.load``
    read the weights from the folder of ``path``). The exporter's messages about torch itself (torchvision ops
    it skips where torchvision is not installed) are not shown; its warnings about the model are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    if model.training:
        warnings.warn("export_onnx: the model is in training mode (BatchNorm uses batch statistics, dropout is "
                      "active); call model.eval() first to export it for inference", stacklevel=2)
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tensor or a tuple of inputs, got {type(args).__name__}")
    dynamo = export_kwargs.get("dynamo", True)
    if dynamo:
        if "custom_translation_table" not in inspect.signature(torch.onnx.export).parameters:
            raise RuntimeError(f"torch {torch.__version__} has no custom_translation_table in torch.onnx.export; "
                               "use dynamo=False or convert the model with rankprune.to_plain first")
        try:
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise ImportError("ONNX export with dynamo=True needs onnxscript and onnx "
                              "(pip install onnx onnxscript)") from exc
        export_kwargs["custom_translation_table"] = {**onnx_translation_table(),
                                                     **(export_kwargs.get("custom_translation_table") or {})}
    else:
        register_onnx_symbolic()
    with _without_exporter_noise():
        return torch.onnx.export(model, args, path, **export_kwargs)


# What torch.onnx.export says on every call that is about torch, not the model: a warning per torchvision op it
# cannot register where torchvision is not installed, and a deprecation inside torch's own pytree code.
_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"
_NO_TORCHVISION = "torchvision is not installed"
_PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


@contextlib.contextmanager
def _without_exporter_noise():
    """Drop exactly those messages (above) for the block; every other warning of the exporter still shows."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NO_TORCHVISION)

    logger = logging.getLogger(_REGISTRATION_LOGGER)
    logger.addFilter(keep)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PYTREE_DEPRECATION, category=FutureWarning)
            yield
    finally:
        logger.removeFilter(keep)


def _numpy_inputs(session, args) -> Dict[str, Any]:
    tensors = [args] if isinstance(args, torch.Tensor) else list(args)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ValueError(f"the ONNX file takes {len(names)} inputs ({names}), got {len(tensors)}")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


def onnx_session(path: str, threads: Optional[int] = None, spinning: bool = True):
    """An ONNX Runtime CPU ``InferenceSession`` for ``path`` using ``threads`` intra-op threads (default:
    ``torch.get_num_threads()``, so that timings next to PyTorch use the same cores). ``spinning=False`` makes
    its idle threads block instead of spin-waiting (ONNX Runtime's default; see
    ``rankprune.latency.runtimes`` for why timings turn it off). Needs onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("running an ONNX file needs onnxruntime (pip install onnxruntime)") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_onnx(session, args) -> List[torch.Tensor]:
    """Outputs of the ONNX Runtime ``session`` (see :func:`onnx_session`) on ``args`` (a tensor or a tuple of
    tensors, in the order of the file's inputs), as torch tensors."""
    return [torch.from_numpy(o) for o in session.run(None, _numpy_inputs(session, args))]


def onnx_max_abs_diff(path: str, model: nn.Module, args: Any) -> float:
    """Largest absolute difference between the outputs of the ONNX file ``path`` in ONNX Runtime (CPU) and of
    ``model`` on ``args`` (a tensor or a tuple of tensors; the model runs on CPU copies, without grad)."""
    args_cpu = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    args_cpu = tuple(a.detach().cpu() for a in args_cpu)
    ours = run_onnx(onnx_session(path), args_cpu)
    model_device = next(iter(model.parameters()), torch.empty(0)).device
    with torch.no_grad():
        out = call_model(model, tuple(a.to(model_device) for a in args_cpu))
    # The exporters flatten nested outputs (tuples, dicts, a transformers ModelOutput) in pytree order and drop
    # what is not a tensor; the model's outputs are flattened the same way.
    theirs = [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]
    if len(ours) != len(theirs):
        raise ValueError(f"the ONNX file has {len(ours)} outputs, the model {len(theirs)}")
    return max(float((a.double() - b.detach().cpu().double()).abs().max()) for a, b in zip(ours, theirs))


__all__ = ["to_plain", "export_onnx", "onnx_translation_table", "register_onnx_symbolic", "onnx_session", "run_onnx",
           "onnx_max_abs_diff"]
