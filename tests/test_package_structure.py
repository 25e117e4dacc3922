"""The package stays readable: no library module imports the CLI, no import cycle among rankprune's modules
(function-level imports included), no module over 600 lines and no function over 80 lines, and every verb
that runs a model in eval mode gives each module its own training flag back."""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch
from torch import nn

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "rankprune"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def module_files() -> Dict[str, Path]:
    """``{dotted module name: file}`` for every Python module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()
# Compiled extensions (``from .. import _C``) are modules too: leaves of the graph.
# rankprune._C is one wherever the build put it: an editable pip install (CI) keeps it in build/, not here.
EXTENSIONS = {"rankprune._C"} | {".".join(p.relative_to(PACKAGE.parent).parts[:-1] + (p.name.split(".")[0],))
                                 for p in PACKAGE.rglob("*") if p.suffix in (".so", ".pyd")}


def imported_modules(name: str, path: Path) -> Set[str]:
    """The rankprune modules ``name`` imports, at its top or inside functions: ``from .x import y`` is
    module ``x.y`` where that is a module, else ``x``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES.keys() | EXTENSIONS else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES.keys() | EXTENSIONS:  # `import a.b.c` -> the deepest module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def in_cli(name: str) -> bool:
    return name == "rankprune.cli" or name.startswith("rankprune.cli.") or name == "rankprune.__main__"


def test_the_import_graph_sees_relative_and_function_level_imports():
    assert "rankprune._inputs" in GRAPH["rankprune.training"]  # from ._inputs import ...
    assert "rankprune.pruning._torch_pruning" in GRAPH["rankprune.pruning._errors"]  # from . import x
    assert "rankprune.scoring" in GRAPH["rankprune.pruning._prune"]  # from .. import scoring
    assert "rankprune.pruning" in GRAPH["rankprune.plans"]  # at call time


def test_no_library_module_imports_the_cli():
    offenders = {name: sorted(t for t in targets if in_cli(t))
                 for name, targets in GRAPH.items() if not in_cli(name)}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_cycle():
    """Among the library's modules (the CLI, which imports the package top, left out)."""
    graph = {name: {t for t in targets if not in_cli(t)}
             for name, targets in GRAPH.items() if not in_cli(name)}
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def long_functions(path: Path) -> List[str]:
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - first + 1
            if length > MAX_FUNCTION_LINES and "# long:" not in lines[node.lineno - 1]:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def sized_modules():
    return list(MODULES.items())


def test_no_module_over_600_lines():
    long = {name: n for name, path in sized_modules() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long


def test_no_function_over_80_lines():
    """A function may run longer only with ``# long: <reason>`` on its ``def`` line."""
    assert not [f for _, path in sized_modules() for f in long_functions(path)]


def mixed_flags_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).train()
    net[1].eval()  # the root in train mode, one BatchNorm frozen (fine-tuning with frozen statistics)
    net[3].eval()
    return net


def flags(model: nn.Module) -> Dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_every_module_keeps_its_own_training_flag():
    from rankprune import benchmark, pruning, report, scoring, training

    net = mixed_flags_net()
    before = flags(net)
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(2)]
    for criterion in ("energy", "taylor"):
        scoring.score(net, data, criterion, progress=False)
        assert flags(net) == before, criterion
    report.model_stats(net, x)
    assert flags(net) == before
    benchmark.latency(net, x, warmup=1, repeats=2)
    assert flags(net) == before
    training.recalibrate(net, data)
    assert flags(net) == before
    pruned, _ = pruning.prune(net, x, "energy", data=data, ratio=0.25, progress=False)
    assert flags(net) == before and flags(pruned) == before
    pruned, _ = pruning.prune(net, x, "l1", target_flops=0.7, inplace=True, progress=False)
    assert pruned is net and flags(net) == before


def _loaded_after(code: str) -> List[str]:
    """Which of a few heavy modules ``code`` loads in a fresh interpreter."""
    import os
    import subprocess
    import sys

    heavy = ("torch", "tqdm", "torch_pruning", "rankprune.ops", "rankprune.lowrank", "rankprune.pruning",
             "rankprune.scoring", "rankprune.export")
    script = f"import sys\n{code}\nprint('loaded:' + ','.join(m for m in {heavy!r} if m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    return [m for m in done.stdout.strip().splitlines()[-1].removeprefix("loaded:").split(",") if m]


def test_import_rankprune_is_lazy():
    # `import rankprune` loads nothing heavy; a verb loads what it needs (decompose: not Torch-Pruning)
    assert _loaded_after("import rankprune") == []
    assert _loaded_after("import rankprune\nrankprune.decompose") == ["torch", "tqdm", "rankprune.ops",
                                                                       "rankprune.lowrank"]
    assert "torch_pruning" in _loaded_after("from rankprune import prune")


def test_every_public_name_resolves():
    import rankprune

    assert all(getattr(rankprune, name) is not None for name in rankprune.__all__)
    assert set(rankprune.__all__) <= set(dir(rankprune))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        rankprune.nope  # noqa: B018
