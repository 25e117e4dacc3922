"""Rebuilding a decomposed architecture from its plan, so that a saved state_dict loads into it."""
from torch import nn

from ..nn import LowRankConv2d, LowRankLinear, check_decomposable_conv
from ..plan_format import plan_layers
from .cost import explicit_padding, layer_kind, linear_features
from .surgery import set_submodule


def apply_decompose_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Replace, in place, the layers named by a ``decompose`` plan with low-rank layers of the planned ranks
    (weights uninitialised in the sense of a fresh module: load the state_dict saved after decomposition).
    Returns ``model``. Raises ValueError when the plan does not fit the model."""
    entries = plan_layers(plan, "decompose", "{kind, scheme, rank[, data_aware]}")
    modules = dict(model.named_modules())
    for name, entry in entries.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"plan names {name!r}, which is not a module of the model")
        kind, scheme, rank = entry.get("kind"), entry.get("scheme"), entry.get("rank")
        if layer_kind(module) != kind:
            raise ValueError(f"plan says {name!r} is a {kind}, the model has a {type(module).__name__}")
        w = module.weight
        if kind == "conv2d":
            check_decomposable_conv(module)
            new = LowRankConv2d(module.in_channels, module.out_channels, module.kernel_size, rank, module.stride,
                                explicit_padding(module), module.dilation, bias=module.bias is not None, scheme=scheme,
                                device=w.device, dtype=w.dtype)
        else:
            out_features, in_features = linear_features(module)
            new = LowRankLinear(in_features, out_features, rank, bias=module.bias is not None,
                                device=w.device, dtype=w.dtype)
        new.train(module.training)
        set_submodule(model, name, new)
    return model
