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
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


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
    least ``min_time_s`` seconds in all). On CUDA each call is bracketed by CUDA events (device time, no host
    sync inside the timed region); with ``cuda_graph=True`` the call is captured once and replayed, which
    removes launch overhead. On CPU, wall time with ``time.perf_counter``.
    """
    import time

    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    run = fn
    if cuda_graph:
        if device.type != "cuda":
            raise ValueError("cuda_graph=True needs a CUDA device")
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
        run()
        _sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time_s:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 100000:
            break
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Timing(median_ms=statistics.median(times), p10_ms=q[0], p90_ms=q[-1], repeats=len(times))


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
