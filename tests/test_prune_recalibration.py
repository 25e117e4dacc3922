"""prune(..., data=..., recalibrate=True): the pruned model's BatchNorm statistics are re-estimated on the
data; the caller's model is untouched unless inplace=True."""
import json

import pytest
import torch

import rankprune
from rankprune import models, pruning


def _setup():
    torch.manual_seed(0)
    model = models.build("resnet20", width=0.25)
    with torch.no_grad():  # statistics that recalibration visibly changes
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model.eval()
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    return model, data, torch.zeros(1, 3, 32, 32)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: m.training for n, m in model.named_modules()}


def _assert_same(model, snapshot):
    state, flags = snapshot
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("criterion, goal", [("energy", {"ratio": 0.5}), ("taylor", {"ratio": 0.5}),
                                             ("energy", {"target_flops": 0.6})])
def test_recalibrated_equals_prune_then_recalibrate(goal, criterion):
    model, data, x = _setup()
    before = _snapshot(model)
    pruned, plan = pruning.prune(model, x, criterion, data=data, progress=False, **goal)
    _assert_same(model, before)  # the caller's model: weights, statistics and flags as they were
    assert all(p.grad is None for p in model.parameters())
    raw, raw_plan = pruning.prune(model, x, criterion, data=data, recalibrate=False, progress=False, **goal)
    _assert_same(model, before)
    assert plan["recalibrated"] and not raw_plan["recalibrated"] and plan["layers"] == raw_plan["layers"]
    raw_state = {k: v.clone() for k, v in raw.state_dict().items()}
    expected = rankprune.recalibrate(raw, data).state_dict()
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, expected[k]), k
    changed = [k for k, v in pruned.state_dict().items() if "running_var" in k and not torch.equal(v, raw_state[k])]
    assert len(changed) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in pruned.modules())
    assert not pruned.training


def test_inplace_recalibrates_the_callers_model():
    model, data, x = _setup()
    reference, _ = pruning.prune(model, x, "l1", data=data, ratio=0.5, progress=False)
    pruned, _ = pruning.prune(model, x, "l1", data=data, ratio=0.5, inplace=True, progress=False)
    assert pruned is model
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_without_data_nothing_is_recalibrated_and_one_shot_data_is_read_once():
    model, data, x = _setup()
    pruned, plan = pruning.prune(model, x, "l1", ratio=0.5, progress=False)
    assert not plan["recalibrated"]
    # scored and recalibrated on: a one-shot iterator is read into a list, as every verb does
    from_list, list_plan = pruning.prune(model, x, "energy", data=data, ratio=0.5, progress=False)
    from_iter, iter_plan = pruning.prune(model, x, "energy", data=iter(data), ratio=0.5, progress=False)
    assert iter_plan == list_plan
    for k, v in from_list.state_dict().items():
        assert torch.equal(from_iter.state_dict()[k], v), k
    # a data-free criterion iterates the data once: a generator is fine
    _, plan = pruning.prune(model, x, "l1", data=(b for b in data), ratio=0.5, progress=False)
    assert plan["recalibrated"]


def test_cli_no_recalibrate(tmp_path):
    from rankprune.cli import main

    common = ["--model", "resnet20", "--width", "0.25", "--num-images", "8", "--batch-size", "4", "--no-progress",
              "--device", "cpu", "--criterion", "l1", "--ratio", "0.5"]
    for flag, expected in (([], True), (["--no-recalibrate"], False)):
        out = tmp_path / str(expected)
        assert main(["prune", *common, *flag, "--out", str(out)]) == 0
        assert json.loads((out / "plan.json").read_text())["recalibrated"] is expected
        assert ("not recalibrated" in (out / "report.md").read_text()) is not expected
