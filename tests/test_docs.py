"""Every command and Python snippet shown in the docs runs, on CPU, with tiny settings.

The rules (keep the docs within them):

* Documents: ``README.md`` and ``docs/*.md``.
* Every fenced ```` ```python ```` block runs as a script (``__name__ == "__main__"``, a fresh namespace) in
  the test's interpreter, in an empty temporary folder. Snippets are written small (a few images, a few
  steps) so that they run as shown.
* Every fenced ```` ```bash ```` block runs command by command (a line, ``\\``-continuations joined,
  ``a && b`` split into ``a`` and ``b``; leading ``VAR=value`` assignments become environment variables),
  with bash, in a temporary folder holding a copy of ``README.md`` and ``benchmarks/`` (so that
  ``python benchmarks/summarize.py`` rewrites the copy). ``rankprune`` runs as ``python -m rankprune`` and
  ``python`` as the interpreter running the tests, with this rankprune importable.
* Not run, by rule:
  - installs and environments (``pip install``, ``python -m pip ...``, ``python -m venv``, ``. .venv/...``,
    ``source``): they need the network and change the environment; CI (``.ci/run``) runs the README's
    install commands exactly as written;
  - ``python -m pytest``: that is this test suite (CI runs it);
  - ``cmake``: builds the extension, which the test run already imports (CI builds it through pip).
* A block preceded by ``<!-- no-test: reason -->`` on the line before its fence is not run; the reason is
  required. Other fences (``text``, ``json``, ...) are not code and never run.
* Commands that take minutes at the documented settings get tiny settings appended (``TINY``): argparse keeps
  the last value of an option, so the appended values win and the documented options are still parsed.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import List, Tuple

import pytest
import torch

import rankprune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
FENCE = re.compile(r"^```(\w*)\s*$")
NO_TEST = re.compile(r"^<!-- no-test: \S.* -->$")
NOT_RUN = [
    re.compile(r"^(python -m )?pip3? "),
    re.compile(r"^python -m venv\b"),
    re.compile(r"^(\.|source) "),
    re.compile(r"^python -m pytest\b"),
    re.compile(r"^cmake\b"),
]
# Appended to commands that start with the key (after `rankprune` / `python` are resolved).
TINY = {
    "rankprune demo": "--quick --train-size 200 --test-size 100 --epochs 1 --finetune-epochs 1 --trp-epochs 1 "
                      "--flops 0.5 --criteria energy --latency-repeats 2 --latency-rounds 2 --no-progress",
    "rankprune bench clear-cache": "",  # takes no timing options
    "rankprune bench": "--warmup 1 --repeats 2",
    "rankprune trp": "--epochs 1 --train-size 64 --test-size 64 --batch-size 32 --no-progress",
    "rankprune score": "--num-images 16 --batch-size 8 --no-progress",
    "rankprune prune": "--num-images 16 --batch-size 8 --no-progress",
    "rankprune decompose": "--num-images 16 --batch-size 8 --no-progress",
    "python benchmarks/run_all.py": "--dry-run",
}
TIMEOUT_S = 600


def blocks(doc: str) -> List[Tuple[str, int, str, str]]:
    """(doc, line of the fence, language, code) of every fenced block of ``doc``, minus ``no-test`` ones."""
    lines = open(os.path.join(ROOT, doc)).read().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        if start > 0 and lines[start - 1].startswith("<!-- no-test"):
            assert NO_TEST.match(lines[start - 1]), f"{doc}:{start}: no-test needs a reason: {lines[start - 1]}"
            continue
        found.append((doc, start + 1, m.group(1), "\n".join(body)))
    return found


def commands(code: str) -> List[str]:
    """The commands of a bash block: continuations joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.split(" # ")[0].strip()
        if not line or line.startswith("#"):
            continue
        out += [c.strip() for c in line.split("&&") if c.strip()]
    return out


def runnable(command: str) -> Tuple[dict, str]:
    """(environment assignments, command without them) for a command that is run; ``None`` if not run."""
    env = {}
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    rest = " ".join(shlex.quote(w) for w in words)
    if any(p.match(rest) for p in NOT_RUN):
        return None
    return env, rest


def _environment() -> dict:
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(rankprune.__file__)))
    env["PYTHONPATH"] = package_parent + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU, as in CI
    return env


def _resolve(command: str) -> str:
    for key, extra in TINY.items():
        if command.startswith(key):
            command = f"{command} {extra}"
            break
    if command.startswith("rankprune "):
        command = "python -m " + command
    if command.startswith("python "):
        command = shlex.quote(sys.executable) + command[len("python"):]
    return command


CASES = [b for doc in DOCS for b in blocks(doc) if b[2] in ("python", "bash")]


def test_docs_have_runnable_blocks():
    langs = {(doc, lang) for doc, _, lang, _ in CASES}
    assert ("README.md", "python") in langs and ("README.md", "bash") in langs


def test_commands_rule():
    cmds = commands("python -m pip install -r r.txt && python -m pip install -e . && rankprune demo  # go\n"
                    "PYTHONPATH=python python -m pytest -q\nrankprune bench layer \\\n  --rank 8")
    assert [runnable(c) for c in cmds] == [None, None, ({}, "rankprune demo"), None,
                                           ({}, "rankprune bench layer --rank 8")]
    assert _resolve("rankprune demo --trp").endswith("--trp " + TINY["rankprune demo"])


@pytest.mark.parametrize("doc,line,lang,code", CASES, ids=[f"{d}:{n}" for d, n, _, _ in CASES])
def test_doc_block_runs(doc, line, lang, code, tmp_path, monkeypatch):
    if lang == "python":
        # In this interpreter (no second torch import), as a script of its own, in an empty folder.
        monkeypatch.chdir(tmp_path)
        torch_threads = torch.get_num_threads()
        try:
            exec(compile(code, f"{doc}:{line}", "exec"), {"__name__": "__main__"})
        finally:
            torch.set_num_threads(torch_threads)
        return
    env = _environment()
    shutil.copy(os.path.join(ROOT, "README.md"), tmp_path / "README.md")
    shutil.copytree(os.path.join(ROOT, "benchmarks"), tmp_path / "benchmarks",
                    ignore=shutil.ignore_patterns("__pycache__"))
    ran = 0
    for command in commands(code):
        parsed = runnable(command)
        if parsed is None:
            continue
        extra_env, cmd = parsed
        cmd = _resolve(cmd)
        proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env={**env, **extra_env}, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
        assert proc.returncode == 0, f"{doc}:{line}: `{command}` failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        ran += 1
    if ran == 0:
        pytest.skip("every command of this block is excluded by rule (installs, pytest, cmake)")


def _public_calls():
    """(qualified name, object) of every public function, class and method reachable from rankprune's public
    modules (no ``_`` in the module path), re-exports included. CLI ``register``/``run`` are documented by
    ``--help`` instead."""
    import importlib
    import inspect
    import pkgutil

    seen = {}
    for info in pkgutil.walk_packages(rankprune.__path__, "rankprune."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not getattr(obj, "__module__", "").startswith("rankprune"):
                continue
            if info.name.startswith("rankprune.cli.") and name in ("register", "run"):
                continue
            seen.setdefault(f"{info.name}.{name}", obj)
            if inspect.isclass(obj):
                for attr in vars(obj):
                    if not attr.startswith("_") and callable(getattr(obj, attr, None)):
                        seen.setdefault(f"{info.name}.{name}.{attr}", getattr(obj, attr))
    return seen


def test_every_public_call_has_a_docstring():
    import inspect

    missing = sorted(name for name, obj in _public_calls().items() if not inspect.getdoc(obj))
    assert not missing, "public calls without a docstring:\n" + "\n".join(missing)
