"""The calibration engine: runs calibration data through a model in stages and streams the statistics that
data-aware compression needs, at the cost of a few forward passes.

Every data-aware verb (``decompose(data=...)``, ``recalibrate``) runs through one :class:`Calibration`:

- **Structure.** The first pass over the data (``Calibration.trace``) records, on the first batch, when
  every module starts and ends (its *span*) and how long it takes; every later pass knows from it which
  modules have finished before a given layer starts.
- **Stages.** A stage is a set of layers whose inputs are final: all layers before them in execution order
  are already compressed. A stage pass runs every batch only up to the last input it needs (the rest of the
  forward is skipped), and modules that finished before the stage starts are not run at all: their outputs
  were kept from an earlier pass (the *frontier cache*), so a stage pass costs about the layers between the
  previous stage and this one. Which outputs are kept is chosen by the time they save per byte, within
  ``cache_bytes``; what does not fit is recomputed. Layers that read the very same input tensor (the
  convolutions of two branches, the query/key/value projections of attention) share a stage.
- **Streaming statistics.** Hooks receive each layer input as it is produced and fold it into float64
  accumulators whose size does not depend on the number of batches; nothing else of the activations is
  kept beyond the cache. Under ``torch.distributed`` (an initialised process group, each rank holding a
  shard of the data) :meth:`Calibration.all_reduce` sums the accumulators so that every rank computes the
  same result.
- **Accounting.** Each phase records its wall time, the batches it ran, the bytes held by the cache and the
  peak resident memory sampled after every batch (CUDA: the peak allocated device memory), reported by
  :meth:`Calibration.summary`.

Assumptions, checked where they can be: the model calls its modules in the same order on every batch (no
data-dependent control flow between modules), the data yields the same batches in the same order on every
pass (checked: a shuffling loader or an iterator that stops early raises a clear error; a one-shot
iterator is read into a list once), and a module's output depends only on its inputs (eval mode, no
randomness). In-place operations downstream (``ReLU(inplace=True)``, ``out += identity``) never corrupt the
cache: every cached tensor reaches the model as a copy-on-write alias (``torch._lazy_clone``), which is copied
only when the model writes into it; the cached tensor itself is never handed out.
"""
import collections
import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ._inputs import (batch_size, call_model, distributed_world, eval_mode, model_device_dtype, model_inputs, progress,
                      removed_after, reusable)

# Default share of the memory available on the model's device that the engine may keep (cached stage
# outputs and dense layer inputs), and its ceiling.
DEFAULT_CACHE_FRACTION = 0.25
DEFAULT_CACHE_CEILING = 8 << 30

# How many recent layer inputs are compared with each new one to find layers reading the same tensor.
SAME_INPUT_WINDOW = 16

Capture = Callable[[int, int, Tensor], None]  # (batch index, call index within the batch, layer input)


class _StageDone(Exception):
    """Raised by a capture hook once a stage has every input it needs: the rest of the forward is skipped."""


@dataclass
class _Span:
    """When a module runs within one forward pass (event indices of its first start and last end), how many
    times, its inclusive wall time, and the bytes of its outputs, all on the first batch."""

    start: int
    end: int = -1
    calls: int = 0
    seconds: float = 0.0
    output_bytes: int = 0


@dataclass
class _Phase:
    seconds: float = 0.0
    batches: int = 0
    peak_memory: int = 0


@dataclass
class _CachedOutputs:
    """The outputs of one module on every batch, per call, and their size."""

    per_batch: Dict[int, List[Any]] = field(default_factory=dict)
    nbytes: int = 0
    complete: bool = False


def _tensor_bytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, Tensor))


def _alias(t: Tensor) -> Tensor:
    """A copy-on-write alias of ``t``: free until the model writes into it, then a copy of its own. Most
    cached outputs are never written (a served module's output feeds other served modules), and real copies
    of each took 5 s of a 60 s ResNet-18 decomposition on 256 images; a storage that PyTorch cannot share
    (e.g. one borrowed from numpy) is copied at once."""
    try:
        return torch._lazy_clone(t)
    except RuntimeError:
        return t.clone()


def _aliases(value: Any) -> Any:
    return pytree.tree_map(lambda t: _alias(t) if isinstance(t, Tensor) else t, value)


def _fingerprint(inputs: Any) -> Tuple:
    """A cheap identity of a batch (shapes and one sum per tensor) to check that every pass sees the same
    batches in the same order."""
    leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor)]
    # repr, not the float: a batch holding NaN must equal itself (NaN != NaN), so that the NaN is what gets named
    return tuple((tuple(t.shape), repr(float(t.double().sum())) if t.numel() else "0") for t in leaves)


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _resident_memory() -> int:
    """Resident set size of this process in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` in place over the ranks of the process group (one flat float64 message)."""
    import torch.distributed as dist

    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()


class SameInputStages:
    """Groups layers into stages as they are called on the first batch: a layer whose input is the very tensor
    (same storage and version, still alive) that a recent layer got joins that layer's stage (``layer.stage``,
    numbered in execution order)."""

    def __init__(self):
        self.recent = collections.deque(maxlen=SAME_INPUT_WINDOW)  # (tensor, version, stage)
        self.count = 0

    def assign(self, layer, x: Tensor) -> None:
        """Set ``layer.stage`` from its first input ``x`` (call it on the first batch, in execution order)."""
        for seen, version, stage in self.recent:
            if seen.data_ptr() == x.data_ptr() and seen.shape == x.shape and seen._version == version \
                    and seen.stride() == x.stride():
                layer.stage = stage
                break
        else:
            layer.stage = self.count
            self.count += 1
        self.recent.append((x, x._version, layer.stage))


class PhaseClock:
    """Wall time, batches run and peak memory per named phase of a verb. Memory: the resident memory of the
    process sampled after every batch and at the end of each phase on CPU, the peak allocated device memory
    on CUDA."""

    def __init__(self, model: nn.Module):
        self.device = model_device_dtype(model)[0]
        self.phases: Dict[str, _Phase] = {}
        self._current: Optional[_Phase] = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Account the wall time, batches and peak memory of the block to phase ``name``."""
        phase = self.phases.setdefault(name, _Phase())
        outer, self._current = self._current, phase
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            phase.seconds += time.perf_counter() - start
            self._sample()
            self._current = outer

    def batch_done(self) -> None:
        """Count one batch run by the current phase and sample the memory."""
        if self._current is not None:
            self._current.batches += 1
            self._sample()

    def _sample(self) -> None:
        used = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else _resident_memory())
        self._current.peak_memory = max(self._current.peak_memory, used)

    def summary(self) -> dict:
        """``{"phases": {name: {seconds, batches, peak_memory}}, "memory": what peak_memory measures}``."""
        return {"phases": {name: {"seconds": p.seconds, "batches": p.batches, "peak_memory": p.peak_memory}
                           for name, p in self.phases.items()},
                "memory": "cuda max_memory_allocated" if self.device.type == "cuda" else "process resident memory"}


class Calibration:
    """Calibration data bound to one model: staged passes, the frontier cache, streaming hooks, accounting.

    Args:
        model: the network, on the device and in the dtype it runs in. Its modules are swapped by the caller
            between stages; the engine never changes its weights.
        data: an iterable of batches (tensors, ``(inputs, labels, ...)`` tuples whose first item is the input,
            or dicts of keyword inputs). Read again on every pass; a one-shot iterator is read into a list
            once. Floating tensors are cast to the model's dtype and moved to its device; batches may differ
            in size (and, for convolutions, in spatial size): each runs as it is.
        cache_bytes: the most memory the engine keeps (cached outputs plus what callers reserve with
            :meth:`reserve`); default a quarter of the memory available on the model's device, at most 8 GiB.
            0 caches nothing: every stage pass recomputes from the inputs.
        progress: show progress bars.
        distributed: all-reduce statistics over an initialised ``torch.distributed`` process group.
        name: the verb, used in messages and progress bars.
    """

    def __init__(self, model: nn.Module, data: Iterable, *, cache_bytes: Optional[int] = None,
                 progress: bool = True, distributed: bool = True, name: str = "calibration"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model, self.name, self.show_progress = model, name, progress
        self.data = reusable(data)
        self.device, self.dtype = model_device_dtype(model)
        if cache_bytes is None:
            cache_bytes = min(int(DEFAULT_CACHE_FRACTION * _available_memory(self.device)), DEFAULT_CACHE_CEILING)
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, (int, float)) or not cache_bytes >= 0:
            raise ValueError(f"cache_bytes must be a number of bytes >= 0, got {cache_bytes!r}")
        self.cache_bytes = int(cache_bytes)
        self.distributed = distributed and distributed_world()
        self.spans: Dict[nn.Module, _Span] = {}
        self.fingerprints: List[Tuple] = []
        self.traced = False
        self.samples = 0
        self.reserved = 0
        self.cached: Dict[nn.Module, _CachedOutputs] = {}
        self.clock = PhaseClock(model)
        self.notes: List[str] = []
        self._current_batch = 0
        self._served_calls: Dict[nn.Module, int] = {}
        self._uncached = False  # inside forward_uncached: no cache is served or recorded
        self._budget_noted = False

    # ------------------------------------------------------------------------------------------ accounting
    def phase(self, name: str):
        """Account the wall time, batches and peak memory of the block to phase ``name``."""
        return self.clock.phase(name)

    def summary(self) -> dict:
        """Plain data for a report: the phases (see :class:`PhaseClock`), the cache budget, the number of
        batches and samples, whether statistics were all-reduced, and notes."""
        return dict(self.clock.summary(), cache_bytes=self.cache_bytes, batches=len(self.fingerprints),
                    samples=self.samples, distributed=self.distributed, notes=list(self.notes))

    def reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` of the cache budget for the caller's own use (e.g. dense layer inputs); False,
        taking nothing, when they do not fit."""
        if self._cache_used() + nbytes > self.cache_bytes:
            return False
        self.reserved += nbytes
        return True

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` taken with :meth:`reserve`."""
        self.reserved = max(0, self.reserved - nbytes)

    def hold(self, kept: Dict[Any, Tensor], key: Any, value: Tensor) -> bool:
        """Keep ``value`` as ``kept[key]`` within the budget (reserved); when it does not fit, give back what
        ``kept`` holds and return False: a caller's set of kept tensors is all or nothing."""
        if self.reserve(value.numel() * value.element_size()):
            kept[key] = value
            return True
        self.release_held(kept)
        return False

    def release_held(self, kept: Dict[Any, Tensor]) -> None:
        """Give back the bytes of the tensors kept with :meth:`hold`."""
        self.release(sum(t.numel() * t.element_size() for t in kept.values()))

    def _cache_used(self) -> int:
        return self.reserved + sum(c.nbytes for c in self.cached.values())

    def all_reduce(self, tensors: Sequence[Tensor]) -> None:
        """Sum ``tensors`` over the ranks when running distributed; nothing otherwise."""
        if self.distributed:
            all_reduce_sum(tensors)

    # ------------------------------------------------------------------------------------------- passes
    def batches(self) -> Iterator[Tuple[int, Any]]:
        """``(index, model inputs)`` for every batch, checking that each pass sees the batches of the first."""
        count = 0
        for index, batch in enumerate(self.data):
            inputs = model_inputs(batch, self.model)
            mark = _fingerprint(inputs)
            if self.traced and index >= len(self.fingerprints):
                raise ValueError(f"{self.name}: the calibration data gave more batches on a later pass than the "
                                 f"{len(self.fingerprints)} of the first; every pass must see the same batches")
            if index < len(self.fingerprints):
                if mark != self.fingerprints[index]:
                    raise ValueError(f"{self.name}: the calibration data gave a different batch {index} on a later "
                                     "pass; every pass must see the same batches in the same order (use a "
                                     "DataLoader without shuffling, or a list of batches)")
            else:
                self.fingerprints.append(mark)
                self.samples += batch_size(inputs)
            count += 1
            yield index, inputs
        if count == 0:
            raise ValueError(f"{self.name}: data holds no batches (empty calibration data)")
        if count != len(self.fingerprints):
            raise ValueError(f"{self.name}: the calibration data gave {count} batches on a later pass and "
                             f"{len(self.fingerprints)} on the first (an iterator that stops early?); every pass "
                             "must see the same batches")

    def trace(self, captures: Dict[nn.Module, Capture], desc: str, train: Sequence[nn.Module] = (),
              outputs: Optional[List[Any]] = None) -> None:
        """The first pass over every batch (eval mode, no gradients; the modules in ``train`` in train mode):
        each ``captures[module](batch, call, input)`` sees every input of its module, and the span of every
        module is recorded on the first batch. The model's outputs are appended to ``outputs`` if given."""
        if self.fingerprints:
            raise RuntimeError(f"{self.name}: trace() runs once, before any stage pass")
        order, started = [0], {}

        def before(module, args):
            span = self.spans.get(module)
            if span is None:
                span = self.spans[module] = _Span(start=order[0])
            span.calls += 1
            order[0] += 1
            started.setdefault(module, []).append(time.perf_counter())

        def after(module, args, output):
            span = self.spans[module]
            span.end = order[0]
            span.seconds += time.perf_counter() - started[module].pop()
            span.output_bytes += _tensor_bytes(output)
            order[0] += 1

        structure = [m for m in self.model.modules() if m is not self.model]
        handles = [m.register_forward_pre_hook(before) for m in structure]
        handles += [m.register_forward_hook(after) for m in structure]
        with removed_after(handles):
            with self._captures(captures, stop=()) as counter:
                for index, inputs in self._progress(desc):
                    output = self._forward(index, inputs, counter, train)
                    if outputs is not None:
                        outputs.append(output)
                    for h in handles:  # the structure is that of the first batch
                        h.remove()
            self.traced = True

    def substitute(self, old: nn.Module, new: nn.Module) -> None:
        """``new`` has taken ``old``'s place in the model (e.g. a low-rank layer for a dense one): it inherits
        ``old``'s span, so that later passes can serve its outputs from the cache too."""
        if old in self.spans:
            self.spans[new] = self.spans[old]

    def start_of(self, modules: Sequence[nn.Module]) -> float:
        """The event index at which the first of ``modules`` starts in the traced pass (inf: never called)."""
        starts = [self.spans[m].start for m in modules if m in self.spans]
        return min(starts) if starts else math.inf

    def stage_pass(self, captures: Dict[nn.Module, Capture], desc: str,
                   before_batch: Optional[Callable[[int, Any], None]] = None) -> None:
        """One pass over every batch up to the last input that ``captures`` need, the outputs of modules that
        finish before the first captured module starts served from the frontier cache. ``before_batch(index,
        inputs)`` runs before each batch's forward (e.g. a forward of the same batch through other modules
        with :meth:`forward_uncached`)."""
        keep = self._plan_cache(self.start_of(list(captures)))
        with self._captures(captures, tuple(captures)) as counter, self._serving(keep) as recording:
            for index, inputs in self._progress(desc):
                if before_batch is not None:
                    before_batch(index, inputs)
                self._forward(index, inputs, counter)
        for module in recording:
            self.cached[module].complete = True

    def outputs_from(self, module: nn.Module, desc: str) -> List[Any]:
        """The model's outputs on every batch, computed from where ``module`` (a traced module, which the
        caller may have swapped for another) starts: modules that finish before it are served from the
        frontier cache."""
        keep = self._plan_cache(self.start_of([module]))
        outputs = []
        with self._captures({}, ()) as counter, self._serving(keep) as recording:
            for index, inputs in self._progress(desc):
                outputs.append(self._forward(index, inputs, counter))
        for cached in recording:
            self.cached[cached].complete = True
        return outputs

    def forward_uncached(self, index: int, inputs: Any, captures: Dict[nn.Module, Capture]) -> None:
        """Batch ``index`` through the model as it is now, computing everything (no cache), up to the inputs
        that ``captures`` need."""
        outer, self._uncached = self._uncached, True
        try:
            with self._captures(captures, tuple(captures), uncached=True) as counter:
                self._forward(index, inputs, counter)
        finally:
            self._uncached = outer

    def _progress(self, desc: str) -> Iterable[Tuple[int, Any]]:
        total = len(self.fingerprints) or None
        return progress(self.batches(), f"{self.name}: {desc}", self.show_progress, total=total)

    def _forward(self, index: int, inputs: Any, counter: "_Counter", train: Sequence[nn.Module] = ()) -> Any:
        """Batch ``index`` through the model; its output, or None where a stage stopped it."""
        counter.start(index)
        if not self._uncached:
            self._current_batch = index
            self._served_calls.clear()
        output = None
        with eval_mode(self.model):
            for module in train:
                module.train()
            try:
                output = call_model(self.model, inputs)
            except _StageDone:
                pass
        self.clock.batch_done()
        return output

    @contextlib.contextmanager
    def _captures(self, captures: Dict[nn.Module, Capture], stop: Tuple[nn.Module, ...], uncached: bool = False):
        """Pre-hooks feeding each captured module's inputs to its capture; with ``stop``, the forward ends once
        every module in it has had as many calls as on the first batch. Hooks of a stage pass stay silent
        during a :meth:`forward_uncached` inside it, and the other way round."""
        counter = _Counter({m: max(self.spans[m].calls, 1) if m in self.spans else 1 for m in stop})

        def hook(module, args):
            if self._uncached != uncached:
                return
            call = counter.called(module)
            x = args[0] if args else None
            if isinstance(x, Tensor):
                captures[module](counter.batch, call, x.detach())
            if counter.finished():
                raise _StageDone

        handles = [m.register_forward_pre_hook(hook) for m in captures]
        with removed_after(handles):
            yield counter

    # ------------------------------------------------------------------------------------ frontier cache
    def _frontier(self, start: float) -> List[nn.Module]:
        """The largest modules that finish before event ``start`` (none of their ancestors does)."""
        done = {m for m, s in self.spans.items() if 0 <= s.end < start}
        return [m for name, m in self.model.named_modules()
                if m in done and not any(a in done for a in self._ancestors(name))]

    def _ancestors(self, name: str) -> List[nn.Module]:
        parts = name.split(".")
        return [self.model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]

    def _plan_cache(self, start: float) -> List[nn.Module]:
        """The modules whose outputs are served from (or recorded into) the cache on this pass: frontier modules
        by wall time saved per byte, within the budget. A complete cache inside a frontier module that is
        only being recorded keeps serving for this pass; every other cache off the frontier is dropped."""
        frontier = self._frontier(start)
        batches = max(len(self.fingerprints), 1)
        keep, budget = [], self.cache_bytes - self.reserved
        for module in sorted(frontier, key=lambda m: -self.spans[m].seconds / max(self.spans[m].output_bytes, 1)):
            size = self.cached[module].nbytes if module in self.cached else self.spans[module].output_bytes * batches
            if 0 < size <= budget:
                keep.append(module)
                budget -= size
            elif size > budget and not self._budget_noted:
                self._budget_noted = True
                self.notes.append(f"cache_bytes={self.cache_bytes} holds only part of the stage outputs: the rest "
                                  "is recomputed on every stage pass")
        complete = {m for m in keep if m in self.cached and self.cached[m].complete}
        for name, module in self.model.named_modules():
            if module in self.cached and module not in keep:
                ancestors = self._ancestors(name)
                if any(a in keep for a in ancestors) and not any(a in complete for a in ancestors) \
                        and self.cached[module].complete:
                    keep.append(module)  # serves while its ancestor is recorded
                else:
                    del self.cached[module]
        return keep

    @contextlib.contextmanager
    def _serving(self, keep: List[nn.Module]):
        """Modules in ``keep`` with a complete cache return their cached outputs without running (as aliases
        that the model may write into); the others record their outputs on this pass. Yields the modules being
        recorded."""
        recording = [m for m in keep if m not in self.cached or not self.cached[m].complete]
        calls = self._served_calls
        handles, patched = [], []
        for module in keep:
            if module in recording:
                self.cached[module] = _CachedOutputs()

                def record(mod, args, output):
                    if self._uncached:
                        return None
                    entry = self.cached[mod]
                    entry.per_batch.setdefault(self._current_batch, []).append(output)
                    entry.nbytes += _tensor_bytes(output)
                    return _aliases(output)

                handles.append(module.register_forward_hook(record))
            else:
                def serve(*args, _module=module, **kwargs):
                    if self._uncached:
                        return type(_module).forward(_module, *args, **kwargs)
                    call = calls.get(_module, 0)
                    calls[_module] = call + 1
                    return _aliases(self.cached[_module].per_batch[self._current_batch][call])

                patched.append((module, module.__dict__.get("forward")))
                module.forward = serve
        try:
            with removed_after(handles):
                yield recording
        finally:
            for module, previous in patched:
                del module.forward
                if previous is not None:  # an instance-level forward of the caller's (e.g. accelerate's hooks)
                    module.forward = previous


class _Counter:
    """Calls of the captured modules within the current batch, and whether a stage has all it needs."""

    def __init__(self, needed: Dict[nn.Module, int]):
        self.needed, self.calls, self.batch = needed, {}, 0

    def start(self, batch: int) -> None:
        self.batch, self.calls = batch, {}

    def called(self, module: nn.Module) -> int:
        call = self.calls.get(module, 0)
        self.calls[module] = call + 1
        return call

    def finished(self) -> bool:
        return bool(self.needed) and all(self.calls.get(m, 0) >= n for m, n in self.needed.items())
