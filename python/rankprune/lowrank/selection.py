"""Which layers ``decompose`` may factor: Conv2d (groups=1, zero padding) and Linear / Hugging Face Conv1D
layers chosen by name patterns or by ``ranks``, less those that cannot be swapped for a low-rank module
(tied weights, the projections of ``nn.MultiheadAttention``, weights read outside their own forward)."""
import fnmatch
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .._inputs import call_model, eval_mode, removed_after
from ..nn import check_decomposable_conv
from .cost import Candidate, layer_kind


def matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    """Whether ``name`` matches one of the fnmatch ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def patterns(value, arg: str) -> Optional[List[str]]:
    """``value`` (a pattern or a list of them, or None) as a list; TypeError naming ``arg`` otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{arg} must be a module name pattern or a list of them (fnmatch style), got {value!r}")


def warn_unmatched(model: nn.Module, include: Optional[List[str]]) -> None:
    """Warn once about ``include`` patterns that match no Conv2d/Linear layer of the model (likely a typo)."""
    names = [name for name, m in model.named_modules() if layer_kind(m) is not None]
    unmatched = [p for p in include or () if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        warnings.warn(f"decompose: include pattern(s) {unmatched} match no Conv2d or Linear layer of "
                      f"{type(model).__name__}", stacklevel=5)


def unreplaceable(model: nn.Module) -> Dict[str, str]:
    """Layers that cannot be swapped for a low-rank module, by name, with the reason: the projections of an
    ``nn.MultiheadAttention`` (it reads ``out_proj.weight`` itself instead of calling the module) and layers
    whose weight is shared with another module (tied embeddings and heads: replacing one would untie them)."""
    reasons: Dict[str, str] = {}
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child, _ in module.named_children():
                reasons[f"{name}.{child}" if name else child] = (
                    "nn.MultiheadAttention uses its projection weights directly, not through the module")
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{name}.{pname}" if name else pname)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and len(owners.get(id(weight), ())) > 1:
            others = [o for o in owners[id(weight)] if o != f"{name}.weight"]
            reasons.setdefault(name, f"its weight is shared with {', '.join(others)} (tied weights)")
    return reasons



class _WeightReads(TorchFunctionMode):
    """Records the layers whose weight enters a torch function while the layer's own forward is not running
    (a parent calling ``F.linear(x, child.weight)``): such a layer cannot be swapped for a low-rank module,
    which has no ``weight``."""

    def __init__(self, owners: Dict[int, str]):
        super().__init__()
        self.owners, self.running, self.outside = owners, [], set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in pytree.tree_leaves((args, kwargs)):
            name = self.owners.get(id(value)) if isinstance(value, Tensor) else None
            if name is not None and name not in self.running:
                self.outside.add(name)
        return func(*args, **kwargs)


def weights_read_outside(model: nn.Module, names: Sequence[str], example_inputs) -> List[str]:
    """The layers among ``names`` whose weight is used outside their own forward on ``example_inputs``."""
    modules = {name: model.get_submodule(name) for name in names}
    reads = _WeightReads({id(m.weight): name for name, m in modules.items()})
    handles = []

    def enter(name: str):
        def hook(module, args) -> None:
            reads.running.append(name)
        return hook

    def leave(module, args, output) -> None:
        reads.running.pop()

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    with removed_after(handles):
        with eval_mode(model), reads:
            call_model(model, example_inputs)
    return [name for name in names if name in reads.outside]


def _checked_ranks(model: nn.Module, ranks, scheme: str, unreplaceable_layers: Dict[str, str]) -> Dict[str, Candidate]:
    if not isinstance(ranks, dict):
        raise TypeError(f"ranks must be a dict {{module name: rank}}, got {type(ranks).__name__}")
    modules = dict(model.named_modules())
    layers = {}
    for name, rank in ranks.items():
        if name not in modules:
            raise ValueError(f"ranks names {name!r}, which is not a module of the model")
        kind = layer_kind(modules[name])
        if kind is None:
            raise ValueError(f"ranks names {name!r}, a {type(modules[name]).__name__}; only Conv2d and "
                             "Linear layers can be decomposed")
        if kind == "conv2d":
            check_decomposable_conv(modules[name])
        if name in unreplaceable_layers:
            raise ValueError(f"ranks names {name!r}, which cannot be decomposed: {unreplaceable_layers[name]}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"ranks[{name!r}] must be a positive int, got {rank!r}")
        layers[name] = Candidate(name, modules[name], kind, scheme if kind == "conv2d" else "channel")
    return layers


def _matching(model: nn.Module, include, exclude, scheme: str, unreplaceable_layers: Dict[str, str],
              skipped: Dict[str, str]) -> Dict[str, Candidate]:
    include_p, exclude_p = patterns(include, "include"), patterns(exclude, "exclude")
    warn_unmatched(model, include_p)
    layers = {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or not name:
            continue
        if (include_p is not None and not matches(name, include_p)) or (
                exclude_p is not None and matches(name, exclude_p)):
            continue
        if name in unreplaceable_layers:
            skipped[name] = unreplaceable_layers[name]
            continue
        if kind == "conv2d":
            try:
                check_decomposable_conv(module)
            except ValueError as exc:
                skipped[name] = str(exc)
                continue
        layers[name] = Candidate(name, module, kind, scheme if kind == "conv2d" else "channel")
    return layers


def select(model: nn.Module, ranks: Optional[Dict[str, int]], include, exclude, scheme: str,
           example_inputs) -> Tuple[Dict[str, Candidate], Dict[str, str]]:
    """The candidate layers (``ranks``' keys, else every decomposable layer matching ``include`` and not
    ``exclude``) and ``{name: reason}`` for matching layers left dense. Layers whose weight is read outside
    their own forward on ``example_inputs`` stay dense with one warning naming them (not detectable without
    example inputs)."""
    skipped: Dict[str, str] = {}
    unreplaceable_layers = unreplaceable(model)
    if ranks is not None:
        layers = _checked_ranks(model, ranks, scheme, unreplaceable_layers)
    else:
        layers = _matching(model, include, exclude, scheme, unreplaceable_layers, skipped)
    if example_inputs is not None and layers:
        outside = weights_read_outside(model, list(layers), example_inputs)
        if outside and ranks is not None:
            raise ValueError(f"ranks names {outside}, whose weight is read outside the layer's own forward (by a "
                             "parent module); such layers cannot be replaced by a low-rank module")
        for name in outside:
            del layers[name]
            skipped[name] = ("its weight is read outside its own forward (by a parent module): a low-rank "
                             "module has no weight to read")
        if outside:
            warnings.warn(f"decompose: keeping {outside} dense: their weights are read outside the layers' own "
                          "forward (by a parent module), so they cannot be replaced", stacklevel=4)
    for index, layer in enumerate(layers.values()):
        layer.index = index
    return layers, skipped
