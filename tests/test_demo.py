"""`rankprune demo` end to end at tiny settings, its verdict and its report writer."""
import json
import os

import pytest
import torch

import rankprune
from rankprune import cli, demo, demo_verdict, models, plots, report

TINY = ["--quick", "--train-size", "200", "--test-size", "100", "--epochs", "1", "--trp-epochs", "1",
        "--latency-repeats", "2", "--latency-rounds", "3", "--no-progress", "--device", "cpu"]
METHODS = ["dense", "prune: l1", "prune: default", "decompose: data-aware", "decompose: weight SVD", "compress", "trp"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = cli.main(["demo", "--trp", *TINY, "--out", str(out)])
    return rc, out, json.loads((out / "results.json").read_text())


def test_demo_compares_every_method_at_the_same_flops(demo_run):
    rc, _, results = demo_run
    assert rc == 0
    rows = results["rows"]
    assert [r["method"] for r in rows] == METHODS
    assert [r["variant"] for r in rows][:3] == ["baseline", "prune-l1-0.5", "prune-default-0.5"]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        if r["method"] not in ("dense", "trp"):
            assert r["target_flops"] == 0.5
            assert abs(r["flops_kept"] - 0.5) < 0.05, r["variant"]  # every method met the same budget


def test_demo_every_latency_has_a_spread(demo_run):
    _, out, results = demo_run
    for r in results["rows"]:
        for key in ("latency_ms", "latency_ratio"):
            t = r[key]
            assert t["rounds"] == 3
            assert t["min"] <= t["q1"] <= t["median"] <= t["q3"] <= t["max"], (r["variant"], key)
    assert results["rows"][0]["latency_ratio"]["median"] == 1.0  # the dense model against itself, round by round
    md = (out / "report.md").read_text()
    assert "latency ms (IQR)" in md and "x dense (IQR)" in md
    assert "Wall-clock time of each stage, each run once (no spread)" in md


def test_demo_verdict_names_the_best_method(demo_run):
    _, out, results = demo_run
    verdict = results["verdict"]
    compared = set(METHODS) - {"dense", "trp"}
    assert verdict["equal_flops"]["best"] in compared
    assert f"**{verdict['equal_flops']['best']}**" in verdict["text"]
    at_latency = verdict["equal_latency"]
    if at_latency["best"] is None:  # a loaded machine can leave every variant within the noise of the dense time
        assert "no compressed model ran faster" in verdict["text"]
    else:
        assert at_latency["best"] in compared and f"**{at_latency['best']}**" in verdict["text"]
    assert "## Verdict" in (out / "report.md").read_text()


def test_demo_plot_files(demo_run):
    _, out, _ = demo_run
    if not plots.available():
        pytest.skip("matplotlib not installed")
    for name in ("accuracy_vs_flops.png", "accuracy_vs_latency.png", "layers.png"):
        assert (out / name).stat().st_size > 0, name


def test_demo_saves_baseline(demo_run):
    _, out, results = demo_run
    cfg, base = results["config"], results["rows"][0]
    assert base["weights"] == os.path.join("plans", "baseline.pt")
    model = models.build(cfg["model"], num_classes=10, width=cfg["width"])
    model.load_state_dict(torch.load(out / base["weights"], weights_only=True))
    assert sum(p.numel() for p in model.parameters()) == base["params"]


def test_demo_plans_restore(demo_run):
    """Every compressed variant, the compress plan included, rebuilds from its plan and loads its weights."""
    _, out, results = demo_run
    cfg = results["config"]
    restored = [r for r in results["rows"] if r["method"] != "dense"]
    assert {r["method"] for r in restored} == set(METHODS) - {"dense"}
    for row in restored:
        plan = json.loads((out / row["plan"]).read_text())
        model = rankprune.apply_plan(models.build(cfg["model"], num_classes=10, width=cfg["width"]), plan)
        model.load_state_dict(torch.load(out / row["weights"], weights_only=True))
        stats = report.model_stats(model.eval(), (torch.zeros(1, 3, 32, 32),))
        assert (stats["params"], stats["flops"]) == (row["params"], row["flops"]), row["variant"]
    compress_plan = json.loads((out / "plans" / "compress-0.5.json").read_text())
    assert compress_plan["method"] == "compress"


def test_demo_layer_ranks_only_where_factored(demo_run):
    """A layer has a rank exactly when the variant factored it; the layers it kept dense carry None."""
    _, out, results = demo_run
    for method, variant in (("decompose: data-aware", "decompose-data-aware-0.5"),
                            ("decompose: weight SVD", "decompose-weight-svd-0.5")):
        plan = json.loads((out / "plans" / f"{variant}.json").read_text())
        for layer in results["layers"]:
            want = plan["layers"][layer["layer"]]["rank"] if layer["layer"] in plan["layers"] else None
            assert layer["ranks"][method] == want, (variant, layer["layer"])


def _row(method, level, accuracy, ratio=None, variant=None):
    row = {"method": method, "variant": variant or demo.variant_name(method, level), "target_flops": level,
           "accuracy": accuracy, "chance": accuracy <= demo.chance_threshold(2000)}
    if ratio is not None:
        row["latency_ratio"] = {"median": ratio, "q1": ratio - 0.02, "q3": ratio + 0.02, "min": ratio - 0.05,
                                "max": ratio + 0.05, "rounds": 7}
    return row


def test_verdict_at_equal_flops_and_latency():
    rows = [_row("dense", None, 0.90, 1.0, "baseline"),
            _row("prune: default", 0.6, 0.88, 0.70), _row("prune: default", 0.4, 0.84, 0.50),
            _row("decompose: data-aware", 0.6, 0.86, 1.02), _row("decompose: data-aware", 0.4, 0.85, 1.10),
            {**_row("compress", 0.6, 0.87, 0.80), "prune_share": 1.0}, {**_row("compress", 0.4, 0.845, 0.60),
                                                                         "prune_share": 1 / 3}]
    verdict = demo.method_verdict(rows, 2000, "as returned")
    flops = verdict["equal_flops"]
    assert flops["best"] == "prune: default" and flops["wins"] == {"prune: default": 1, "decompose: data-aware": 1}
    high, low = flops["levels"]
    assert (high["target_flops"], high["best"], high["runner_up"]) == (0.6, "prune: default", "compress")
    assert high["margin"] == pytest.approx(1.0)
    assert high["noise"] == pytest.approx(100 * demo_verdict.accuracy_noise(0.88, 2000))
    assert low["best"] == "decompose: data-aware"
    # data-aware decomposition never runs faster; the budget is compress's fastest variant (0.60x), within which
    # pruning's 0.60 level (0.70x) does not fit but its 0.4 level (0.50x) does
    latency = verdict["equal_latency"]
    assert latency["not_faster"] == {"decompose: data-aware": 1.02}
    assert latency["budget"] == 0.6
    assert (latency["best"], latency["variant"], latency["runner_up"]) == ("compress", "compress-0.4", "prune: default")
    assert latency["margin"] == pytest.approx(0.5)
    text = verdict["text"]
    assert "At equal FLOPs (as returned), **prune: default**" in text
    assert "**compress** is the most accurate" in text and "within the noise" in text and "a tie" in text
    assert "decompose: data-aware (fastest median 1.02x)" in text
    assert "chance" not in text
    assert ("The hybrid compress chose pruning alone (the default pruning's model) at 60%; pruning for 0.33 of "
            "the budget" in text)


def test_latency_targeted_pruning_competes_at_equal_latency_only():
    targeted = {**_row(demo.LATENCY_TARGETED, None, 0.89, 0.55, "prune-latency-targeted-0.7"),
                "target_latency": 0.7, "flops_kept": 0.45}
    rows = [_row("dense", None, 0.90, 1.0, "baseline"), _row("prune: default", 0.6, 0.88, 0.70),
            _row("prune: default", 0.4, 0.84, 0.50), targeted]
    verdict = demo.method_verdict(rows, 2000, "as returned")
    assert [level["target_flops"] for level in verdict["equal_flops"]["levels"]] == [0.6, 0.4]
    assert verdict["equal_latency"]["best"] == demo.LATENCY_TARGETED  # 89% within the budget of 0.55x
    assert ("Latency-targeted pruning (prune(target_latency=t), measured here): t = 0.70: 0.55x the dense latency, "
            "45% of the FLOPs, 89.0%") in verdict["text"]


def test_latency_targets_option(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(demo, "run", lambda config, echo=print: seen.append(config) or {})
    common = ["demo", "--quick", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(common + ["--latency-targets", "0.9,0.75"]) == 0
    assert seen[-1].latency_targets == (0.9, 0.75)
    assert cli.main(common + ["--latency-targets", "none"]) == 0 and seen[-1].latency_targets == ()
    assert cli.main(common) == 0 and seen[-1].latency_targets == ()  # --quick has none
    assert cli.main(common + ["--latency-targets", "fast"]) == 2
    with pytest.raises(ValueError, match=r"latency_targets must be fractions in \(0, 1\), got 1.5"):
        demo.DemoConfig(latency_targets=(1.5,)).check()


def test_verdict_when_nothing_is_faster_and_chance_level():
    rows = [_row("dense", None, 0.5, 1.0, "baseline"), _row("prune: l1", 0.5, 0.10, 1.00),
            _row("decompose: weight SVD", 0.5, 0.30, 1.05)]
    verdict = demo.method_verdict(rows, 2000, "as returned")
    assert verdict["equal_flops"]["best"] == "decompose: weight SVD"
    assert verdict["equal_latency"]["best"] is None
    assert "no compressed model ran faster than the dense model" in verdict["text"]
    assert "At chance level (at most 11.3%" in verdict["text"] and "prune-l1-0.5 (10.0%)" in verdict["text"]


def test_chance_threshold():
    assert demo.chance_threshold(2000) == pytest.approx(0.1 + 1.96 * (0.09 / 2000) ** 0.5)
    assert demo.chance_threshold(100, classes=2) > 0.5


def _results():
    env = {"device": "test cpu", "torch": torch.__version__, "commit": "x", "date": "2026-01-01"}
    rows = [_row("dense", None, 0.5, 1.0, "baseline"), _row("prune: l1", 0.5, 0.1, 0.7)]
    for r in rows:
        r.update(params=10, flops=100, flops_kept=1.0, latency_ms=dict(r["latency_ratio"]))
    return {
        "config": {"model": "resnet20", "width": 0.5, "flops": [0.5], "test_size": 2000},
        "environment": env, "stages_s": {"data": 0.1}, "total_s": 0.1, "rows": rows,
        "layers": [{"layer": "conv1", "out_channels": 8, "full_rank": 8, "ranks": {"compress": 4},
                    "channels": {"compress": 6}}],
        "verdict": demo.method_verdict(rows, 2000, "as returned"),
        "notes": [],
    }


def test_report_marks_chance_level(tmp_path, capsys):
    demo.write_report(_results(), str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "| 10.0 (chance)" in md and "| 50.0 " in md
    assert "At chance level" in md
    assert "10.0 (chance)" in capsys.readouterr().out


def test_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    demo.write_report(_results(), str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "matplotlib is not installed" in md
    assert not os.path.exists(tmp_path / "accuracy_vs_flops.png")
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_config_checks():
    with pytest.raises(ValueError, match="flops"):
        demo.DemoConfig(flops=(1.0,)).check()
    with pytest.raises(ValueError, match="criteria"):
        demo.DemoConfig(criteria=("magic",)).check()
    with pytest.raises(ValueError, match="calibration_batches"):
        demo.DemoConfig(calibration_batches=1).check()
    demo.DemoConfig(calibration_batches=1, compress=False).check()
    demo.DemoConfig.quick().check()


def test_rank_panel_marks_dense_layers():
    layers = [{"layer": "a", "full_rank": 16, "ranks": {"data-aware": 4, "svd": None}},
              {"layer": "b", "full_rank": 32, "ranks": {"data-aware": None, "svd": 8}}]
    panel = demo._rank_panel(layers)
    assert panel["series"] == {
        "full rank": [16, 32],
        "data-aware: rank": [4, None],
        "data-aware: kept dense": [None, 32],
        "svd: rank": [None, 8],
        "svd: kept dense": [16, None],
    }
    assert panel["points"] == ["data-aware: kept dense", "svd: kept dense"]


def _spy_plots(monkeypatch, method):
    import matplotlib.axes

    drawn = []
    original = getattr(matplotlib.axes.Axes, method)

    def spy(self, *args, **kwargs):
        drawn.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, method, spy)
    return drawn


def test_layer_profile_no_marker_hides_another(tmp_path, monkeypatch):
    """Gaps break the lines; equal values of different series land on different pixels, with distinct
    markers."""
    if not plots.available():
        pytest.skip("matplotlib not installed")
    drawn = _spy_plots(monkeypatch, "plot")
    panel = {"ylabel": "rank", "series": {"rank": [4, None, 6], "other rank": [4, 5, 6], "dense": [None, 32, None],
                                          "other dense": [None, 32, None]}, "points": ["dense", "other dense"]}
    assert plots.layer_profile(["a", "b", "c"], [panel], str(tmp_path / "l.png"), "t")
    (_, rank), (_, other), (_, dense), (_, other_dense) = [(kw["label"], kw) for _, kw in drawn]
    ys = drawn[0][0][1]
    assert ys[0] == 4 and ys[1] != ys[1] and ys[2] == 6  # NaN gap
    assert dense["linestyle"] == "none" and drawn[2][0][1][1] == 32
    assert len({kw["marker"] for _, kw in drawn}) == 4
    for first, second, point in ((rank, other, (0, 4)), (dense, other_dense, (1, 32))):
        assert first["transform"].transform(point)[0] != second["transform"].transform(point)[0]


def test_accuracy_scatter_offsets_and_chance(tmp_path, monkeypatch):
    if not plots.available():
        pytest.skip("matplotlib not installed")
    drawn = _spy_plots(monkeypatch, "errorbar")
    points = [{"series": "a", "x": 0.5, "accuracy": 0.8}, {"series": "b", "x": 0.5, "accuracy": 0.8}]
    assert plots.accuracy_scatter(points, str(tmp_path / "s.png"), "t", "x", 0.113, offset_series=True)
    (_, a), (_, b) = drawn
    assert a["marker"] != b["marker"] and a["markersize"] != b["markersize"]
    assert a["transform"].transform((0.5, 80))[0] != b["transform"].transform((0.5, 80))[0]
