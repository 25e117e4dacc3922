"""Everything a GPU machine should run, in one command, from the repository root:

    python benchmarks/run_all.py

Steps: install rankprune in editable mode against the torch already installed (``--no-deps``), ``rankprune
info``, the whole test suite (CUDA tests included), ``compute-sanitizer`` memcheck and racecheck over the
CUDA tests (``pytest -m cuda``), every ``benchmarks/bench_*.py`` (each writes its own JSON into
``benchmarks/results/``), the model and layer latency benchmarks of ``rankprune bench`` on CUDA and on CPU,
and finally ``benchmarks/summarize.py``, which renders the newest results into README.md.

A step that fails does not stop the others. The run's own record — each step's command, status
(passed / failed / timed out / not found / skipped), exit code, seconds and the tail of its output — is
written as ``benchmarks/results/run_all-<device>-<stamp>.json``; the exit code is 1 if any step failed.
Without ``compute-sanitizer`` on PATH (or in $CUDA_HOME/bin) the sanitizer steps are recorded as
"not found". Without a GPU the CUDA-only steps are recorded as "skipped".
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
TAIL_CHARS = 4000

# (results name, rankprune bench arguments). Names encode the configuration so that summarize.py keeps the
# newest result per configuration.
MODEL_BENCHES = [
    ("bench-model-resnet20-b1", ["model", "--model", "resnet20", "--batch-size", "1"]),
    ("bench-model-resnet20-b64", ["model", "--model", "resnet20", "--batch-size", "64"]),
    ("bench-model-resnet50-b1", ["model", "--model", "resnet50", "--input-size", "224", "--batch-size", "1",
                                 "--num-classes", "1000"]),
    ("bench-model-resnet50-b32", ["model", "--model", "resnet50", "--input-size", "224", "--batch-size", "32",
                                  "--num-classes", "1000"]),
]
LAYER_BENCHES = [
    ("bench-layer-c64-k3-r16-s32-b1", ["layer", "--in-channels", "64", "--out-channels", "64", "--rank", "16",
                                       "--input-size", "32", "--batch-size", "1"]),
    ("bench-layer-c256-k3-r64-s14-b32", ["layer", "--in-channels", "256", "--out-channels", "256", "--rank", "64",
                                         "--input-size", "14", "--batch-size", "32"]),
    ("bench-layer-c512-k3-r128-s7-b32", ["layer", "--in-channels", "512", "--out-channels", "512", "--rank", "128",
                                         "--input-size", "7", "--batch-size", "32"]),
]

# Arguments of a benchmarks/bench_*.py script other than its defaults. bench_calibration's full run (four models
# at 32 and 256 images on 2 CPU threads) takes hours: run it by hand; run_all smokes it.
SCRIPT_ARGS: Dict[str, List[str]] = {"bench_calibration": ["--quick", "--no-progress"]}


def find_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, else under $CUDA_HOME/bin or /usr/local/cuda/bin; None if absent."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "compute-sanitizer"), os.X_OK):
            return os.path.join(home, "bin", "compute-sanitizer")
    return None


class Run:
    """Runs steps, echoes their output, and keeps a record of each."""

    def __init__(self, dry_run: bool):
        self.steps: List[Dict[str, object]] = []
        self.dry_run = dry_run

    def record(self, name: str, status: str, cmd: Optional[List[str]] = None, note: str = "") -> None:
        self.steps.append({"name": name, "status": status, "cmd": cmd, "rc": None, "seconds": 0.0, "tail": note})
        print(f"== {name}: {status}" + (f" ({note})" if note else ""), flush=True)

    def step(self, name: str, cmd: List[str], timeout_s: int, env: Optional[Dict[str, str]] = None) -> bool:
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        if self.dry_run:
            self.steps.append({"name": name, "status": "skipped", "cmd": cmd, "rc": None, "seconds": 0.0,
                               "tail": "dry run"})
            return True
        t0 = time.perf_counter()
        chunks: List[str] = []
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, **(env or {})})
        except FileNotFoundError:
            self.record(name, "not found", cmd, f"{cmd[0]} is not installed")
            return False
        def pump() -> None:  # echo as it comes, keep it for the record's tail
            for line in proc.stdout:
                sys.stdout.write(line)
                chunks.append(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc, status = None, "timed out"
        reader.join(timeout=10)
        seconds = round(time.perf_counter() - t0, 1)
        self.steps.append({"name": name, "status": status, "cmd": cmd, "rc": rc, "seconds": seconds,
                           "tail": "".join(chunks)[-TAIL_CHARS:]})
        print(f"== {name}: {status} in {seconds} s", flush=True)
        return status == "passed"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Install, test, sanitize and benchmark rankprune on this machine.")
    parser.add_argument("--skip-install", action="store_true", help="use the rankprune already installed")
    parser.add_argument("--skip-tests", action="store_true", help="skip pytest and the compute-sanitizer runs")
    parser.add_argument("--only", default="", help="run only the benchmarks whose name contains this text")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per step (default 1800)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps without running them")
    args = parser.parse_args(argv)

    py = sys.executable
    run = Run(args.dry_run)
    if not args.skip_install:
        run.step("install", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], args.timeout)
    run.step("info", [py, "-m", "rankprune", "info"], 120)

    import torch  # after the install step: the steps above must not depend on it

    has_gpu = torch.cuda.is_available()
    if not args.skip_tests:
        run.step("pytest", [py, "-m", "pytest", "-q", "-rs"], args.timeout)
        sanitizer = find_sanitizer()
        for tool in ("memcheck", "racecheck"):
            name = f"compute-sanitizer {tool}"
            if not has_gpu:
                run.record(name, "skipped", note="no CUDA device")
            elif sanitizer is None:
                run.record(name, "not found", note="compute-sanitizer is not on PATH nor in $CUDA_HOME/bin")
            else:
                # Without the caching allocator every tensor is its own allocation, so memcheck sees
                # out-of-bounds accesses that would otherwise land inside a pooled block.
                run.step(name, [sanitizer, f"--tool={tool}", "--error-exitcode=99", py, "-m", "pytest", "-q",
                                "-m", "cuda", "-p", "no:cacheprovider"], args.timeout,
                         env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})

    for script in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py"))):
        name = os.path.splitext(os.path.basename(script))[0]
        if args.only in name:
            run.step(name, [py, script, *SCRIPT_ARGS.get(name, [])], args.timeout)

    devices = (["cuda"] if has_gpu else []) + ["cpu"]
    for name, bench_args in MODEL_BENCHES + LAYER_BENCHES:
        for device in devices:
            if args.only not in name:
                continue
            if device == "cpu" and ("-b64" in name or "-b32" in name):
                continue  # large batches on CPU take long and say little the batch-1 runs do not
            extra = ["--repeats", "30", "--warmup", "5"] if device == "cpu" else ["--repeats", "200"]
            run.step(f"{name} ({device})", [py, "-m", "rankprune", "bench", *bench_args, *extra, "--device", device,
                                            "--name", name, "--out", RESULTS], args.timeout)
            if device == "cuda":
                run.step(f"{name}-graph ({device})", [py, "-m", "rankprune", "bench", *bench_args, *extra,
                                                      "--device", device, "--cuda-graph", "--name", name + "-graph",
                                                      "--out", RESULTS], args.timeout)

    sys.path.insert(0, os.path.join(ROOT, "python"))
    from rankprune.benchmark import environment, write_results
    from rankprune.demo import summary_table

    env = environment("cuda" if has_gpu else "cpu")
    if args.only in "demo":
        with tempfile.TemporaryDirectory() as tmp:
            device = "cuda" if has_gpu else "cpu"
            if run.step(f"demo ({device})", [py, "-m", "rankprune", "demo", "--trp", "--device", device, "--out", tmp,
                                             "--no-progress"], args.timeout) and not args.dry_run:
                with open(os.path.join(tmp, "results.json")) as f:
                    demo = json.load(f)
                # the README shows the demo's verdict and table as the demo wrote them
                write_results("demo", {"environment": env, "config": demo["config"], "stages_s": demo["stages_s"],
                                       "rows": demo["rows"], "verdict": demo["verdict"],
                                       "markdown": demo["verdict"]["text"] + "\n\n" + summary_table(demo)}, RESULTS)
    failed = [s["name"] for s in run.steps if s["status"] in ("failed", "timed out")]
    path = None
    if not args.dry_run:
        path = write_results("run_all", {"environment": env, "passed": not failed, "failed": failed,
                                         "rows": [{k: s[k] for k in ("name", "status", "rc", "seconds")}
                                                  for s in run.steps], "steps": run.steps}, RESULTS)
        run.step("summarize", [py, os.path.join("benchmarks", "summarize.py")], 120)
    print(f"\n{len(run.steps)} steps, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else "")
          + (f"; record: {path}" if path else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
