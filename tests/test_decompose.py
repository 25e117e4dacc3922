import io
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rankprune
from rankprune.lowrank import apply_decompose_plan
from rankprune.nn import LowRankConv2d, LowRankLinear


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def small_resnet():
    """A CIFAR-style ResNet-ish network, small enough for 2 CPU cores."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def _flops(model, x):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.fixture
def net_and_input(seed):
    model = small_resnet().eval()
    return model, torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_target_flops_is_met(net_and_input, target, scheme):
    model, x = net_and_input
    new, plan, report = rankprune.decompose(model, target_flops=target, scheme=scheme, example_inputs=x,
                                            min_rank=1)
    ratio = _flops(new, x) / _flops(model, x)
    assert abs(ratio - target) <= 0.05 * target, ratio
    assert report["total"]["flops"] == _flops(new, x)
    assert all(e["scheme"] == (scheme if e["kind"] == "conv2d" else "channel") for e in plan["layers"].values())
    assert not any(isinstance(m, (LowRankConv2d, LowRankLinear)) for m in model.modules())  # inplace=False


@pytest.mark.parametrize("target", [0.4, 0.7])
def test_target_params_is_met(net_and_input, target):
    model, x = net_and_input
    new, _, report = rankprune.decompose(model, target_params=target, min_rank=1)
    ratio = sum(p.numel() for p in new.parameters()) / sum(p.numel() for p in model.parameters())
    assert abs(ratio - target) <= 0.05 * target
    assert report["total"]["flops"] is None


def test_budget_keeps_the_energy_of_important_layers(seed):
    # Two layers with the same cost, one nearly rank 1: the budget should be spent on the other one.
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False))
    with torch.no_grad():
        u, v = torch.randn(8, 1), torch.randn(1, 72)
        model[0].weight.copy_((u @ v + 1e-3 * torch.randn(8, 72)).reshape(8, 8, 3, 3))
    x = torch.randn(1, 8, 6, 6)
    _, plan, report = rankprune.decompose(model, target_flops=0.6, example_inputs=x, min_rank=1)
    assert plan["layers"]["0"]["rank"] == 1
    assert report["layers"]["0"]["energy_kept"] > 0.999


def test_energy_and_skipping(net_and_input):
    model, x = net_and_input
    new, plan, report = rankprune.decompose(model, energy=0.9, example_inputs=x)
    for name, entry in report["layers"].items():
        assert entry["energy_kept"] >= 0.9
        assert entry["flops"] < entry["flops_dense"]
        assert 0 <= entry["rel_error"] < 1
    modules = dict(model.named_modules())
    for name in report["skipped"]:  # skipped exactly when the 90%-energy rank would not save FLOPs
        w = modules[name].weight.reshape(modules[name].weight.shape[0], -1).double()
        s2 = torch.linalg.svdvals(w) ** 2
        r = int((s2.cumsum(0) / s2.sum() < 0.9 - 1e-12).sum()) + 1
        assert r * sum(w.shape) >= w.numel()
    assert report["skipped"]  # the 1x1 shortcuts (32 x 16, 64 x 32) never save FLOPs at 90% energy
    assert set(plan["layers"]) | set(report["skipped"]) == {
        n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def test_full_rank_never_saves_flops(net_and_input):
    # A full-rank factorization of an m x n matrix costs r (m + n) > m n: every layer is skipped.
    model, x = net_and_input
    new, plan, report = rankprune.decompose(model, rank_ratio=1.0, example_inputs=x)
    assert plan["layers"] == {} and len(report["skipped"]) == 10
    assert report["total"]["output_rel_error"] == 0.0


def test_min_flop_saving(net_and_input):
    model, x = net_and_input
    _, _, report = rankprune.decompose(model, energy=0.5, example_inputs=x, min_flop_saving=0.3)
    assert report["layers"] and all(e["flops"] <= 0.7 * e["flops_dense"] for e in report["layers"].values())


@pytest.mark.parametrize("progress", [True, False])
def test_progress_switch(net_and_input, progress, capfd):
    model, x = net_and_input
    rankprune.decompose(model, energy=0.9, example_inputs=x, progress=progress)
    assert ("decompose: SVD" in capfd.readouterr().err) == progress


def test_explicit_ranks_include_exclude(net_and_input):
    model, x = net_and_input
    new, plan, report = rankprune.decompose(model, ranks={"3.conv1": 4, "8": 2}, example_inputs=x)
    assert plan["layers"] == {"3.conv1": {"kind": "conv2d", "scheme": "channel", "rank": 4, "data_aware": False},
                              "8": {"kind": "linear", "scheme": "channel", "rank": 2, "data_aware": False}}
    assert isinstance(new[3].conv1, LowRankConv2d) and isinstance(new[8], LowRankLinear)
    _, plan, _ = rankprune.decompose(model, rank_ratio=0.25, include="5.*", exclude=["5.shortcut.*"])
    assert set(plan["layers"]) == {"5.conv1", "5.conv2"}


def test_plan_and_state_dict_round_trip(net_and_input):
    model, x = net_and_input
    new, plan, _ = rankprune.decompose(model, target_flops=0.5, scheme="spatial", example_inputs=x)
    plan = json.loads(json.dumps(plan))
    buffer = io.BytesIO()
    torch.save(new.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = apply_decompose_plan(small_resnet(), plan).eval()
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(rebuilt(x), new(x))


def test_training_flags_and_running_stats_untouched(net_and_input):
    model, x = net_and_input
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, _, _ = rankprune.decompose(model, energy=0.8, example_inputs=x, inplace=True)
    assert new is model and model.training and all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, before["1.running_mean"])


def test_bad_arguments(net_and_input):
    model, x = net_and_input
    with pytest.raises(ValueError, match="exactly one"):
        rankprune.decompose(model)
    with pytest.raises(ValueError, match="exactly one"):
        rankprune.decompose(model, energy=0.9, rank_ratio=0.5)
    with pytest.raises(ValueError, match="example_inputs"):
        rankprune.decompose(model, target_flops=0.5)
    with pytest.raises(ValueError, match="target_flops"):
        rankprune.decompose(model, target_flops=1.5, example_inputs=x)
    with pytest.raises(ValueError, match="not a module"):
        rankprune.decompose(model, ranks={"nope": 2})
    with pytest.raises(ValueError, match="only Conv2d and Linear"):
        rankprune.decompose(model, ranks={"1": 2})
    with pytest.raises(ValueError, match="full rank"):
        rankprune.decompose(model, ranks={"8": 11})
    with pytest.raises(ValueError, match="scheme"):
        rankprune.decompose(model, energy=0.9, scheme="tucker")
    with pytest.raises(ValueError, match="cannot be met"):
        rankprune.decompose(model, target_flops=0.01, example_inputs=x)
    with pytest.raises(ValueError, match="plan"):
        apply_decompose_plan(small_resnet(), {"method": "prune", "version": 1})
    with pytest.raises(ValueError, match="plan says"):
        apply_decompose_plan(small_resnet(), {"method": "decompose", "version": 1,
                                              "layers": {"1": {"kind": "conv2d", "scheme": "channel", "rank": 2}}})


# (name, width): the 512-channel SVDs of full-width VGG-16/MobileNetV2/ResNet-50 take minutes on 2 cores.
BUILTIN_MODELS = [("resnet20", 1.0), ("resnet56", 1.0), ("vgg16", 0.5), ("mobilenetv2", 0.5)] + [
    pytest.param(name, 1.0, marks=pytest.mark.slow) for name in ("vgg16", "mobilenetv2", "resnet50")
]


@pytest.mark.parametrize("name, width", BUILTIN_MODELS)
def test_every_builtin_model_meets_the_budget(name, width, seed):
    models = pytest.importorskip("rankprune.models")
    model = models.build(name, width=width).eval()
    x = torch.randn(1, *models.INPUT_SHAPES[name])
    new, plan, report = rankprune.decompose(model, target_flops=0.5, example_inputs=x)
    ratio = _flops(new, x) / _flops(model, x)
    assert abs(ratio - 0.5) <= 0.05 * 0.5, ratio
    assert plan["layers"] and report["total"]["output_rel_error"] is not None
    rebuilt = apply_decompose_plan(models.build(name, width=width).eval(), json.loads(json.dumps(plan)))
    rebuilt.load_state_dict(new.state_dict())
    torch.testing.assert_close(rebuilt(x), new(x))
