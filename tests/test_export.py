"""Deployment without rankprune: ``to_plain`` (same numbers from stock modules), ONNX export of the fused
low-rank op (both exporters) checked against ONNX Runtime, and a ``torch.export`` program of a compressed
model loaded in a process where rankprune cannot be imported."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import rankprune
from rankprune import models
from rankprune.nn import LowRankConv2d, LowRankLinear

ATOL = 1e-4


def _decomposed_resnet20(scheme="channel"):
    torch.manual_seed(0)
    model = models.build("resnet20", width=0.25).eval()
    small, _, _ = rankprune.decompose(model, rank_ratio=0.5, scheme=scheme, example_inputs=(torch.randn(1, 3, 32, 32),),
                                      progress=False)
    return small.eval()


def _lowrank_types(model):
    return [type(m).__name__ for m in model.modules() if isinstance(m, (LowRankConv2d, LowRankLinear))]


class _LayerZoo(nn.Module):
    """One LowRankConv2d per attribute the ONNX translation must carry: stride, asymmetric kernel and padding,
    dilation, no bias; and a LowRankLinear."""

    def __init__(self):
        super().__init__()
        self.plain = LowRankConv2d(3, 8, 3, rank=4, padding=1)
        self.strided = LowRankConv2d(8, 6, (3, 1), rank=3, stride=(2, 1), padding=(1, 0), bias=False)
        self.dilated = LowRankConv2d(6, 5, 3, rank=2, padding=2, dilation=2)
        self.spatial = LowRankConv2d(5, 4, 3, rank=2, padding=1, scheme="spatial")
        self.head = LowRankLinear(4, 3, rank=2)

    def forward(self, x):
        y = self.spatial(self.dilated(self.strided(self.plain(x))))
        return self.head(y.mean((2, 3)))


def _layer_zoo():
    torch.manual_seed(0)
    return _LayerZoo().eval()


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_to_plain_same_numbers_same_keys_no_lowrank_left(scheme):
    model = _decomposed_resnet20(scheme)
    assert _lowrank_types(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = rankprune.to_plain(model)
    assert _lowrank_types(plain) == []
    assert all(type(m).__module__.startswith(("torch.", "rankprune.models")) for m in plain.modules())
    # The state_dict is the compressed model's, key for key.
    assert list(plain.state_dict()) == list(before)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-6)
    # The caller's model is untouched.
    assert _lowrank_types(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_to_plain_inplace_and_a_bare_layer():
    model = _decomposed_resnet20()
    assert rankprune.to_plain(model, inplace=True) is model
    assert _lowrank_types(model) == []
    layer = LowRankConv2d(4, 6, 3, rank=2, padding=1)
    pair = rankprune.to_plain(layer)
    assert isinstance(pair, nn.Sequential) and [type(m) for m in pair] == [nn.Conv2d, nn.Conv2d]
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(pair(x), layer(x), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="nn.Module"):
        rankprune.to_plain("resnet20")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_translation_is_two_convs_and_matches(dynamo, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    zoo = _layer_zoo()
    x = torch.randn(2, 3, 11, 9)
    path = str(tmp_path / "zoo.onnx")
    rankprune.export_onnx(zoo, (x,), path, dynamo=dynamo, **({"verbose": False} if dynamo else {}))
    graph = onnx.load(path).graph
    kinds = [n.op_type for n in graph.node]
    # 4 low-rank convolutions, each exactly two Conv nodes; no custom-domain node anywhere.
    assert kinds.count("Conv") == 8
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)
    assert rankprune.export.onnx_max_abs_diff(path, zoo, (x,)) < ATOL


def _check_onnx_model(model, x, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    path = str(tmp_path / "model.onnx")
    rankprune.export_onnx(model, (x,), path, verbose=False)
    diff = rankprune.export.onnx_max_abs_diff(path, model, (x,))
    assert diff < ATOL, diff


def test_decomposed_model_runs_in_onnxruntime(tmp_path):
    _check_onnx_model(_decomposed_resnet20(), torch.randn(2, 3, 32, 32), tmp_path)


def test_pruned_model_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = models.build("resnet20", width=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned, _ = rankprune.prune(model, x[:1], "l1", ratio=0.5, progress=False)
    _check_onnx_model(pruned.eval(), x, tmp_path)


def test_export_onnx_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="nn.Module"):
        rankprune.export_onnx(lambda x: x, torch.randn(1), str(tmp_path / "f.onnx"))
    with pytest.raises(TypeError, match="tuple"):
        rankprune.export_onnx(_layer_zoo(), [torch.randn(1, 3, 8, 8)], str(tmp_path / "f.onnx"))


def test_export_onnx_warns_about_training_mode(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: None)  # only the check before exporting
    with pytest.warns(UserWarning, match="training mode"):
        rankprune.export_onnx(_LayerZoo().train(), torch.randn(1, 3, 8, 8), str(tmp_path / "f.onnx"), dynamo=False)


def test_translation_table_names_the_op():
    table = rankprune.onnx_translation_table()
    assert list(table) == [torch.ops.rankprune.lowrank_conv2d.default]


def test_exported_program_loads_where_rankprune_cannot_be_imported(tmp_path):
    model = rankprune.to_plain(_decomposed_resnet20())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "model.pt2"))
    torch.save({"x": x, "expected": expected}, str(tmp_path / "io.pt"))
    script = textwrap.dedent("""
        import sys
        sys.modules["rankprune"] = None  # any import of rankprune now fails
        import torch
        io = torch.load("io.pt", weights_only=True)
        program = torch.export.load("model.pt2")
        with torch.no_grad():
            y = program.module()(io["x"])
        torch.testing.assert_close(y, io["expected"], rtol=0, atol=1e-5)
        assert not [m for m in sys.modules if m.startswith("rankprune") and sys.modules[m] is not None]
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


class _NestedOutputs(nn.Module):
    """A low-rank layer whose outputs come back nested, as a transformers ModelOutput (a dict) does."""

    def __init__(self):
        super().__init__()
        self.conv = LowRankConv2d(3, 4, 3, rank=2, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return {"logits": y, "extra": (y.mean((2, 3)), {"norm": y.pow(2).sum()})}


def test_onnx_comparison_flattens_nested_outputs(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = _NestedOutputs().eval()
    x = torch.randn(2, 3, 8, 8)
    path = str(tmp_path / "nested.onnx")
    rankprune.export_onnx(model, (x,), path, verbose=False)
    outputs = rankprune.export.run_onnx(rankprune.export.onnx_session(path), (x,))
    assert [tuple(o.shape) for o in outputs] == [(2, 4, 8, 8), (2, 4), ()]
    assert rankprune.export.onnx_max_abs_diff(path, model, (x,)) < ATOL
    # a model that differs only in the nested scalar is seen to differ
    shifted = _NestedOutputs().eval()
    shifted.load_state_dict(model.state_dict())
    shifted.forward = lambda x: {**model(x), "extra": (model(x)["extra"][0], {"norm": model(x)["extra"][1]["norm"] + 1})}
    assert rankprune.export.onnx_max_abs_diff(path, shifted, (x,)) == pytest.approx(1.0, rel=1e-4)
