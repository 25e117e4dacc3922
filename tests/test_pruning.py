import copy
import json

import pytest
import torch
import torch_pruning as tp
from torch import nn

import rankprune
from rankprune import models, pruning, report, scoring


def example(name):
    return torch.randn(2, 3, 64, 64) if name == "resnet50" else torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16", "mobilenetv2", "resnet50"])
def test_builtin_models_prune_and_run(name):
    torch.manual_seed(0)
    model = models.build(name, width=0.125 if name == "resnet50" else 0.25).eval()
    x = example(name)
    pruned, plan = pruning.prune(model, x[:1], "l2", ratio=0.5, progress=False)
    assert pruned(x).shape == model(x).shape
    assert plan["flops"][1] < 0.6 * plan["flops"][0]
    assert plan["params"][1] < plan["params"][0]
    assert pruned is not model and sum(p.numel() for p in model.parameters()) == plan["params"][0]
    for m in pruned.modules():  # depthwise convs stay depthwise
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels


def zero_channel_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).eval()
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.bias.uniform_(0.1, 0.3)
        net[0].weight[[1, 4]] = 0
        net[0].bias[[1, 4]] = 0
        net[1].bias[[1, 4]] = -0.5  # zero conv output -> negative after BN -> zero after ReLU
    return net


def test_zero_energy_channels_are_removed_without_changing_outputs():
    net = zero_channel_net()
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    x = torch.randn(3, 3, 8, 8)
    scores = scoring.score(net, data, "energy", progress=False)
    assert set(scores["0"].argsort()[:2].tolist()) == {1, 4}
    pruned, plan = pruning.prune(net, x[:1], scores, ratio=2 / 6 + 1e-6, ignored_layers=["3"], progress=False)
    assert plan["layers"]["0"]["out_channels_kept"] == [0, 2, 3, 5]
    assert plan["layers"]["3"]["in_channels_kept"] == [0, 2, 3, 5]
    assert pruned[0].out_channels == 4 and pruned[3].out_channels == 5
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x))


def test_plan_round_trip(tmp_path):
    torch.manual_seed(0)
    model = models.build("resnet20", width=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned, plan = pruning.prune(model, x[:1], "weight_energy", ratio=0.4, global_ranking=True, progress=False)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    torch.save(pruned.state_dict(), tmp_path / "w.pt")
    fresh = models.build("resnet20", width=0.25)
    rankprune.apply_plan(fresh, json.loads((tmp_path / "plan.json").read_text()))
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pruned(x))
    # applying the plan to the original model reproduces the pruned weights
    replay = pruning.apply_prune_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        torch.testing.assert_close(replay(x), pruned(x))


def test_target_flops_within_five_percent():
    torch.manual_seed(0)
    model = models.build("resnet20", width=0.5).eval()
    x = torch.randn(1, 3, 32, 32)
    for global_ranking in (False, True):
        pruned, plan = pruning.prune(model, x, "l1", target_flops=0.6, global_ranking=global_ranking, progress=False)
        kept = report.count_flops(pruned, x) / report.count_flops(model, x)
        assert abs(kept / 0.6 - 1) <= 0.05, (global_ranking, kept)
        assert plan["flops"][1] == report.count_flops(pruned, x)


def test_round_to_and_max_layer_ratio():
    torch.manual_seed(0)
    model = models.build("vgg16", width=0.25).eval()
    pruned, plan = pruning.prune(model, torch.randn(1, 3, 32, 32), "l1", ratio=0.5, round_to=4, progress=False)
    for name, m in pruned.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 4 == 0, name
    pruned, _ = pruning.prune(model, torch.randn(1, 3, 32, 32), "random", ratio=0.99, max_layer_ratio=0.5,
                              progress=False)
    assert all(m.out_channels >= 8 for m in pruned.modules() if isinstance(m, nn.Conv2d))


def test_score_importance_with_torch_pruning():
    torch.manual_seed(0)
    model = models.build("resnet20", width=0.25).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    data = [torch.randn(2, 3, 32, 32, dtype=torch.float64)]
    imp = pruning.ScoreImportance("energy", data=data)
    imp.criterion.progress = False
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    assert model.conv1.out_channels == 2 and model(x).shape == (1, 10)


def test_inplace():
    model = zero_channel_net()
    pruned, _ = pruning.prune(model, torch.randn(1, 3, 8, 8), "l1", ratio=0.5, inplace=True, progress=False)
    assert pruned is model and model[0].out_channels == 3
    model = zero_channel_net()
    pruned, plan = pruning.prune(model, torch.randn(1, 3, 8, 8), "l1", target_flops=0.5, inplace=True,
                                 progress=False)
    assert pruned is model and plan["flops"][1] == report.count_flops(model, torch.randn(1, 3, 8, 8))
    # the same channels as pruning a copy
    copy_pruned, copy_plan = pruning.prune(zero_channel_net(), torch.randn(1, 3, 8, 8), "l1", target_flops=0.5,
                                           progress=False)
    assert copy_plan["layers"] == plan["layers"]
    assert all(torch.equal(a, b) for a, b in zip(copy_pruned.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("goal", [{"ratio": 0.3}, {"target_flops": 0.6}])
def test_inplace_refusal_leaves_the_model_as_it_was(goal):
    # torchvision's ViT keeps hidden_dim outside its layers: the cut model no longer runs and prune refuses;
    # with inplace=True the caller's model must not be left cut.
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    with pytest.raises(pruning.PruningError, match="no longer runs"):
        pruning.prune(model, x, "l1", inplace=True, progress=False, **goal)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(model(x), want)


def test_bad_inputs():
    net = zero_channel_net()
    x = torch.randn(1, 3, 8, 8)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"^ratio must be in \[0, 1\), got "):
            pruning.prune(net, x, "l1", ratio=bad)
    with pytest.raises(ValueError, match="exactly one"):
        pruning.prune(net, x, "l1")
    with pytest.raises(ValueError, match="exactly one"):
        pruning.prune(net, x, "l1", ratio=0.5, target_flops=0.5)
    with pytest.raises(ValueError, match="target_flops must be in"):
        pruning.prune(net, x, "l1", target_flops=0.0)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        pruning.prune(nn.Sequential(nn.Linear(4, 4)), torch.randn(1, 4), "l1", ratio=0.5)
    with pytest.raises(ValueError, match="no batches"):
        pruning.prune(net, x, "energy", data=[], ratio=0.5, progress=False)
    with pytest.raises(ValueError, match="needs calibration data"):
        pruning.prune(net, x, "energy", ratio=0.5, progress=False)
    with pytest.raises(ValueError, match="not a module"):
        pruning.prune(net, x, "l1", ratio=0.5, ignored_layers=["nope"])
    with pytest.raises(ValueError, match="method 'prune'"):
        pruning.apply_prune_plan(net, {"method": "decompose"})
    with pytest.raises(ValueError, match="has no module"):
        pruning.apply_prune_plan(net, {"method": "prune", "version": 1, "layers": {"x": {}}})
    with pytest.raises(ValueError, match="does not fit"):
        pruning.apply_prune_plan(net, {"method": "prune", "version": 1, "layers": {"0": {"out_channels_kept": [7]}}})


def test_exported_from_package():
    assert rankprune.prune is pruning.prune


def test_cli_score_then_prune(tmp_path, capsys):
    from rankprune.cli import main

    common = ["--model", "resnet20", "--width", "0.25", "--num-images", "8", "--batch-size", "4", "--no-progress",
              "--device", "cpu"]
    assert main(["score", *common, "--criterion", "l1", "--out", str(tmp_path / "s")]) == 0
    assert main(["prune", *common, "--scores", str(tmp_path / "s" / "scores.pt"), "--ratio", "0.5",
                 "--out", str(tmp_path / "p")]) == 0
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    fresh = pruning.apply_prune_plan(models.build("resnet20", width=0.25), plan)
    fresh.load_state_dict(torch.load(tmp_path / "p" / "pruned.pt", weights_only=True))
    assert "FLOPs" in (tmp_path / "p" / "report.md").read_text()
    capsys.readouterr()
    assert main(["prune", *common, "--ratio", "1.5", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rankprune prune: error: --ratio must be in [0, 1), got 1.5"
    assert main(["score", *common, "--criterion", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "unknown 'nope'" in capsys.readouterr().err
