"""The command line's conventions, for every subcommand: ``--help`` works, the working subcommands take
``--device/--dtype/--seed/--out``, and bad input gives a non-zero exit code and a one-line error."""
import argparse
import importlib.util
import json
import os

import pytest

import torch

import rankprune
from rankprune import cli


def _leaf_parsers():
    """(argv prefix, parser) of every runnable subcommand, nested ones (``bench model``) included."""
    found = []

    def walk(prefix, parser):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found.append((prefix, parser))
        for action in subs:
            for name, child in action.choices.items():
                walk(prefix + [name], child)

    walk([], cli.build_parser())
    return found


LEAVES = _leaf_parsers()


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("argv", [p for p, _ in LEAVES] + [["bench"]], ids=lambda a: " ".join(a))
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rankprune " + " ".join(argv))


@pytest.mark.parametrize("argv", [p for p, _ in LEAVES if p not in (["info"], ["bench", "clear-cache"])],
                         ids=lambda a: " ".join(a))
def test_working_subcommands_take_common_options(argv):
    parser = dict((tuple(p), q) for p, q in LEAVES)[tuple(argv)]
    options = {o for a in parser._actions for o in a.option_strings}
    assert {"--device", "--dtype", "--seed", "--out"} <= options


def _error_line(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1, err
    assert err[0].startswith(f"rankprune {argv[0]}: error:"), err
    return err[0]


BAD_INPUT = [
    (["demo", "--flops", "1.5"], "flops"),
    (["demo", "--flops", "a,b"], "--flops"),
    (["demo", "--model", "no_such_model"], "no_such_model"),
    (["demo", "--epochs", "0"], "epochs"),
    (["demo", "--energy", "1.5"], "energy"),
    (["demo", "--criteria", "energy,magic"], "magic"),
    (["demo", "--device", "tpu"], "--device"),
    (["bench", "model", "--plan", "no/such/plan.json"], "no/such/plan.json"),
    (["bench", "model", "--model", "no_such_model"], "no_such_model"),
    (["bench", "model", "--ratio", "1.0"], "--ratio"),
    (["bench", "model", "--rank-ratio", "0"], "--rank-ratio"),
    (["bench", "model", "--variants", "dense,turbo"], "turbo"),
    (["bench", "model", "--repeats", "0"], "--repeats"),
    (["bench", "layer", "--rank", "1000"], "--rank"),
    (["bench", "layer", "--ratio", "-0.5"], "--ratio"),
    (["bench", "layer", "--in-channels", "0"], "--in-channels"),
    (["bench", "layer", "--cuda-graph", "--device", "cpu"], "--cuda-graph"),
    (["score", "--model", "no_such_model"], "no_such_model"),
    (["score", "--model", "resnet20", "--weights", "no/such/weights.pt"], "no/such/weights.pt"),
    (["prune", "--model", "resnet20", "--ratio", "1.5"], "ratio"),
    (["prune", "--model", "resnet20", "--ratio", "0.5", "--scores", "no/such/scores.pt"], "no/such/scores.pt"),
    (["trp", "--model", "no_such_model"], "no_such_model"),
    (["trp", "--energy", "1.5"], "--energy"),
    (["score", "--model", "timm:resnet18"] if importlib.util.find_spec("timm") is None else
     (["score", "--model", "timm:no_such_timm_model"]), "timm"),
    (["score", "--model", "torchvision:resnet18", "--width", "0.5"], "--width"),
    (["score", "--model", "resnet20", "--input-size", "4"], "--input-size"),
    (["score", "--model", "resnet20", "--mean", "0.5"], "--std"),
    (["score", "--model", "resnet20", "--mean", "0.5", "--std", "0.2", "--normalize", "imagenet"], "--normalize"),
    (["score", "--model", "resnet20", "--mean", "a,b", "--std", "1"], "--mean"),
    (["score", "--model", "resnet20", "--mean", "0.5", "--std", "0"], "--std"),
    (["prune", "--model", "resnet20", "--ratio", "0.5", "--data", "no/such/folder"], "no/such/folder"),
    (["decompose", "--model", "no_such_model", "--energy", "0.9"], "no_such_model"),
    (["decompose", "--model", "resnet20", "--energy", "1.5"], "--energy"),
    (["decompose", "--model", "resnet20", "--rank-ratio", "0.5", "--min-rank", "0"], "--min-rank"),
    (["decompose", "--model", "resnet20", "--rank-ratio", "0.5", "--min-rank", "1.5"], "--min-rank"),
    (["decompose", "--model", "resnet20", "--rank-ratio", "0.5", "--rank-multiple", "0"], "--rank-multiple"),
    (["decompose", "--model", "resnet20", "--rank-ratio", "0.5", "--no-recalibrate"], "--data"),
    (["decompose", "--model", "resnet20", "--rank-ratio", "0.5", "--normalize", "imagenet"], "--data"),
    (["bench", "model", "--onnx", "--dtype", "float64", "--device", "cpu"], "--onnx"),
    (["export", "--model", "resnet20", "--formats", "onnx,zip"], "--formats"),
    (["export", "--model", "resnet20", "--plan", "no/such/plan.json"], "no/such/plan.json"),
    (["decompose", "--model", "resnet20", "--rank-ratio", "0.5", "--onnx", "."], "--onnx"),
]


@pytest.mark.parametrize("argv,mentions", BAD_INPUT, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_input_is_one_line_and_nonzero(argv, mentions, capsys, tmp_path):
    line = _error_line(capsys, argv + ["--out", str(tmp_path / "out")])
    assert mentions in line


def test_bad_plan_file(capsys, tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    assert "not valid JSON" in _error_line(capsys, ["bench", "model", "--plan", str(bad), "--out", str(tmp_path)])
    bad.write_text(json.dumps({"layers": {}}))
    assert "not a rankprune plan" in _error_line(capsys, ["bench", "model", "--plan", str(bad), "--out", str(tmp_path)])


def test_out_must_be_a_folder(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    assert "not a folder" in _error_line(capsys, ["bench", "layer", "--repeats", "1", "--out", str(f)])


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--epochs", "two"])
    assert exc.value.code == 2
    assert "--epochs" in capsys.readouterr().err.strip().splitlines()[-1]


def test_bench_layer_writes_results(capsys, tmp_path):
    argv = ["bench", "layer", "--in-channels", "8", "--out-channels", "8", "--rank", "4", "--input-size", "8",
            "--warmup", "1", "--repeats", "3", "--device", "cpu", "--out", str(tmp_path), "--name", "layer-test"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for variant in ("dense", "pruned", "lowrank", "lowrank-fused"):
        assert f"| {variant} " in out
    files = os.listdir(tmp_path)
    stem = [f for f in files if f.endswith(".json")][0][: -len(".json")]
    assert stem.startswith("layer-test-cpu-")
    payload = json.loads((tmp_path / f"{stem}.json").read_text())
    assert payload["environment"]["device_type"] == "cpu"
    rows = {r["variant"]: r for r in payload["rows"]}
    assert rows["dense"]["speedup"] == 1.0
    assert rows["lowrank"]["flops"] < rows["dense"]["flops"]
    assert rows["pruned"]["params"] < rows["dense"]["params"]
    assert (tmp_path / f"{stem}.md").exists()


def test_bench_model_writes_results(capsys, tmp_path):
    argv = ["bench", "model", "--model", "resnet20", "--warmup", "1", "--repeats", "2", "--device", "cpu",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    payload = json.loads(next(p for p in tmp_path.iterdir() if p.suffix == ".json").read_text())
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == {"dense", "pruned", "decomposed"}
    assert rows["pruned"]["flops"] < rows["dense"]["flops"]
    assert rows["decomposed"]["flops"] < rows["dense"]["flops"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"rankprune {rankprune.__version__} (torch {torch.__version__})"


def test_bad_checkpoints(capsys, tmp_path):
    whole = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), whole)  # a pickled module: refused by weights_only=True
    line = _error_line(capsys, ["score", "--model", "resnet20", "--weights", str(whole), "--out", str(tmp_path)])
    assert "weights_only=True" in line and "state_dict" in line
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    assert "do not fit" in _error_line(capsys, ["score", "--model", "resnet20", "--weights", str(wrong), "--out",
                                                str(tmp_path)])


def _args(argv):
    """Parsed ``score`` options (model and data) for the loaders of ``rankprune.cli.common``."""
    return cli.build_parser().parse_args(["score"] + argv)


def test_checkpoint_forms_and_model_sources(tmp_path):
    pytest.importorskip("torchvision")
    from rankprune.cli.common import load_model

    cpu = torch.device("cpu")
    reference = load_model(_args(["--model", "torchvision:resnet18"]), cpu, torch.float32)
    assert reference.fc.out_features == 1000  # torchvision's own default class count
    state = reference.state_dict()
    x = torch.randn(1, 3, 32, 32)
    for i, checkpoint in enumerate([state, {"state_dict": state, "epoch": 3},
                                    {"model": {f"module.{k}": v for k, v in state.items()}}]):
        path = tmp_path / f"ckpt{i}.pt"
        torch.save(checkpoint, path)
        model = load_model(_args(["--model", "torchvision:resnet18", "--weights", str(path)]), cpu, torch.float32)
        assert not model.training
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    factory = load_model(_args(["--model", "rankprune.models:resnet20", "--num-classes", "7"]), cpu, torch.float32)
    assert factory(x).shape == (1, 7)


def _image_folder(root, size=(40, 30), colour=(255, 0, 51)):
    from PIL import Image

    for cls in ("a", "b"):
        os.makedirs(root / cls)
        Image.new("RGB", size, colour).save(root / cls / "img.png")
    return root


def test_image_folder_input_size_and_normalisation(tmp_path):
    from rankprune.cli.common import default_input_size, load_data

    folder = str(_image_folder(tmp_path / "images"))
    pixel = torch.tensor([255, 0, 51]) / 255.0
    cases = [
        (["--model", "torchvision:resnet18"], 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet"),
        (["--model", "resnet20"], 32, (0.5,) * 3, (0.25,) * 3, "builtin"),
        (["--model", "resnet20", "--input-size", "48", "--normalize", "none"], 48, (0.0,) * 3, (1.0,) * 3, "none"),
        (["--model", "resnet20", "--mean", "0.1,0.2,0.3", "--std", "0.5"], 32, (0.1, 0.2, 0.3), (0.5,) * 3, "custom"),
    ]
    for argv, size, mean, std, name in cases:
        args = _args(argv + ["--data", folder])
        loader, shape, description = load_data(args, default_input_size(args))
        assert shape == (3, size, size)
        assert f"2 images {size}x{size}" in description and f"normalised {name}" in description
        x, y = next(iter(loader))
        want = (pixel - torch.tensor(mean)) / torch.tensor(std)
        torch.testing.assert_close(x, want.view(1, 3, 1, 1).expand(2, 3, size, size), rtol=0, atol=1e-6)
        assert y.tolist() == [0, 1]


def test_dataset_normalisation_values_are_checked():
    from rankprune import data

    images, labels = torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2)
    with pytest.raises(ValueError, match="1 or 3 values"):
        data.ImageTensorDataset(images, labels, mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="positive"):
        data.ImageTensorDataset(images, labels, std=(1.0, 0.0, 1.0))


def test_tensor_file_keeps_its_size_and_float_data_is_not_normalised(capsys, tmp_path):
    from rankprune.cli.common import default_input_size, load_data

    path = tmp_path / "x.pt"
    images = torch.randn(4, 3, 20, 20)
    torch.save(images, path)
    args = _args(["--model", "resnet20", "--data", str(path)])
    loader, shape, description = load_data(args, default_input_size(args))
    assert shape == (3, 20, 20) and "no normalisation" in description
    torch.testing.assert_close(next(iter(loader))[0], images, rtol=0, atol=0)
    argv = ["score", "--model", "resnet20", "--data", str(path), "--out", str(tmp_path / "o")]
    assert "--input-size 32" in _error_line(capsys, argv + ["--input-size", "32"])
    assert "8-bit" in _error_line(capsys, argv + ["--normalize", "imagenet"])


def test_decompose_writes_plan_weights_report_and_onnx(capsys, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    out, onnx_path = tmp_path / "dec", tmp_path / "onnx" / "model.onnx"
    argv = ["decompose", "--model", "resnet20", "--width", "0.25", "--rank-ratio", "0.5", "--exclude", "fc",
            "--no-progress", "--device", "cpu", "--out", str(out), "--onnx", str(onnx_path)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "| layer1.0.conv1 | conv2d | channel | 2 / 4 |" in text
    assert f"wrote {onnx_path} and its weights {onnx_path}.data (ONNX Runtime vs PyTorch" in text
    plan = json.loads((out / "plan.json").read_text())
    assert "fc" not in plan["layers"] and plan["layers"]["conv1"]["rank"] == 2
    # The plan and the weights rebuild the model; the ONNX file computes what it computes.
    restored = rankprune.apply_plan(rankprune.models.build("resnet20", width=0.25), plan)
    restored.load_state_dict(torch.load(out / "decomposed.pt", weights_only=True))
    restored.eval()
    x = torch.randn(3, 3, 32, 32)  # another batch size than the export's: the batch dimension is dynamic
    assert rankprune.export.onnx_max_abs_diff(str(onnx_path), restored, (x,)) < 1e-4
    report = json.loads((out / "report.json").read_text())
    assert report["total"]["flops"] < report["total"]["flops_dense"]
    assert (out / "report.md").read_text().startswith("# rankprune decompose: resnet20")
    # `rankprune export` turns the saved plan and weights into a torch.export program of plain modules.
    argv = ["export", "--model", "resnet20", "--width", "0.25", "--plan", str(out / "plan.json"), "--weights",
            str(out / "decomposed.pt"), "--formats", "pt2", "--device", "cpu", "--out", str(tmp_path / "exp")]
    assert cli.main(argv) == 0
    program = torch.export.load(str(tmp_path / "exp" / "model.pt2"))
    assert not (tmp_path / "exp" / "model.onnx").exists()
    assert "rankprune" not in str(program.graph)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), restored(x), rtol=0, atol=1e-5)


def test_decompose_data_aware_end_to_end(capsys, tmp_path):
    out = tmp_path / "dec"
    argv = ["decompose", "--model", "resnet20", "--width", "0.25", "--target-flops", "0.7", "--data", "synthetic",
            "--num-images", "32", "--batch-size", "16", "--min-rank", "2", "--rank-multiple", "2", "--no-progress",
            "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "data: synthetic, 32 images 32x32, normalised builtin" in capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    ranks = [layer["rank"] for layer in plan["layers"].values()]
    assert ranks and all(r >= 2 and r % 2 == 0 for r in ranks)
    report = json.loads((out / "report.json").read_text())
    assert report["total"]["flops"] <= 0.7 * report["total"]["flops_dense"] * 1.05


def _record_calls(monkeypatch, name, result):
    calls = []

    def fake(model, *args, **kwargs):
        calls.append(kwargs)
        return (model, *result)

    monkeypatch.setattr(rankprune, name, fake)
    return calls


def test_decompose_passes_every_option_to_the_library(monkeypatch, tmp_path):
    report = {"layers": {}, "skipped": {"fc": "excluded"},
              "total": {"params_dense": 2, "params": 1, "flops_dense": 2, "flops": 1, "output_rel_error": 0.1}}
    calls = _record_calls(monkeypatch, "decompose", ({"method": "decompose", "version": 1, "layers": {}}, report))
    argv = ["decompose", "--model", "resnet20", "--width", "0.25", "--target-flops", "0.6", "--scheme", "spatial",
            "--include", "layer1.*", "--include", "layer2.*", "--exclude", "fc", "--min-rank", "4",
            "--rank-multiple", "8", "--data", "synthetic", "--num-images", "8", "--batch-size", "4",
            "--no-recalibrate", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    (kwargs,) = calls
    batches = list(kwargs.pop("data"))
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 32, 32)
    assert kwargs.pop("example_inputs")[0].shape == (1, 3, 32, 32)
    assert kwargs == {"target_flops": 0.6, "scheme": "spatial", "include": ["layer1.*", "layer2.*"],
                      "exclude": ["fc"], "min_rank": 4, "rank_multiple": 8, "recalibrate": False, "progress": False}
    assert cli.main(argv[:-2] + ["--min-rank", "0.5", "--out", str(tmp_path)]) == 0
    assert calls[-1]["min_rank"] == 0.5 and isinstance(calls[-1]["min_rank"], float)
    # Without --data: data-free, and the library's own defaults for what was not given.
    assert cli.main(argv[:argv.index("--data")] + ["--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "data" not in calls[-1] and "recalibrate" not in calls[-1]
    # --recalibrate forces it; neither flag leaves the library's default
    with_data = [a for a in argv if a != "--no-recalibrate"]
    assert cli.main(with_data + ["--recalibrate"]) == 0 and calls[-1]["recalibrate"] is True
    assert cli.main(with_data) == 0 and "recalibrate" not in calls[-1]


def test_prune_no_recalibrate_reaches_the_library(monkeypatch, tmp_path):
    calls = _record_calls(monkeypatch, "prune", ({"method": "prune", "criterion": "l1", "recalibrated": True},))
    argv = ["prune", "--model", "resnet20", "--width", "0.25", "--ratio", "0.5", "--criterion", "l1",
            "--num-images", "8", "--batch-size", "4", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert calls[-1]["recalibrate"] is True
    assert cli.main(argv + ["--no-recalibrate"]) == 0
    assert calls[-1]["recalibrate"] is False


def test_target_latency_and_runtime_reach_the_library(monkeypatch, tmp_path):
    calls = _record_calls(monkeypatch, "prune", ({"method": "prune", "criterion": "l1", "recalibrated": True},))
    common = ["--model", "resnet20", "--width", "0.25", "--num-images", "8", "--batch-size", "4", "--no-progress",
              "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(["prune", "--target-latency", "0.7", "--runtime", "onnxruntime", "--criterion", "l1", *common]) == 0
    assert calls[-1]["target_latency"] == 0.7 and calls[-1]["runtime"] == "onnxruntime"
    assert calls[-1]["target_flops"] is None and calls[-1]["ratio"] is None
    report = {"layers": {}, "skipped": {}, "total": {"params_dense": 2, "params": 1, "flops_dense": 2, "flops": 1}}
    calls = _record_calls(monkeypatch, "decompose", ({"method": "decompose", "version": 1, "layers": {}}, report))
    assert cli.main(["decompose", "--target-latency", "0.5", *common]) == 0
    assert calls[-1]["target_latency"] == 0.5 and "runtime" not in calls[-1]
    chosen = {"prune_share": 1.0, "pruned_to": 0.6, "budget": "latency", "divergence": 0.1}
    calls = _record_calls(monkeypatch, "compress", ({"method": "compress", "steps": []},
                                                    {"candidates": [chosen], "chosen": chosen}))
    assert cli.main(["compress", "--target-latency", "0.6", "--runtime", "eager", *common]) == 0
    assert calls[-1]["target_latency"] == 0.6 and calls[-1]["runtime"] == "eager" and "target_flops" not in calls[-1]


def test_compress_table_marks_the_reference_the_clearly_closer_splits_and_the_chosen_one():
    from rankprune.cli.compress import render_splits

    alone = {"prune_share": 1.0, "pruned_to": 0.4, "divergence": 0.02, "clearly_closer": False}
    mixed = {"prune_share": 0.5, "pruned_to": 0.63, "divergence": 0.01, "clearly_closer": True}
    noisy = {"prune_share": 0.0, "pruned_to": 1.0, "divergence": 0.019, "clearly_closer": False}
    table = render_splits({"candidates": [noisy, mixed, alone], "chosen": mixed, "reference": 1.0})
    rows = [line for line in table.splitlines() if line.startswith("| 0.") or line.startswith("| 1.")]
    assert rows[0].rstrip(" |").endswith("0.019") and rows[1].endswith("clearly closer, chosen |")
    assert rows[2].endswith("reference |")


def test_target_latency_out_of_range_is_a_usage_error(capsys):
    argv = ["prune", "--model", "resnet20", "--target-latency", "1.5", "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 2
    assert "--target-latency must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_prune_image_folder_at_the_model_input_size(capsys, tmp_path):
    folder = _image_folder(tmp_path / "images")
    argv = ["prune", "--model", "resnet20", "--width", "0.25", "--ratio", "0.5", "--criterion", "l1", "--data",
            str(folder), "--input-size", "40", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 images 40x40, normalised builtin (mean 0.5, 0.5, 0.5; std 0.25, 0.25, 0.25)" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    dense_at_40 = rankprune.report.count_flops(rankprune.models.build("resnet20", width=0.25), torch.zeros(1, 3, 40, 40))
    assert report["before"]["flops"] == dense_at_40


def test_bench_model_any_model_and_onnxruntime(capsys, tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    argv = ["bench", "model", "--model", "torchvision:resnet18", "--num-classes", "10", "--input-size", "32",
            "--variants", "dense", "--onnx", "--warmup", "1", "--repeats", "2", "--device", "cpu", "--out",
            str(tmp_path)]
    assert cli.main(argv) == 0
    assert "torchvision:resnet18, batch 1, 32x32" in capsys.readouterr().out
    payload = json.loads(next(p for p in tmp_path.iterdir() if p.suffix == ".json").read_text())
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == {"dense", "dense (onnxruntime)"}
    assert rows["dense (onnxruntime)"]["flops"] == rows["dense"]["flops"] > 0


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_timm_models_through_prune_and_decompose(name, tmp_path):
    # --model timm:NAME (timm's own tiny test architectures, random weights: nothing is downloaded); the
    # written plan and weights rebuild the compressed model on a fresh timm model.
    timm = pytest.importorskip("timm")
    common = ["--model", f"timm:{name}", "--num-classes", "10", "--input-size", "32", "--num-images", "8",
              "--batch-size", "4", "--no-progress", "--device", "cpu"]
    x = torch.randn(2, 3, 32, 32)
    for command, extra, weights in (("prune", ["--criterion", "l1", "--ratio", "0.3"], "pruned.pt"),
                                    ("decompose", ["--rank-ratio", "0.5", "--data", "synthetic"], "decomposed.pt")):
        out = tmp_path / command
        assert cli.main([command, *common, *extra, "--out", str(out)]) == 0
        plan = json.loads((out / "plan.json").read_text())
        assert plan["layers"]
        torch.manual_seed(0)
        fresh = timm.create_model(name, num_classes=10).eval()
        rebuilt = rankprune.apply_plan(fresh, plan)
        rebuilt.load_state_dict(torch.load(out / weights, weights_only=True))
        assert rebuilt(x).shape == (2, 10)
        assert sum(p.numel() for p in rebuilt.parameters()) < sum(
            p.numel() for p in timm.create_model(name, num_classes=10).parameters())


HEAVY = ("torch", "numpy", "tqdm", "torch_pruning", "rankprune.ops", "rankprune.pruning", "rankprune.models.vgg")


def _modules_after(code: str):
    """The HEAVY modules loaded by ``code`` in a fresh interpreter (this process has them all)."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"import sys\n{code}\nprint('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=str(Path(rankprune.__file__).parents[1]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip().splitlines()[-1].removeprefix("loaded:")


def test_help_and_usage_errors_import_no_torch():
    # `rankprune --help` answers without torch (importing it takes most of a second): every subcommand registers
    # its options without importing what it runs
    for argv in (["--help"], ["prune", "--ratio"]):
        code = f"from rankprune.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
        assert _modules_after(code) == ""


def test_lazy_choices_are_named_in_the_help():
    # --dtype and --normalize list their choices in the help text (argparse would load them to print the usage)
    from rankprune._inputs import DTYPES
    from rankprune.data import NORMALIZATIONS

    parser = dict((tuple(p), q) for p, q in LEAVES)[("prune",)]
    helps = {a.dest: a.help for a in parser._actions}
    assert all(name in helps["dtype"] for name in DTYPES)
    assert all(name in helps["normalize"] for name in NORMALIZATIONS)
    assert [c for c in parser._option_string_actions["--dtype"].choices] == sorted(DTYPES)


def test_fractions_read_alike_in_every_command(capsys, tmp_path):
    out = ["--out", str(tmp_path)]
    for argv, line in (
            (["prune", "--model", "resnet20", "--target-flops", "1.5"],
             "prune: error: --target-flops must be in (0, 1]"),
            (["decompose", "--model", "resnet20", "--target-flops", "1.5"],
             "decompose: error: --target-flops must be in (0, 1]"),
            (["trp", "--energy", "1.5"], "trp: error: --energy must be in (0, 1]"),
            (["bench", "model", "--ratio", "1.5"], "bench: error: --ratio must be in (0, 1)")):
        assert _error_line(capsys, argv + out) == f"rankprune {line}, got 1.5"


def test_a_checkpoint_of_another_width_or_class_count_gets_a_hint(capsys, tmp_path):
    half = tmp_path / "half.pt"
    torch.save(rankprune.models.build("resnet20", width=0.5).state_dict(), half)
    line = _error_line(capsys, ["score", "--model", "resnet20", "--weights", str(half), "--out", str(tmp_path)])
    assert line.startswith(f"rankprune score: error: --weights {half} do not fit --model resnet20: size mismatch")
    assert "(saved with --width 0.5?)" in line
    assert "--width" not in _error_line(capsys, ["score", "--model", "resnet20", "--width", "0.5", "--weights",
                                                 str(half), "--out", str(tmp_path), "--num-images", "0"])
    seven = tmp_path / "seven.pt"
    torch.save(rankprune.models.build("resnet20", num_classes=7).state_dict(), seven)
    line = _error_line(capsys, ["score", "--model", "resnet20", "--weights", str(seven), "--out", str(tmp_path)])
    assert line.endswith("(saved with --num-classes 7?)")


def test_decompose_eval_reports_the_accuracy_change(capsys, tmp_path):
    argv = ["decompose", "--model", "resnet20", "--width", "0.25", "--rank-ratio", "0.5", "--eval", "--no-progress",
            "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    a, b = report["accuracy_before"], report["accuracy_after"]
    assert 0 <= a <= 1 and 0 <= b <= 1
    assert f"accuracy: {100 * a:.2f}% -> {100 * b:.2f}% (change {100 * (b - a):+.2f} pt)" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["prune"], ["decompose"]])
def test_help_names_one_way_to_restore(argv, capsys):
    # every plan is applied by rankprune.apply_plan; no help names a verb-specific function
    with pytest.raises(SystemExit):
        cli.main(argv + ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "rankprune.apply_plan(fresh_model, plan), then load_state_dict" in text
    assert "apply_prune_plan" not in text and "apply_decompose_plan" not in text and "--eval" in text
