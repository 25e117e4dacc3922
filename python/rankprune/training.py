"""Training helpers the CLI, the demo and the benchmarks share: fine-tuning, evaluation and BatchNorm
recalibration.

The library's compression verbs never own a training loop; these are conveniences for the built-in
workflows (``rankprune trp``, ``rankprune prune --eval``, ``rankprune demo``) and a reference for one's own
loop. :func:`recalibrate` is the exception that users call directly (it is re-exported as
``rankprune.recalibrate``): after channels are removed or weights truncated, every BatchNorm still holds
the statistics of the original network, and re-estimating them on a few hundred calibration images
restores much of the lost accuracy with forward passes only (EagleEye's "adaptive BN", Li et al. 2020).
"""
import warnings
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._inputs import check_finite_weights, iter_batches, model_device_dtype, raise_non_finite
from .calibration import Calibration


def _device_of(model: nn.Module, device) -> torch.device:
    return torch.device(device) if device is not None else model_device_dtype(model)[0]


def train(model: nn.Module, loader, epochs: int, lr: float, device=None, *, pruner=None,
          weight_decay: float = 1e-4, amp: bool = False, dtype: torch.dtype = torch.float32,
          progress: bool = True, desc: str = "train") -> nn.Module:
    """Train ``model`` on ``loader`` (``(x, y)`` batches, cross-entropy) and return it in eval mode.

    SGD (momentum 0.9, ``weight_decay``) with a cosine learning rate from ``lr`` over all ``epochs``.
    ``device`` defaults to the model's. With ``pruner`` (a :class:`rankprune.trp.TrainedRankPruner` on
    ``model``), TRP's two calls sit around ``optimizer.step()``. ``amp`` trains with float16 autocast and a
    ``GradScaler`` (CUDA), adding the regulariser in the scaled domain.
    """
    from tqdm.auto import tqdm

    device = _device_of(model, device)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    for epoch in range(epochs):
        for x, y in tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=not progress, unit="batch"):
            x, y = x.to(device, dtype, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if pruner is not None:
                # the gradients are still scaled by the GradScaler: add the regulariser scaled alike
                pruner.regularize(grad_scale=scaler.get_scale() if amp else 1.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if pruner is not None:
                pruner.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device=None, dtype: torch.dtype = torch.float32) -> float:
    """Top-1 accuracy (a fraction) of ``model`` over ``loader`` (``(x, y)`` batches); the model is left in
    eval mode. ``device`` defaults to the model's."""
    device = _device_of(model, device)
    model.to(device).eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.to(device, dtype)).argmax(1) == y.to(device)).sum())
        total += y.numel()
    return correct / max(total, 1)


class _BatchStats:
    """Streaming per-channel mean and variance of one BatchNorm's inputs over all calibration samples
    (Chan et al.'s pairwise update in float64: batch sizes may differ and nothing but [C] vectors is kept).
    A NaN or Inf input leaves the mean or the variance non-finite for good: one check after the pass finds it."""

    def __init__(self, bn: _BatchNorm):
        self.count = 0
        self.mean = torch.zeros(bn.num_features, dtype=torch.float64, device=bn.running_mean.device)
        self.m2 = torch.zeros_like(self.mean)

    def __call__(self, batch: int, call: int, x: torch.Tensor) -> None:
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        n = x.numel() // x.shape[1]
        mean, var = mean.to(torch.float64), var.to(torch.float64)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += var * n + delta.square() * (self.count * n / total)
        self.count = total

    def sums(self) -> List[torch.Tensor]:
        """``[count, sum x, sum x^2]`` per channel (float64), the form that adds up over ranks."""
        count = torch.full_like(self.mean, float(self.count))
        return [count, self.mean * count, self.m2 + self.mean.square() * count]

    def set_sums(self, sums: List[torch.Tensor]) -> None:
        count, total, squares = sums
        self.count = int(count[0]) if count.numel() else 0
        self.mean = total / max(self.count, 1)
        self.m2 = (squares - self.mean.square() * self.count).clamp_min(0)


def _collect(engine: Calibration, norms: Dict[str, _BatchNorm], stats: Dict[str, _BatchStats]) -> int:
    """One pass with every module in eval mode (dropout off) but the BatchNorms, which normalise by their
    batch; each BatchNorm's input statistics all-reduced under torch.distributed. Returns the number of
    batches (of all ranks)."""
    engine.trace({bn: stats[name] for name, bn in norms.items()}, "BatchNorm statistics", train=list(norms.values()))
    batches = torch.tensor([float(len(engine.fingerprints))], dtype=torch.float64)
    if engine.distributed:
        sums = [stats[name].sums() for name in norms]
        engine.all_reduce([t for group in sums for t in group] + [batches])
        for name, group in zip(norms, sums):
            stats[name].set_sums(group)
    bad = [name for name, s in stats.items() if not bool(torch.isfinite(s.mean).all() & torch.isfinite(s.m2).all())]
    if bad:
        raise_non_finite(engine.model, engine.data, "recalibrate", f"the input statistics of BatchNorm {bad[0]!r}",
                         train=list(norms.values()))
    never = [name for name, s in stats.items() if s.count == 0]
    if never:
        warnings.warn(f"recalibrate: BatchNorm layers {never} were not called on the calibration data; "
                      "their statistics are unchanged", stacklevel=4)
    return int(batches)


def recalibrate(model: nn.Module, data: Iterable, max_batches: Optional[int] = None,
                progress: bool = False) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm of ``model`` on calibration batches.

    Runs ``data`` through the model with the BatchNorm modules in train mode (each normalises by its batch,
    as during training) and everything else in eval mode (dropout off), without gradients, and sets each
    BatchNorm's ``running_mean`` / ``running_var`` to the exact mean and (unbiased) variance of its inputs
    over *all* calibration samples, accumulated in float64 one batch at a time: the cumulative average
    over samples, so that batch sizes may differ and the result does not depend on how the data was split
    into batches (PyTorch's own ``momentum=None`` average is a mean of per-batch variances, which misses
    the spread of the batch means). ``num_batches_tracked`` becomes the number of batches seen.

    The pass runs through the calibration engine (:mod:`rankprune.calibration`), as every data-aware verb
    does: a one-shot iterator is read into a list, floating inputs are cast to the model's dtype, and under
    ``torch.distributed`` (an initialised process group, each rank holding a shard of the data) the
    statistics are all-reduced so that every rank sets the same ones.

    Training flags and every module's ``momentum`` are restored afterwards; on an error the statistics
    are left as they were. BatchNorms with ``track_running_stats=False`` have no statistics and are skipped.

    Args:
        model: the network (on the device and in the dtype it will run in).
        data: an iterable of batches: a tensor, an ``(inputs, labels, ...)`` tuple/list (the first item
            is the model input), or a dict of keyword inputs. Moved to the model's device and dtype.
        max_batches: use at most this many batches (default: all).
        progress: show a progress bar.

    Returns:
        ``model`` (recalibrated in place).

    Raises:
        ValueError: ``data`` is None or yields no batch, ``max_batches < 1``, a weight holds NaN or Inf
            (named, before any data run), or a BatchNorm sees NaN or Inf in its input (the error names the
            calibration batch that holds it, or the first layer whose output does).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if data is None:
        raise ValueError("recalibrate: data must be an iterable of calibration batches, got None")
    norms: Dict[str, _BatchNorm] = {name: m for name, m in model.named_modules()
                                    if isinstance(m, _BatchNorm) and m.track_running_stats}
    if not norms:
        warnings.warn(f"recalibrate: {type(model).__name__} has no BatchNorm with running statistics; "
                      "nothing to recalibrate", stacklevel=2)
        return model
    check_finite_weights(model, "recalibrate", overwritten=list(norms.values()))
    saved = {name: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(), bn.momentum)
             for name, bn in norms.items()}
    stats = {name: _BatchStats(bn) for name, bn in norms.items()}
    engine = Calibration(model, iter_batches(data, max_batches), cache_bytes=0,
                         progress=progress, name="recalibrate")
    ok = False
    try:
        for bn in norms.values():
            bn.momentum = None  # the layer's own buffers follow a cumulative average too while we stream
        batches = _collect(engine, norms, stats)
        for name, bn in norms.items():
            s = stats[name]
            if s.count == 0:
                continue
            bn.running_mean.copy_(s.mean)
            bn.running_var.copy_(s.m2 / max(s.count - 1, 1))
            bn.num_batches_tracked.fill_(batches)
        ok = True
    finally:
        for name, bn in norms.items():
            mean, var, tracked, momentum = saved[name]
            bn.momentum = momentum
            if not ok:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(tracked)
    return model


__all__: List[str] = ["train", "evaluate", "recalibrate"]
