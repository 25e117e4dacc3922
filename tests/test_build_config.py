"""How CMakeLists.txt chooses the CUDA build (RANKPRUNE_CUDA=AUTO|ON|OFF), checked by configuring only (no compile).

AUTO on a machine where torch sees no GPU builds the CPU kernels only and says so in one line that tells how to
build the CUDA kernels anyway; with a GPU it builds for that GPU's architecture only (cmake/gpu_archs.py)."""
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ONLY_LINE = "rankprune: building the CPU kernels only: "

needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None,
                                 reason="needs cmake and ninja on PATH")


def configure(tmp_path, mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKPRUNE_")}
    return subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(tmp_path / "build"), "-G", "Ninja", f"-DPython_EXECUTABLE={sys.executable}",
         f"-DRANKPRUNE_CUDA={mode}", "-DRANKPRUNE_CUDA_ARCHS=", "-DRANKPRUNE_INPLACE=OFF"],
        capture_output=True, text=True, env=env, timeout=300)


@needs_cmake
@pytest.mark.skipif(torch.cuda.is_available(), reason="a visible GPU: AUTO builds the CUDA kernels here")
def test_auto_without_a_visible_gpu_builds_the_cpu_kernels_only_and_says_so_once(tmp_path):
    done = configure(tmp_path, "AUTO")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if CPU_ONLY_LINE in line]
    assert len(lines) == 1, done.stdout
    assert "CUDA kernels ON" not in done.stdout
    if "no visible GPU" in lines[0]:  # a CUDA build of torch and nvcc: the line says how to build them anyway
        assert "RANKPRUNE_CUDA=ON RANKPRUNE_CUDA_ARCHS=90" in lines[0]


@needs_cmake
@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch: ON would configure CUDA")
def test_on_fails_when_the_cuda_kernels_cannot_be_built(tmp_path):
    done = configure(tmp_path, "ON")
    assert done.returncode != 0
    assert "RANKPRUNE_CUDA=ON but torch" in done.stderr


def gpu_archs(monkeypatch, capsys, capabilities):
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(capabilities))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    runpy.run_path(os.path.join(ROOT, "cmake", "gpu_archs.py"))
    return capsys.readouterr().out.strip()


def test_gpu_archs_are_those_of_the_visible_gpus(monkeypatch, capsys):
    assert gpu_archs(monkeypatch, capsys, [(9, 0)]) == "90"
    assert gpu_archs(monkeypatch, capsys, [(9, 0), (8, 0), (9, 0)]) == "80;90"
    assert gpu_archs(monkeypatch, capsys, [(12, 0), (8, 6)]) == "86;120"
    assert gpu_archs(monkeypatch, capsys, []) == ""
