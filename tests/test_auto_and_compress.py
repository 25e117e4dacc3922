"""criterion="auto", the hybrid ``rankprune.compress`` and the fidelity measure they choose by."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankprune
from rankprune import fidelity


def calibration(count=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 12, 12, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(count)]


class Tiny(nn.Module):
    """conv-BN-ReLU x 3 with a residual addition, then a classifier: small enough for many compressions."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12))
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.body(x)).mean((2, 3)))


def tiny():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def test_divergence_is_zero_for_the_same_model_and_the_mean_kl_otherwise():
    torch.manual_seed(1)
    a = nn.Linear(5, 4)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.bias += torch.tensor([1.0, 0.0, 0.0, 0.0])
    x = torch.randn(6, 5)
    assert fidelity.divergence(a, copy.deepcopy(a), [x]) == 0.0
    p, q = F.log_softmax(a(x).double(), -1), F.log_softmax(b(x).double(), -1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert math.isclose(fidelity.divergence(a, b, [x[:2], x[2:]]), expected, rel_tol=1e-12)


def test_split_holdout_keeps_the_last_quarter_of_the_batches_or_of_the_samples():
    batches = calibration(count=5)
    fit, held = fidelity.split_holdout(batches, "verb")
    assert (len(fit), len(held)) == (3, 2) and held[-1] is batches[-1]
    fit, held = fidelity.split_holdout(iter(batches[:1]), "verb")  # one batch of 8: 6 fit, 2 held out
    assert fit[0][0].shape[0] == 6 and torch.equal(held[0][0], batches[0][0][6:])
    with pytest.raises(ValueError, match="at least 2 calibration samples"):
        fidelity.split_holdout([torch.zeros(1, 3, 12, 12)], "verb")


def test_auto_compares_its_candidates_and_returns_the_closest_one_run_on_all_the_data():
    model, data = tiny(), calibration()
    before = copy.deepcopy(model.state_dict())
    pruned, plan = rankprune.prune(model, torch.zeros(1, 3, 12, 12), "auto", data=data, target_flops=0.6,
                                   progress=False)
    compared = plan["auto"]["candidates"]
    assert [(c["criterion"], c["global_ranking"]) for c in compared] == list(
        rankprune.pruning._prune.AUTO_CANDIDATES)
    best = min(compared, key=lambda c: c["divergence"])
    assert plan["criterion"] == plan["auto"]["chosen"] == best["criterion"]
    assert plan["global_ranking"] == best["global_ranking"] and plan["auto"]["held_out_batches"] == 1
    assert abs(plan["flops"][1] / plan["flops"][0] - 0.6) < 0.06
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match='"auto" needs data'):
        rankprune.prune(model, torch.zeros(1, 3, 12, 12), "auto", target_flops=0.6)
    with pytest.raises(ValueError, match="global_ranking"):
        rankprune.prune(model, torch.zeros(1, 3, 12, 12), "auto", data=data, target_flops=0.6, global_ranking=True)


def test_compress_chooses_a_split_and_its_plan_rebuilds_the_model(tmp_path):
    model, data = tiny(), calibration()
    before = copy.deepcopy(model.state_dict())
    compressed, plan, report = rankprune.compress(model, data=data, target_flops=0.5, shares=(0.0, 0.5, 1.0),
                                                  progress=False)
    assert [c["prune_share"] for c in report["candidates"]] == [0.0, 0.5, 1.0]
    assert report["chosen"] == min(report["candidates"], key=lambda c: c["divergence"])
    assert plan["prune_share"] == report["chosen"]["prune_share"]
    methods = {0.0: ["decompose"], 0.5: ["prune", "decompose"], 1.0: ["prune"]}[plan["prune_share"]]
    assert [s["method"] for s in plan["steps"]] == methods
    assert plan["flops"][1] <= 0.55 * plan["flops"][0]
    torch.save(compressed.state_dict(), tmp_path / "w.pt")
    fresh = rankprune.apply_plan(tiny(), plan)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), compressed.eval()(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compress_with_pruning_and_decomposition_steps_round_trips():
    model, data = tiny(), calibration()
    compressed, plan, _ = rankprune.compress(model, data=data, target_flops=0.5, shares=(0.5,), progress=False)
    assert [s["method"] for s in plan["steps"]] == ["prune", "decompose"]
    fresh = rankprune.apply_plan(tiny(), plan)
    fresh.load_state_dict(compressed.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(data[0][0]), compressed.eval()(data[0][0]))


def test_compress_bad_input():
    model, data = tiny(), calibration()
    with pytest.raises(ValueError, match="target_flops"):
        rankprune.compress(model, data=data, target_flops=1.5)
    with pytest.raises(ValueError, match="shares"):
        rankprune.compress(model, data=data, target_flops=0.5, shares=(2.0,))
    with pytest.raises(ValueError, match="empty calibration data"):
        rankprune.compress(model, data=[], target_flops=0.5)
    with pytest.raises(ValueError, match="compress plan"):
        rankprune.apply_plan(tiny(), {"method": "compress", "version": rankprune.plans.PLAN_VERSION, "steps": []})
