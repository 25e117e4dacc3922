"""How models are called with ``example_inputs``: a tensor, a tuple/list of positional inputs, or a dict of
keyword inputs (the Torch-Pruning convention)."""
from typing import Any

import torch
from torch import nn


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(x)``, ``model(*inputs)`` or ``model(**inputs)`` depending on the type of ``example_inputs``."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return model(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor, a tuple/list of tensors or a dict, got {type(example_inputs).__name__}"
    )


def batch_inputs(batch: Any) -> Any:
    """The model inputs of a data batch: ``x`` of ``(x, y)`` / ``[x, y]``, a tensor as is, a dict as is."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("empty batch")
        return batch[0]
    return batch


def batch_size(inputs: Any) -> int:
    """Number of samples in model inputs (first dimension of the first tensor found)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, dict) else inputs
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.shape[0] if v.dim() else 1
    raise TypeError("cannot tell the batch size: the inputs hold no tensor")


def to_device(inputs: Any, device, dtype=None) -> Any:
    """Move the tensors of ``inputs`` (tensor / tuple / list / dict) to ``device`` (floating ones to ``dtype``)."""
    if isinstance(inputs, torch.Tensor):
        if dtype is not None and inputs.is_floating_point():
            return inputs.to(device=device, dtype=dtype)
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: to_device(v, device, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device, dtype) for v in inputs)
    return inputs
