"""How models are called and fed, shared by every verb: ``example_inputs`` (a tensor, a tuple/list of
positional inputs, or a dict of keyword inputs: the Torch-Pruning convention), calibration batches (tensors,
``(inputs, labels, ...)`` tuples whose first item is the input, or dicts), device and dtype casting, and the
eval-mode context that every calibration pass runs in."""
import contextlib
import os
import sys
from typing import Any, Dict, Iterable, Iterator, List, NoReturn, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


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


def check_fraction(name: str, value: Any, *, low_open: bool = True, high_open: bool = False) -> float:
    """``value`` as a float: the argument check of every fraction of the library and the CLI, in one wording
    ("target_flops must be in (0, 1], got 1.5"). The interval is [0, 1] with 0 excluded when ``low_open``
    (default) and 1 when ``high_open``. TypeError for a non-number, ValueError outside (NaN included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    inside = (0.0 < value if low_open else 0.0 <= value) and (value < 1.0 if high_open else value <= 1.0)
    if not inside:  # NaN compares False, so it lands here too
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


def distributed_world() -> bool:
    """Whether an initialised ``torch.distributed`` process group with more than one rank is there."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_data(data: Any, arg: str = "data") -> None:
    """Raise a clear error unless ``data`` is an iterable of batches (not a tensor, a dict or None) that is
    not known to be empty (a list or DataLoader of length 0 is refused before any work, except under
    ``torch.distributed``, where one rank's shard may be empty and the rank must still join the all-reduce)."""
    if data is None:
        raise ValueError(f"{arg} must be an iterable of calibration batches (e.g. a DataLoader or a list of "
                         "tensors), got None")
    if isinstance(data, (torch.Tensor, dict)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{arg} must be an iterable of calibration batches (e.g. a DataLoader or a list of "
                        f"tensors), got {type(data).__name__}; wrap a single batch in a list: [x]")
    try:
        empty = len(data) == 0
    except TypeError:  # no length: a generator, a DataLoader over an IterableDataset
        empty = False
    if empty and not distributed_world():
        raise ValueError(f"{arg} holds no batches (empty calibration data)")


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


@contextlib.contextmanager
def removed_after(handles: Sequence[Any]) -> Iterator[None]:
    """Remove the hook ``handles`` (``register_forward_hook`` and the like) when the block ends, also on an
    error, so that no hook outlives the call that installed it."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_finite_weights(model: nn.Module, verb: str, overwritten: Sequence[nn.Module] = ()) -> None:
    """Raise ValueError naming the first parameter or buffer of ``model`` that holds NaN or Inf: weights are
    checked before calibration data are blamed for non-finite activations. The buffers of the modules in
    ``overwritten`` are not checked (``recalibrate`` replaces the BatchNorm statistics). One host sync per
    device when every tensor is finite."""
    skipped = {id(b) for m in overwritten for b in m.buffers()}
    tensors = [(kind, name, t) for kind, named in (("parameter", model.named_parameters()),
                                                   ("buffer", model.named_buffers()))
               for name, t in named if t.is_floating_point() and id(t) not in skipped]
    flags: Dict[torch.device, List[Tensor]] = {}
    for _, _, t in tensors:
        flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    if all(bool(torch.stack(f).all()) for f in flags.values()):
        return
    kind, name, _ = next(entry for entry in tensors if not bool(torch.isfinite(entry[2]).all()))
    layer = name.rpartition(".")[0] or type(model).__name__
    raise ValueError(f"{verb}: the {kind} {name!r} of layer {layer!r} holds NaN or Inf")


def holds_non_finite(value: Any) -> bool:
    """Whether a floating tensor in ``value`` (a tensor, or tuples, lists and dicts of them) holds NaN or Inf."""
    if isinstance(value, Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, (tuple, list)) and any(holds_non_finite(v) for v in value)


def _first_non_finite_module(model: nn.Module, inputs: Any) -> Optional[str]:
    """Run ``inputs`` (finite) through ``model`` and describe the first module, in execution order, whose
    output holds NaN or Inf, or whose input does although every module before it gave finite outputs (then
    the code of its caller made it); None when every module's input and output is finite."""
    names = {m: name or type(model).__name__ for name, m in model.named_modules()}
    running: List[nn.Module] = []
    found: List[str] = []

    def before(module, args):
        if not found and holds_non_finite(args):
            caller = f"the forward of {names[running[-1]]!r}" if running else "the caller"
            found.append(f"the input of layer {names[module]!r} ({type(module).__name__}), computed by {caller} "
                         "outside any module,")
        running.append(module)

    def after(module, args, output):
        running.pop()
        if not found and holds_non_finite(output):
            found.append(f"the output of layer {names[module]!r} ({type(module).__name__}), from finite inputs,")

    handles = [m.register_forward_pre_hook(before) for m in names]
    handles += [m.register_forward_hook(after) for m in names]
    with removed_after(handles):
        call_model(model, inputs)
    return found[0] if found else None


def raise_non_finite(model: nn.Module, data: Iterable, verb: str, statistic: str, *, max_batches: Optional[int] = None,
                     where: str = "calibration batch {}", train: Sequence[nn.Module] = ()) -> NoReturn:
    """Raise one ValueError saying where the NaN or Inf that made ``statistic`` non-finite first appears: a
    weight (:func:`check_finite_weights`), else the first batch of ``data`` that holds one itself, else the
    first module, in execution order, whose output holds one (its inputs finite). The batches of ``data`` (the
    first ``max_batches``) are run again (eval mode, no gradients; the modules in ``train`` in train mode, as in
    the failed pass), so the healthy path pays nothing for the diagnosis. ``where`` names a batch from its
    index."""
    check_finite_weights(model, verb, overwritten=train)
    if iter(data) is data:
        raise ValueError(f"{verb}: {statistic} came out NaN or Inf although the weights are finite; the data was a "
                         "one-shot iterator, so the batch and the layer cannot be located: pass a list of batches")
    with eval_mode(model):
        for module in train:
            module.train()
        for index, batch in enumerate(data):
            if max_batches is not None and index >= max_batches:
                break
            inputs = model_inputs(batch, model)
            place = where.format(index)
            if holds_non_finite(inputs):
                raise ValueError(f"{verb}: {place} holds NaN or Inf (the data itself, before any layer)")
            found = _first_non_finite_module(model, inputs)
            if found is not None:
                raise ValueError(f"{verb}: {found} holds NaN or Inf on {place} (the weights and the inputs are "
                                 "finite)")
    raise ValueError(f"{verb}: {statistic} came out NaN or Inf although the weights, the inputs and every layer's "
                     "input and output are finite (an overflow in the statistic, or another rank's data)")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the function calling this one name the first frame
    outside rankprune (the user's call), however deep in the library the warning is raised: one verb reaches
    the same check through different call paths."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level
