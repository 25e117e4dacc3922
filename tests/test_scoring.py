import pytest
import torch
from torch import nn

from rankprune import ops, scoring
from rankprune.models.resnet_cifar import BasicBlock


def small_net(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).to(dtype)
    for bn in (net[1], net[4]):  # non-trivial BatchNorm statistics
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.1, 0.3)
    return net.eval()


def batches(dtype=torch.float32, sizes=(4, 3, 5), hw=(7, 9), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, *hw, generator=gen).to(dtype), torch.randint(0, 3, (n,), generator=gen)) for n in sizes]


def reference_maps(net, data):
    """Post-BN-ReLU maps of both convs over all batches, computed directly."""
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        a1 = net[2](net[1](net[0](x)).clone())
        a2 = net[5](net[4](net[3](a1)))
    return {"0": a1, "3": a2}


def test_energy_matches_float64_svdvals_reference():
    net = small_net(torch.float64)
    data = batches(torch.float64)
    got = scoring.score(net, data, "energy", progress=False)
    for name, maps in reference_maps(net, data).items():
        want = torch.linalg.svdvals(maps.to(torch.float64)).sum(-1).mean(0)
        torch.testing.assert_close(got[name], want, rtol=1e-9, atol=1e-9)
        assert torch.equal(got[name].argsort(), want.argsort())


def test_energy_float32_ranking_matches_reference(seed):
    net = small_net()
    data = batches(seed=seed)
    got = scoring.score(net, data, "energy", progress=False)
    for name, maps in reference_maps(net, data).items():
        want = ops.feature_energy_reference(maps)
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-4)


def test_hrank_matches_matrix_rank():
    net = small_net(torch.float64)
    data = batches(torch.float64)
    got = scoring.score(net, data, "hrank", progress=False)
    for name, maps in reference_maps(net, data).items():
        want = torch.linalg.matrix_rank(maps).to(torch.float64).mean(0)
        torch.testing.assert_close(got[name], want)


def test_streaming_is_weighted_by_batch_size():
    net = small_net(torch.float64)
    data = batches(torch.float64, sizes=(1, 6, 2))
    together = [(torch.cat([b[0] for b in data]), None)]
    a = scoring.score(net, data, "energy", progress=False)
    b = scoring.score(net, together, "energy", progress=False)
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    # plain tensors as batches, max_batches
    c = scoring.score(net, [b_[0] for b_ in data], "energy", progress=False, max_batches=1)
    d = scoring.score(net, data[:1], "energy", progress=False)
    torch.testing.assert_close(c["0"], d["0"])


def test_zero_energy_channels_rank_last():
    net = small_net()
    with torch.no_grad():
        net[0].weight[[1, 4]] = 0
        net[0].bias[[1, 4]] = 0
        net[1].bias[[1, 4]] = -1.0  # BN maps the zero output to a negative constant, ReLU to zero
        net[1].running_mean[[1, 4]] = 0
    s = scoring.score(net, batches(), "energy", progress=False)["0"]
    assert s[1] == 0 and s[4] == 0
    assert set(s.argsort()[:2].tolist()) == {1, 4}
    assert (s[[0, 2, 3, 5]] > 0).all()


def test_taps_in_residual_block():
    block = BasicBlock(4, 4).eval()
    convs = scoring.conv_layers(block)
    x = torch.randn(1, 4, 6, 6)
    auto = scoring.find_taps(block, x, convs, "auto")
    assert auto["conv1"].host is block.bn1 and auto["conv1"].activation is not None
    # bn2's output is added to the shortcut and the sum goes through relu2: read the block output there
    assert auto["conv2"].host is block.relu2 and auto["conv2"].activation is None
    relu = scoring.find_taps(block, x, convs, "relu")
    assert relu["conv2"].host is block.relu2 and relu["conv2"].activation is None
    bn = scoring.find_taps(block, x, convs, "bn")
    assert bn["conv2"].host is block.bn2 and bn["conv2"].activation is None
    conv = scoring.find_taps(block, x, convs, "conv")
    assert conv["conv1"].host is block.conv1 and conv["conv1"].activation is None
    # the inplace ReLU is not modified by reading through it
    assert block.relu1.inplace and auto["conv1"].activation.inplace is False


def test_residual_convs_are_scored_on_the_block_output():
    """Both terms of the addition (second conv, shortcut conv) read the block output after its ReLU; an
    addition without an activation module after it (MobileNetV2's) keeps the BatchNorm output."""
    torch.manual_seed(0)
    block = BasicBlock(3, 4, stride=2).eval()
    data = [torch.randn(3, 3, 8, 8)]
    taps = scoring.find_taps(block, data[0][:1], scoring.conv_layers(block))
    assert taps["conv2"].host is block.relu2 and taps["shortcut.0"].host is block.relu2
    with torch.no_grad():
        out = block(data[0].clone())
    expected = torch.linalg.matrix_norm(out.double(), ord="nuc").mean(0)
    scores = scoring.score(block, data, "energy", progress=False)
    torch.testing.assert_close(scores["conv2"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores["shortcut.0"], expected, rtol=1e-5, atol=1e-5)
    # hrank keeps reading the terms of the addition on their BatchNorm output
    assert not scoring.HRank.residual_output and scoring.Energy.residual_output
    own = scoring.find_taps(block, data[0][:1], scoring.conv_layers(block), residual_output=False)
    assert own["conv2"].host is block.bn2 and own["shortcut.0"].host is block.shortcut[1]

    class AddNoActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()

        def forward(self, x):
            return self.relu(x) + self.bn(self.conv(x))

    net = AddNoActivation().eval()
    assert scoring.find_taps(net, data[0][:1], scoring.conv_layers(net))["conv"].host is net.bn


def test_tap_changes_scores():
    net = small_net()
    data = batches()
    a = scoring.score(net, data, "energy", tap="auto", progress=False)["0"]
    c = scoring.score(net, data, "energy", tap="conv", progress=False)["0"]
    assert not torch.allclose(a, c)


def test_weight_criteria():
    net = small_net(torch.float64)
    w = net[3].weight.detach()
    s = scoring.score(net, None, "weight_energy")
    torch.testing.assert_close(s["3"], torch.linalg.svdvals(w.reshape(5, 6, 9)).sum(-1))
    torch.testing.assert_close(scoring.score(net, None, "l1")["3"], w.abs().sum((1, 2, 3)))
    torch.testing.assert_close(scoring.score(net, None, "l2")["3"], w.pow(2).sum((1, 2, 3)).sqrt())
    torch.testing.assert_close(scoring.score(net, None, "bn_scale")["3"], net[4].weight.detach().abs())
    r1 = scoring.score(net, None, "random", seed=3)
    r2 = scoring.score(net, None, "random", seed=3)
    assert torch.equal(r1["0"], r2["0"]) and r1["0"].shape == (6,)


def test_taylor_scores_and_keeps_grads():
    net = small_net()
    marker = torch.ones_like(net[0].weight)
    net[0].weight.grad = marker
    s = scoring.score(net, batches(), "taylor", progress=False)
    assert s["0"].shape == (6,) and (s["0"] >= 0).all() and s["0"].sum() > 0
    assert net[0].weight.grad is marker
    with pytest.raises(ValueError, match="labelled"):
        scoring.score(net, [torch.randn(2, 3, 5, 5)], "taylor", progress=False)


@pytest.mark.parametrize("criterion", ["energy", "hrank", "taylor"])
def test_scoring_leaves_no_hook_behind(criterion):
    # a hook left on a conv would keep adding to a finished score and break a later pruning of the model
    net = small_net()
    scoring.score(net, batches(), criterion, progress=False)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    with pytest.raises(ValueError):
        scoring.score(net, [(torch.full((2, 3, 5, 5), float("nan")), torch.zeros(2, dtype=torch.long))], criterion,
                      progress=False)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_restores_training_mode():
    net = small_net().train()
    scoring.score(net, batches(), "energy", progress=False)
    assert net.training


def test_bad_inputs():
    net = small_net()
    with pytest.raises(ValueError, match="no batches"):
        scoring.score(net, [], "energy", progress=False)
    with pytest.raises(ValueError, match="needs calibration data"):
        scoring.score(net, None, "energy", progress=False)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        scoring.score(nn.Sequential(nn.Linear(3, 3)), None, "l1")
    with pytest.raises(ValueError, match="tap must be"):
        scoring.get("energy", tap="somewhere")
    with pytest.raises(ValueError, match="unknown criterion"):
        scoring.get("magic")
    with pytest.raises(ValueError, match="not nn.Conv2d layers"):
        scoring.score(net, None, "l1", layers=["8"])
    with pytest.raises(TypeError, match="iterable of calibration batches"):
        scoring.score(net, torch.randn(2, 3, 5, 5), "energy", progress=False)
    with pytest.raises(ValueError, match="shape"):
        scoring.check_scores(net, {"0": torch.ones(3)})


def test_energy_of_sparse_float32_maps_is_finite():
    # Regression: the float32 bidiagonalization once built reflectors from underflowed residue on such maps.
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(64, 16, 32, 32, generator=gen)
    maps = torch.relu(maps - 1.8)  # about 96% zeros, like post-ReLU maps of an untrained net
    got = ops.feature_energy(maps, reduction="none")
    torch.testing.assert_close(got.double(), ops.feature_energy_reference(maps, reduction="none"),
                               rtol=1e-4, atol=1e-4)


def test_probe_runs_a_forward_that_modifies_its_input_in_place():
    class InPlaceInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x.mul_(2)))

    net = InPlaceInput().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    assert scoring.find_taps(net, torch.randn(1, 3, 5, 5), scoring.conv_layers(net))["conv"].host is net.bn
