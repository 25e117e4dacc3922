"""Label-free fidelity of a compressed model to its dense original on held-out calibration batches: what
``prune(criterion="auto")`` and ``compress`` choose their candidates by.

Fidelity is the mean over held-out samples of ``KL(softmax(dense logits) || softmax(compressed logits))`` for
outputs shaped ``[batch, classes]`` or ``[batch, tokens, classes]`` (every token is a sample), and the relative
squared error ``||compressed - dense||^2 / ||dense||^2`` for any other output; lower is closer. The output is
the model's output tensor, its ``.logits`` (Hugging Face) or the first tensor of a tuple, list or dict.

A selection keeps its reference candidate (the default pipeline, pruning alone) unless another is closer by
more than the noise of the held-out samples (``select``): a few hundred held-out samples cannot tell apart
candidates whose mean divergences differ by a few percent, and per-sample divergences are heavy-tailed, so a
lower mean can come from a handful of samples while the candidate is no closer on the rest.
"""
import math
from typing import Any, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._inputs import batch_inputs, batch_size, call_model, eval_mode, model_inputs, reusable, sample_range

# Share of the calibration batches a selection holds out to compare its candidates on.
HOLDOUT_SHARE = 0.25
# Standard errors by which a candidate must beat its reference on the held-out samples, in its mean divergence
# and in a sign test of the samples it is closer on (``clearly_closer``): each about a one-sided 2.5% chance of
# leaving the reference on noise alone.
SIGNIFICANCE_Z = 2.0
# What ``select`` does, in words, for the reports of the selections that use it.
RULE = (f"the reference unless another is lower in mean by more than {SIGNIFICANCE_Z:g} standard errors of the "
        f"paired difference and closer on more samples than not by more than {SIGNIFICANCE_Z:g} standard "
        "deviations of a sign test (then the lowest mean of those)")


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


def divergences(dense: nn.Module, compressed: nn.Module, batches: Iterable) -> Tensor:
    """The divergence of ``compressed``'s outputs from ``dense``'s per unit (module doc): one float64 value per
    held-out sample (per token for ``[batch, tokens, classes]``), or per batch for outputs judged by relative
    error; units in batch order, so two candidates' values pair up on the same batches."""
    values: List[Tensor] = []
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
                values.append((rows.exp() * (rows - logq.reshape_as(rows))).sum(-1).cpu())
            else:
                error = (output - reference).square().sum() / max(float(reference.square().sum()), 1e-300)
                values.append(error.reshape(1).cpu())
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)


def divergence(dense: nn.Module, compressed: nn.Module, batches: Iterable) -> float:
    """Mean divergence of ``compressed``'s outputs from ``dense``'s over ``batches`` (module doc)."""
    values = divergences(dense, compressed, batches)
    return float(values.mean()) if values.numel() else 0.0


def clearly_closer(candidate: Tensor, reference: Tensor, z: float = SIGNIFICANCE_Z) -> bool:
    """Whether ``candidate``'s per-unit divergences (``divergences``) are lower than ``reference``'s on the same
    units beyond the noise of the held-out units, on two counts: the paired mean difference by more than ``z``
    standard errors, and the units it is closer on outnumber those it is further on by more than ``z``
    standard deviations of a sign test (ties count for neither). The held-out evidence a selection needs
    before it leaves its reference: a mean difference within the noise chose a split that the test set did
    not confirm, and so did a mean lowered by a few samples (MobileNetV2, seed 2: 2.1 standard errors lower,
    closer on 53% of the samples, 1.6 points less accurate on test); see docs/pruning.md. A sign test needs
    at least 5 units to pass at ``z = 2``; a single unit is closer when lower."""
    difference = reference - candidate
    if difference.numel() < 2:
        return bool(difference.sum() > 0)
    closer, further = int((difference > 0).sum()), int((difference < 0).sum())
    mean_lower = bool(difference.mean() > z * difference.std() / math.sqrt(difference.numel()))
    return mean_lower and closer - further > z * math.sqrt(closer + further)


def select(values: List[Tensor], reference: int) -> Tuple[int, List[bool]]:
    """``(index of the chosen candidate, which candidates were clearly closer than the reference)`` from each
    candidate's per-unit divergences (``divergences``): the reference unless some are ``clearly_closer``, then
    the one of those with the lowest mean (``RULE``)."""
    closer = [i != reference and clearly_closer(v, values[reference]) for i, v in enumerate(values)]
    better = [i for i in range(len(values)) if closer[i]]
    return (min(better, key=lambda i: float(values[i].mean())) if better else reference), closer
