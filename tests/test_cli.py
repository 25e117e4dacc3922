"""The command line's conventions, for every subcommand: ``--help`` works, the working subcommands take
``--device/--dtype/--seed/--out``, and bad input gives a non-zero exit code and a one-line error."""
import argparse
import json
import os

import pytest

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


@pytest.mark.parametrize("argv", [p for p, _ in LEAVES if p != ["info"]], ids=lambda a: " ".join(a))
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
    (["demo", "--ratios", "1.5"], "ratio"),
    (["demo", "--ratios", "a,b"], "--ratios"),
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
