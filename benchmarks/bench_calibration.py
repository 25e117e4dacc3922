"""Cost of data-aware decomposition: ``rankprune.decompose(data=calib, target_flops=0.5)`` against the
data-free ``decompose(target_flops=0.5)`` and against one forward pass over the calibration data, side by
side in one run, with the peak memory of each (issue 20's target: the data-aware call costs at most the
data-free one plus 8 forward passes over the calibration data, and that extra cost grows linearly with the
number of images).

Models: torchvision resnet18, resnet50, mobilenet_v2 (random weights, eval mode, 224x224) and a GPT-2 built
from a config by Hugging Face transformers (4 layers, width 256, 4 heads, vocabulary 8192, random weights;
its "images" are sequences of 128 random token ids, fed as ``{"input_ids": ...}``; the tied LM head is
skipped by decompose). Calibration data: 32 and 256 images (``--images``) in batches of 32 (``--batch-size``),
random normal pixels, seeded.

For each model and number of images N, three measurements, each in a fresh process (``--one``):

(a) ``forward``: one pass over the N calibration images, eval mode, no_grad; the median of ``--repeats`` (3)
    passes after a one-batch warm-up. This is the unit the extra cost is counted in.
(b) ``data-free``: ``decompose(model, target_flops=0.5, example_inputs=x1, measure_latency=False)``, x1 one
    image (batch 1; the result is not timed against dense, which would cost (b) and (c) the same); it does
    not depend on N, so it runs once per model.
(c) ``data-aware``: the same with ``data=calib``.

(b) and (c) time the median of ``--calls`` calls (default 1) in their process: near the target one call's
noise decides the verdict (ResNet-18 at 32 images measured 6.1 and 8.4 extra passes in two runs of one commit).

Reported: ``extra_passes = (c - b) / a`` (target: <= 8), the same in CPU seconds (``extra_passes_cpu``: each
measuring process's user + system time, so less sensitive to other processes on a shared machine), the
extra passes beyond the factorizations (``extra_passes_beyond_factorizations``: the same with each call's
``report["calibration"]`` phases ``factorization`` and ``refit factorization`` taken out, the measure of issue
24's GPU target), and its linearity: ``extra_growth`` is ``(c - b)`` at
N over ``(c - b)`` at the smallest N, next to ``linear_growth = N / smallest N`` (equal when the extra cost is
linear in N). ``report["calibration"]`` (per-phase seconds, peak memory, pass count) is printed and kept
where decompose returns it.

Peak memory (``*_peak_mib``): the measuring process resets its peak resident set size just before the
measured call (``/proc/self/clear_refs``, Linux), and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
after the call minus its resident set size (``VmRSS``) just before it: what the call adds on top of the
interpreter, the model, the calibration data and one warm-up forward. Where the reset is unavailable the
peak is the process's whole-life ``ru_maxrss`` (an upper bound; ``peak_reset`` says which). Each measurement
also records ``cpu_s`` (the process's CPU seconds during the call) and the load average before and after it:
on a shared machine, a call whose ``cpu_s`` is far below threads x seconds was slowed by other processes.

    python benchmarks/bench_calibration.py                              # everything (hours on 2 CPU threads)
    python benchmarks/bench_calibration.py --quick                      # smoke run, 1-2 min on an idle machine
    python benchmarks/bench_calibration.py --models resnet18 --images 32 --timeout 300
    python benchmarks/bench_calibration.py --models resnet18 --measure forward,data-free

A measurement that runs past ``--timeout`` seconds is killed and recorded as timed out (then
``extra_passes`` is a lower bound, shown as ``>x``). ``--quick`` runs resnet18 at 112x112 and a 2-layer
GPT-2 of width 64 (sequences of 32 tokens) with 4 and 8 images in batches of 4, and writes
``bench_calibration-quick-...json`` so that it does not replace the full run's table.

GPU (``--device cuda``; exits at once with one line where ``torch.cuda.is_available()`` is False): the model,
every calibration batch and the example input are built on the CPU with the same seed as on the CPU and moved
to the GPU; each measuring process first runs one warm-up forward on every distinct input shape (the example
input and the calibration batches: lazy CUDA module loading and cuDNN's per-shape algorithm choice are not
timed; ``torch.backends.cudnn.benchmark`` stays at its default, off), and every timed region is bracketed by
``torch.cuda.synchronize()``. Peak memory is then GPU memory (``*_peak_gpu_mib``): the peak of
``torch.cuda.max_memory_allocated()`` over the call (stats reset just before it; the resets that decompose's
phase clock makes inside the call are folded in, so it is the peak of the whole call) minus
``torch.cuda.memory_allocated()`` just before it; the host-side fields (``*_peak_mib``, ``cpu_s``, load) are kept
in the JSON. ``--threads`` sets the CPU threads only (the host side of the GPU run). The JSON is
``bench_calibration-cuda-<stamp>.json`` and the table's setting line names the GPU; its CPU-seconds column is
left out (on a GPU the host's CPU seconds say little about the work). The budgeted check of issue 24's target
(data-aware ``decompose`` of ResNet-50 with 256 images at most 8 forward passes beyond the factorizations):
three processes (forward, data-free, data-aware), about a minute on one H100 once rankprune's extension
is built there (``gpu_check.sh``'s build step):

    python benchmarks/bench_calibration.py --device cuda --models resnet50 --images 256 --repeats 3 --out DIR

With one image count the extra cost's growth is that count over itself (``1 (1)``): give two counts
(``--images 32,256``, two processes more) to see the linearity.
"""
import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))  # a developer build (PYTHONPATH=python) works as well

import rankprune  # noqa: E402
from rankprune.benchmark import environment, markdown_table, write_results  # noqa: E402

TORCHVISION_MODELS = ("resnet18", "resnet50", "mobilenet_v2")
# GPT-2 configurations built without a download: (layers, width, heads, vocabulary)
GPT2_CONFIGS = {"gpt2": (4, 256, 4, 8192), "gpt2-tiny": (2, 64, 2, 512)}
MODELS = TORCHVISION_MODELS + tuple(GPT2_CONFIGS)
# Budgets below --target-flops where that is out of reach: GPT-2's tied LM head stays dense (replacing it
# would untie it), so at the default min_rank (a quarter of each layer's rank) half of its FLOPs cannot be
# cut; its rows use this fraction, and the table says so.
REACHABLE_TARGET = {"gpt2": 0.7, "gpt2-tiny": 0.7}
MEASUREMENTS = ("forward", "data-free", "data-aware")
TARGET_EXTRA_PASSES = 8.0
# The phases of decompose's report["calibration"] that factor matrices (no forward pass): issue 24 counts the
# passes "beyond the factorizations".
FACTORIZATION_PHASES = ("factorization", "refit factorization")
MEMORY_NOTE = ("peak MiB: ru_maxrss after the call (peak reset just before it via /proc/self/clear_refs) minus "
               "VmRSS just before it, in a fresh process per measurement: what the call adds on top of the "
               "model, the calibration data and a warm-up forward")
BEYOND = ("beyond factorizations = the same with each call's factoring phases (report[\"calibration\"]: "
          "factorization, refit factorization) taken out")
GROWTH = ("extra growth = the extra seconds over those at the smallest image count (linear: the ratio of image "
          "counts, in parentheses)")
GPU_MEMORY_NOTE = ("peak GPU MiB: torch.cuda.max_memory_allocated over the call (peak stats reset just before it; "
                   "decompose's own resets inside the call folded in) minus torch.cuda.memory_allocated just "
                   "before it, in a fresh process per measurement: what the call adds on top of the model, the "
                   "calibration data (on the GPU) and the warm-up forwards")


# ------------------------------------------------------------------------------------------------ one measurement


def _rss_kib() -> int:
    """The resident set size now (VmRSS), in KiB; 0 where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM, which ru_maxrss reads) to its current RSS; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process so far: next to the wall time, how much of the machine the
    call got (about threads x seconds when it ran alone; much less when other processes took the cores)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (a timed region's edges); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_device(inputs, device: torch.device):
    """A tensor, or a dict of keyword tensors, on ``device``."""
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def _shape_key(inputs):
    return (tuple(sorted((k, tuple(v.shape)) for k, v in inputs.items())) if isinstance(inputs, dict)
            else tuple(inputs.shape))


class _GpuPeak:
    """The peak allocated CUDA memory over a block, in bytes (``peak``), with what was allocated on entry
    (``before``). decompose's phase clock calls ``torch.cuda.reset_peak_memory_stats`` at each phase's start;
    inside the block that function first folds the peak so far into ``peak``, so ``peak`` covers the whole
    block (and the phase clock's own per-phase peaks are unchanged)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.before = self.peak = 0

    def __enter__(self):
        self._reset = torch.cuda.reset_peak_memory_stats
        self.before = torch.cuda.memory_allocated(self.device)
        self._reset(self.device)
        self.peak = self.before

        def reset(device=None):
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            self._reset(device)

        torch.cuda.reset_peak_memory_stats = reset
        return self

    def __exit__(self, *exc):
        torch.cuda.reset_peak_memory_stats = self._reset
        self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        return False


def build(spec: Dict[str, object]):
    """``(model, calibration batches, x1)`` for a measurement spec: the model in eval mode with seeded random
    weights, ``spec["images"]`` samples in batches of ``spec["batch"]``, and one sample as example inputs."""
    name, images, batch, seed = spec["model"], int(spec["images"]), int(spec["batch"]), int(spec["seed"])
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sizes = [min(batch, images - i) for i in range(0, images, batch)]
    if name in TORCHVISION_MODELS:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        side = int(spec["size"])
        calib = [torch.randn(b, 3, side, side, generator=gen) for b in sizes]
        x1 = torch.randn(1, 3, side, side, generator=gen)
    elif name in GPT2_CONFIGS:
        import transformers

        layers, width, heads, vocab = GPT2_CONFIGS[name]
        seq = int(spec["seq_len"])
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=layers,
                                         n_head=heads, use_cache=False)
        model = transformers.GPT2LMHeadModel(config)
        calib = [{"input_ids": torch.randint(0, vocab, (b, seq), generator=gen)} for b in sizes]
        x1 = {"input_ids": torch.randint(0, vocab, (1, seq), generator=gen)}
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return model.eval(), calib, x1


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def measure_one(spec: Dict[str, object]) -> Dict[str, object]:
    """Run one measurement (``spec["measure"]``: forward, data-free or data-aware) in this process and return
    its seconds, peak memory and, for decompose, what its report says. ``spec["device"]`` (default cpu):
    on cuda the model and the inputs are moved to the GPU after they are built (on the CPU, seeded)."""
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec.get("device", "cpu"))
    model, calib, x1 = build(spec)
    if device.type == "cuda":
        model, calib, x1 = model.to(device), [_to_device(b, device) for b in calib], _to_device(x1, device)
    with torch.no_grad():
        _call(model, calib[0] if spec["measure"] == "forward" else x1)  # warm-up: lazy init, allocator
        if device.type == "cuda":  # each input shape once: lazy module loading, cuDNN's per-shape choices
            warmed = {_shape_key(calib[0] if spec["measure"] == "forward" else x1)}
            for inputs in [x1] + calib:
                if _shape_key(inputs) not in warmed:
                    warmed.add(_shape_key(inputs))
                    _call(model, inputs)
    _sync(device)
    gc.collect()
    result: Dict[str, object] = {}
    gpu = _GpuPeak(device) if device.type == "cuda" else None
    if gpu is not None:
        gpu.__enter__()
    rss_before = _rss_kib()
    reset = _reset_peak()
    load_before, cpu_before = os.getloadavg()[0], _cpu_s()
    if spec["measure"] == "forward":
        times = []
        with torch.no_grad():
            for _ in range(int(spec["repeats"])):
                _sync(device)
                start = time.perf_counter()
                for batch in calib:
                    _call(model, batch)
                _sync(device)
                times.append(time.perf_counter() - start)
        result["seconds"] = statistics.median(times)
        result["times_s"] = times
        result["passes"] = len(times)
    else:
        data = calib if spec["measure"] == "data-aware" else None
        times = []
        for _ in range(int(spec.get("calls", 1))):  # the median call counts (--calls)
            gc.collect()
            _sync(device)
            start = time.perf_counter()
            # measure_latency=False: timing the result against dense (the default with target_flops) costs
            # both calls the same and would only add its noise to their difference
            _, plan, report = rankprune.decompose(model, data=data, target_flops=float(spec["target_flops"]),
                                                  example_inputs=x1, progress=False, measure_latency=False)
            _sync(device)
            times.append(time.perf_counter() - start)
        result["seconds"] = statistics.median(times)
        result["times_s"] = times
        result["passes"] = len(times)
        total = report["total"]
        result["layers"] = len(plan["layers"])
        result["skipped"] = len(report["skipped"])
        result["flops_kept"] = total["flops"] / total["flops_dense"] if total.get("flops_dense") else None
        result["output_rel_error"] = total.get("output_rel_error")
        if report.get("calibration") is not None:
            result["calibration"] = report["calibration"]
    peak = _maxrss_kib()
    if gpu is not None:
        gpu.__exit__(None, None, None)
        result.update(peak_gpu_mib=(gpu.peak - gpu.before) / 2**20, gpu_allocated_before_mib=gpu.before / 2**20)
    result.update(peak_mib=(peak - rss_before) / 1024, rss_before_mib=rss_before / 1024, peak_reset=reset,
                  cpu_s=_cpu_s() - cpu_before, load_before=load_before, load_after=os.getloadavg()[0])
    result["cpu_s_per_call"] = result["cpu_s"] / result.get("passes", 1)
    return result


# ------------------------------------------------------------------------------------------------ the whole run


def run_child(spec: Dict[str, object], timeout: Optional[float]) -> Dict[str, object]:
    """``measure_one(spec)`` in a fresh process (this script with ``--one``); a timeout or a failure is
    recorded, not raised."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec), "--one-out", out]
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"timed_out": True, "seconds": None, "timeout_s": timeout,
                    "wall_s": time.perf_counter() - start}
        if proc.returncode != 0 or not os.path.exists(out):
            return {"failed": True, "seconds": None, "rc": proc.returncode,
                    "error": (proc.stdout + proc.stderr)[-2000:]}
        with open(out) as f:
            result = json.load(f)
        result["wall_s"] = time.perf_counter() - start  # with the process start, imports and model build
        return result


def _available(model: str) -> Optional[str]:
    """None if the package the model needs imports, else why it is skipped."""
    module = "torchvision" if model in TORCHVISION_MODELS else "transformers"
    try:
        __import__(module)
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        return f"skipped: {module} is not importable ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def summarize_rows(rows: List[Dict[str, object]]) -> None:
    """Fill each row's ``extra_passes = (data_aware - data_free) / forward`` (a lower bound ``extra_passes_min``
    when the data-aware call timed out), ``extra_passes_cpu`` (the same in CPU seconds of the measuring
    processes: less sensitive to other processes on the machine), ``extra_growth`` (the extra seconds over those of the model's smallest
    image count) and ``linear_growth`` (the image count over the smallest), in place."""
    for row in rows:
        a, b, c = row.get("forward_s"), row.get("data_free_s"), row.get("data_aware_s")
        row["extra_s"] = c - b if c is not None and b is not None else None
        row["extra_passes"] = row["extra_s"] / a if row["extra_s"] is not None and a else None
        row["extra_passes_min"] = None
        if c is None and row.get("data_aware_timeout_s") and b is not None and a:
            row["extra_passes_min"] = (row["data_aware_timeout_s"] - b) / a
        a_cpu, b_cpu, c_cpu = row.get("forward_cpu_s"), row.get("data_free_cpu_s"), row.get("data_aware_cpu_s")
        row["extra_passes_cpu"] = ((c_cpu - b_cpu) / a_cpu if None not in (a_cpu, b_cpu, c_cpu) and a_cpu
                                   and c is not None else None)
        row["target_met"] = None if row["extra_passes"] is None else row["extra_passes"] <= TARGET_EXTRA_PASSES
        fa, fb = (_factorization_s(row, "data-aware"), _factorization_s(row, "data-free"))
        row["extra_passes_beyond_factorizations"] = (
            (row["extra_s"] - (fa - fb)) / a if None not in (row["extra_s"], fa, fb) and a else None)
    by_model: Dict[str, List[Dict[str, object]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    for model_rows in by_model.values():
        base = min(model_rows, key=lambda r: r["images"])
        for row in model_rows:
            row["linear_growth"] = row["images"] / base["images"]
            row["extra_growth"] = (row["extra_s"] / base["extra_s"]
                                   if row["extra_s"] is not None and base["extra_s"] else None)


def _factorization_s(row: Dict[str, object], measurement: str) -> Optional[float]:
    """Seconds a measured decompose call spent factoring (its ``report["calibration"]`` phases
    ``FACTORIZATION_PHASES``), None where it recorded no phases."""
    calibration = row.get("runs", {}).get(measurement, {}).get("calibration")
    if not calibration:
        return None
    return sum(p["seconds"] for name, p in calibration["phases"].items() if name in FACTORIZATION_PHASES)


def _rounded(value):
    """``value`` with its floats to 3 significant digits (nested dicts and lists too), for the table's notes."""
    if isinstance(value, float):
        return float(f"{value:.3g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _fmt(value, digits: str = ".3g") -> str:
    if value is None:
        return "-"
    text = format(value, digits)
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # "-0" (RSS went down a little): "0"


def markdown(rows: List[Dict[str, object]], config: Dict[str, object]) -> str:
    """The README table: one row per model and image count. ``config["device"] == "cuda"`` (a GPU run, its
    name in ``config["gpu"]``): GPU peak memory, and no CPU-seconds column."""
    cuda = config.get("device", "cpu") == "cuda"
    headers = ["model", "input", "images", "forward pass s", "data-free s", "data-aware s", "extra passes",
               "beyond factorizations", "in CPU s", "extra growth (linear)", "peak MiB fwd / free / aware"]
    if cuda:
        headers[8:] = ["extra growth (linear)", "peak GPU MiB fwd / free / aware"]
    peak_keys = [f"{m}_peak_{'gpu_' if cuda else ''}mib" for m in ("forward", "data_free", "data_aware")]
    lines = []
    for r in rows:
        aware = _fmt(r.get("data_aware_s"), ".1f") if r.get("data_aware_s") is not None else (
            f">{r['data_aware_timeout_s']:.0f} (timed out)" if r.get("data_aware_timeout_s") else "-")
        extra = (f"**{r['extra_passes']:.1f}**" if r.get("extra_passes") is not None else
                 (f">{r['extra_passes_min']:.1f}" if r.get("extra_passes_min") is not None else "-"))
        growth = "-" if r.get("extra_growth") is None else f"{r['extra_growth']:.3g} ({r['linear_growth']:g})"
        peaks = " / ".join(_fmt(r.get(k), ".0f") for k in peak_keys)
        line = [r["model"], r["input"], r["images"], _fmt(r.get("forward_s")),
                _fmt(r.get("data_free_s"), ".1f") if r.get("data_free_s") is not None else "-", aware, extra,
                _fmt(r.get("extra_passes_beyond_factorizations"), ".1f"), _fmt(r.get("extra_passes_cpu"), ".1f"),
                growth, peaks]
        if cuda:
            del line[8]
        lines.append(line)
    if cuda:
        setting = (f"`decompose(data=calib, target_flops={config['target_flops']})` against the data-free call "
                   f"and one forward pass over the calibration data (median of {config['repeats']}, after a "
                   f"warm-up forward on each input shape), random weights, random inputs in batches of "
                   f"{config['batch_size']}, on the GPU ({config.get('gpu') or 'cuda'}; model and data on the "
                   "device, timed regions bracketed by torch.cuda.synchronize()); extra passes = (data-aware - "
                   f"data-free) / forward pass (target <= {TARGET_EXTRA_PASSES:g}), in wall seconds; {BEYOND}; "
                   f"{GROWTH}. {GPU_MEMORY_NOTE}.")
    else:
        setting = (f"`decompose(data=calib, target_flops={config['target_flops']})` against the data-free call and "
                   f"one forward pass over the calibration data (median of {config['repeats']}; decompose calls: "
                   f"median of {config.get('calls', 1)}), random weights, "
                   f"random inputs in batches of {config['batch_size']}, {config['threads']} CPU threads; extra "
                   f"passes = (data-aware - data-free) / forward pass (target <= {TARGET_EXTRA_PASSES:g}), in wall "
                   "seconds, and in CPU seconds of the measuring process (less sensitive to other load); "
                   f"{BEYOND}; {GROWTH}. {MEMORY_NOTE}.")
    notes = [f"- {r['model']}: {r['note']}" for r in rows if r.get("note")]
    for r in rows:
        calibration = r.get("runs", {}).get("data-aware", {}).get("calibration")
        if calibration is not None:
            notes.append(f"- {r['model']}, {r['images']} images, `report[\"calibration\"]`: "
                         f"`{json.dumps(_rounded(calibration))}`")
    return setting + "\n\n" + markdown_table(headers, lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(MODELS)} "
                   "(default resnet18,resnet50,mobilenet_v2,gpt2)")
    p.add_argument("--images", default=None, help="calibration set sizes, comma-separated (default 32,256)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration batch size (default 32)")
    p.add_argument("--size", type=int, default=None, help="image side for the torchvision models (default 224)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per GPT-2 sequence (default 128)")
    p.add_argument("--measure", default=",".join(MEASUREMENTS), help="which of forward,data-free,data-aware")
    p.add_argument("--target-flops", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes; the median counts (default 3)")
    p.add_argument("--calls", type=int, default=1, help="timed decompose calls per measurement, in one process; "
                   "the median counts (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model, the data and the measured calls run (default cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=0, help="seconds per measurement, 0 for none (default 0)")
    p.add_argument("--quick", action="store_true", help="resnet18 at 112x112 and a tiny GPT-2, 4 and 8 images")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    p.add_argument("--one-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one is not None:
        result = measure_one(json.loads(args.one))
        with open(args.one_out, "w") as f:
            json.dump(result, f, default=str)  # whatever report["calibration"] holds, it reaches the parent
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench_calibration: --device cuda needs a CUDA GPU, but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda})", file=sys.stderr)
        return 2

    quick = dict(models="resnet18,gpt2-tiny", images="4,8", batch_size=4, size=112, seq_len=32)
    full = dict(models="resnet18,resnet50,mobilenet_v2,gpt2", images="32,256", batch_size=32, size=224, seq_len=128)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    models = [m for m in args.models.split(",") if m]
    images = sorted(int(n) for n in args.images.split(","))
    measures = [m for m in args.measure.split(",") if m]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    for m in measures:
        if m not in MEASUREMENTS:
            p.error(f"unknown measurement {m!r}; known: {', '.join(MEASUREMENTS)}")
    if min(images) < 1 or args.batch_size < 1:
        p.error("--images and --batch-size must be positive")
    timeout = args.timeout or None
    torch.set_num_threads(args.threads)  # for environment(): it names the thread count

    rows: List[Dict[str, object]] = []
    jobs = []  # (row indices, measurement, spec)
    for model in models:
        first = len(rows)
        note = _available(model)
        for n in images:
            rows.append({"model": model, "images": n, "note": note,
                         "input": (f"3x{args.size}x{args.size}" if model in TORCHVISION_MODELS
                                   else f"{args.seq_len} tokens")
                         + (f", target_flops {REACHABLE_TARGET[model]}" if model in REACHABLE_TARGET else "")})
        if note:
            print(f"{model}: {note}", flush=True)
            continue
        base = dict(model=model, batch=args.batch_size, size=args.size, seq_len=args.seq_len, threads=args.threads,
                    seed=args.seed, target_flops=max(args.target_flops, REACHABLE_TARGET.get(model, 0.0)),
                    repeats=args.repeats, calls=args.calls, device=args.device)
        if "data-free" in measures:  # independent of the calibration data: once per model
            jobs.append((list(range(first, len(rows))), "data-free", dict(base, images=1, measure="data-free")))
        for i, n in enumerate(images):
            for m in ("forward", "data-aware"):
                if m in measures:
                    jobs.append(([first + i], m, dict(base, images=n, measure=m)))

    from tqdm.auto import tqdm

    bar = tqdm(jobs, desc="bench_calibration", unit="run", disable=args.no_progress)
    for indices, measure, spec in bar:
        bar.set_postfix_str(f"{spec['model']} {measure} {spec['images']} images")
        result = run_child(spec, timeout)
        key = measure.replace("-", "_")
        for i in indices:
            rows[i][f"{key}_s"] = result.get("seconds")
            if result.get("peak_mib") is not None:
                rows[i][f"{key}_peak_mib"] = result["peak_mib"]
                rows[i][f"{key}_cpu_s"] = result["cpu_s_per_call"]
            if result.get("peak_gpu_mib") is not None:
                rows[i][f"{key}_peak_gpu_mib"] = result["peak_gpu_mib"]
            if result.get("timed_out"):
                rows[i][f"{key}_timeout_s"] = timeout
            rows[i].setdefault("runs", {})[measure] = result
        if result.get("timed_out"):
            status = f"timed out after {timeout:.0f} s"
        elif result.get("failed"):
            status = "FAILED: " + (result["error"].strip().splitlines() or ["(no output)"])[-1]
        else:
            status = (f"{result['seconds']:.2f} s ({result['cpu_s']:.1f} CPU s in all, load "
                      f"{result['load_before']:.1f}), peak +{result['peak_mib']:.0f} MiB")
            if result.get("peak_gpu_mib") is not None:
                status += f", GPU peak +{result['peak_gpu_mib']:.0f} MiB"
        extra = ""
        if result.get("flops_kept") is not None:
            extra = f", {result['layers']} layers, FLOPs kept {result['flops_kept']:.3f}"
        bar.write(f"{spec['model']:<13} {measure:<10} {spec['images']:>4} images: {status}{extra}")
        if result.get("calibration") is not None:
            bar.write(f"  report['calibration']: {json.dumps(result['calibration'])}")
    bar.close()

    summarize_rows(rows)
    config = {"models": models, "images": images, "batch_size": args.batch_size, "size": args.size,
              "seq_len": args.seq_len, "measure": measures, "target_flops": args.target_flops,
              "repeats": args.repeats, "calls": args.calls, "threads": args.threads, "seed": args.seed,
              "timeout_s": timeout,
              "quick": args.quick, "gpt2_configs": {k: dict(zip(("layers", "width", "heads", "vocab"), v))
                                                    for k, v in GPT2_CONFIGS.items() if k in models}}
    env = environment(args.device)  # on cuda: the first CUDA use of this process, after the measurements
    if args.device == "cuda":
        config.update(device="cuda", gpu=env["device"], cudnn_benchmark=torch.backends.cudnn.benchmark,
                      cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                      float32_matmul_precision=torch.get_float32_matmul_precision())
    md = markdown(rows, config)
    print("\n" + md)
    measured = [r for r in rows if r.get("extra_passes") is not None]
    if measured:
        worst = max(measured, key=lambda r: r["extra_passes"])
        print(f"target (extra passes <= {TARGET_EXTRA_PASSES:g} on every model): "
              f"{'met' if all(r['target_met'] for r in measured) else 'NOT met'} on the {len(measured)} rows "
              f"measured; worst {worst['extra_passes']:.1f} ({worst['model']}, {worst['images']} images)")
    memory = MEMORY_NOTE if args.device == "cpu" else f"{GPU_MEMORY_NOTE}; host *_peak_mib: {MEMORY_NOTE}"
    payload = {"benchmark": "calibration", "environment": env, "config": config,
               "memory": memory, "rows": rows, "markdown": md}
    name = "bench_calibration-quick" if args.quick else "bench_calibration"
    print(f"wrote {write_results(name, payload, args.out or os.path.join(ROOT, 'benchmarks', 'results'))}")
    return 0 if all(not run.get("failed") for r in rows for run in r.get("runs", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
