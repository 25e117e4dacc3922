"""Two processes on gloo (CPU): each scores its shard, the all-reduced scores equal one process on all data."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rankprune import scoring


def make_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    return net.eval()


def make_batches():
    gen = torch.Generator().manual_seed(1)
    # uneven shards: rank 0 gets batches of 5 and 2 images, rank 1 one batch of 3
    return [(torch.randn(n, 3, 6, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (5, 3, 2)]


CRITERIA = ("energy", "taylor")


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = make_batches()[rank::world]
        for criterion in CRITERIA:
            scores = scoring.score(make_net(), shard, criterion, progress=False)
            torch.save(scores, os.path.join(out_dir, f"{criterion}-rank{rank}.pt"))
        # one batch for two ranks: rank 1 has an empty shard and still joins the all-reduce
        scores = scoring.score(make_net(), make_batches()[:1][rank::world], "energy", progress=False)
        torch.save(scores, os.path.join(out_dir, f"empty-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for criterion in CRITERIA:
        single = scoring.score(make_net(), make_batches(), criterion, progress=False)
        for rank in range(2):
            got = torch.load(tmp_path / f"{criterion}-rank{rank}.pt", weights_only=True)
            assert got.keys() == single.keys()
            for name in single:
                torch.testing.assert_close(got[name], single[name], rtol=1e-6, atol=1e-9)
    single = scoring.score(make_net(), make_batches()[:1], "energy", progress=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"empty-rank{rank}.pt", weights_only=True)
        for name in single:
            torch.testing.assert_close(got[name], single[name], rtol=1e-6, atol=1e-9)
