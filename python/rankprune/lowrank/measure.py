"""What ``decompose`` measures on the example inputs for its report: FLOPs (FlopCounterMode), each candidate's
inputs and outputs, and relative output errors."""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .._inputs import call_model, eval_mode, holds_non_finite, raise_non_finite, removed_after
from .cost import Candidate


def run_example(model: nn.Module, example_inputs, layers: Dict[str, Candidate], record: bool) -> Tuple[object, int]:
    """One forward pass in eval mode without gradients (training flags restored): the output and its
    FlopCounterMode FLOPs; with ``record``, each layer's inputs and outputs are kept. A NaN or Inf in the
    output raises ValueError naming the weight, input or layer it comes from."""
    handles = []
    if record:
        for layer in layers.values():
            def hook(module, args, output, layer=layer):
                layer.inputs.append(args[0].detach())
                layer.outputs.append(output.detach())

            handles.append(layer.module.register_forward_hook(hook))
    with removed_after(handles):
        with eval_mode(model), FlopCounterMode(display=False) as counter:
            output = call_model(model, example_inputs)
    if holds_non_finite(output):  # [[inputs]]: one batch whose first item is the inputs, whatever their form
        raise_non_finite(model, [[example_inputs]], "decompose", "the model's output", where="example_inputs")
    return output, counter.get_total_flops()


def rel_error(got, want) -> Optional[float]:
    """``||got - want|| / ||want||`` in float64 (``||got||`` where ``want`` is zero), None unless both are tensors."""
    if not isinstance(got, Tensor) or not isinstance(want, Tensor):
        return None
    want64 = want.double()
    denom = float(want64.norm())
    return float((got.double() - want64).norm()) / denom if denom > 0 else float((got.double()).norm())



def layer_rel_error(layer: Candidate, new: nn.Module) -> Optional[float]:
    """The relative output error of ``new`` against the dense layer on its recorded example inputs (weighted
    by the dense outputs' norms over calls), None when the layer was not called on them."""
    if not layer.inputs:
        return None
    with torch.no_grad():
        errors = [(rel_error(new(x), y), float(y.double().norm())) for x, y in zip(layer.inputs, layer.outputs)]
    weight = sum(w for _, w in errors)
    return sum(e * w for e, w in errors) / weight if weight > 0 else errors[0][0]
