"""The model-zoo matrix: real architectures through every step a user takes (issue 14).

One test, parametrized over (model, cell), model-major, so each model is built once and its results are
reused by the cells after them (and dropped when the next model starts). Cells:

- ``score-<criterion>``: every criterion on calibration batches; models without ``nn.Conv2d`` are refused
  with a ValueError.
- ``prune_ratio`` / ``prune_flops``: ``prune`` by channel ratio, and by ``target_flops`` (FLOPs within 5% of
  the target).
- ``decompose`` (data-free, weight SVD, energy 0.9, every layer) / ``decompose_data`` (data-aware, on the
  calibration batches, layers with at most 1152 inputs, without the asymmetric refit and sensitivity pass).
- ``<result>-plan``: the plan through JSON and the state_dict through ``torch.load(weights_only=True)`` onto
  a freshly built model (``apply_plan`` + ``load_state_dict``), same outputs.
- ``<result>-export`` (``torch.export``: full capture, fake kernels), ``<result>-compile``
  (``torch.compile(fullgraph=True)`` with the ``eager`` backend: Dynamo must capture the whole forward
  without a graph break; inductor's code generation and even ``aot_eager`` double the cost on 2 CPU cores,
  and ``torch.export`` already runs the fake kernels), ``<result>-onnx`` (``rankprune.export_onnx`` with
  the TorchScript exporter, ten times faster here than the ``dynamo=True`` one, which tests/test_export.py
  covers and which vgg11_bn and GPT-2 need; the file run in ONNX Runtime, every output compared), for
  ``prune_ratio`` (export and ONNX: a pruned model is made of stock modules) and ``decompose`` (all three);
  ``prune_flops`` and ``decompose_data`` get the plan check only, their models being made of the same kinds
  of layers.

A cell either works or ends in the one intended, clear error of its model (``REFUSED``); cells after a refused
step are skipped with that reason. Small inputs (32x32 images, batch 2, two calibration batches) keep the
whole matrix within a few minutes on 2 CPU cores: measured 328 s for its 294 cells on 2 otherwise idle cores
(``pytest -m zoo``); with another busy process on the same two cores it took 1148 s, torch's two threads
waiting on each other. ``benchmarks/zoo_table.py`` runs it and writes docs/architectures.md.
"""
import copy
import dataclasses
import io
import json
import os
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import nn

import rankprune
from rankprune import pruning, scoring
from rankprune._inputs import call_model

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.zoo

SIZE = 32
BATCH = 2
CRITERIA = sorted(scoring.CRITERIA)


@dataclasses.dataclass
class Spec:
    build: Callable[[], nn.Module]
    inputs: Callable[[], Tuple[torch.Tensor, ...]]
    note: str = ""
    # {step: (exception type, message pattern)}: the intended refusal of a step on this architecture.
    refused: Dict[str, Tuple[type, str]] = dataclasses.field(default_factory=dict)
    # {cell: reason}: known gaps, run as non-strict xfail.
    gaps: Dict[str, str] = dataclasses.field(default_factory=dict)
    # ONNX through the dynamo exporter where the TorchScript one cannot export the architecture.
    onnx_dynamo: bool = False


def _images():
    return (torch.randn(BATCH, 3, SIZE, SIZE),)


def _torchvision(name, **kwargs):
    return lambda: getattr(torchvision.models, name)(num_classes=10, **kwargs)


def _vgg11_bn():
    model = torchvision.models.vgg11_bn(num_classes=10)
    # vgg11_bn's features; its 25088x4096 and 4096x4096 classifier layers narrowed to 256 so that the
    # matrix's SVDs and ONNX files stay small (the classifier is three Linear layers either way).
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 256), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(256, 256), nn.ReLU(True), nn.Dropout(), nn.Linear(256, 10))
    return model


def _vit():
    # vit_b_16's architecture (torchvision VisionTransformer, patch 16) at 2 layers and width 128: vit_b_16
    # itself (86M parameters) takes minutes per step on 2 CPU cores.
    return torchvision.models.VisionTransformer(image_size=SIZE, patch_size=16, num_layers=2, num_heads=4,
                                                hidden_dim=128, mlp_dim=512, num_classes=10)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=2, use_cache=False)
    return transformers.GPT2LMHeadModel(config)


def _tokens():
    return (torch.randint(0, 256, (BATCH, 16)),)


_NO_CONV = {step: (ValueError, "has no nn.Conv2d layer") for step in ["prune_ratio", "prune_flops"]}
_NO_CONV.update({f"score-{c}": (ValueError, "has no nn.Conv2d layer") for c in CRITERIA})

SPECS: Dict[str, Spec] = {
    "resnet18": Spec(_torchvision("resnet18"), _images),
    "resnet50": Spec(_torchvision("resnet50"), _images),
    "mobilenet_v2": Spec(_torchvision("mobilenet_v2"), _images),
    "mobilenet_v3_small": Spec(_torchvision("mobilenet_v3_small"), _images),
    "efficientnet_b0": Spec(_torchvision("efficientnet_b0"), _images),
    "regnet_x_400mf": Spec(_torchvision("regnet_x_400mf"), _images),
    "densenet121": Spec(_torchvision("densenet121"), _images),
    "shufflenet_v2_x1_0": Spec(
        _torchvision("shufflenet_v2_x1_0"), _images,
        refused={s: (pruning.PruningError, "reshape of the channel dimension") for s in ["prune_ratio", "prune_flops"]}),
    "convnext_tiny": Spec(_torchvision("convnext_tiny"), _images),
    "squeezenet1_1": Spec(_torchvision("squeezenet1_1"), _images),
    "googlenet": Spec(_torchvision("googlenet", aux_logits=False, init_weights=False), _images),
    # At 32x32 the features end in a 1x1 map that adaptive_avg_pool2d spreads to 7x7, which the TorchScript
    # ONNX exporter refuses ("output size that are not factor of input size"); the dynamo exporter does it.
    "vgg11_bn": Spec(_vgg11_bn, _images, note="classifier narrowed to 256 units", onnx_dynamo=True),
    "vit_b_16": Spec(
        _vit, _images, note="2 layers, width 128",
        refused={s: (pruning.PruningError, "no longer runs") for s in ["prune_ratio", "prune_flops"]}),
    "gpt2": Spec(
        _gpt2, _tokens, note="transformers GPT-2, 2 layers, width 64", refused=_NO_CONV,
        onnx_dynamo=True),  # transformers' attention mask uses aten::diff, unknown to the TorchScript exporter
}

RESULTS = ["prune_ratio", "prune_flops", "decompose", "decompose_data"]
# prune_flops and decompose_data give models of the same kinds of layers as prune_ratio and decompose: their
# deployment checks would repeat those (at about a quarter of the matrix's time each).
# A pruned model is made of stock modules: torch.export and ONNX check that the cut architecture traces; the
# fullgraph compile, which adds nothing rankprune-specific to them, runs on the decomposed models (whose
# LowRankConv2d calls rankprune's op) only.
CELLS = ([f"score-{c}" for c in CRITERIA] + RESULTS
         + [f"{r}-plan" for r in RESULTS]
         + [f"prune_ratio-{check}" for check in ("export", "onnx")]
         + [f"decompose-{check}" for check in ("export", "compile", "onnx")])


class Case:
    """One model of the matrix: built once; each step's result (or its refusal) computed once."""

    def __init__(self, name: str):
        self.name = name
        self.spec = SPECS[name]
        torch.manual_seed(0)
        self.model = self.spec.build().eval()
        self.inputs = self.spec.inputs()
        self.calibration = [(self.spec.inputs()[0], torch.randint(0, 10, (BATCH,))) for _ in range(2)]
        self.results: Dict[str, Any] = {}

    def fresh(self) -> nn.Module:
        torch.manual_seed(0)
        return self.spec.build().eval()

    def result(self, step: str):
        """``(model, plan)`` of ``step``; a refused step re-raises its refusal when asked again."""
        if step not in self.results:
            try:
                self.results[step] = ("ok", STEPS[step](self))
            except Exception as exc:
                self.results[step] = ("error", exc)
        status, value = self.results[step]
        if status == "error":
            raise value
        return value


def _decompose_kwargs(case: Case) -> Dict[str, Any]:
    return dict(energy=0.9, example_inputs=case.inputs, progress=False)


def _decompose(case: Case):
    model, plan, _ = rankprune.decompose(case.model, **_decompose_kwargs(case))
    return model.eval(), plan


def _decompose_data(case: Case):
    # Whitened (data-aware) factors and allocation. The per-layer asymmetric refit and the sensitivity pass
    # cost a forward per layer each (minutes for DenseNet on 2 cores), and the whitening of layers with more
    # than 1152 inputs (C_in*k*k) an eigendecomposition of that size each: left to tests/test_decompose*.py.
    large = [n for n, m in case.model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight[0].numel() > 1152]
    model, plan, _ = rankprune.decompose(case.model, data=case.calibration, asymmetric=False, sensitivity=False,
                                         exclude=large or None, **_decompose_kwargs(case))
    return model.eval(), plan


STEPS: Dict[str, Callable[[Case], Any]] = {
    "prune_ratio": lambda c: rankprune.prune(c.model, c.inputs, "l1", ratio=0.3, progress=False),
    "prune_flops": lambda c: rankprune.prune(c.model, c.inputs, "l1", target_flops=0.6, progress=False),
    "decompose": _decompose,
    "decompose_data": _decompose_data,
}


def _output(out) -> torch.Tensor:
    """The first output tensor (logits) of a tensor, tuple or transformers ModelOutput."""
    while not isinstance(out, torch.Tensor):
        out = out[0]
    return out


def _assert_same(got, want, rtol=1e-4):
    got, want = _output(got), _output(want)
    scale = float(want.abs().max()) + 1e-6
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= rtol * scale


_current: Dict[str, Case] = {}


def _case(name: str) -> Case:
    if name not in _current:
        _current.clear()  # one model at a time in memory
        _current[name] = Case(name)
    return _current[name]


def _check(case: Case, cell: str, tmp_path):
    if cell.startswith("score-"):
        criterion = scoring.get(cell[len("score-"):])
        if hasattr(criterion, "progress"):
            criterion.progress = False
        scores = criterion.scores(case.model, case.calibration if criterion.needs_data else None)
        convs = scoring.conv_layers(case.model)
        assert set(scores) == set(convs)
        assert all(s.shape == (convs[n].out_channels,) and torch.isfinite(s).all() for n, s in scores.items())
        return
    step, _, check = cell.partition("-")
    model, plan = case.result(step)
    with torch.no_grad():
        want = call_model(model, case.inputs)
    if not check:
        base = rankprune.report.count_flops(case.model, case.inputs)
        flops = rankprune.report.count_flops(model, case.inputs)
        assert _output(want).shape == _output(call_model(case.model, case.inputs)).shape
        assert plan["layers"], "nothing was compressed"
        if step == "prune_flops":
            assert abs(flops / base - 0.6) <= 0.05 * 0.6, f"{flops / base:.3f} of the FLOPs, target 0.6"
        else:
            assert flops < base
        return
    if check == "plan":
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        restored = rankprune.apply_plan(case.fresh(), json.loads(json.dumps(plan)))
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        with torch.no_grad():
            _assert_same(call_model(restored.eval(), case.inputs), want)
    elif check == "export":
        program = torch.export.export(model, case.inputs)
        with torch.no_grad():
            _assert_same(program.module()(*case.inputs), want)
    elif check == "compile":
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            _assert_same(compiled(*case.inputs), want)
    elif check == "onnx":
        path = os.fspath(tmp_path / f"{case.name}-{step}.onnx")
        rankprune.export_onnx(model, case.inputs, path, dynamo=case.spec.onnx_dynamo)
        # every output (a transformers ModelOutput is a dict: onnx_max_abs_diff flattens it as the exporter does)
        diff = rankprune.export.onnx_max_abs_diff(path, model, case.inputs)
        assert diff <= 1e-4 * (float(_output(want).abs().max()) + 1e-6)
    else:
        raise AssertionError(f"unknown cell {cell}")


def _refusal(spec: Spec, cell: str) -> Optional[Tuple[type, str]]:
    return spec.refused.get(cell)


@pytest.mark.parametrize("name,cell", [pytest.param(n, c, id=f"{n}-{c}") for n in SPECS for c in CELLS])
def test_zoo(name, cell, tmp_path, record_property, request):
    spec = SPECS[name]
    record_property("model_note", spec.note)
    gap = spec.gaps.get(cell) or spec.gaps.get(cell.partition("-")[0])
    if gap:
        request.applymarker(pytest.mark.xfail(reason=gap, strict=False))
    case = _case(name)
    refusal = _refusal(spec, cell)
    if refusal is not None:
        with pytest.raises(refusal[0], match=refusal[1]) as info:
            _check(case, cell, tmp_path)
        record_property("refused", str(info.value).splitlines()[0])
        return
    step = cell.partition("-")[0]
    if step in spec.refused and cell != step:
        pytest.skip(f"{step} is refused on {name}")
    _check(case, cell, tmp_path)
