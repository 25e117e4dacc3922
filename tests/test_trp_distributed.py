"""TRP under DistributedDataParallel: two CPU processes (gloo) must end with identical weights."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rankprune.trp import TrainedRankPruner


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 3),
    )


def _worker(rank: int, world: int, store: str, out_dir: str, scheme: str, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # the same initial weights on every rank
        model = nn.parallel.DistributedDataParallel(_net())
        # lowrank_min_dim=8: the 8 x 72 / 24 x 24 matrices take the randomized svd_lowrank path too
        pruner = TrainedRankPruner(model, energy=0.8, lam=1e-2, period=2, scheme=scheme, lowrank_min_dim=8, seed=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        for _ in range(steps):
            x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            pruner.regularize()
            opt.step()
            pruner.step()
        torch.save(
            {"weights": model.module.state_dict(), "ranks": pruner.ranks(), "state": pruner.state_dict()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_ddp_ranks_end_identical(tmp_path, scheme):
    world, steps = 2, 5
    # spawn, not fork: a forked child of a process whose autograd engine has already run (any earlier test's
    # backward) cannot run backward itself ("Unable to handle autograd's threading in combination with
    # fork-based multiprocessing"); a spawned child pays a torch import instead.
    args = (world, str(tmp_path / "store"), str(tmp_path), scheme, steps)
    mp.start_processes(_worker, args=args, nprocs=world, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    first = results[0]
    for other in results[1:]:
        for name, w in first["weights"].items():
            assert torch.equal(other["weights"][name], w), name
        assert other["ranks"] == first["ranks"]
        assert other["state"] == first["state"]
    assert first["state"]["calls"] == steps
    # the 4th step projected and the 5th moved the weights on: the pruner sees no pending projection
    assert first["state"]["projected_ranks"] == {}
    init = _net()
    assert set(first["ranks"]) == {"2", "4", "6"}
    assert all(1 <= r <= min(init.get_submodule(n).weight.flatten(1).shape) for n, r in first["ranks"].items())
