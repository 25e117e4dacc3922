import json

import pytest
import torch
from torch import nn

import rankprune
from rankprune.nn import weight_matrix
from rankprune.trp import TrainedRankPruner, default_layers, matrix_to_weight

SCHEMES = ["channel", "spatial"]


def tiny_net(dtype=torch.float32) -> nn.Sequential:
    """First conv (excluded by default), a strided 3x3, two 3x3 of equal shape (one batched group), a 1x1
    (excluded), a linear head (excluded)."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).to(dtype)


def reference_svdvals(w: torch.Tensor, scheme: str) -> torch.Tensor:
    return torch.linalg.svdvals(weight_matrix(w.detach().double(), scheme))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reshape_round_trip_and_layout(scheme, seed):
    w = torch.randn(5, 3, 3, 2)
    m = weight_matrix(w, scheme)
    if scheme == "channel":
        assert m.shape == (5, 3 * 3 * 2)
        assert m[4, 1 * 6 + 2 * 2 + 1] == w[4, 1, 2, 1]
    else:
        # rows (c, i), columns (n, j): the kh x 1 conv C->r then 1 x kw conv r->N factorisation
        assert m.shape == (3 * 3, 5 * 2)
        assert m[1 * 3 + 2, 4 * 2 + 1] == w[4, 1, 2, 1]
    assert torch.equal(matrix_to_weight(m, w.shape, scheme), w)
    batched = torch.randn(4, 5, 3, 3, 2)
    stacked = torch.stack([weight_matrix(b, scheme) for b in batched])
    assert torch.equal(matrix_to_weight(stacked, batched.shape[1:], scheme), batched)


def test_default_selection_and_groups():
    net = tiny_net()
    assert default_layers(net) == ["2", "4", "6"]
    pruner = TrainedRankPruner(net)
    assert pruner.layer_names == ["2", "4", "6"]
    assert sorted(len(g.names) for g in pruner._groups) == [1, 2]  # "4" and "6" share one batched call
    wrapped = TrainedRankPruner(nn.DataParallel(tiny_net()), layers=lambda name, m: isinstance(m, nn.Conv2d))
    assert wrapped.layer_names == ["0", "2", "4", "6", "8"]  # names of the bare module


def test_bad_arguments():
    net = tiny_net()
    for kwargs in ({"energy": 0.0}, {"energy": 1.5}, {"lam": -1.0}, {"period": 0}, {"period": 2.0},
                   {"scheme": "nd"}, {"layers": ["nope"]}, {"layers": ["11"], "scheme": "spatial"},
                   {"layers": ["1"]}, {"layers": []}):
        with pytest.raises(ValueError):
            TrainedRankPruner(net, **kwargs)
    with pytest.raises(ValueError, match="grouped"):
        TrainedRankPruner(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), layers=["0"])
    odd = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding_mode="circular"))
    with pytest.raises(ValueError, match="no layer selected"):
        TrainedRankPruner(odd)  # the default selection leaves out what cannot be decomposed
    with pytest.raises(TypeError):
        TrainedRankPruner(net, layers="4")
    pruner = TrainedRankPruner(net)
    with pytest.raises(TypeError, match="get_scale"):
        pruner.regularize(grad_scale=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_regularize_is_nuclear_norm_gradient(scheme, seed):
    """energy=1 keeps the full rank: the added gradient is autograd's gradient of lam * ||W||_* (float64)."""
    net = tiny_net(torch.float64)
    lam = 0.37
    pruner = TrainedRankPruner(net, energy=1.0, lam=lam, scheme=scheme)
    expected = {}
    for name in pruner.layer_names:
        w = net.get_submodule(name).weight.detach().clone().requires_grad_(True)
        (lam * torch.linalg.matrix_norm(weight_matrix(w, scheme), ord="nuc")).backward()
        expected[name] = w.grad
        s = reference_svdvals(w, scheme)
        assert (s[:-1] - s[1:]).min() > 1e-6 and s[-1] > 1e-6  # distinct, non-zero: the gradient exists
    loss_grads = {name: torch.randn_like(net.get_submodule(name).weight) for name in pruner.layer_names}
    for name, g in loss_grads.items():
        net.get_submodule(name).weight.grad = g.clone()
    pruner.regularize()
    for name in pruner.layer_names:
        added = net.get_submodule(name).weight.grad - loss_grads[name]
        torch.testing.assert_close(added, expected[name], rtol=1e-9, atol=1e-10)
    # in the scaled domain of a GradScaler: the same term times the scale
    net.zero_grad(set_to_none=True)
    pruner.regularize(grad_scale=torch.tensor(8.0, dtype=torch.float64))
    for name in pruner.layer_names:
        torch.testing.assert_close(net.get_submodule(name).weight.grad, 8.0 * expected[name], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("energy", [0.5, 0.9])
def test_projection_keeps_energy_with_minimal_rank(scheme, energy, seed):
    net = tiny_net(torch.float64)
    pruner = TrainedRankPruner(net, energy=energy, period=3, scheme=scheme)
    before = {name: net.get_submodule(name).weight.detach().clone() for name in pruner.layer_names}
    assert not pruner.step() and not pruner.step()
    assert pruner.step()  # the third call projects
    for name, w in before.items():
        s2 = reference_svdvals(w, scheme).square()
        csum = s2.cumsum(0)
        r = int((csum < energy * s2.sum() * (1 - 1e-12)).sum()) + 1  # minimal rank holding the energy
        projected = net.get_submodule(name).weight.detach()
        ps = reference_svdvals(projected, scheme)
        assert int((ps > 1e-9 * ps[0]).sum()) == r
        assert ps.square().sum() >= energy * s2.sum() * (1 - 1e-12)
        if r > 1:
            assert csum[r - 2] < energy * s2.sum()
        # it is the best rank-r approximation (Eckart-Young): the residual holds exactly the tail
        torch.testing.assert_close((w - projected).square().sum(), s2[r:].sum(), rtol=1e-8, atol=1e-12)


def test_regularize_after_projection_uses_projection_factors(seed):
    net = tiny_net(torch.float64)
    pruner = TrainedRankPruner(net, energy=0.8, lam=1.0, period=1)
    pruner.step()
    net.zero_grad(set_to_none=True)
    pruner.regularize()  # weights unchanged since the projection: U_r V_r^T of the projection
    for name in pruner.layer_names:
        conv = net.get_submodule(name)
        ws = reference_svdvals(conv.weight, "channel")
        r = int((ws > 1e-9 * ws[0]).sum())
        gs = reference_svdvals(conv.weight.grad, "channel")
        torch.testing.assert_close(gs[:r], torch.ones(r, dtype=torch.float64))
        assert bool((gs[r:].abs() < 1e-9).all())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_finalize_matches_projected_model(scheme, seed):
    net = tiny_net().eval()
    pruner = TrainedRankPruner(net, energy=0.7, scheme=scheme)
    before = {name: net.get_submodule(name).weight.detach().clone() for name in pruner.layer_names}
    expected_ranks = pruner.ranks()  # energy ranks of the unprojected weights: what finalize will keep
    x = torch.randn(2, 3, 12, 12)
    small, plan = pruner.finalize(example_inputs=(x,))
    assert plan["method"] == "decompose"
    json.dumps(plan)
    projected_out = net(x)  # finalize left the projected weights in the trained model
    small_out = small(x)
    assert (small_out - projected_out).norm() <= 1e-5 * projected_out.norm()
    assert pruner.ranks() == expected_ranks  # still the projected weights: the projection's ranks
    for name, layer in plan["layers"].items():
        assert layer["rank"] == expected_ranks[name]
    assert any(not torch.equal(net.get_submodule(n).weight, w) for n, w in before.items())
    assert isinstance(net.get_submodule("4"), nn.Conv2d)  # the trained model is not restructured


def test_finalize_right_after_projection_keeps_weights(seed):
    net = tiny_net().eval()
    pruner = TrainedRankPruner(net, energy=0.7, period=1)
    pruner.step()
    projected = {name: net.get_submodule(name).weight.detach().clone() for name in pruner.layer_names}
    ranks = pruner.ranks()
    small, plan = pruner.finalize()
    for name, w in projected.items():
        assert torch.equal(net.get_submodule(name).weight, w)  # no second truncation
        assert plan["layers"].get(name, {"rank": ranks[name]})["rank"] == ranks[name]
    x = torch.randn(2, 3, 12, 12)
    assert (small(x) - net(x)).norm() <= 1e-5 * net(x).norm()


def test_state_dict_resume_equals_uninterrupted_run(seed):
    torch.manual_seed(seed)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))) for _ in range(7)]
    init = tiny_net(torch.float64).state_dict()

    def run(net, pruner, opt, batches):
        for x, y in batches:
            loss = nn.functional.cross_entropy(net(x.double()), y)
            opt.zero_grad()
            loss.backward()
            pruner.regularize()
            opt.step()
            pruner.step()

    def fresh():
        net = tiny_net(torch.float64)
        net.load_state_dict(init)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        return net, TrainedRankPruner(net, energy=0.8, lam=1e-2, period=2), opt

    net_a, pruner_a, opt_a = fresh()
    run(net_a, pruner_a, opt_a, data)

    net_b, pruner_b, opt_b = fresh()
    run(net_b, pruner_b, opt_b, data[:4])  # the 4th step() projected: the checkpoint holds its ranks
    state = json.loads(json.dumps(pruner_b.state_dict()))
    assert state["calls"] == 4 and state["projected_ranks"]
    checkpoint = {"model": net_b.state_dict(), "opt": opt_b.state_dict()}
    net_c, pruner_c, opt_c = fresh()
    net_c.load_state_dict(checkpoint["model"])
    opt_c.load_state_dict(checkpoint["opt"])
    pruner_c.load_state_dict(state)
    run(net_c, pruner_c, opt_c, data[4:])
    for (name, a), c in zip(net_a.state_dict().items(), net_c.state_dict().values()):
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-12, msg=name)

    with pytest.raises(ValueError, match="scheme"):
        TrainedRankPruner(tiny_net(), scheme="spatial").load_state_dict(state)


def test_grad_scaler_both_orders(seed):
    """GradScaler: regularize() before unscale_ with grad_scale=scale, or after unscale_ with nothing."""
    torch.manual_seed(seed)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    init = tiny_net().state_dict()
    results = []
    for mode in ("plain", "scaled", "unscaled"):
        net = tiny_net()
        net.load_state_dict(init)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        pruner = TrainedRankPruner(net, energy=0.8, lam=0.05, period=1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        loss = nn.functional.cross_entropy(net(x), y)
        if mode == "plain":
            loss.backward()
            pruner.regularize()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if mode == "scaled":
                pruner.regularize(grad_scale=scaler.get_scale())
            else:
                scaler.unscale_(opt)
                pruner.regularize()
            scaler.step(opt)
            scaler.update()
        pruner.step()
        results.append(net.state_dict())
    for other in results[1:]:
        for name, w in results[0].items():
            torch.testing.assert_close(other[name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_lowrank_path_keeps_energy(seed):
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 24, 3), nn.Conv2d(24, 24, 3))
    pruner = TrainedRankPruner(net, energy=0.9, period=1, lowrank_min_dim=16)
    before = {n: net.get_submodule(n).weight.detach().clone() for n in pruner.layer_names}
    ranks = pruner.project()
    for name, w in before.items():
        p = net.get_submodule(name).weight.detach()
        assert p.double().square().sum() >= 0.9 * w.double().square().sum() * (1 - 1e-5)
        ps = reference_svdvals(p, "channel")
        assert int((ps > 1e-5 * ps[0]).sum()) == int(ranks[name])
    assert set(pruner.ranks()) == set(pruner.layer_names)


def test_linear_layers_and_missing_grads(seed):
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    pruner = TrainedRankPruner(net, energy=1.0, lam=1.0, layers=lambda name, m: isinstance(m, nn.Linear))
    pruner.regularize()  # no backward yet: the gradient is the regulariser's alone
    for name in ("0", "2"):
        g = net.get_submodule(name).weight.grad
        torch.testing.assert_close(torch.linalg.svdvals(g), torch.ones(min(g.shape)), rtol=1e-5, atol=1e-5)
    net[2].weight.requires_grad_(False)
    net.zero_grad(set_to_none=True)
    pruner.regularize()
    assert net[2].weight.grad is None and net[0].weight.grad is not None


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=True),
    lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False),
    lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),
], ids=["sgd-foreach", "sgd-loop", "adam-fused"])
def test_optimizer_step_invalidates_projection_factors(make_opt, seed):
    """After the optimizer moves the weights, regularize() must use the SVD of the new weights."""
    net = tiny_net()
    pruner = TrainedRankPruner(net, energy=0.8, lam=1.0, period=1)
    pruner.step()
    opt = make_opt(net.parameters())
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    net.zero_grad(set_to_none=True)
    pruner.regularize()
    got = {n: net.get_submodule(n).weight.grad.clone() for n in pruner.layer_names}
    net.zero_grad(set_to_none=True)
    TrainedRankPruner(net, energy=0.8, lam=1.0).regularize()  # no cached factors
    for name, g in got.items():
        torch.testing.assert_close(g, net.get_submodule(name).weight.grad, rtol=1e-4, atol=1e-5)


def test_cli_trp_writes_model_plan_and_report(tmp_path, capsys):
    from rankprune.cli import main

    out = tmp_path / "trp"
    argv = ["trp", "--model", "resnet20", "--width", "0.25", "--epochs", "1", "--train-size", "32",
            "--test-size", "16", "--batch-size", "16", "--period", "2", "--device", "cpu", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    plan = json.loads((out / "plan.json").read_text())
    result = json.loads((out / "report.json").read_text())
    state = json.loads((out / "trp_state.json").read_text())
    assert plan["method"] == "decompose" and state["calls"] == 2
    assert set(result["ranks"]) == set(state["layers"])
    assert result["decomposed"]["flops"] <= result["dense"]["flops"]
    weights = torch.load(out / "model.pt", weights_only=True)
    rebuilt = rankprune.lowrank.apply_decompose_plan(rankprune.models.build("resnet20", width=0.25), plan)
    rebuilt.load_state_dict(weights)
    assert main(["trp", "--energy", "1.5", "--out", str(out)]) == 2
    assert "--energy" in capsys.readouterr().err


def test_low_precision_weights(seed):
    """bfloat16 weights: SVDs run in float32, the weights and gradients stay bfloat16."""
    net = tiny_net(torch.bfloat16)
    pruner = TrainedRankPruner(net, energy=0.8, lam=0.1, period=1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    net(x).float().sum().backward()
    pruner.regularize()
    assert pruner.step()
    for name in pruner.layer_names:
        w = net.get_submodule(name).weight
        assert w.dtype == w.grad.dtype == torch.bfloat16
    ranks = pruner.ranks()
    for name, r in ranks.items():
        s = reference_svdvals(net.get_submodule(name).weight, "channel")
        assert int((s > 1e-2 * s[0]).sum()) == r  # rank r up to bfloat16 rounding of the projected weight


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_matches_cpu(scheme, seed):
    """The same TRP steps on CUDA and on the CPU give the same weights, gradients and ranks."""
    nets = {"cpu": tiny_net(torch.float64)}
    nets["cuda"] = tiny_net(torch.float64).cuda()
    nets["cuda"].load_state_dict(nets["cpu"].state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    results = {}
    for device, net in nets.items():
        pruner = TrainedRankPruner(net, energy=0.8, lam=0.1, period=2, scheme=scheme)
        for _ in range(3):
            net.zero_grad(set_to_none=True)
            net(x.to(device)).sum().backward()
            pruner.regularize()
            with torch.no_grad():
                for p in net.parameters():
                    p -= 0.05 * p.grad
            pruner.step()
        results[device] = ({k: v.cpu() for k, v in net.state_dict().items()}, pruner.ranks())
    assert results["cuda"][1] == results["cpu"][1]
    for name, w in results["cpu"][0].items():
        torch.testing.assert_close(results["cuda"][0][name], w, rtol=1e-6, atol=1e-8, msg=name)
