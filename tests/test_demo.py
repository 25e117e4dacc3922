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
    assert list(rows) == ["baseline", "pruned-energy-0.5", "pruned-l1-0.5", "decomposed", "decomposed-svd", "trp"]
    base = rows["baseline"]
    for name, r in rows.items():
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["cpu_ms"] > 0
        if name != "baseline":
            assert r["flops"] < base["flops"], name
            # every compressed model measured as it came out and after BatchNorm recalibration
            assert 0.0 <= r["accuracy_raw"] <= 1.0 and 0.0 <= r["accuracy_recalibrated"] <= 1.0, name
    assert (rows["decomposed"]["method"], rows["decomposed-svd"]["method"]) == ("data-aware", "weight SVD")
    assert set(results["stages_s"]) >= {"data", "latency"}
    assert any(layer.get("decomposed_rank") for layer in results["layers"])
    assert any("energy" in layer for layer in results["layers"])
    assert len(results["verdict"]) == 1 and "won" in results["verdict"][0]


def test_demo_layer_ranks_only_where_decomposed(demo_run):
    """A layer has a decomposed rank exactly when the variant factored it: the ones it kept dense carry None
    (drawn as 'kept dense', not as a rank)."""
    _, out = demo_run
    results = json.loads((out / "results.json").read_text())
    for variant, key in (("decomposed", "decomposed_rank"), ("decomposed-svd", "decomposed_svd_rank")):
        plan = json.loads((out / "plans" / f"{variant}.json").read_text())
        for layer in results["layers"]:
            want = plan["layers"][layer["layer"]]["rank"] if layer["layer"] in plan["layers"] else None
            assert layer[key] == want, (variant, layer["layer"])


def test_demo_saves_baseline(demo_run):
    _, out = demo_run
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    base = results["rows"][0]
    assert base["weights"] == os.path.join("plans", "baseline.pt")
    model = models.build(cfg["model"], num_classes=10, width=cfg["width"])
    model.load_state_dict(torch.load(out / base["weights"], weights_only=True))
    assert sum(p.numel() for p in model.parameters()) == base["params"]


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


def _pruned(criterion, raw, recalibrated, final, ratio=0.5):
    return {"variant": f"pruned-{criterion}-{ratio:g}", "stage": "prune", "criterion": criterion, "ratio": ratio,
            "accuracy_raw": raw, "accuracy_recalibrated": recalibrated, "accuracy": final}


def test_verdict_names_the_winner_and_the_noise():
    rows = [_pruned("l1", 0.2, 0.6, 0.80), _pruned("taylor", 0.3, 0.8, 0.90), _pruned("random", 0.1, 0.5, 0.70)]
    (line,) = demo.criterion_verdict(rows, test_size=2000)
    assert "**taylor** won: 90.0%" in line and "(l1 80.0, random 70.0)" in line
    assert "labels" in line  # what taylor looks at
    assert "already led after recalibration" in line
    assert "10.0 points, is beyond the noise" in line
    # recalibration gains: (0.4 + 0.5 + 0.4) / 3 = 43.3 points
    assert "+43.3 points on average" in line


def test_verdict_tie_and_reordering():
    rows = [_pruned("energy", 0.2, 0.75, 0.851), _pruned("bn_scale", 0.2, 0.70, 0.855)]
    (line,) = demo.criterion_verdict(rows, test_size=500)
    assert "**bn_scale** won" in line
    assert "energy led (75.0% against 70.0%): fine-tuning reordered them" in line
    assert "treat them as tied" in line
    assert "Energy came second: it measures how large" in line


def test_rank_panel_marks_dense_layers():
    layers = [{"layer": "a", "full_rank": 16, "decomposed_rank": 4, "decomposed_svd_rank": None},
              {"layer": "b", "full_rank": 32, "decomposed_rank": None, "decomposed_svd_rank": 8}]
    panel = demo._rank_panel(layers)
    assert panel["series"] == {
        "full rank": [16, 32],
        "data-aware decomposition: rank": [4, None],
        "data-aware decomposition: kept dense": [None, 32],
        "weight SVD: rank": [None, 8],
        "weight SVD: kept dense": [16, None],
    }
    assert panel["points"] == ["data-aware decomposition: kept dense", "weight SVD: kept dense"]


def test_layer_profile_breaks_lines_at_gaps(tmp_path, monkeypatch):
    if not plots.available():
        pytest.skip("matplotlib not installed")
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(args[1]), kwargs.get("linestyle")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    panel = {"ylabel": "rank", "series": {"rank": [4, None, 6], "dense": [None, 32, None]}, "points": ["dense"]}
    assert plots.layer_profile(["a", "b", "c"], [panel], str(tmp_path / "l.png"), "t")
    (rank_label, rank_y, rank_style), (dense_label, dense_y, dense_style) = drawn
    assert rank_label == "rank" and rank_y[0] == 4 and rank_y[1] != rank_y[1] and rank_y[2] == 6  # NaN gap
    assert dense_label == "dense" and dense_style == "none" and dense_y[1] == 32
