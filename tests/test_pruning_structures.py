"""Structures that need care when pruning (grouped convs, unwrapped parameters, LayerNorm, ShuffleNet's
channel shuffle, which Torch-Pruning cannot trace) and the warnings that say what was not done."""
import warnings

import pytest
import torch
from torch import nn

import rankprune
from rankprune import pruning
from rankprune.trp import TrainedRankPruner


class GroupedNet(nn.Module):
    """conv a (8) -> grouped conv b (8 -> 8, groups=2) -> conv c; optional concatenation before b."""

    def __init__(self, concat: bool = False):
        super().__init__()
        self.concat = concat
        self.a = nn.Conv2d(3, 4 if concat else 8, 3, padding=1)
        self.a2 = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.cat([self.a(x), self.a2(x)], 1) if self.concat else self.a(x)
        return self.c(torch.relu(self.b(torch.relu(h))))


def test_grouped_conv_pruned_equally_per_group_without_changing_outputs():
    torch.manual_seed(0)
    net = GroupedNet().eval()
    with torch.no_grad():  # dead channels placed on purpose: a's 1 and 6, b's 2 and 5 output zeros
        for conv, dead in ((net.a, [1, 6]), (net.b, [2, 5])):
            conv.weight[dead] = 0
            conv.bias[dead] = -1.0
    scores = {"a": torch.tensor([5., 0, 5, 5, 5, 5, 0, 5]), "b": torch.tensor([5., 5, 0, 5, 5, 0, 5, 5])}
    x = torch.randn(2, 3, 8, 8)
    pruned, plan = rankprune.prune(net, x[:1], scores, ratio=0.25, progress=False)
    assert plan["layers"]["a"]["out_channels_kept"] == [0, 2, 3, 4, 5, 7]
    assert plan["layers"]["b"]["in_channels_kept"] == [0, 2, 3, 4, 5, 7]
    assert plan["layers"]["b"]["out_channels_kept"] == [0, 1, 3, 4, 6, 7]
    assert pruned.b.groups == 2 and pruned.b.weight.shape == (6, 3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x))
    restored = rankprune.apply_plan(GroupedNet(), plan)
    restored.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), pruned(x))


def test_unequal_removal_from_groups_is_refused():
    net = GroupedNet()
    plan = {"method": "prune", "version": rankprune.pruning.PLAN_VERSION,
            "layers": {"b": {"in_channels_kept": [1, 2, 3, 4, 5, 6, 7]}}}
    with pytest.raises(ValueError, match="equal numbers from each group"):
        rankprune.apply_plan(net, plan)


def test_grouped_conv_behind_concatenation_is_left_unpruned_with_one_warning():
    net = GroupedNet(concat=True).eval()
    with pytest.warns(UserWarning, match="left unpruned") as record:
        pruned, plan = rankprune.prune(net, torch.randn(1, 3, 8, 8), "l1", target_flops=0.8, progress=False)
    messages = [str(w.message) for w in record if "left unpruned" in str(w.message)]
    assert len(messages) == 1 and "'b'" in messages[0] and "a2" in messages[0]
    assert pruned.a.out_channels == 4 and pruned.a2.out_channels == 4 and pruned.b.in_channels == 8


class LayerScaleNet(nn.Module):
    """A parameter outside any standard layer (ConvNeXt's layer_scale) and a channels-last LayerNorm."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.norm(self.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.b(h * self.scale)


def test_layernorm_and_unwrapped_parameter_plan_round_trip():
    torch.manual_seed(0)
    net = LayerScaleNet().eval()
    x = torch.randn(2, 3, 8, 8)
    pruned, plan = rankprune.prune(net, x[:1], "l1", ratio=0.5, progress=False)
    kept = plan["layers"]["a"]["out_channels_kept"]
    assert len(kept) == 4 and plan["layers"]["scale"] == {"dim": 0, "channels_kept": kept}
    assert pruned.norm.normalized_shape == (4,) and pruned.scale.shape == (4, 1, 1)
    restored = rankprune.apply_plan(LayerScaleNet(), plan)
    restored.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), pruned(x))


def test_torch_pruning_failure_is_a_pruning_error_naming_the_place():
    torchvision = pytest.importorskip("torchvision")  # optional: CI installs it

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=4).eval()
    with pytest.raises(pruning.PruningError, match=r"ShuffleNetV2.*reshape of the channel dimension") as info:
        rankprune.prune(model, torch.randn(1, 3, 32, 32), "l1", ratio=0.3, progress=False)
    assert "after layer 'stage" in str(info.value) and isinstance(info.value.__cause__, ZeroDivisionError)


def test_tied_scores_warn_once_naming_the_layers():
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    with pytest.warns(UserWarning, match=r"all equal.*: 0$"):
        rankprune.prune(net, torch.randn(1, 3, 8, 8), "bn_scale", ratio=0.5, progress=False)


def test_decompose_include_matching_nothing_warns():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.warns(UserWarning, match=r"\['layer1\.\*'\] match no Conv2d or Linear"):
        _, plan, _ = rankprune.decompose(net, energy=0.5, include=["layer1.*", "2"], progress=False)
    assert list(plan["layers"]) == ["2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rankprune.decompose(net, energy=0.5, include="2", progress=False)


def test_trp_finalize_without_any_decomposed_layer_warns():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    pruner = TrainedRankPruner(net, energy=1.0, layers=["0"])  # full rank 4: factors cost more than the conv
    with pytest.warns(UserWarning, match=r"decomposed no layer(.|\n)*  0: "):
        small, plan = pruner.finalize(example_inputs=torch.randn(1, 3, 8, 8), progress=False)
    assert plan["layers"] == {}
