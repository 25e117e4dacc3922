"""`rankprune demo` end to end at tiny settings, and its report writer."""
import json
import os

import pytest
import torch

import rankprune
from rankprune import cli, demo, models, plots

TINY = ["--quick", "--train-size", "200", "--test-size", "100", "--epochs", "1", "--finetune-epochs", "1",
        "--trp-epochs", "1", "--latency-repeats", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = cli.main(["demo", "--trp", *TINY, "--out", str(out)])
    return rc, out


def test_demo_runs_every_stage(demo_run, capsys):
    rc, out = demo_run
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    assert list(rows) == ["baseline", "pruned-energy-0.5", "pruned-l1-0.5", "decomposed", "trp"]
    base = rows["baseline"]
    for name, r in rows.items():
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["cpu_ms"] > 0
        if name != "baseline":
            assert r["flops"] < base["flops"], name
    assert set(results["stages_s"]) >= {"data", "latency"}
    assert any(layer.get("decomposed_rank") for layer in results["layers"])
    assert any("energy" in layer for layer in results["layers"])


def test_demo_report_files(demo_run):
    _, out = demo_run
    md = (out / "report.md").read_text()
    assert "| variant" in md and "pruned-energy-0.5" in md and "Measured on" in md
    if plots.available():
        assert (out / "accuracy_vs_flops.png").stat().st_size > 0
        assert (out / "layers.png").stat().st_size > 0


@pytest.mark.parametrize("variant", ["pruned-energy-0.5", "decomposed", "trp"])
def test_demo_plans_restore(demo_run, variant):
    _, out = demo_run
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    plan = json.loads((out / "plans" / f"{variant}.json").read_text())
    model = rankprune.apply_plan(models.build(cfg["model"], num_classes=10, width=cfg["width"]), plan)
    model.load_state_dict(torch.load(out / "plans" / f"{variant}.pt", weights_only=True))
    row = next(r for r in results["rows"] if r["variant"] == variant)
    assert sum(p.numel() for p in model.parameters()) == row["params"]


def _results(tmp_path):
    env = {"device": "test cpu", "device_type": "cpu", "torch": torch.__version__, "commit": "x", "date": "2026-01-01"}
    return {
        "config": {"model": "resnet20", "width": 0.5},
        "environment": {"cpu": env},
        "stages_s": {"data": 0.1},
        "total_s": 0.1,
        "rows": [{"variant": "baseline", "stage": "train", "params": 10, "flops": 100, "accuracy": 0.5, "cpu_ms": 1.0},
                 {"variant": "pruned-energy-0.5", "stage": "prune", "criterion": "energy", "params": 5, "flops": 50,
                  "accuracy": 0.4, "cpu_ms": 0.6}],
        "layers": [{"layer": "conv1", "full_rank": 8, "decomposed_rank": 4, "energy": 1.0}],
        "notes": [],
    }


def test_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    demo.write_report(_results(tmp_path), str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "matplotlib is not installed" in md
    assert not os.path.exists(tmp_path / "accuracy_vs_flops.png")
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_config_checks():
    with pytest.raises(ValueError, match="ratio"):
        demo.DemoConfig(ratios=(1.0,)).check()
    with pytest.raises(ValueError, match="criteria"):
        demo.DemoConfig(criteria=("magic",)).check()
    demo.DemoConfig.quick().check()
