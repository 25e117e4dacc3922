"""Size and cost of a model: parameters, FLOPs (``torch.utils.flop_counter``), per-layer channels, and
Markdown tables comparing a model before and after compression."""
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._inputs import call_model, eval_mode

_CHANNEL_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """FLOPs of one forward pass on ``example_inputs`` as ``torch.utils.flop_counter`` counts them
    (2 per multiply-add of convolutions and matrix products; elementwise ops are not counted)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_model(model, example_inputs)
    return int(counter.get_total_flops())


def layer_channels(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """``{name: {"type", "in", "out", "groups"}}`` for every conv and linear layer (channels / features)."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            layers[name] = {"type": "Linear", "in": m.in_features, "out": m.out_features, "groups": 1}
        elif isinstance(m, _CHANNEL_LAYERS):
            layers[name] = {"type": type(m).__name__, "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
    return layers


def model_stats(model: nn.Module, example_inputs: Any) -> Dict[str, Any]:
    """``{"params", "flops", "layers"}`` of ``model``: parameter count, FLOPs of one forward on
    ``example_inputs`` (see :func:`count_flops`; the batch size of ``example_inputs`` scales it), and
    :func:`layer_channels`. The model is run in eval mode and restored to its previous mode."""
    with eval_mode(model):
        flops = count_flops(model, example_inputs)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": flops,
        "layers": layer_channels(model),
    }


def compare(
    model_before: nn.Module,
    model_after: nn.Module,
    example_inputs: Any,
    eval_fn: Optional[Callable[[nn.Module], float]] = None,
) -> Dict[str, Any]:
    """Plain-data report of a compression: ``before`` / ``after`` :func:`model_stats`, the kept fractions
    ``params_ratio`` / ``flops_ratio`` (after / before), and, when ``eval_fn(model) -> float`` is given,
    ``accuracy_before`` / ``accuracy_after``."""
    before = model_stats(model_before, example_inputs)
    after = model_stats(model_after, example_inputs)
    report = {
        "before": before,
        "after": after,
        "params_ratio": after["params"] / max(before["params"], 1),
        "flops_ratio": after["flops"] / max(before["flops"], 1),
    }
    if eval_fn is not None:
        report["accuracy_before"] = float(eval_fn(model_before))
        report["accuracy_after"] = float(eval_fn(model_after))
    return report


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub Markdown table; floats are printed with 4 significant digits."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def render(report: Dict[str, Any], per_layer: bool = True) -> str:
    """Markdown for a :func:`compare` report: a summary table (each row's change, after minus before: a loss
    of accuracy reads ``-36.55 pt``) and, with ``per_layer``, the channels of every layer before -> after.
    FLOPs are those of ``example_inputs``: per example when they hold one, as the CLI passes them."""
    before, after = report["before"], report["after"]
    rows: List[List[Any]] = [
        ["params", _human(before["params"]), _human(after["params"]), f"{100 * (report['params_ratio'] - 1):+.1f}%"],
        ["FLOPs per example", _human(before["flops"]), _human(after["flops"]),
         f"{100 * (report['flops_ratio'] - 1):+.1f}%"],
    ]
    if "accuracy_before" in report:
        a, b = report["accuracy_before"], report["accuracy_after"]
        rows.append(["accuracy", f"{100 * a:.2f}%", f"{100 * b:.2f}%", f"{100 * (b - a):+.2f} pt"])
    text = markdown_table(rows, ["", "before", "after", "change"])
    if per_layer:
        layer_rows = []
        for name, lb in before["layers"].items():
            la = after["layers"].get(name)
            if la is None:
                layer_rows.append([name, lb["type"], f"{lb['in']} -> {lb['out']}", "(removed)"])
            elif la["in"] != lb["in"] or la["out"] != lb["out"]:
                layer_rows.append([name, lb["type"], f"{lb['in']} -> {lb['out']}", f"{la['in']} -> {la['out']}"])
            else:
                layer_rows.append([name, lb["type"], f"{lb['in']} -> {lb['out']}", "unchanged"])
        text += "\n\n" + markdown_table(layer_rows, ["layer", "type", "in -> out before", "in -> out after"])
    return text
