"""rankprune.benchmark (timing, tables, result files) and the scripts benchmarks/summarize.py and run_all.py.
No timing assertions: only that the numbers are well-formed."""
import importlib.util
import json
import os

import pytest
import torch
from torch import nn

from rankprune import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_cpu_counts_calls():
    calls = []
    t = benchmark.measure(lambda: calls.append(1), warmup=2, repeats=5)
    assert t.repeats >= 5 and len(calls) >= 7
    assert 0 <= t.p10_ms <= t.median_ms <= t.p90_ms


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        benchmark.measure(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="cuda_graph"):
        benchmark.measure(lambda: None, cuda_graph=True)


class _TwoInputs(nn.Module):
    def forward(self, a, b=None):
        return a + (0 if b is None else b)


@pytest.mark.parametrize("inputs", [torch.ones(2), (torch.ones(2), torch.ones(2)), {"a": torch.ones(2)}],
                         ids=["tensor", "tuple", "dict"])
def test_latency_accepts_tensor_tuple_dict(inputs):
    model = _TwoInputs().train()
    t = benchmark.latency(model, inputs, warmup=1, repeats=3)
    assert t.median_ms > 0
    assert model.training  # mode restored


def test_latency_rejects_other_inputs():
    with pytest.raises(TypeError, match="example_inputs"):
        benchmark.latency(_TwoInputs(), 3.0)


@pytest.mark.cuda
def test_measure_cuda_events_and_graph():
    x = torch.randn(256, 256, device="cuda")
    for graph in (False, True):
        t = benchmark.measure(lambda: x @ x, device="cuda", warmup=2, repeats=10, cuda_graph=graph)
        assert t.repeats >= 10 and t.median_ms > 0


def test_spread_is_the_median_and_the_inclusive_deciles():
    values = [float(v) for v in (11, 1, 6, 2, 10, 3, 9, 4, 8, 5, 7)]  # 1..11, shuffled
    assert benchmark.spread(values) == (6.0, 2.0, 10.0)
    assert benchmark.spread([4.5]) == (4.5, 4.5, 4.5)
    assert values[0] == 11.0  # the caller's list is left in its order


def test_bench_latency_true_names_a_partial_run_apart():
    """A run of part of the matrix gets its own result name (and README table): it must not replace the full
    run's table."""
    bench = _script("bench_latency_true")
    everything, both = list(bench.MODELS), ["eager", "onnxruntime"]
    assert bench.result_name(everything, [1, 8], both, "cpu", quick=False) == "bench_latency_true"
    assert bench.result_name(everything, [8], both, "cpu", quick=False) == "bench_latency_true-b8"
    assert bench.result_name(["resnet18"], [8], both, "cpu", quick=False) == "bench_latency_true-b8-resnet18"
    two = bench.result_name(["resnet50", "mobilenet_v2"], [1], both, "cpu", quick=False)
    assert two == "bench_latency_true-resnet50_mobilenet_v2"
    ort = bench.result_name(["efficientnet_b0"], [8], ["onnxruntime"], "cpu", quick=False)
    assert ort == "bench_latency_true-b8-efficientnet_b0-onnxruntime"
    assert bench.result_name(everything, [1, 8], ["eager", "cuda_graph"], "cuda", quick=False) == "bench_latency_true"
    assert bench.result_name(["resnet50"], [8], both, "cpu", quick=True) == "bench_latency_true-quick"


def test_markdown_table_aligns_and_formats():
    text = benchmark.markdown_table(["a", "b"], [["x", 1.23456], ["longer", None], ["n", 1234567]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "1.23" in text and " - " in text and "1,234,567" in text


def _fake_result(tmp_path, name, device, stamp, value):
    payload = {"environment": {"device": f"Fake {device}", "device_type": device, "torch": "2.x", "cuda": None,
                               "commit": "abc1234", "date": f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T00:00:00+00:00"},
               "rows": [{"case": "c1", "median_ms": {"ours": value, "torch": 2.0}}]}
    (tmp_path / f"{name}-{device}-{stamp}.json").write_text(json.dumps(payload))


def test_summarize_fills_markers_with_newest_results(tmp_path):
    summarize = _script("summarize")
    _fake_result(tmp_path, "svdvals", "cuda", "20260101T000000Z", 4.56)
    _fake_result(tmp_path, "svdvals", "cuda", "20260301T000000Z", 0.123)  # newer: this one is shown
    _fake_result(tmp_path, "svdvals", "cpu", "20260201T000000Z", 9.87)
    _fake_result(tmp_path, "svdvals-big", "cuda", "20260401T000000Z", 7.77)  # another name, not this section
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:svdvals -->\nold\n<!-- /results:svdvals -->\n"
                      "<!-- results:missing -->\nold\n<!-- /results:missing -->\nend\n")
    assert summarize.main(["--readme", str(readme), "--results", str(tmp_path)]) == 0
    text = readme.read_text()
    section = text.split("<!-- results:svdvals -->")[1].split("<!-- /results:svdvals -->")[0]
    assert "Fake cuda" in section and "2026-03-01" in section and "Fake cpu" in section
    assert section.index("Fake cuda") < section.index("Fake cpu")
    tables = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert "median_ms.ours" in tables and "0.123" in tables and "9.87" in tables
    assert "4.56" not in tables and "7.77" not in tables
    assert "No results yet" in text.split("<!-- results:missing -->")[1]
    assert text.startswith("intro\n") and text.endswith("end\n")
    assert summarize.main(["--readme", str(readme), "--results", str(tmp_path), "--check"]) == 0
    readme.write_text(text.replace("0.123", "0.124"))
    assert summarize.main(["--readme", str(readme), "--results", str(tmp_path), "--check"]) == 1


def test_summarize_shows_an_experiments_own_markdown(tmp_path):
    summarize = _script("summarize")
    payload = {"environment": {"device": "Fake cpu", "date": "2026-05-01T00:00:00"}, "runs": [{"a": 1}],
               "markdown": "setting line\n\n| model | acc |\n|---|---|\n| plain | 95.1 |\n"}
    (tmp_path / "exp_x-cpu-20260501T000000Z.json").write_text(json.dumps(payload))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:exp_x -->\n<!-- /results:exp_x -->\n")
    assert summarize.main(["--readme", str(readme), "--results", str(tmp_path)]) == 0
    section = readme.read_text()
    assert "setting line" in section and "| plain | 95.1 |" in section and "every run in" in section
    assert "| a |" not in section


def test_summarize_missing_readme_is_an_error(tmp_path, capsys):
    assert _script("summarize").main(["--readme", str(tmp_path / "nope.md")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_write_results_name(tmp_path):
    path = benchmark.write_results("x", {"environment": benchmark.environment("cpu")}, str(tmp_path))
    assert os.path.basename(path).startswith("x-cpu-") and path.endswith("Z.json")
    assert json.loads(open(path).read())["environment"]["device_type"] == "cpu"


def test_run_all_dry_run_lists_every_step(capsys, monkeypatch):
    run_all = _script("run_all")
    monkeypatch.setattr(run_all, "find_sanitizer", lambda: None)
    assert run_all.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pip install --no-build-isolation --no-deps -e ." in out
    assert "-m pytest -q" in out
    assert "compute-sanitizer memcheck: " + ("not found" if torch.cuda.is_available() else "skipped") in out
    for script in os.listdir(os.path.join(ROOT, "benchmarks")):
        if script.startswith("bench_") and script.endswith(".py"):
            assert script in out
    assert "bench model --model resnet20" in out and "bench layer" in out


def _quality_runs():
    """Hand-made exp_quality runs on ResNet-20 whose targets are known."""
    def run(family, method, target, raw, recal, ft, seed=0, **extra):
        return {"model": "resnet20", "width": 1.0, "seed": seed, "family": family, "method": method,
                "target_flops": target, "flops": 100, "params": 10, "flops_kept": target, "params_kept": target,
                "raw": raw, "recalibrated": recal, "fine-tuned": ft, **extra}

    ranks = {"ranks": {"a": 4, "b": 8}, "full_ranks": {"a": 16, "b": 16}, "min_ranks": {"a": 4, "b": 4}}
    exp = _script("exp_quality")
    return exp, [
        run("baseline", "baseline", 1.0, 0.90, None, None),
        # data-aware decomposition is judged as decompose(data=...) returns it: raw (see returned_stage)
        run("decompose", "data-aware + allocation", 0.8, 0.885, 0.80, 0.89, **ranks),  # drop 1.5: met
        run("decompose", "data-aware + allocation", 0.5, 0.79, 0.70, 0.88, **ranks),  # drop 11 / 2: not met
        run("prune", "l1", 0.6, 0.2, 0.60, 0.80),
        run("prune", "bn_scale", 0.6, 0.3, 0.70, 0.82),
        run("prune", exp.TP_METHOD, 0.6, 0.3, 0.65, 0.85),
    ]


def test_exp_quality_targets_known_outcomes():
    exp, runs = _quality_runs()
    targets = exp.check_targets(exp.summarize(runs), runs)
    assert [t["met"] for t in targets[:6]] == [True, False, False, True, True, False]
    assert all(t["met"] is None for t in targets[6:])  # issue 21's pipeline rows are not in these runs
    assert "drop +1.50 points" in targets[0]["value"] and "after recalibration: 80.00%" in targets[0]["value"]
    assert "bn_scale 70.00% vs Torch-Pruning 65.00%" in targets[4]["value"]


def test_exp_quality_pipeline_targets_known_outcomes():
    exp, runs = _quality_runs()
    run = lambda family, method, target, acc: dict(runs[0], family=family, method=method, target_flops=target,
                                                   raw=acc, recalibrated=acc)
    runs += [run("prune", exp.DEFAULT_PIPELINE, 0.6, 0.88), run("prune", exp.DEFAULT_PIPELINE, 0.4, 0.79),
             run("prune", "random" + exp.RECONSTRUCTED, 0.6, 0.80), run("prune", "random", 0.4, 0.795),
             run("hybrid", exp.HYBRID, 0.4, 0.80), run("decompose", "data-aware + allocation", 0.4, 0.81)]
    targets = {t["target"]: t for t in exp.pipeline_targets(exp.summarize(runs))}
    met = {text.split(":")[0]: t["met"] for text, t in targets.items()}
    assert met["resnet20, default pruning pipeline at 60% FLOPs"] is True  # drop 2 <= 3
    assert met["resnet20, default pruning pipeline at 40% FLOPs"] is False  # drop 11 > 10
    assert met["resnet20, default pipeline at 60% at least 5 points above Torch-Pruning's default"] is True
    assert met["resnet20, default pipeline above random at every level"] is False  # 79 < 79.5 at 40%
    hybrid = "resnet20, hybrid at 40% FLOPs at least as accurate as the better of pruning and decomposition alone"
    assert met[hybrid] is False  # 80 < the decomposition's 81
    assert met["concatnet, default pruning pipeline at 60% FLOPs"] is None


def test_exp_quality_flags_a_layer_below_min_rank():
    exp, runs = _quality_runs()
    runs[1] = dict(runs[1], ranks={"a": 3, "b": 8})
    targets = exp.check_targets(exp.summarize(runs), runs)
    assert targets[3]["met"] is False and "1 below min_rank" in targets[3]["value"]


def test_exp_quality_torch_pruning_meets_the_flops():
    from rankprune import models, report

    exp = _script("exp_quality")
    torch.manual_seed(0)
    model = models.build("resnet20", width=0.25).eval()
    example = torch.zeros(1, 3, 32, 32)
    pruned, ratio = exp.torch_pruning_default(model, example, 0.6, tolerance=0.02)
    kept = report.count_flops(pruned, (example,)) / report.count_flops(model, (example,))
    assert abs(kept / 0.6 - 1) <= 0.02 and 0 < ratio < 1
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in models.build("resnet20", width=0.25)
                                                             .parameters())  # the caller's model untouched


def _calibration_rows():
    rows = [{"model": "m", "input": "3x8x8", "images": 32, "forward_s": 2.0, "data_free_s": 10.0,
             "data_aware_s": 20.0},
            {"model": "m", "input": "3x8x8", "images": 256, "forward_s": 16.0, "data_free_s": 10.0,
             "data_aware_s": 90.0},
            {"model": "n", "input": "3x8x8", "images": 32, "forward_s": 1.0, "data_free_s": 5.0,
             "data_aware_s": None, "data_aware_timeout_s": 300.0},
            {"model": "t", "input": "128 tokens", "images": 32, "note": "skipped: transformers is not importable"}]
    return rows


def test_bench_calibration_extra_passes_and_linearity():
    bench = _script("bench_calibration")
    rows = _calibration_rows()
    bench.summarize_rows(rows)
    m32, m256, timed_out, skipped = rows
    assert m32["extra_passes"] == 5.0 and m32["target_met"] is True  # (20 - 10) / 2
    assert m256["extra_passes"] == 5.0 and m256["extra_growth"] == 8.0 and m256["linear_growth"] == 8.0
    assert timed_out["extra_passes"] is None and timed_out["extra_passes_min"] == 295.0
    assert skipped["extra_passes"] is None and skipped["extra_growth"] is None
    text = bench.markdown(rows, {"target_flops": 0.5, "repeats": 3, "batch_size": 32, "threads": 2})
    assert "**5.0**" in text and "8 (8)" in text and ">295.0" in text and "(timed out)" in text
    assert "- t: skipped: transformers is not importable" in text and "ru_maxrss" in text


@pytest.mark.slow
def test_bench_calibration_quick_runs(tmp_path):
    import importlib.util as util
    import subprocess
    import sys

    if util.find_spec("torchvision") is None and util.find_spec("transformers") is None:
        pytest.skip("bench_calibration --quick needs torchvision or transformers")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_calibration.py"), "--quick",
                           "--no-progress", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("bench_calibration-quick-cpu-*.json")
    payload = json.loads(path.read_text())
    measured = [r for r in payload["rows"] if not r.get("note")]
    assert measured and "| model" in payload["markdown"]
    for row in measured:
        assert row["forward_s"] > 0 and row["data_free_s"] > 0 and row["data_aware_s"] > 0
        assert row["extra_passes"] is not None and row["data_aware_peak_mib"] >= 0


def test_bench_calibration_gpu_form(monkeypatch, capsys):
    """--device cuda on the CPU: the table's GPU form, the GPU peak over decompose's own peak resets (with
    faked allocator stats), and one clear line where CUDA is missing."""
    bench = _script("bench_calibration")
    rows = _calibration_rows()[:2]
    for row, gpu in zip(rows, (100.0, 900.0)):
        row.update(forward_peak_gpu_mib=gpu / 10, data_free_peak_gpu_mib=gpu / 2, data_aware_peak_gpu_mib=gpu)
    bench.summarize_rows(rows)
    text = bench.markdown(rows, {"target_flops": 0.5, "repeats": 3, "batch_size": 32, "threads": 2,
                                 "device": "cuda", "gpu": "NVIDIA H100"})
    assert "NVIDIA H100" in text and "peak GPU MiB" in text and "90 / 450 / 900" in text
    assert "in CPU s" not in text and "CPU threads" not in text and "**5.0**" in text and "8 (8)" in text

    stats = {"allocated": 100, "max": 100}

    def reset(device=None):
        stats["max"] = stats["allocated"]

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: stats["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: stats["max"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    with bench._GpuPeak(torch.device("cuda")) as peak:
        stats["max"], stats["allocated"] = 900, 300  # a phase peaks at 900 ...
        torch.cuda.reset_peak_memory_stats()  # ... and the next phase's reset would forget it
        stats["max"] = 400
    assert (peak.before, peak.peak) == (100, 900) and torch.cuda.reset_peak_memory_stats is reset
    monkeypatch.undo()

    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda", "--models", "resnet50", "--images", "256"]) == 2
        assert "torch.cuda.is_available() is False" in capsys.readouterr().err
