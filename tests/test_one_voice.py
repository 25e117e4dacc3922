"""The verbs speak alike: FLOPs per example in prune's plan and decompose's report, one wording for every
fraction argument, inputs that cannot succeed refused before any work, and an ONNX export whose output holds
nothing about torch itself."""
import logging
import warnings

import pytest
import torch

import rankprune
from rankprune import models
from rankprune.report import count_flops
from rankprune.trp import TrainedRankPruner


def _model():
    torch.manual_seed(0)
    return models.build("resnet20", width=0.25).eval()


def test_prune_and_decompose_count_the_same_flops_per_example():
    model, image = _model(), torch.randn(1, 3, 32, 32)
    per_example = count_flops(model, image)
    pruned, plan = rankprune.prune(model, image, "l1", ratio=0.5, progress=False)
    small, _, report = rankprune.decompose(model, rank_ratio=0.5, example_inputs=image, progress=False)
    assert plan["flops"][0] == report["total"]["flops_dense"] == per_example
    assert plan["flops"][1] == count_flops(pruned, image) and report["total"]["flops"] == count_flops(small, image)
    # data-aware without example_inputs: counted on the first sample of the data, not on its batch of 8
    _, _, report = rankprune.decompose(model, rank_ratio=0.5, data=[torch.randn(8, 3, 32, 32)], progress=False)
    assert report["total"]["flops_dense"] == per_example


@pytest.mark.parametrize("call,name,interval", [
    (lambda m, v: rankprune.prune(m, torch.zeros(1, 3, 32, 32), "l1", target_flops=v), "target_flops", "(0, 1]"),
    (lambda m, v: rankprune.prune(m, torch.zeros(1, 3, 32, 32), "l1", ratio=v), "ratio", "[0, 1)"),
    (lambda m, v: rankprune.prune(m, torch.zeros(1, 3, 32, 32), "l1", ratio=0.5, max_layer_ratio=v),
     "max_layer_ratio", "[0, 1)"),
    (lambda m, v: rankprune.decompose(m, target_flops=v), "target_flops", "(0, 1]"),
    (lambda m, v: rankprune.decompose(m, energy=v), "energy", "(0, 1]"),
    (lambda m, v: rankprune.decompose(m, rank_ratio=0.5, min_flop_saving=v), "min_flop_saving", "[0, 1)"),
    (lambda m, v: TrainedRankPruner(m, energy=v), "energy", "(0, 1]"),
    (lambda m, v: rankprune.nn.LowRankConv2d.from_dense(m.conv1, energy=v), "energy", "(0, 1]"),
])
def test_every_fraction_reads_alike(call, name, interval):
    model = _model()
    with pytest.raises(ValueError) as info:
        call(model, 1.5)
    assert str(info.value) == f"{name} must be in {interval}, got 1.5"
    with pytest.raises(TypeError) as info:
        call(model, "half")
    assert str(info.value) == f"{name} must be a number, got str"


def test_empty_calibration_data_fail_before_any_work(monkeypatch):
    import rankprune.pruning._prune as prune_module

    def no_work(*args, **kwargs):
        raise AssertionError("pruned although the data could not succeed")

    monkeypatch.setattr(prune_module, "prune_by_ratio", no_work)
    for criterion in ("l1", "energy"):  # data-free (recalibrated on the data) and data-driven alike
        with pytest.raises(ValueError) as info:
            rankprune.prune(_model(), torch.zeros(1, 3, 32, 32), criterion, data=[], ratio=0.5, progress=False)
        assert str(info.value) == "data holds no batches (empty calibration data)"


def test_onnx_export_keeps_torch_notes_out_and_writes_its_side_file(tmp_path):
    pytest.importorskip("onnxscript")
    from rankprune import export

    # torch registers its ONNX ops once per process, so the notes are checked where export_onnx silences them
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger(export._REGISTRATION_LOGGER)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the caller shows every warning: the export still drops this one
            with export._without_exporter_noise():
                logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
                logger.warning("another note of the exporter")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
                warnings.warn("a warning about the model", UserWarning)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["another note of the exporter"]  # only those notes are dropped
    assert [str(w.message) for w in caught] == ["a warning about the model"]
    small, _, _ = rankprune.decompose(_model(), rank_ratio=0.5, progress=False)
    path = tmp_path / "model.onnx"
    rankprune.export_onnx(small, (torch.randn(1, 3, 32, 32),), str(path), verbose=False)
    assert path.exists() and (tmp_path / "model.onnx.data").exists()  # the weights, documented next to the graph
