"""How models are called and fed, shared by every verb: ``example_inputs`` (a tensor, a tuple/list of
positional inputs, or a dict of keyword inputs: the Torch-Pruning convention), calibration batches (tensors,
``(inputs, labels, ...)`` tuples whose first item is the input, or dicts), device and dtype casting, and the
eval-mode context that every calibration pass runs in."""
import contextlib
from typing import Any, Iterable, Iterator, List, Optional, Tuple

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


def first_samples(inputs: Any, count: int) -> Any:
    """The first ``count`` samples of model inputs (see :func:`sample_range`)."""
    return sample_range(inputs, 0, count)


def sample_range(inputs: Any, start: int, stop: Optional[int]) -> Any:
    """Samples ``start:stop`` of model inputs or of a data batch: every tensor, also inside nested tuples, lists
    and dicts, sliced along its first dimension."""
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, dict):
        return {k: sample_range(v, start, stop) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(sample_range(v, start, stop) for v in inputs)
    return inputs


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, Optional[torch.dtype]]:
    """Device and dtype of the model's first parameter (CPU and None for a model without parameters)."""
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), None


# The floating-point types a model can be cast to by name (the CLI's ``--dtype``, the demo's ``dtype``).
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for a name of :data:`DTYPES` (``"float32"``, ``"bfloat16"``, ...)."""
    return DTYPES[name]


def model_inputs(batch: Any, model: nn.Module) -> Any:
    """The inputs of a data batch, on the model's device, floating tensors in the model's dtype."""
    device, dtype = model_device_dtype(model)
    return to_device(batch_inputs(batch), device, dtype)


def check_data(data: Any, arg: str = "data") -> None:
    """Raise a clear error unless ``data`` is an iterable of batches (not a tensor, a dict or None)."""
    if data is None:
        raise ValueError(f"{arg} must be an iterable of calibration batches (e.g. a DataLoader or a list of "
                         "tensors), got None")
    if isinstance(data, (torch.Tensor, dict)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{arg} must be an iterable of calibration batches (e.g. a DataLoader or a list of "
                        f"tensors), got {type(data).__name__}; wrap a single batch in a list: [x]")


def reusable(data: Iterable, arg: str = "data") -> Iterable:
    """``data`` if it can be iterated again (a list, a DataLoader), else its batches read into a list: every
    verb that passes over calibration data more than once treats a one-shot iterator (a generator) this way."""
    check_data(data, arg)
    return list(data) if iter(data) is data else data


def iter_batches(data: Iterable, max_batches: Optional[int] = None, arg: str = "data") -> Iterator[Any]:
    """The batches of ``data``, at most ``max_batches`` of them (all when None)."""
    check_data(data, arg)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be an int >= 1, got {max_batches!r}")
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def progress(iterable: Iterable, desc: str, enabled: bool, total: Optional[int] = None, unit: str = "batch"):
    """``iterable`` wrapped in a tqdm bar (with an ETA where the length is known) when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False)


@contextlib.contextmanager
def eval_mode(model: nn.Module, no_grad: bool = True) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode (and turn gradients off) for the block, then give every
    module back its own training flag, also on an error: ``model.train(flag)`` would restore only the root's
    flag onto all of them."""
    flags: List[Tuple[nn.Module, bool]] = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield model
    finally:
        for m, flag in flags:
            m.training = flag


def check_finite_weights(model: nn.Module, verb: str) -> None:
    """Raise ValueError naming the first parameter or buffer of ``model`` that holds NaN or Inf: weights are
    checked before calibration data are blamed for non-finite activations."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                layer = name.rpartition(".")[0] or type(model).__name__
                raise ValueError(f"{verb}: the {kind} {name!r} of layer {layer!r} holds NaN or Inf")
