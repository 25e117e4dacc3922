"""NaN and Inf never pass silently: a non-finite weight, a module that emits NaN and non-finite calibration
data are each caught by every verb (prune, data-free and data-aware decompose, scoring, recalibrate, TRP's
finalize) with one error naming the tensor and the layer (or the batch) where it first appears, weights
before data; the caller's model is left as it was."""
import warnings

import pytest
import torch
from torch import nn

import rankprune
from rankprune import scoring
from rankprune.trp import TrainedRankPruner


class EmitsNaN(nn.Module):
    """A custom module whose output is NaN whatever its input."""

    def forward(self, x):
        return x * float("nan")


class LogOfNegative(nn.Module):
    """A block whose own forward (outside any submodule) turns its input non-finite before its child."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.log(x - 10.0))


def _net(middle: nn.Module = None) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    layers += [middle] if middle is not None else []
    layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(8, 4)]
    return nn.Sequential(*layers).eval()


def _data(nan_in_batch: int = None):
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 4, (4,), generator=gen)) for _ in range(3)]
    if nan_in_batch is not None:
        batches[nan_in_batch][0][2, 1, 3, 3] = float("nan")
    return batches


EXAMPLE = torch.randn(1, 3, 8, 8)
VERBS = {
    "prune energy": (lambda m, d: rankprune.prune(m, EXAMPLE, "energy", data=d, ratio=0.5, progress=False),
                     "scoring (energy)"),
    "prune taylor": (lambda m, d: rankprune.prune(m, EXAMPLE, "taylor", data=d, ratio=0.5, progress=False),
                     "scoring (taylor)"),
    "prune l1, reconstructed": (lambda m, d: rankprune.prune(m, EXAMPLE, "l1", data=d, ratio=0.5, progress=False),
                                "prune"),
    "score hrank": (lambda m, d: scoring.score(m, d, "hrank", progress=False), "scoring (hrank)"),
    "decompose data-aware": (lambda m, d: rankprune.decompose(m, rank_ratio=0.5, data=d, progress=False),
                             "decompose"),
    "recalibrate": (lambda m, d: rankprune.recalibrate(m, d), "recalibrate"),  # in place: restored on an error
}
WEIGHT_VERB = {"prune energy": "prune", "prune taylor": "prune", "prune l1, reconstructed": "prune"}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    """Every tensor of the state as it was (NaN where it was NaN)."""
    return all(torch.equal(v.isnan(), before[k].isnan()) and torch.equal(v.nan_to_num(), before[k].nan_to_num())
               for k, v in model.state_dict().items())


@pytest.mark.parametrize("verb", list(VERBS))
def test_a_nan_weight_is_named_before_the_data_are_blamed(verb):
    run, name = VERBS[verb]
    model = _net()
    with torch.no_grad():
        model[3].weight[1, 2, 0, 0] = float("nan")
    before = _state(model)
    with pytest.raises(ValueError) as info:
        run(model, _data(nan_in_batch=0))  # the data hold a NaN too: the weight comes first
    assert str(info.value) == f"{WEIGHT_VERB.get(verb, name)}: the parameter '3.weight' of layer '3' holds NaN or Inf"
    assert _unchanged(model, before)


@pytest.mark.parametrize("verb", list(VERBS))
def test_a_module_that_emits_nan_is_named_not_its_consumer(verb):
    run, name = VERBS[verb]
    model = _net(EmitsNaN())
    before = _state(model)
    with pytest.raises(ValueError) as info:
        run(model, _data())
    assert str(info.value) == (f"{name}: the output of layer '3' (EmitsNaN), from finite inputs, holds NaN or Inf "
                               "on calibration batch 0 (the weights and the inputs are finite)")
    assert _unchanged(model, before)


@pytest.mark.parametrize("verb", list(VERBS))
def test_non_finite_calibration_data_are_named_with_the_batch(verb):
    run, name = VERBS[verb]
    model = _net()
    before = _state(model)
    data = _data(nan_in_batch=2)
    with pytest.raises(ValueError) as info:
        run(model, data)
    assert str(info.value) == f"{name}: calibration batch 2 holds NaN or Inf (the data itself, before any layer)"
    assert _unchanged(model, before)


def test_inf_and_nan_made_by_a_forward_outside_any_module_name_the_caller():
    model = _net(LogOfNegative())  # log of a negative number: NaN before the block's conv
    with pytest.raises(ValueError, match=r"^decompose: the input of layer '3.conv' \(Conv2d\), computed by the "
                                         r"forward of '3' outside any module, holds NaN or Inf on calibration batch 0"):
        rankprune.decompose(model, rank_ratio=0.5, data=_data(), progress=False)


def test_data_free_verbs_check_weights_and_the_example_run():
    model = _net()
    with torch.no_grad():
        model[4].running_var[3] = float("inf")
    for run, verb in ((lambda: scoring.score(model, None, "l1"), "scoring (l1)"),
                      (lambda: scoring.score(model, None, "bn_scale"), "scoring (bn_scale)"),
                      (lambda: rankprune.prune(model, EXAMPLE, "l1", ratio=0.5, progress=False), "prune"),
                      (lambda: rankprune.decompose(model, rank_ratio=0.5, progress=False), "decompose")):
        with pytest.raises(ValueError) as info:
            run()
        assert str(info.value) == f"{verb}: the buffer '4.running_var' of layer '4' holds NaN or Inf"
    with pytest.raises(ValueError) as info:  # data-free: the example forward of the report finds the module
        rankprune.decompose(_net(EmitsNaN()), rank_ratio=0.5, example_inputs=EXAMPLE, progress=False)
    assert str(info.value) == ("decompose: the output of layer '3' (EmitsNaN), from finite inputs, holds NaN or Inf "
                               "on example_inputs (the weights and the inputs are finite)")


def test_recalibrate_ignores_the_statistics_it_replaces():
    # NaN running statistics are what recalibration overwrites: not an error, and replaced by finite ones
    model = _net()
    with torch.no_grad():
        model[1].running_var.fill_(float("nan"))
    rankprune.recalibrate(model, _data())
    assert torch.isfinite(model[1].running_var).all()


def test_trp_finalize_names_a_nan_weight_before_projecting():
    model = _net()
    pruner = TrainedRankPruner(model, layers=["3"])
    with torch.no_grad():
        model[3].weight[0, 0, 1, 1] = float("nan")
    before = _state(model)
    with pytest.raises(ValueError) as info:
        pruner.finalize(progress=False)
    assert str(info.value) == "TrainedRankPruner.finalize: the parameter '3.weight' of layer '3' holds NaN or Inf"
    assert _unchanged(model, before)  # no projection wrote NaN factors into it


def test_a_one_shot_iterator_cannot_be_replayed_and_says_so():
    with pytest.raises(ValueError, match=r"^scoring \(energy\): the scores of layer '0' came out NaN or Inf although "
                                         r"the weights are finite; the data was a one-shot iterator"):
        scoring.score(_net(), (b for b in _data(nan_in_batch=1)), "energy", progress=False)


def test_healthy_runs_are_unaffected():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say about a healthy model
        scores = scoring.score(_net(), _data(), "energy", progress=False)
    assert all(torch.isfinite(s).all() for s in scores.values())
