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


def test_divergences_pair_up_per_sample_and_average_to_the_divergence():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3).double(), nn.Linear(5, 3).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    values = fidelity.divergences(a, b, [x[:2], x[2:]])
    p, q = torch.log_softmax(a(x), -1), torch.log_softmax(b(x), -1)
    assert torch.allclose(values, (p.exp() * (p - q)).sum(-1).detach(), rtol=1e-12, atol=0)
    assert math.isclose(fidelity.divergence(a, b, [x[:2], x[2:]]), float(values.mean()), rel_tol=1e-12)


def test_select_keeps_the_reference_unless_a_candidate_is_closer_beyond_the_noise():
    reference = torch.tensor([1.0, 3.0, 1.0, 3.0] * 25, dtype=torch.float64)  # mean 2, paired differences below
    noisy = reference + torch.tensor([-1.0, 0.8] * 50, dtype=torch.float64)  # mean 1.9: SE of the difference 0.09
    clear = reference - 0.5 + torch.tensor([0.01, -0.01] * 50, dtype=torch.float64)  # mean 1.5, SE 0.001
    assert not fidelity.clearly_closer(noisy, reference) and fidelity.clearly_closer(clear, reference)
    assert fidelity.select([reference, noisy], 0) == (0, [False, False])
    assert fidelity.select([reference, noisy, clear], 0) == (2, [False, False, True])
    # of several clearly closer candidates the lowest mean; the reference itself is never "closer"
    clearer = clear - 0.25
    assert fidelity.select([clear, reference, clearer], 1) == (2, [True, False, True])
    assert fidelity.select([reference], 0) == (0, [False])


def test_a_mean_lowered_by_a_few_samples_is_not_clearly_closer():
    reference = torch.ones(100, dtype=torch.float64)
    # 10 samples at 0, 90 slightly further: mean lower by 0.082, 2.7 standard errors, but closer on 10 of 100
    lopsided = torch.cat([torch.zeros(10), torch.full((90,), 1.02)]).double()
    difference = reference - lopsided
    assert difference.mean() > 2 * difference.std() / 10  # the mean test alone would take it
    assert not fidelity.clearly_closer(lopsided, reference)
    assert fidelity.select([reference, lopsided], 0) == (0, [False, False])
    # closer on 61 of 100 samples (sign test: 61 - 39 > 2 * sqrt(100)) and lower in mean: clearly closer; on 60
    # of 100 (60 - 40 = 20) not yet
    most = torch.cat([torch.full((61,), 0.9), torch.full((39,), 1.01)]).double()
    assert fidelity.clearly_closer(most, reference)
    assert not fidelity.clearly_closer(torch.cat([torch.full((60,), 0.9), torch.full((40,), 1.01)]).double(), reference)
    # a sign test needs 5 units at z = 2: 4 of 4 closer is not enough, 5 of 5 is; ties count for neither
    assert not fidelity.clearly_closer(torch.tensor([0.5, 0.6, 0.5, 0.6]).double(), torch.ones(4).double())
    assert fidelity.clearly_closer(torch.tensor([0.5, 0.6, 0.5, 0.6, 0.5]).double(), torch.ones(5).double())
    assert fidelity.clearly_closer(torch.tensor([0.5, 0.6, 0.5, 0.6, 0.5, 1, 1, 1]).double(), torch.ones(8).double())


def test_auto_compares_its_candidates_and_returns_the_closest_one_run_on_all_the_data():
    model, data = tiny(), calibration()
    before = copy.deepcopy(model.state_dict())
    pruned, plan = rankprune.prune(model, torch.zeros(1, 3, 12, 12), "auto", data=data, target_flops=0.6,
                                   progress=False)
    compared = plan["auto"]["candidates"]
    assert [(c["criterion"], c["global_ranking"]) for c in compared] == list(
        rankprune.pruning._prune.AUTO_CANDIDATES)
    closer = [c for c in compared if c["clearly_closer"]]
    best = min(closer, key=lambda c: c["divergence"]) if closer else compared[0]  # the default is the reference
    assert not compared[0]["clearly_closer"]
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
    closer = [c for c in report["candidates"] if c["clearly_closer"]]
    assert report["reference"] == 1.0 and not report["candidates"][-1]["clearly_closer"]
    assert report["chosen"] == (min(closer, key=lambda c: c["divergence"]) if closer else report["candidates"][-1])
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
