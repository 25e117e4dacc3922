"""`import rankprune` and everything but channel pruning work without torch-pruning (a bare GPU machine has
none), while pruning itself says clearly that it needs it. Run in a subprocess where importing torch_pruning
fails, so this process's modules are untouched."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"

SCRIPT = textwrap.dedent("""
    import sys

    class NoTorchPruning:
        def find_spec(self, name, path=None, target=None):
            if name == "torch_pruning" or name.startswith("torch_pruning."):
                raise ImportError("torch_pruning is made unimportable by the test")

    sys.meta_path.insert(0, NoTorchPruning())
    import torch
    from torch import nn
    import rankprune
    from rankprune import ops, scoring

    torch.manual_seed(0)
    a = torch.randn(4, 9, 7)
    torch.testing.assert_close(ops.svdvals(a).double(), ops.svdvals_reference(a), rtol=1e-5, atol=1e-5)
    U, S, V = ops.svd_lowrank(torch.randn(2, 30, 20), 4)
    x = torch.randn(2, 8, 6, 6)
    w1, w2 = torch.randn(4, 8, 3, 3), torch.randn(5, 4, 1, 1)
    torch.testing.assert_close(ops.lowrank_conv2d(x, w1, w2, None, 1, 1).double(),
                               ops.lowrank_conv2d_reference(x, w1, w2, None, 1, 1), rtol=1e-4, atol=1e-4)

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    data = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    scores = scoring.score(model, data, "energy")
    assert set(scores) == {"0", "2"} and scores["0"].shape == (16,)

    compressed, plan, report = rankprune.decompose(model, rank_ratio=0.5, progress=False)
    assert any(isinstance(m, rankprune.nn.LowRankConv2d) for m in compressed.modules())

    pruner = rankprune.TrainedRankPruner(model, energy=0.9, period=1, lowrank_min_dim=1)
    pruner.project()
    assert pruner.ranks() and all(1 <= r <= 16 for r in pruner.ranks().values())

    assert "torch_pruning" not in sys.modules
    try:
        rankprune.prune
    except ImportError as e:
        assert "torch_pruning" in str(e)
    else:
        raise AssertionError("rankprune.prune without torch_pruning should raise ImportError")
    print("OK")
""")


@pytest.mark.slow
def test_import_and_ops_without_torch_pruning():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(PYTHON_DIR), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")
