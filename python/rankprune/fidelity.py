"""Label-free fidelity of a compressed model to its dense original on held-out calibration batches: what
``prune(criterion="auto")`` and ``compress`` choose their candidates by.

Fidelity is the mean over held-out samples of ``KL(softmax(dense logits) || softmax(compressed logits))`` for
outputs shaped ``[batch, classes]`` or ``[batch, tokens, classes]`` (every token is a sample), and the relative
squared error ``||compressed - dense||^2 / ||dense||^2`` for any other output; lower is closer. The output is
the model's output tensor, its ``.logits`` (Hugging Face) or the first tensor of a tuple, list or dict.
"""
import math
from typing import Any, Iterable, List, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ._inputs import batch_inputs, batch_size, call_model, eval_mode, model_inputs, reusable, sample_range

# Share of the calibration batches a selection holds out to compare its candidates on.
HOLDOUT_SHARE = 0.25


def output_tensor(output: Any) -> Optional[Tensor]:
    """The tensor a model's output is judged by: the output itself, ``.logits`` (Hugging Face), or the first
    tensor of a tuple/list/dict."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, Tensor)), None)


def split_holdout(data: Iterable, verb: str) -> Tuple[List[Any], List[Any]]:
    """``(fit batches, held-out batches)``: the last ``HOLDOUT_SHARE`` of the batches (at least one) held out,
    or of the samples when there is a single batch. The batches are read into lists; a single batch of one
    sample is an error."""
    batches = list(reusable(data))
    if len(batches) == 1:
        size = batch_size(batch_inputs(batches[0]))
        held = int(math.ceil(HOLDOUT_SHARE * size))
        if size < 2:
            raise ValueError(f"{verb}: choosing among candidates needs at least 2 calibration samples (some are held "
                             "out to compare them), got 1")
        return [sample_range(batches[0], 0, size - held)], [sample_range(batches[0], size - held, None)]
    if not batches:
        raise ValueError(f"{verb}: data holds no batches (empty calibration data)")
    held = max(1, int(math.ceil(HOLDOUT_SHARE * len(batches))))
    return batches[:-held], batches[-held:]


def divergence(dense: nn.Module, compressed: nn.Module, batches: Iterable) -> float:
    """Mean divergence of ``compressed``'s outputs from ``dense``'s over ``batches`` (module doc)."""
    total, count = 0.0, 0
    with eval_mode(dense), eval_mode(compressed):
        for batch in batches:
            reference = output_tensor(call_model(dense, model_inputs(batch, dense)))
            output = output_tensor(call_model(compressed, model_inputs(batch, compressed)))
            if reference is None or output is None:
                raise ValueError("the model's output holds no tensor to compare")
            reference, output = reference.double(), output.double()
            if reference.dim() in (2, 3):
                logp, logq = F.log_softmax(reference, -1), F.log_softmax(output, -1)
                rows = logp.reshape(-1, logp.shape[-1])
                total += float((rows.exp() * (rows - logq.reshape_as(rows))).sum())
                count += rows.shape[0]
            else:
                total += float((output - reference).square().sum()) / max(float(reference.square().sum()), 1e-300)
                count += 1
    return total / max(count, 1)
