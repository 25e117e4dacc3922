"""The budgeted GPU check behind benchmarks/gpu_check.sh (run that; see benchmarks/README.md).

Steps, each under a deadline taken from the budget (a step's deadline is its share of the time still left,
so time a step does not use goes to the later ones):

1. build     CMake + Ninja on all cores, in place, RANKPRUNE_CUDA=ON, RANKPRUNE_CUDA_ARCHS=90
2. verify    rankprune imports and ops.cuda_kernels_built() is true (else the check stops, loudly)
3. smoke     benchmarks/gpu_cases.py, one process per op family (a sticky CUDA error stays in its family)
4. tests     pytest -m cuda on the CUDA test files (xdist workers), and at the same time compute-sanitizer
             memcheck, racecheck and synccheck on gpu_cases.py --small, filtered to rankprune's kernels
5. bench     device-to-device copy (the bandwidth floor), then the benchmarks in their quick GPU form

OUTDIR receives, as each step finishes: summary.json (rewritten), build.log, smoke.log, tests.log,
sanitizers.log, bench.log (appended), results.json (rewritten) and the built extension (_C*.so, for a rerun
with --skip-build on a fresh machine): 8 files at most.
"""
import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run_all import find_sanitizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
WORK = os.path.join(ROOT, "build", "gpu-check")  # build tree, per-process logs and raw benchmark JSON
DEFAULT_BUDGET_S = 540
MIN_BUDGET_S = 60
FAMILIES = ["svdvals", "svd", "lowrank_conv", "errors"]
SANITIZERS = ["memcheck", "racecheck", "synccheck"]
# The test files holding CUDA tests (pytest -m cuda selects the tests inside them).
CUDA_TEST_FILES = ["tests/test_cuda_svdvals_paths.py", "tests/test_cuda_svd_paths.py",
                   "tests/test_cuda_lowrank_conv_paths.py", "tests/test_svdvals.py", "tests/test_svd.py",
                   "tests/test_lowrank_conv_op.py", "tests/test_trp.py", "tests/test_benchmark.py",
                   "tests/test_multi_gpu.py", "tests/test_latency.py", "tests/test_cuda_models.py"]
PYTEST_WORKERS = 6  # of 16 cores: the model-level CUDA tests compute their CPU reference too
TEST_TIMEOUT_S = 120
# Weights of the steps in the budget: for 540 s, about 135 s build (16 cores; 65 s of CUDA compile on 2),
# 15 verify, 40 smoke, 155 tests and sanitizers, 195 benchmarks.
SHARES = {"build": 135, "verify": 15, "smoke": 40, "tests": 155, "bench": 195}
# Importing torch and initializing CUDA on a cold machine takes seconds whatever the budget.
FLOOR_S = 30.0
# The benchmarks, in order, with their shares of the bench step. Quick forms: no looped cuSOLVER over
# thousands of matrices (bench_svdvals runs the target shapes in full and times the looped baselines on 512
# matrices of each, scaled to the batch: their cost is linear in it; bench_svd_lowrank skips
# torch.linalg.svd), two batch sizes of the fused conv, scoring on 2 batches; the ratios the GPU targets name
# are all still measured side by side.
BENCHMARKS = [
    ("bandwidth", 10, None),
    ("svdvals", 40, ["bench_svdvals.py", "--device", "cuda", "--shapes", "16384x56", "65536x14", "4096x28",
                 "--baseline-batch", "512", "--repeats", "10"]),
    ("lowrank_conv", 30, ["bench_lowrank_conv.py", "--device", "cuda", "--dtypes", "bfloat16",
                          "--batches", "8,32", "--no-model", "--repeats", "20"]),
    ("svd_lowrank", 20, ["bench_svd_lowrank.py", "--device", "cuda", "--no-linalg", "--no-small", "--repeats", "5"]),
    ("scoring", 30, ["bench_scoring.py", "--device", "cuda", "--batches", "2", "--repeats", "3",
                     "--maps-per-layer", "8"]),
    # Issue 20's cost target on the GPU: data-aware decompose of ResNet-50 on 256 images, in extra forward passes.
    ("calibration", 60, ["bench_calibration.py", "--device", "cuda", "--models", "resnet50", "--images", "256",
                         "--repeats", "3", "--no-progress", "--timeout", "150"]),
    # Issue 22's GPU rows: FLOPs- against latency-targeted decompose of ResNet-50 (batch 8), eager and CUDA
    # graphs, the fused kernel against the cuDNN pair in the same rounds.
    ("latency", 45, ["bench_latency_true.py", "--device", "cuda", "--quick", "--targets", "0.5", "--methods",
                     "decompose"]),
]


def python() -> str:
    return sys.executable


def build_commands(jobs: int) -> List[List[str]]:
    build_dir = os.path.join(WORK, "build")
    return [
        ["cmake", "-S", ROOT, "-B", build_dir, "-G", "Ninja", f"-DPython_EXECUTABLE={python()}",
         "-DCMAKE_BUILD_TYPE=Release", "-DRANKPRUNE_CUDA=ON", "-DRANKPRUNE_CUDA_ARCHS=90"],
        ["cmake", "--build", build_dir, "-j", str(jobs)],
    ]


VERIFY = """
import json, torch, rankprune
from rankprune import ops
from rankprune.benchmark import environment
built = ops.cuda_kernels_built()
print(json.dumps({"cuda_kernels_built": built, "cuda_available": torch.cuda.is_available(),
                  **environment("cuda" if torch.cuda.is_available() else "cpu")}))
if not (built and torch.cuda.is_available()):
    raise SystemExit("GPU CHECK STOPS: " + ("no CUDA device" if not torch.cuda.is_available() else
                     "rankprune was built WITHOUT its CUDA kernels (ops.cuda_kernels_built() is False)"))
"""

BANDWIDTH = """
import json, torch
n = 1 << 30  # bytes per buffer
src = torch.empty(n, dtype=torch.uint8, device="cuda")
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(20):
    start.record(); dst.copy_(src); stop.record(); stop.synchronize()
    times.append(start.elapsed_time(stop))
ms = sorted(times)[len(times) // 2]
print(json.dumps({"bytes_copied": n, "median_ms": ms, "GBps_read_plus_write": 2 * n / ms / 1e6}))
"""


def select_benchmarks(names: List[str]) -> None:
    """Keep only the named benchmarks (in their usual order); the bench step's share of the budget shrinks by
    the weight left out, so that a rerun of a few benchmarks leaves the time to the other steps."""
    global BENCHMARKS
    full = sum(w for _, w, _ in BENCHMARKS)
    BENCHMARKS = [b for b in BENCHMARKS if b[0] in names]
    SHARES["bench"] = SHARES["bench"] * sum(w for _, w, _ in BENCHMARKS) / full


def plan_deadlines(budget_s: float, names: List[str]) -> Dict[str, float]:
    """Each step's deadline if every earlier step used all of its own: its share of what is left."""
    left, out = float(budget_s), {}
    for i, name in enumerate(names):
        out[name] = share_of(left, names[i:])
        left -= out[name]
    return out


def share_of(left_s: float, names_left: List[str]) -> float:
    """The first step's deadline: its share of the time left, at least FLOOR_S (if that much is left)."""
    share = left_s * SHARES[names_left[0]] / sum(SHARES[n] for n in names_left)
    return max(1.0, min(left_s, max(FLOOR_S, share)))


class Check:
    def __init__(self, outdir: str, budget_s: float, commit: str):
        self.outdir = outdir
        self.budget_s = budget_s
        self.t0 = time.monotonic()
        self.summary = {"budget_s": budget_s, "commit": commit, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "finished": False, "steps": []}
        self.results: Dict[str, object] = {"commit": commit}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def deadline(self, names_left: List[str]) -> float:
        """The deadline of the first of names_left, from the time left now."""
        return share_of(self.left(), names_left)

    def write(self, name: str, payload: object) -> None:
        tmp = os.path.join(self.outdir, f".{name}.tmp")
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, os.path.join(self.outdir, name))

    def record(self, **step) -> None:
        self.summary["steps"].append(step)
        self.summary["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.write("summary.json", self.summary)
        status = step["status"]
        print(f"== {step['name']}: {status} in {step.get('seconds', 0)} s"
              + (f" ({step['note']})" if step.get("note") else ""), flush=True)

    def append_log(self, log: str, title: str, text: str) -> None:
        with open(os.path.join(self.outdir, log), "a") as f:
            f.write(f"===== {title}\n{text}\n")


def start(cmd: List[str], log_path: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """A process in its own session (so that a deadline kills its children too), output to log_path."""
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_all(procs: Dict[str, subprocess.Popen], deadline_s: float) -> Dict[str, Optional[int]]:
    """Wait for every process until deadline_s from now; those still running are killed (rc None)."""
    end = time.monotonic() + deadline_s
    rcs: Dict[str, Optional[int]] = {}
    for name, proc in procs.items():
        try:
            rcs[name] = proc.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rcs[name] = None
    return rcs


def status_of(rc: Optional[int]) -> str:
    return "timed out" if rc is None else ("passed" if rc == 0 else "failed")


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def run_parallel(check: Check, step: str, cmds: Dict[str, List[str]], logs: Dict[str, str], deadline_s: float,
                 env: Optional[Dict[str, Dict[str, str]]] = None) -> Dict[str, Optional[int]]:
    """Run cmds at once under one deadline; append each one's output to its OUTDIR log (logs[name]) and
    record it in the summary, with the last line of its output as the note."""
    t = time.monotonic()
    procs = {name: start(cmd, os.path.join(WORK, "logs", f"{step}-{name}.log"), (env or {}).get(name))
             for name, cmd in cmds.items()}
    rcs = wait_all(procs, deadline_s)
    seconds = round(time.monotonic() - t, 1)
    for name, cmd in cmds.items():
        text = read(os.path.join(WORK, "logs", f"{step}-{name}.log"))
        check.append_log(logs[name], f"{step} {name}: {' '.join(cmd)} -> {status_of(rcs[name])}", text)
        check.record(name=f"{step}:{name}", status=status_of(rcs[name]), rc=rcs[name], seconds=seconds,
                     deadline_s=round(deadline_s, 1), log=logs[name],
                     note=text.strip().splitlines()[-1][:300] if text.strip() else "")
    return rcs


def sanitizer_commands(sanitizer: str) -> Dict[str, List[str]]:
    cases = [python(), os.path.join(BENCH, "gpu_cases.py"), "--small"]
    # --kernel-name kns=rankprune: only rankprune's kernels are instrumented (their mangled names hold the
    # namespace), so torch's and cuDNN's kernels run at full speed; API errors of the libraries are not ours.
    return {tool: [sanitizer, "--tool", tool, "--kernel-name", "kns=rankprune", "--report-api-errors", "no",
                   "--error-exitcode", "1", *cases] for tool in SANITIZERS}


def pytest_command() -> List[str]:
    # -v: one line per test as it finishes, so a step cut by its deadline still says what passed and failed.
    # no:benchmark: pytest-benchmark, where installed, claims any test argument named "benchmark".
    cmd = [python(), "-m", "pytest", "-m", "cuda", "-v", "-rfE", "-p", "no:cacheprovider", "-p", "no:benchmark",
           *CUDA_TEST_FILES]
    try:
        import xdist  # noqa: F401
        cmd[5:5] = ["-n", str(PYTEST_WORKERS)]  # after "-m cuda": between them it would eat the marker
    except ImportError:
        pass
    try:
        import pytest_timeout  # noqa: F401

        cmd[5:5] = ["--timeout", str(TEST_TIMEOUT_S)]  # a hung test fails alone instead of eating the step
    except ImportError:
        pass
    return cmd


def parse_json_lines(text: str) -> List[object]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def dry_run(budget_s: float, steps: List[str]) -> int:
    deadlines = plan_deadlines(budget_s, steps)
    jobs = os.cpu_count() or 1
    print(f"gpu_check: budget {budget_s:.0f} s; deadlines if every step used all of its own "
          "(unused time goes to the later steps)")
    for step in steps:
        print(f"[{step}] deadline {deadlines[step]:.0f} s")
        if step == "build":
            for cmd in build_commands(jobs):
                print("    " + " ".join(cmd))
        elif step == "verify":
            print(f"    {python()} -c <import rankprune; require ops.cuda_kernels_built()>")
        elif step == "smoke":
            for fam in FAMILIES:
                print(f"    {python()} benchmarks/gpu_cases.py --family {fam}   (in parallel)")
        elif step == "tests":
            print("    " + " ".join(pytest_command()) + "   (in parallel with:)")
            for cmd in sanitizer_commands(find_sanitizer() or "compute-sanitizer").values():
                print("    " + " ".join(cmd))
        elif step == "bench":
            total = sum(w for _, w, _ in BENCHMARKS)
            for name, weight, cmd in BENCHMARKS:
                what = "device-to-device copy of 1 GiB" if cmd is None else " ".join(["benchmarks/" + cmd[0], *cmd[1:]])
                print(f"    ({weight / total * deadlines[step]:.0f} s) {name}: {what}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", help="folder for summary.json, results.json and the logs (created)")
    p.add_argument("budget", nargs="?", default=str(DEFAULT_BUDGET_S), help=f"seconds in all (default {DEFAULT_BUDGET_S})")
    p.add_argument("--dry-run", action="store_true", help="print the steps and their deadlines, run nothing")
    p.add_argument("--skip-build", action="store_true", help="use the extension already built in place")
    p.add_argument("--bench", default=",".join(n for n, _, _ in BENCHMARKS),
                   help="comma-separated subset of the benchmarks (" + ",".join(n for n, _, _ in BENCHMARKS)
                   + "); the bench step's share of the budget shrinks with their weights")
    p.add_argument("--steps", default=",".join(SHARES), help="comma-separated subset of " + ",".join(SHARES)
                   + " (verify always runs); e.g. a rerun of what failed")
    args = p.parse_args(argv)
    try:
        budget = float(args.budget)
    except ValueError:
        p.error(f"BUDGET_SECONDS must be a number, got {args.budget!r}")
    if budget < MIN_BUDGET_S:
        p.error(f"BUDGET_SECONDS must be at least {MIN_BUDGET_S}, got {args.budget}")
    chosen = [b.strip() for b in args.bench.split(",") if b.strip()]
    unknown_bench = sorted(set(chosen) - {n for n, _, _ in BENCHMARKS})
    if unknown_bench:
        p.error(f"unknown benchmarks {unknown_bench}; choose from {[n for n, _, _ in BENCHMARKS]}")
    select_benchmarks(chosen)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(SHARES))
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {list(SHARES)}")
    if args.skip_build and "build" in steps:
        steps.remove("build")
    if "verify" not in steps:
        steps.append("verify")
    steps = [s for s in SHARES if s in steps]
    if args.dry_run:
        return dry_run(budget, steps)

    os.makedirs(args.outdir, exist_ok=True)
    os.makedirs(os.path.join(WORK, "logs"), exist_ok=True)
    raw = os.path.join(WORK, "results")
    shutil.rmtree(raw, ignore_errors=True)
    os.makedirs(raw)
    check = Check(args.outdir, budget, os.environ.get("RANKPRUNE_COMMIT", "unknown"))
    check.summary["steps_planned"] = steps
    check.write("summary.json", check.summary)

    def remaining(step):
        return steps[steps.index(step):]

    if "build" in steps:
        deadline = check.deadline(remaining("build"))
        t = time.monotonic()
        rc: Optional[int] = 0
        env = {"CUDACXX": os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"}
        for i, cmd in enumerate(build_commands(os.cpu_count() or 1)):
            rcs = wait_all({"b": start(cmd, os.path.join(WORK, "logs", f"build-{i}.log"), env)},
                           deadline - (time.monotonic() - t))
            rc = rcs["b"]
            check.append_log("build.log", f"{' '.join(cmd)} -> {status_of(rc)}", read(os.path.join(WORK, "logs", f"build-{i}.log")))
            if rc != 0:
                break
        check.record(name="build", status=status_of(rc), rc=rc, seconds=round(time.monotonic() - t, 1),
                     deadline_s=round(deadline, 1), log="build.log")
        if rc != 0:
            print("GPU CHECK STOPS: the CUDA build failed (build.log)", file=sys.stderr)
            return 1
        # The built extension beside the results: a rerun on a fresh machine can put it back in
        # python/rankprune/ and pass --skip-build (a minute of device time saved).
        for built in glob.glob(os.path.join(ROOT, "python", "rankprune", "_C*.so")):
            shutil.copy2(built, args.outdir)

    # Every later process imports the package built in place (ahead of any carried wheels on PYTHONPATH).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH")]))
    deadline = check.deadline(remaining("verify"))
    t = time.monotonic()
    log = os.path.join(WORK, "logs", "verify.log")
    rc = wait_all({"v": start([python(), "-c", VERIFY], log)}, deadline)["v"]
    text = read(log)
    env_info = parse_json_lines(text)
    check.summary["environment"] = env_info[-1] if env_info else None
    check.results["environment"] = check.summary["environment"]
    check.record(name="verify", status=status_of(rc), rc=rc, seconds=round(time.monotonic() - t, 1),
                 deadline_s=round(deadline, 1), note=text.strip().splitlines()[-1][:500] if rc != 0 and text.strip() else "")
    if rc != 0:
        print("GPU CHECK STOPS: " + (text.strip().splitlines() or ["verify failed"])[-1], file=sys.stderr)
        return 1

    failed = False
    if "smoke" in steps:
        deadline = check.deadline(remaining("smoke"))
        cmds = {fam: [python(), os.path.join(BENCH, "gpu_cases.py"), "--family", fam] for fam in FAMILIES}
        rcs = run_parallel(check, "smoke", cmds, {fam: "smoke.log" for fam in FAMILIES}, deadline)
        check.results["smoke"] = {fam: parse_json_lines(read(os.path.join(WORK, "logs", f"smoke-{fam}.log")))
                                  for fam in FAMILIES}
        check.write("results.json", check.results)
        failed |= any(rc != 0 for rc in rcs.values())

    if "tests" in steps:
        deadline = check.deadline(remaining("tests"))
        cmds = {"pytest": pytest_command()}
        env = {}
        sanitizer = find_sanitizer()
        if sanitizer:
            cmds.update(sanitizer_commands(sanitizer))
            # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
            env["memcheck"] = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        else:
            check.record(name="tests:sanitizers", status="not found", note="compute-sanitizer is not installed")
        logs = {name: "tests.log" if name == "pytest" else "sanitizers.log" for name in cmds}
        rcs = run_parallel(check, "tests", cmds, logs, deadline, env)
        failed |= any(rc != 0 for rc in rcs.values())

    if "bench" in steps:
        bench_start, bench_budget = time.monotonic(), check.deadline(remaining("bench"))
        weights_left = sum(w for _, w, _ in BENCHMARKS)
        check.results["benchmarks"] = {}
        for name, weight, cmd in BENCHMARKS:
            spent = time.monotonic() - bench_start
            deadline = max(1.0, (bench_budget - spent) * weight / weights_left)
            weights_left -= weight
            log = os.path.join(WORK, "logs", f"bench-{name}.log")
            if cmd is None:
                full = [python(), "-c", BANDWIDTH]
            else:
                full = [python(), os.path.join(BENCH, cmd[0]), *cmd[1:], "--out", os.path.join(raw, name)]
            t = time.monotonic()
            rc = wait_all({name: start(full, log)}, deadline)[name]
            text = read(log)
            check.append_log("bench.log", f"{name}: {' '.join(full)} -> {status_of(rc)}", text)
            if cmd is None:
                parsed = parse_json_lines(text)
                check.results["benchmarks"][name] = parsed[-1] if parsed else None
            else:
                files = sorted(glob.glob(os.path.join(raw, name, "*.json")))
                check.results["benchmarks"][name] = json.loads(read(files[-1])) if files else None
            check.write("results.json", check.results)
            check.record(name=f"bench:{name}", status=status_of(rc), rc=rc, seconds=round(time.monotonic() - t, 1),
                         deadline_s=round(deadline, 1), log="bench.log")
            failed |= rc != 0

    check.summary["finished"] = True
    check.write("summary.json", check.summary)
    print(f"gpu_check: {'FAILURES (see summary.json)' if failed else 'all steps passed'} in "
          f"{time.monotonic() - check.t0:.0f} s; results in {args.outdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
