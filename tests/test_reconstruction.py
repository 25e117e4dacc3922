"""Least-squares reconstruction after channel removal (``prune(..., reconstruct=True)``), on cases whose
outcome is known: removed channels that are exact combinations of kept ones, constant channels, channels dead
by construction in residual, concatenation and depthwise structures, and a refit that would overfit."""
import copy

import pytest
import torch
from torch import nn

import rankprune
from rankprune.pruning import apply_prune_plan



@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def batches(count=4, size=8, shape=(3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *shape, generator=g, dtype=torch.float64) for _ in range(count)]


def assert_same_outputs(a: nn.Module, b: nn.Module, data, tol=1e-6):
    with torch.no_grad():
        for x in data:
            ya, yb = a(x), b(x)
            assert float((ya - yb).abs().max()) <= tol * max(1.0, float(ya.abs().max()))


class Duplicate(nn.Module):
    """conv_a's channel 3 is exactly 2x its channel 0 (a positive scale passes ReLU): removing it, conv_b's refit
    W0 + 2 W3 gives the dense output exactly, at every position (both are zero in the padding)."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 5, 3, padding=1)
        with torch.no_grad():
            self.conv_a.weight[3] = 2 * self.conv_a.weight[0]
            self.conv_a.bias[3] = 2 * self.conv_a.bias[0]

    def forward(self, x):
        return self.conv_b(torch.relu(self.conv_a(x))).mean((2, 3))


def test_a_removed_channel_that_is_a_combination_of_kept_ones_is_reconstructed_exactly():
    torch.manual_seed(0)
    model, data = Duplicate().eval(), batches()
    scores = {"conv_a": torch.tensor([4.0, 3.0, 2.0, 1.0])}  # channel 3 goes
    plain, _ = rankprune.prune(model, data[0][:1], scores, data=data, ratio=0.25, reconstruct=False,
                               progress=False)
    pruned, plan = rankprune.prune(model, data[0][:1], scores, data=data, ratio=0.25, damping=0.0, progress=False)
    assert plan["layers"]["conv_a"]["out_channels_kept"] == [0, 1, 2]
    entry = plan["reconstruction"]["layers"]["conv_b"]
    assert entry["refit"] and entry["error_refit"] < 1e-12 < entry["error_plain"]
    assert_same_outputs(model, pruned, batches(seed=1))
    with torch.no_grad():
        expected = model.conv_b.weight[:, :3].clone()
        expected[:, 0] += 2 * model.conv_b.weight[:, 3]
        assert torch.allclose(pruned.conv_b.weight, expected, atol=1e-8)
        x = batches(seed=1)[0]
        assert float((plain(x) - model(x)).abs().max()) > 1e-3  # without the refit the output is off


class Constant(nn.Module):
    """conv_a's channel 2 is constant (zero weight, bias 0.7 through ReLU), read by a 1x1 conv (``head_bias``) or
    by a bias-free 1x1 conv into a BatchNorm, or by a bias-free 1x1 conv alone."""

    def __init__(self, consumer):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv_a.weight[2] = 0
            self.conv_a.bias[2] = 0.7
        self.consumer = consumer
        self.conv_b = nn.Conv2d(4, 6, 1, bias=consumer == "bias")
        self.bn = nn.BatchNorm2d(6) if consumer == "batchnorm" else nn.Identity()
        if consumer == "batchnorm":
            with torch.no_grad():
                self.bn.running_mean.normal_()
                self.bn.running_var.uniform_(0.5, 2)
                self.bn.weight.normal_()
                self.bn.bias.normal_()

    def forward(self, x):
        return self.bn(self.conv_b(torch.relu(self.conv_a(x)))).mean((2, 3))


@pytest.mark.parametrize("consumer", ["bias", "batchnorm", "added"])
def test_a_constant_channel_is_compensated_exactly_through_the_bias(consumer, tmp_path):
    torch.manual_seed(1)
    model, data = Constant(consumer).eval(), batches()
    scores = {"conv_a": torch.tensor([4.0, 3.0, 0.0, 2.0])}
    pruned, plan = rankprune.prune(model, data[0][:1], scores, data=data, ratio=0.25, damping=0.0,
                                   recalibrate=False, progress=False)
    assert plan["layers"]["conv_a"]["out_channels_kept"] == [0, 1, 3]
    assert plan["reconstruction"]["layers"]["conv_b"].get("bias", "bias") == consumer
    assert_same_outputs(model, pruned, batches(seed=2))
    if consumer == "added":  # the plan gives a fresh model the bias, so the state_dict loads
        assert plan["layers"]["conv_b"]["bias_added"] is True
        torch.save(pruned.state_dict(), tmp_path / "w.pt")
        fresh = apply_prune_plan(Constant(consumer).eval(), plan)
        fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
        assert_same_outputs(pruned, fresh, batches(seed=2), tol=0)


def dead(conv: nn.Conv2d, channels, bn: nn.BatchNorm2d = None):
    """Channels whose output is zero on every input (zero weight, no bias; BatchNorm beta 0 after them)."""
    with torch.no_grad():
        conv.weight[channels] = 0
        if bn is not None:
            bn.bias[channels] = 0


def cbr(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Residual(nn.Module):
    """stem and body both write channels 1 and 4 of a residual sum: dead in both branches."""

    def __init__(self):
        super().__init__()
        self.stem, self.body, self.head = cbr(3, 6), cbr(6, 6), nn.Conv2d(6, 5, 3, padding=1)
        dead(self.stem[0], [1, 4], self.stem[1])
        dead(self.body[0], [1, 4], self.body[1])

    def forward(self, x):
        s = self.stem(x)
        return self.head(s + self.body(s)).mean((2, 3))


class Concatenation(nn.Module):
    """cat([a, b]) with dead channels in both branches (a: 0, b: 2, 3), read by one head."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = cbr(3, 4), cbr(3, 5), nn.Conv2d(9, 5, 3, padding=1)
        dead(self.a[0], [0], self.a[1])
        dead(self.b[0], [2, 3], self.b[1])

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3))


class Depthwise(nn.Module):
    """expand -> depthwise -> project: channels 2 and 5 dead in the expansion pass the depthwise conv (dead there
    too) and are reconstructed at the projection, the next dense consumer."""

    def __init__(self):
        super().__init__()
        self.expand, self.dw, self.project = cbr(3, 8, 1), cbr(8, 8, 3, groups=8), nn.Conv2d(8, 5, 1)
        dead(self.expand[0], [2, 5], self.expand[1])
        dead(self.dw[0], [2, 5], self.dw[1])

    def forward(self, x):
        return self.project(self.dw(self.expand(x))).mean((2, 3))


def randomize_batchnorm(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.mul_(0).add_(torch.rand_like(m.bias) * (m.weight.abs() > 0))


@pytest.mark.parametrize("make, removed", [(Residual, {"stem.0": [1, 4], "body.0": [1, 4]}),
                                           (Concatenation, {"a.0": [0], "b.0": [2, 3]}),
                                           (Depthwise, {"expand.0": [2, 5], "dw.0": [2, 5]})])
def test_dead_channels_are_removed_with_the_output_unchanged(make, removed):
    torch.manual_seed(2)
    model = make()
    randomize_batchnorm(model)
    for conv, channels in removed.items():  # BatchNorm keeps the dead channels at exactly zero
        bn = model.get_submodule(conv[:-1] + "1")
        with torch.no_grad():
            bn.bias[channels] = 0
            bn.running_mean[channels] = 0
    model.eval()
    before = copy.deepcopy(model.state_dict())
    data = batches()
    total = sum(len(c) for c in removed.values())
    pruned, plan = rankprune.prune(model, data[0][:1], "l1", data=data, ratio=0.25, global_ranking=True,
                                   damping=0.0, recalibrate=False, progress=False)
    for conv, channels in removed.items():
        kept = plan["layers"][conv]["out_channels_kept"]
        assert not set(kept) & set(channels) and len(kept) == model.get_submodule(conv).out_channels - len(channels)
    assert total >= 2 and plan["reconstruction"]["layers"]
    assert all(e["error_refit"] < 1e-12 for e in plan["reconstruction"]["layers"].values())
    assert_same_outputs(model, pruned, batches(seed=3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model untouched


class Overfit(nn.Module):
    """A classifier on 12 pooled features: with 4 fitting samples, an exact least-squares refit interpolates them
    and does worse than the plain pruned layer on the held-out batch."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 12, 1)
        self.fc = nn.Linear(12, 10)
        with torch.no_grad():
            self.fc.weight[:, :3] *= 1e-3  # the channels that go matter little to the plain layer

    def forward(self, x):
        return self.fc(torch.relu(self.features(x)).mean((2, 3)))


def test_a_refit_worse_than_the_plain_layer_on_held_out_data_is_not_kept():
    torch.manual_seed(3)
    model = Overfit().eval()
    data = batches(count=2, size=4, seed=4)  # 2 batches: the second is held out
    scores = {"features": torch.tensor([0.0, 0.0, 0.0] + [1.0] * 9)}
    pruned, plan = rankprune.prune(model, data[0][:1], scores, data=data, ratio=0.25, damping=0.0,
                                   ignore_output_layer=True, progress=False)
    entry = plan["reconstruction"]["layers"]["fc"]
    assert not entry["refit"] and entry["error_refit"] > entry["error_plain"]
    with torch.no_grad():  # the plain layer: the dense weight sliced, only the bias compensated
        assert torch.equal(pruned.fc.weight, model.fc.weight[:, 3:])


def test_grouped_consumers_fall_back_with_a_reason_and_bad_arguments_fail_first():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1, groups=2)

        def forward(self, x):
            return self.b(self.a(x)).mean((2, 3))

    model, data = Grouped().eval(), batches()
    with pytest.warns(UserWarning, match="not reconstructed"):
        _, plan = rankprune.prune(model, data[0][:1], "l1", data=data, ratio=0.25, progress=False)
    assert "grouped convolution" in plan["reconstruction"]["fallback"]["b"]
    with pytest.raises(ValueError, match="reconstruct=True needs data"):
        rankprune.prune(model, data[0][:1], "l1", ratio=0.25, reconstruct=True)
    with pytest.raises(ValueError, match="damping"):
        rankprune.prune(model, data[0][:1], "l1", data=data, ratio=0.25, damping=-1.0)
    bad = [x.clone() for x in data]
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration batch 1 holds NaN or Inf"):
        rankprune.prune(Duplicate().eval(), data[0][:1], "l1", data=bad, ratio=0.25, progress=False)
    with pytest.raises(ValueError, match="label"):  # taylor needs labelled batches
        rankprune.prune(Duplicate().eval(), data[0][:1], "taylor", data=data, ratio=0.25, progress=False)


def test_inplace_reconstruction_and_a_one_shot_iterator():
    torch.manual_seed(5)
    model, data = Duplicate().eval(), batches()
    scores = {"conv_a": torch.tensor([4.0, 3.0, 2.0, 1.0])}
    copy_pruned, _ = rankprune.prune(model, data[0][:1], scores, data=data, ratio=0.25, progress=False)
    same, _ = rankprune.prune(model, data[0][:1], scores, data=iter(data), ratio=0.25, inplace=True,
                              progress=False)
    assert same is model
    assert_same_outputs(copy_pruned, model, batches(seed=6), tol=0)


class Redundant(nn.Module):
    """conv_a's channel 1 is 3x channel 0 (large, redundant), channel 2 small but unique: ``l1`` removes channel
    2; ``output_error`` removes channel 0 or 1 (either one's removal the refit of conv_b undoes exactly)."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 5, 3, padding=1)
        with torch.no_grad():
            self.conv_a.weight[1] = 3 * self.conv_a.weight[0]
            self.conv_a.bias[1] = 3 * self.conv_a.bias[0]
            self.conv_a.weight[2] *= 0.1
            self.conv_a.bias[2] *= 0.1
            self.conv_b.weight[:, 2] *= 10  # channel 2 matters to the output

    def forward(self, x):
        return self.conv_b(torch.relu(self.conv_a(x))).mean((2, 3))


def test_output_error_removes_the_channel_the_refit_can_replace_where_l1_removes_the_small_one():
    torch.manual_seed(6)
    model, data = Redundant().eval(), batches()
    _, by_l1 = rankprune.prune(model, data[0][:1], "l1", data=data, ratio=0.25, progress=False)
    assert by_l1["layers"]["conv_a"]["out_channels_kept"] == [0, 1, 3]
    pruned, plan = rankprune.prune(model, data[0][:1], "output_error", data=data, ratio=0.25, damping=0.0,
                                   progress=False)
    assert plan["criterion"] == "output_error" and plan["global_ranking"] is True  # comparable scores
    assert plan["layers"]["conv_a"]["out_channels_kept"] in ([0, 2, 3], [1, 2, 3])
    assert_same_outputs(model, pruned, batches(seed=7))
    scores = rankprune.pruning.OutputError(damping=0.0, progress=False).scores(model, data)["conv_a"]
    assert float(scores[:2].min()) < 1e-9 * float(scores.max())  # removing one of the pair costs nothing


def test_without_a_criterion_prune_takes_output_error_with_data_and_l1_without():
    model, data = Redundant().eval(), batches()
    _, with_data = rankprune.prune(model, data[0][:1], data=data, ratio=0.25, progress=False)
    _, without = rankprune.prune(model, data[0][:1], ratio=0.25, progress=False)
    assert (with_data["criterion"], with_data["global_ranking"]) == ("output_error", True)
    assert (without["criterion"], without["global_ranking"], without["reconstruction"]) == ("l1", False, None)
    with pytest.raises(ValueError, match="output_error"):
        rankprune.prune(model, data[0][:1], "no_such_criterion", ratio=0.25)
