"""Pruning through torch.cat: channels built dead on purpose in chosen inputs of a concatenation must be
exactly the ones removed, and removing them must leave the output unchanged."""
import pytest
import torch
import torch_pruning as tp
from torch import nn

import rankprune
from rankprune import models, pruning
from rankprune.pruning._prune import _output_layers


def test_concatnet_builds_and_prunes():
    model = models.build("concatnet", num_classes=7, width=0.5).eval()
    assert models.INPUT_SHAPES["concatnet"] == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"DenseBlock", "InceptionBlock", "CSPBlock"} <= kinds
    pruned, plan = rankprune.prune(model, x[:1], "l1", ratio=0.5, progress=False)
    with torch.no_grad():
        assert pruned(x).shape == (2, 7)
    assert plan["flops"][1] < 0.5 * plan["flops"][0]
    with pytest.raises(ValueError, match="width"):
        models.build("concatnet", width=0)


def cbr(cin, cout, k=1, groups=1):
    """conv (no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class CatDepthwise(nn.Module):
    """The issue's case: cat([a, b, c]) then a depthwise conv, which ties the three convs' channels together."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 4, 3), cbr(3, 6, 3), cbr(3, 5, 3)
        self.dw = cbr(15, 15, 3, groups=15)
        self.head = nn.Conv2d(15, 3, 1)

    def forward(self, x):
        return self.head(self.dw(torch.cat([self.a(x), self.b(x), self.c(x)], 1))).mean((2, 3))


class Dense(nn.Module):
    """DenseNet-style: x = cat([x, layer(x)]) twice (nested concatenations); ``tie`` adds a depthwise conv."""

    def __init__(self, tie):
        super().__init__()
        self.stem, self.l1, self.l2 = cbr(3, 6, 3), cbr(6, 4, 3), cbr(10, 4, 3)
        self.tie = cbr(14, 14, 3, groups=14) if tie else nn.Identity()
        self.head = nn.Conv2d(14, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.head(self.tie(x)).mean((2, 3))


class InceptionResidual(nn.Module):
    """Inception-style branches concatenated and added to their input (Inception-ResNet): one residual group
    holding the stem and the last conv of every branch, each at its offset."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 9, 3)
        self.b1 = cbr(9, 3)
        self.b3 = nn.Sequential(cbr(9, 2), cbr(2, 3, 3))
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.bp = cbr(9, 3)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(9, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(x + torch.cat([self.b1(x), self.b3(x), self.bp(self.pool(x))], 1))
        return self.head(x).mean((2, 3))


class CSP(nn.Module):
    """CSP-style: cat([a + bottleneck(a), split_b(x)]) with a = split_a(x), then a 1x1 fuse; ``tie`` adds a
    depthwise conv after the concatenation (the residual pair and split_b then share one group)."""

    def __init__(self, tie):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.split_a, self.split_b = cbr(8, 4), cbr(8, 4)
        self.bottleneck = nn.Sequential(cbr(4, 4), cbr(4, 4, 3))
        self.tie = cbr(8, 8, 3, groups=8) if tie else nn.Identity()
        self.fuse = cbr(8, 6)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        a = self.split_a(x)
        return self.head(self.fuse(self.tie(torch.cat([a + self.bottleneck(a), self.split_b(x)], 1)))).mean((2, 3))


def planted(name):
    """``(model, dead, n_dead, inputs, calibration)`` for ``CASES[name]``: a positive BatchNorm shift
    everywhere, the channels ``dead[block]`` of each conv-BN-ReLU block made dead (zero filters, zero BN
    scale, BN shift -1: the map is 0 after the ReLU, whatever the statistics), then BatchNorm statistics
    from the calibration batches, so that every other channel is alive after its ReLU."""
    torch.manual_seed(0)
    make, dead, n_dead = CASES[name]
    model = make()
    calibration = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.fill_(0.5)
        for block, idxs in dead.items():
            kill(model.get_submodule(block), idxs)
    rankprune.recalibrate(model, calibration)
    return model.eval(), dead, n_dead, torch.randn(6, 3, 8, 8), calibration


def kill(block: nn.Sequential, idxs):
    conv, bn = block[0], block[1]
    with torch.no_grad():
        conv.weight[idxs] = 0
        bn.weight[idxs] = 0
        bn.bias[idxs] = -1.0


# (model, {conv-BN-ReLU block: its dead channels, in its own positions}, number of dead channels counted
# once per group: channels tied across convs by a depthwise conv or an addition are one group channel).
# Dead channels sit in every input of each concatenation, the first included, and in every branch of a
# residual group.
CASES = {
    "cat_depthwise": (CatDepthwise, {"a": [1], "b": [0, 4], "c": [2, 3], "dw": [1, 4, 8, 12, 13]}, 5),
    "dense": (lambda: Dense(tie=False), {"stem": [2], "l1": [1, 3], "l2": [0]}, 4),
    "dense_tied": (lambda: Dense(tie=True), {"stem": [2], "l1": [1, 3], "l2": [0], "tie": [2, 7, 9, 10]}, 4),
    "inception_residual": (InceptionResidual, {"stem": [1, 4, 8], "b1": [1], "b3.1": [1], "bp": [2]}, 3),
    "csp": (lambda: CSP(tie=False), {"split_a": [0, 2], "bottleneck.1": [0, 2], "split_b": [1, 3]}, 4),
    "csp_tied": (lambda: CSP(tie=True),
                 {"split_a": [0, 2], "bottleneck.1": [0, 2], "split_b": [1, 3], "tie": [0, 2, 5, 7]}, 4),
    "concatnet": (lambda: models.build("concatnet", width=0.25),
                  {"stem": [1], "dense.layers.0": [0], "dense.layers.1": [2], "inception.branch1": [1],
                   "inception.branch3.1": [0], "inception.branch_pool": [3], "csp.split_a": [1],
                   "csp.bottleneck.1": [1], "csp.split_b": [0]}, 8),
}


def prunable_channels(model, x):
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    groups = graph.get_all_groups(ignored_layers=_output_layers(model, x),
                                  root_module_types=[nn.Conv2d, nn.Linear])
    return sum(len(g[0].idxs) for g in groups)


@pytest.mark.parametrize("criterion", ["energy", "l1", "bn_scale"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_dead_channels_behind_concatenations_are_exactly_the_ones_removed(name, criterion):
    model, dead, n_dead, x, calibration = planted(name)
    # global ranking: exactly the n_dead lowest group channels go, wherever they are
    ratio = (n_dead + 0.5) / prunable_channels(model, x[:1])
    pruned, plan = rankprune.prune(model, x[:1], criterion, data=calibration, ratio=ratio, global_ranking=True,
                                   recalibrate=False, max_layer_ratio=0.99, progress=False)
    shrunk = {n for n, entry in plan["layers"].items()
              if "out_channels_kept" in entry and isinstance(model.get_submodule(n), nn.Conv2d)}
    assert shrunk == {f"{block}.0" for block in dead}, name
    for block, idxs in dead.items():
        conv = model.get_submodule(block)[0]
        expected = [c for c in range(conv.out_channels) if c not in idxs]
        assert plan["layers"][f"{block}.0"]["out_channels_kept"] == expected, (name, block)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("criterion", ["energy", "l1", "bn_scale"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_group_scores_are_zero_exactly_at_dead_root_channels(name, criterion):
    """ScoreImportance, group by group: every scored conv of a group puts its scores at its channels' root
    positions, so a group's importance is 0 exactly at the dead channels of its root conv."""
    model, dead, _, x, calibration = planted(name)
    scores = rankprune.scoring.score(model, calibration, criterion, **({"progress": False} if criterion == "energy" else {}))
    importance = pruning.ScoreImportance(scores).bind(model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    names = {m: n for n, m in model.named_modules()}
    seen = 0
    for group in graph.get_all_groups(root_module_types=[nn.Conv2d]):
        root = names[group[0].dep.target.module]
        imp = importance(group)
        expected = dead.get(root.rsplit(".", 1)[0], []) if root.endswith(".0") else []
        assert (imp == 0).nonzero().flatten().tolist() == expected, (root, imp)
        seen += bool(expected)
    assert seen >= 1


@pytest.mark.parametrize("criterion", ["energy", "l1", "bn_scale"])
def test_dead_channels_of_a_residual_group_read_at_the_block_output(criterion):
    """A ResNet block with a conv shortcut: channels dead in both terms of the addition (second conv and
    shortcut conv; energy reads both on the block output after the addition's ReLU) and in the first conv
    are exactly the ones removed, and the output does not change."""
    from rankprune.models.resnet_cifar import BasicBlock

    torch.manual_seed(0)
    net = nn.Sequential(cbr(3, 4, 3), BasicBlock(4, 6), nn.Conv2d(6, 3, 1))
    block = net[1]
    calibration = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.fill_(0.5)
        for conv, bn, idxs in ((block.conv2, block.bn2, [1, 4]), (block.shortcut[0], block.shortcut[1], [1, 4]),
                               (block.conv1, block.bn1, [2])):
            conv.weight[idxs] = 0
            bn.weight[idxs] = 0
            bn.bias[idxs] = -1.0
    rankprune.recalibrate(net, calibration)
    net.eval()
    x = torch.randn(6, 3, 8, 8)
    ratio = (3 + 0.5) / prunable_channels(net, x[:1])
    pruned, plan = rankprune.prune(net, x[:1], criterion, data=calibration, ratio=ratio, global_ranking=True,
                                   recalibrate=False, max_layer_ratio=0.99, progress=False)
    layers = plan["layers"]
    assert layers["1.conv2"]["out_channels_kept"] == layers["1.shortcut.0"]["out_channels_kept"] == [0, 2, 3, 5]
    assert layers["1.conv1"]["out_channels_kept"] == [0, 1, 3, 4, 5]
    assert "out_channels_kept" not in layers.get("0.0", {})
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-6)
