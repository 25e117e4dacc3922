"""Honest latency measurement: warm-up, many repeats, median and spread, CUDA events on GPU.

Used by ``rankprune bench`` and by the scripts in ``benchmarks/``; results are written as JSON with the
environment they were measured in (device, torch version, commit) so that ratios can be traced.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ._inputs import eval_mode


@dataclass
class Timing:
    """One latency measurement: median, 10th and 90th percentile in milliseconds, and how many replicates."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    def as_dict(self) -> Dict[str, float]:
        """The fields as a JSON-able dict."""
        return asdict(self)


_MAX_REPLICATES = 100000
# CPU calls shorter than this are timed in blocks (torch.utils.benchmark), longer ones one by one.
_BLOCK_BELOW_S = 1e-3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    device="cpu",
    warmup: int = 3,
    repeats: int = 20,
    min_time_s: float = 0.0,
    cuda_graph: bool = False,
) -> Timing:
    """Time ``fn()`` on ``device``: ``warmup`` untimed calls, then at least ``repeats`` timed ones (and at
    least ``min_time_s`` seconds in all); returns the median and the 10th/90th percentiles in milliseconds.

    On CUDA each call is bracketed by CUDA events (device time, no host sync inside the timed region); with
    ``cuda_graph=True`` the call is captured once into a CUDA graph and replayed, which removes the launch
    overhead (``fn`` must then be capturable: no host syncs, no allocation that changes between calls).
    On the CPU, calls shorter than a millisecond are timed in blocks by
    ``torch.utils.benchmark.Timer.blocked_autorange`` (timer overhead amortised; a replicate is the mean of
    one block), longer ones one by one with ``time.perf_counter``; ``Timing.repeats`` counts calls.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"measure: need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    device = torch.device(device)
    if cuda_graph and device.type != "cuda":
        raise ValueError("measure: cuda_graph=True needs a CUDA device")
    last_call_s = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        last_call_s = time.perf_counter() - t0
    _sync(device)
    if device.type == "cuda":
        times = _cuda_event_times(_graphed(fn, device) if cuda_graph else fn, device, repeats, min_time_s)
        calls = len(times)
    else:
        times, calls = _cpu_times(fn, repeats, min_time_s, last_call_s)
    median, p10, p90 = spread(times)
    return Timing(median_ms=median, p10_ms=p10, p90_ms=p90, repeats=calls)


def spread(values: List[float]) -> Tuple[float, float, float]:
    """``(median, 10th percentile, 90th percentile)`` of ``values`` (inclusive method; one value: itself)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), q[0], q[-1]


def _graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """Capture ``fn`` into a CUDA graph (after a warm-up on a side stream, as the CUDA graphs docs ask)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    _sync(device)
    return graph.replay


def _cuda_event_times(run: Callable[[], object], device: torch.device, repeats: int, min_time_s: float) -> List[float]:
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time_s:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if len(times) >= _MAX_REPLICATES:
            break
    return times


def _cpu_times(fn: Callable[[], object], repeats: int, min_time_s: float,
               call_s: Optional[float]) -> Tuple[List[float], int]:
    """Per-call milliseconds of each replicate and the number of calls timed."""
    if call_s is None:
        t0 = time.perf_counter()
        fn()
        call_s = time.perf_counter() - t0
    if call_s >= _BLOCK_BELOW_S:
        times: List[float] = []
        start_all = time.perf_counter()
        while len(times) < repeats or (time.perf_counter() - start_all) < min_time_s:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if len(times) >= _MAX_REPLICATES:
                break
        return times, len(times)
    from torch.utils import benchmark as tub

    timer = tub.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times, calls = [], 0
    while calls < repeats or not times:
        m = timer.blocked_autorange(min_run_time=max(min_time_s, (repeats - calls) * max(call_s, 1e-7), 0.01))
        times.extend(t * 1e3 for t in m.times)
        calls += len(m.times) * m.number_per_run
        min_time_s = 0.0
    return times, calls


def latency(
    model: torch.nn.Module,
    example_inputs,
    device=None,
    warmup: int = 10,
    repeats: int = 50,
    min_time_s: float = 0.0,
    cuda_graph: bool = False,
) -> Timing:
    """Inference latency of ``model`` on ``example_inputs`` (a tensor, a tuple of positional arguments, or a
    dict of keyword arguments) under ``torch.inference_mode()``, measured with :func:`measure`.

    ``device`` defaults to the device of the inputs; the model and the inputs must already live there
    (nothing is moved, so the caller decides about dtype and memory format).
    """
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TypeError(f"latency: example_inputs must be a tensor, tuple or dict, got {type(example_inputs).__name__}")
    if device is None:
        tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
    with eval_mode(model, no_grad=False), torch.inference_mode():
        return measure(lambda: model(*args, **kwargs), device=device, warmup=warmup, repeats=repeats,
                       min_time_s=min_time_s, cuda_graph=cuda_graph)


def environment(device="cpu") -> Dict[str, object]:
    """Where a measurement was taken: device name, torch/CUDA versions, commit, date, host."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"{name} ({torch.get_num_threads()} threads)"
    # RANKPRUNE_COMMIT first: a copy of the tree (a lent GPU machine) may carry a .git whose HEAD is not the code.
    commit = os.environ.get("RANKPRUNE_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    from . import ops

    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_kernels_built": ops.cuda_kernels_built(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def write_results(name: str, payload: Dict[str, object], out_dir: Optional[str] = None) -> str:
    """Write ``payload`` (which should hold ``environment(...)`` under "environment") as
    ``<out_dir>/<name>-<device_type>-<UTC timestamp>.json`` and return the path."""
    out_dir = out_dir or os.path.join(os.getcwd(), "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    env = payload.get("environment", {})
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(out_dir, f"{name}-{env.get('device_type', 'cpu')}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    return path


def format_value(value) -> str:
    """How a table cell shows a value: floats with 3 significant digits (more for large ones), None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(headers: List[str], rows: List[List[object]]) -> str:
    """A Markdown table with aligned columns (readable in a terminal as well); cells via ``format_value``."""
    cells = [[str(h) for h in headers]] + [[format_value(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])
