"""The CPU-capable parts of benchmarks/gpu_check.sh: the dry run (steps, commands, deadlines), argument
handling, the loud stop when the CUDA kernels are missing (with its summary written to OUTDIR), and the
case script of the smoke pass and the sanitizers, run on the CPU."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ENV = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}


def run(*args, timeout=120):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout)


def load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shell_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text and os.access(SCRIPT, os.X_OK)


def test_dry_run_lists_every_step_within_the_budget(tmp_path):
    done = run("--dry-run", tmp_path / "out", 540)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    deadlines = {m[0]: float(m[1]) for m in re.findall(r"^\[(\w+)\] deadline (\d+) s", out, re.M)}
    assert list(deadlines) == ["build", "verify", "smoke", "tests", "bench"]
    assert abs(sum(deadlines.values()) - 540) <= len(deadlines)  # rounding of the printed seconds
    for needle in ["-DRANKPRUNE_CUDA=ON", "-DRANKPRUNE_CUDA_ARCHS=90", "-G Ninja", "cuda_kernels_built",
                   "-m pytest -m cuda", "test_cuda_lowrank_conv_paths.py", "--kernel-name kns=rankprune",
                   "--tool memcheck", "--tool racecheck", "--tool synccheck", "device-to-device copy",
                   "bench_svdvals.py --device cuda --shapes 16384x56 65536x14", "bench_svd_lowrank.py --device cuda --no-linalg --no-small"]:
        assert needle in out, needle
    for family in ["svdvals", "svd", "lowrank_conv"]:
        assert f"gpu_cases.py --family {family}" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_deadlines_pass_unused_time_on():
    driver = load_driver()
    plan = driver.plan_deadlines(300, list(driver.SHARES))
    assert sum(plan.values()) == pytest.approx(300)
    assert plan["build"] == pytest.approx(300 * driver.SHARES["build"] / sum(driver.SHARES.values()))
    assert plan["verify"] == driver.FLOOR_S  # its share would be shorter than a cold import of torch
    # Without the build, the same budget is shared by the rest.
    rest = driver.plan_deadlines(300, ["verify", "smoke", "tests", "bench"])
    assert sum(rest.values()) == pytest.approx(300) and rest["tests"] > plan["tests"]


@pytest.mark.parametrize("args, message", [
    ([], "required: outdir"),
    (["OUT", "abc"], "must be a number"),
    (["OUT", "10"], "at least 60"),
    (["OUT", "--steps", "build,fly"], "unknown steps"),
])
def test_bad_arguments(args, message, tmp_path):
    done = run(*[tmp_path / a if a == "OUT" else a for a in args], timeout=60)
    assert done.returncode == 2 and message in done.stderr


def test_stops_loudly_without_cuda_kernels(tmp_path):
    # Here (no GPU) the verify step must fail, stop the check, and leave its summary in OUTDIR.
    out = tmp_path / "out"
    done = run(out, 300, "--skip-build", timeout=300)
    assert done.returncode == 1
    assert "GPU CHECK STOPS" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["verify"]
    assert summary["steps"][0]["status"] == "failed" and not summary["finished"]
    assert summary["environment"]["cuda_kernels_built"] in (True, False)
    assert len(list(out.iterdir())) <= 8


def test_case_script_on_cpu():
    cases = ROOT / "benchmarks" / "gpu_cases.py"
    listed = subprocess.run([sys.executable, str(cases), "--list"], capture_output=True, text=True, env=ENV)
    assert listed.returncode == 0
    families = {line.split(":")[0] for line in listed.stdout.splitlines()}
    assert families == {"svdvals", "svd", "lowrank_conv", "errors"}
    done = subprocess.run([sys.executable, str(cases), "--device", "cpu", "--small", "--family", "svd"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == sum(f == "svd" for f in (line.split(":")[0] for line in listed.stdout.splitlines()))
    assert all(r["ok"] and r["err"] <= r["tol"] for r in results)
    # every misuse of the errors family raises the documented exception on the CPU
    errors = subprocess.run([sys.executable, str(cases), "--device", "cpu", "--family", "errors"],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert errors.returncode == 0, errors.stdout + errors.stderr
    assert all(json.loads(line)["ok"] for line in errors.stdout.splitlines())


def test_deadline_kills_a_step_and_keeps_its_output(tmp_path):
    # The machinery of every step: processes run side by side under one deadline; one that outlives it is
    # killed with its children, and what each printed is appended to its OUTDIR log and recorded.
    driver = load_driver()
    driver.WORK = str(tmp_path / "work")
    os.makedirs(os.path.join(driver.WORK, "logs"))
    check = driver.Check(str(tmp_path), budget_s=60, commit="abc")
    cmds = {"quick": ["bash", "-c", "echo done"],
            "slow": ["bash", "-c", "echo started; sleep 30 & wait"]}
    rcs = driver.run_parallel(check, "demo", cmds, {"quick": "a.log", "slow": "b.log"}, deadline_s=2)
    assert rcs == {"quick": 0, "slow": None}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [("demo:quick", "passed"), ("demo:slow", "timed out")]
    assert summary["steps"][0]["note"] == "done" and summary["commit"] == "abc"
    assert "started" in (tmp_path / "b.log").read_text()
