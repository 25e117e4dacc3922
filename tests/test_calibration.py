"""The calibration engine (rankprune.calibration) and the data-aware decomposition that runs on it: staged
passes, the frontier cache, the dense-input cache and its recomputation, data checks, torch.distributed."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rankprune
from rankprune.calibration import Calibration
from rankprune.nn import LowRankConv2d, LowRankLinear


class CountingReLU(nn.ReLU):
    """A ReLU that counts how often its forward runs (a cached module's forward does not)."""

    calls = 0

    def forward(self, x):
        CountingReLU.calls += 1
        return super().forward(x)


class BranchNet(nn.Module):
    """A stem, two branches reading the same tensor and concatenated, a residual addition, a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = CountingReLU()
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 1)
        self.mid = nn.Conv2d(12, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        s = self.act(self.stem(x))
        y = torch.cat([torch.relu(self.a(s)), torch.relu(self.b(s))], 1)
        y = torch.relu(self.mid(y) + s)
        return self.fc(y.mean((2, 3)))


RANKS = {"stem": 5, "a": 5, "b": 3, "mid": 6, "fc": 3}
DAMPING = 1e-6


def _data(dtype=torch.float64, batches=3, n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    # 4 x 8 x 8 = 256 patches per batch: below the sample cap, every column is used
    return [(torch.randn(n, 3, 8, 8, generator=gen, dtype=dtype), torch.zeros(n)) for _ in range(batches)]


def _net(seed=0):
    torch.manual_seed(seed)
    return BranchNet().double().eval()


def _reference(model, data):
    """Zhang et al.'s asymmetric reconstruction, layer by layer in forward order, in float64 with full passes:
    the first layer by the whitened SVD of its dense inputs, each later one by the reduced-rank regression of
    the dense outputs W X on the inputs H it gets once the layers before it are replaced."""
    dense, work = model, _net()
    work.load_state_dict(model.state_dict())
    x = torch.cat([b[0] for b in data])

    def inputs(net, name):
        seen = []
        handle = net.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            net(x)
        handle.remove()
        layer = net.get_submodule(name)
        if isinstance(layer, nn.Conv2d):
            cols = nn.functional.unfold(seen[0], layer.kernel_size, layer.dilation, layer.padding, layer.stride)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1]).T
        return seen[0].reshape(-1, seen[0].shape[-1]).T

    def whiten(C):
        eye = torch.eye(C.shape[0], dtype=C.dtype)
        return torch.linalg.cholesky(C + DAMPING * C.diagonal().mean() * eye)

    for i, name in enumerate(RANKS):
        layer = work.get_submodule(name)
        W = dense.get_submodule(name).weight.detach().reshape(layer.weight.shape[0], -1)
        X, H = inputs(dense, name), inputs(work, name)
        L = whiten(X @ X.T if i == 0 else H @ H.T)
        target = W @ L if i == 0 else torch.linalg.solve_triangular(L, H @ (W @ X).T, upper=False).T
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        r = RANKS[name]
        Wr = (U[:, :r] * S[:r]) @ torch.linalg.solve_triangular(L.T, Vh[:r].T, upper=True).T
        with torch.no_grad():
            layer.weight.copy_(Wr.reshape(layer.weight.shape))
    return work


@pytest.mark.parametrize("batches,n", [(3, 4), (1, 1), (2, 1)])
def test_staged_refit_equals_the_layer_by_layer_reference(seed, batches, n, monkeypatch):
    # (3, 4): every refitted layer sees more columns than it has inputs (its products are accumulated);
    # (1, 1): 64 columns for a's 72 and mid's 108 inputs and 1 sample for fc's 8, all fitted in the sample
    # space; (2, 1): a and mid start in the sample space and fold into the products at the second batch.
    in_sample_space = set()
    original = rankprune.lowrank.passes.sample_space_factors
    monkeypatch.setattr(rankprune.lowrank.passes, "sample_space_factors",
                        lambda h, y, damping, name, kernel: in_sample_space.add(name) or original(h, y, damping,
                                                                                                   name, kernel))
    model, data = _net(), _data(batches=batches, n=n)
    new, plan, report = rankprune.decompose(model, ranks=RANKS, data=data, damping=DAMPING, progress=False)
    assert in_sample_space == {(3, 4): set(), (1, 1): {"a", "mid", "fc"}, (2, 1): {"fc"}}[(batches, n)]
    assert all(isinstance(new.get_submodule(n), (LowRankConv2d, LowRankLinear)) for n in RANKS)
    assert [n for n, e in report["layers"].items() if e["refitted"]] == ["a", "b", "mid", "fc"]
    want = _reference(model, data)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        torch.testing.assert_close(new(x), want(x), rtol=1e-7, atol=1e-9)
    phases = report["calibration"]["phases"]
    assert {"statistics", "factorization", "refit", "refit factorization", "replace"} <= set(phases)
    assert phases["statistics"]["batches"] == len(data)
    assert all(p["seconds"] >= 0 and p["peak_memory"] >= 0 for p in phases.values())


def test_cache_serves_finished_modules_and_changes_nothing(seed):
    data = _data()
    x = torch.cat([b[0] for b in data])
    results = {}
    for budget in (None, 0):
        CountingReLU.calls = 0
        new, _, report = rankprune.decompose(_net(), ranks=RANKS, data=data, damping=DAMPING, cache_bytes=budget,
                                             sensitivity=False, progress=False)
        with torch.no_grad():
            results[budget] = (CountingReLU.calls, new(x))
    cached_calls, cached_out = results[None]
    plain_calls, plain_out = results[0]
    # the stem's activation runs in the statistics pass; with a cache it is then served by every refit pass
    # (recorded in the first), without one it runs again in each of the 3 refit stages (and in each
    # recomputation of the dense inputs). Three single-sample runs on the example inputs come on top.
    assert cached_calls == 2 * len(data) + 3
    assert plain_calls >= 4 * len(data) + 3
    torch.testing.assert_close(cached_out, plain_out, rtol=1e-10, atol=1e-12)
    assert any("recomputed" in note for note in report["calibration"]["notes"])


class WritesIntoOutputs(nn.Module):
    """``a``'s output written in place right after it (a write the recording pass sees) or only after ``b``
    ran (a write a pass that stops at ``b`` never sees); ``b``'s output never written."""

    def __init__(self, late: bool):
        super().__init__()
        self.late = late
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if not self.late:
            y.mul_(2)
        z = self.b(y)
        if self.late:
            y.add_(1)
        return self.c(z + y)


def _captured_inputs(engine, module, desc):
    seen = {}
    engine.stage_pass({module: lambda b, c, x: seen.setdefault(b, x)}, desc)
    return seen


@pytest.mark.parametrize("late", [False, True])
def test_cache_survives_writes_into_served_outputs(late):
    torch.manual_seed(0)
    model = WritesIntoOutputs(late).double().eval()
    data = [torch.randn(2, 3, 5, 5, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        expected = []
        for x in data:
            y = model.a(x) * (1 if late else 2)
            expected.append(model.b(y) + (y + 1 if late else y))
        expected_a = [model.a(x) for x in data]
    engine = Calibration(model, data, progress=False)
    engine.trace({}, "trace")
    _captured_inputs(engine, model.b, "b")  # records a's outputs (the pass stops at b: a late write is not seen)
    for attempt in range(3):  # serves a (and then b); a late write lands in a served tensor on the first of these
        seen = _captured_inputs(engine, model.c, f"c {attempt}")
        for b, x in enumerate(data):
            torch.testing.assert_close(seen[b], expected[b], rtol=0, atol=1e-12)
    # the writes landed in copy-on-write aliases: the cache still holds a's outputs as they were
    assert engine.cached[model.a].complete
    for b in range(len(data)):
        torch.testing.assert_close(engine.cached[model.a].per_batch[b][0], expected_a[b], rtol=0, atol=0)


def test_outputs_nothing_writes_into_are_served_without_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)).double().eval()
    data = [torch.randn(2, 3, 5, 5, dtype=torch.float64) for _ in range(2)]
    engine = Calibration(model, data, progress=False)
    engine.trace({}, "trace")
    recorded = _captured_inputs(engine, model[2], "record")
    served = _captured_inputs(engine, model[2], "serve")
    cached = engine.cached[model[1]]
    for b in range(len(data)):
        # still sharing the cached storage (an alias that nothing wrote into is never copied)
        assert torch._C._is_cow_tensor(recorded[b]) and torch._C._is_cow_tensor(served[b])
        assert served[b] is not cached.per_batch[b][0]
        torch.testing.assert_close(served[b], cached.per_batch[b][0], rtol=0, atol=0)


class FromNumpy(nn.Module):
    """Returns a tensor whose storage numpy owns: PyTorch cannot alias it copy-on-write."""

    def forward(self, x):
        return torch.from_numpy(x.numpy() * 2)


def test_outputs_that_cannot_be_aliased_are_copied():
    model = nn.Sequential(FromNumpy(), nn.ReLU(inplace=True), nn.Linear(3, 2).double()).eval()
    data = [torch.randn(2, 3, dtype=torch.float64) for _ in range(2)]
    engine = Calibration(model, data, progress=False)
    engine.trace({}, "trace")
    for desc in ("record", "serve"):  # the in-place ReLU writes into what the model gets, never into the cache
        seen = _captured_inputs(engine, model[2], desc)
        for b, x in enumerate(data):
            torch.testing.assert_close(seen[b], (2 * x).relu(), rtol=0, atol=0)
            torch.testing.assert_close(engine.cached[model[0]].per_batch[b][0], 2 * x, rtol=0, atol=0)


def test_budget_too_small_for_the_dense_inputs_recomputes_them(seed):
    data = _data()
    x = torch.cat([b[0] for b in data])
    full, _, _ = rankprune.decompose(_net(), ranks=RANKS, data=data, damping=DAMPING, progress=False)
    small, _, report = rankprune.decompose(_net(), ranks=RANKS, data=data, damping=DAMPING, cache_bytes=1,
                                           progress=False)
    notes = report["calibration"]["notes"]
    assert notes and all("recomputed" in n for n in notes) and any("holds only part" in n for n in notes)
    with torch.no_grad():
        torch.testing.assert_close(small(x), full(x), rtol=1e-10, atol=1e-12)


class Shuffled:
    """A re-iterable that yields its batches in another order on every pass (like a shuffling DataLoader)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        order = self.batches if self.passes % 2 else self.batches[::-1]
        return iter(order)


class Shrinking(Shuffled):
    """Stops one batch early on every other pass."""

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes % 2 else self.batches[:-1])


@pytest.mark.parametrize("kind, message", [(Shuffled, "different batch"), (Shrinking, "batches on a later pass|more batches on a later pass")])
def test_data_that_changes_between_passes_is_refused(kind, message):
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        rankprune.decompose(model, ranks=RANKS, data=kind(_data()), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_one_shot_iterator_mixed_batch_sizes_and_dtypes():
    # a generator is read once into a list; float32 batches run in the float64 model's dtype; batch sizes differ
    data = [(torch.randn(n, 3, 8, 8), torch.zeros(n)) for n in (4, 1, 3)]
    x = torch.cat([b[0] for b in data]).double()
    from_list, _, _ = rankprune.decompose(_net(), ranks=RANKS, data=data, damping=DAMPING, progress=False)
    from_gen, _, report = rankprune.decompose(_net(), ranks=RANKS, data=(b for b in data), damping=DAMPING,
                                              progress=False)
    assert report["calibration"]["samples"] == 8 and report["calibration"]["batches"] == 3
    with torch.no_grad():
        torch.testing.assert_close(from_gen(x), from_list(x), rtol=0, atol=0)


class NaNAfterStem(nn.Module):
    def forward(self, x):
        return x * float("nan")


def test_nan_is_attributed_to_the_right_tensor():
    data = _data(batches=1)
    model = _net()
    model.act = nn.Sequential(CountingReLU(), NaNAfterStem())  # a module that emits NaN
    with pytest.raises(ValueError,
                       match=r"the output of layer 'act.1' \(NaNAfterStem\), from finite inputs, holds NaN"):
        rankprune.decompose(model, ranks=RANKS, data=data, progress=False)
    model = _net()
    with torch.no_grad():
        model.mid.weight[0, 0, 0, 0] = float("inf")
    for kwargs in ({"data": data}, {"example_inputs": data[0][0]}):
        with pytest.raises(ValueError, match="parameter 'mid.weight' of layer 'mid' holds NaN or Inf"):
            rankprune.decompose(model, ranks=RANKS, progress=False, **kwargs)


class ReadsChildWeight(nn.Module):
    """A parent that calls its child's weight itself (as some attention modules do): the child cannot be
    replaced by a low-rank module, which has no weight."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = nn.functional.linear(x, self.proj.weight, self.proj.bias)
        return self.out(torch.relu(x))


def test_layer_whose_weight_is_read_by_its_parent_stays_dense(seed):
    model = ReadsChildWeight().eval()
    x = torch.randn(32, 16)
    with pytest.warns(UserWarning, match=r"\['proj'\]"):
        new, plan, report = rankprune.decompose(model, rank_ratio=0.25, data=[x], progress=False)
    assert isinstance(new.proj, nn.Linear) and isinstance(new.out, LowRankLinear)
    assert "read outside its own forward" in report["skipped"]["proj"]
    new(x)  # still runs
    with pytest.raises(ValueError, match="read outside"):
        rankprune.decompose(model, ranks={"proj": 4}, example_inputs=x, progress=False)


def test_engine_rejects_a_bad_budget_and_empty_data():
    with pytest.raises(ValueError, match="cache_bytes"):
        Calibration(_net(), _data(), cache_bytes=-1)
    with pytest.raises(ValueError, match="empty calibration data"):  # a list known to be empty: at once
        Calibration(_net(), [], progress=False)
    engine = Calibration(_net(), (batch for batch in []), progress=False)
    with pytest.raises(ValueError, match="empty calibration data"):  # a generator: when it yields nothing
        engine.trace({}, "statistics")


# ------------------------------------------------------------------------------------------ torch.distributed
def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = _data(batches=4)[rank::world]
        new, plan, _ = rankprune.decompose(_net(), ranks=RANKS, data=shard, damping=DAMPING, progress=False)
        torch.save(new.state_dict(), os.path.join(out_dir, f"ranks-{rank}.pt"))
        new, plan, _ = rankprune.decompose(_net(), target_flops=0.6, data=shard, min_rank=1, measure_latency=False,
                                            progress=False)
        torch.save({"plan": plan, "state": new.state_dict()}, os.path.join(out_dir, f"budget-{rank}.pt"))
        net = rankprune.recalibrate(_bn_net(), shard)
        torch.save(net.state_dict(), os.path.join(out_dir, f"recalibrated-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                         nn.BatchNorm2d(2)).double()


def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single, _, _ = rankprune.decompose(_net(), ranks=RANKS, data=_data(batches=4), damping=DAMPING, progress=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"ranks-{rank}.pt", weights_only=True)
        for name, value in single.state_dict().items():
            torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-9)
    # with a budget each rank measures sensitivities on its own probe: the averages agree, so do the models
    first, second = (torch.load(tmp_path / f"budget-{r}.pt", weights_only=False) for r in range(2))
    assert first["plan"] == second["plan"]
    for name, value in first["state"].items():
        torch.testing.assert_close(second["state"][name], value, rtol=0, atol=0)
    # recalibrate: the BatchNorm statistics of both shards together, as one process computes them
    single = rankprune.recalibrate(_bn_net(), _data(batches=4)).state_dict()
    for rank in range(2):
        got = torch.load(tmp_path / f"recalibrated-{rank}.pt", weights_only=True)
        for name, value in single.items():
            torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12)
