"""The `cnf` command end to end on a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cnf.cli import main
from cnf.transforms.flow import inner_flow


@pytest.mark.parametrize("model", ["cnf", "planar"])
def test_train_then_evaluate_end_to_end(model: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / model
    shape = ["--layers", "4"] if model == "planar" else ["--hidden", "8", "--rtol", "1e-3", "--atol", "1e-3"]
    common = ["train", "--data", "moons", "--model", model, "--iters", "3", "--time-limit", "60", "--n-train", "500"]
    code = main([*common, *shape, "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test log-likelihood" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["test_nll"])

    code = main(
        ["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", "moons", "--n", "200", "--json"]
    )
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"nll", "nfe", "seconds", "n"}
    assert metrics["n"] == 200 and np.isfinite(metrics["nll"]) and metrics["nfe"] > 0


def test_data_file_is_accepted_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "points.npy"
    np.save(path, rng.normal(size=(300, 2)).astype(np.float32))
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(path),
                "--iters",
                "2",
                "--out",
                str(out),
                "--hidden",
                "8",
                "--rtol",
                "1e-3",
                "--atol",
                "1e-3",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "test NLL:" in printed and "scoring 30 of 300 rows: the test split of the file it trained on (seed 0" in printed


def test_evaluate_scores_the_training_files_test_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """On the file it trained on, `cnf evaluate` scores the test split that `cnf train` scored (the
    other rows were trained or validated on); any other file, or --split all, every row."""
    rng = np.random.default_rng(1)
    path = tmp_path / "table.npy"
    np.save(path, rng.normal(size=(200, 3)).astype(np.float32))
    out = tmp_path / "run"
    train_args = ["train", "--data", str(path), "--iters", "2", "--out", str(out), "--hidden", "8", "--seed", "3"]
    assert main(train_args) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()

    def evaluate(data: Path, *extra: str) -> dict:
        assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    test = evaluate(path)
    assert test["n"] == 20 and "seed 3" in test["scored"]
    np.testing.assert_allclose(test["nll"], summary["test_nll"], rtol=1e-5)
    every = evaluate(path, "--split", "all")
    assert every["n"] == 200 and abs(every["nll"] - test["nll"]) > 1e-6
    copy = tmp_path / "copy.npy"
    np.save(copy, np.load(path))
    assert evaluate(copy)["n"] == 200
    assert evaluate(copy, "--split", "test")["n"] == 20  # the same split rule, seed 0
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", "moons", "--split", "test"]) == 2
    assert "--split test applies to a .npy/.csv file, got --data 'moons'" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", "moons"]) == 2
    assert "--data 'moons' has points of shape (2,); the checkpoint" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "five.npy", np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32))
    assert main(["train", "--data", str(tmp_path / "five.npy"), "--out", str(tmp_path / "r")]) == 2
    assert "five.npy' has 5 rows, too few to split 80/10/10" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--data", "moons"]) == 2
    assert "missing.pt' does not exist" in capsys.readouterr().err
    assert main(["train", "--data", "spiral-galaxy", "--iters", "1", "--out", str(tmp_path)]) == 2
    assert "unknown dataset 'spiral-galaxy'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--time-limit", "-3"])
    assert "must be positive" in capsys.readouterr().err
    # numeric flags are checked by the parser, which names the flag (not the Python field behind it)
    for flag, value, message in [
        ("--n-train", "0", "must be a positive integer"), ("--batch-size", "0", "must be a positive integer"),
        ("--hidden", "0", "must be a positive integer"), ("--seed", "-1", "must be a non-negative integer"),
        ("--ema-decay", "1.5", "must lie in [0, 1)"), ("--sigma-min", "-0.1", "must lie in [0, 1)"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            main(["train", flag, value])
        assert f"argument {flag}: {message}, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "planar", "--hidden", "8", "8"], "--model planar has no velocity field and no ODE solve, so --hidden 8 8 would be ignored"),
        (["--model", "planar", "--rtol", "1e-3", "--activation", "silu"], "so --activation silu, --rtol 0.001 would be ignored"),
        (["--model", "planar", "--no-adjoint"], "so --no-adjoint would be ignored"),
        (["--layers", "4"], "--layers 4 sets the depth of a planar flow; --model cnf takes --hidden"),
    ],
)
def test_model_flags_the_model_would_ignore_are_refused(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", "--data", "moons", "--iters", "1", *flags, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resumed_runs_refuse_flags_their_saved_model_would_ignore(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """On resume the model is the checkpoint's: a planar run refuses --hidden and --rtol, a CNF run
    refuses --layers, and a planar run still takes --layers (--model is unset on resume)."""
    planar, field = tmp_path / "planar", tmp_path / "cnf"
    assert main(["train", "--data", "moons", "--model", "planar", "--layers", "2", "--iters", "2", "--out", str(planar)]) == 0
    assert main(["train", "--data", "moons", "--hidden", "8", "8", "--iters", "2", "--out", str(field)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(planar), "--iters", "3", "--hidden", "8", "--rtol", "1e-3"]) == 2
    assert f"the run in {str(planar / 'checkpoint.pt')!r} (a planar flow) has no velocity field and no ODE solve, so --hidden 8, --rtol 0.001 would be ignored" in capsys.readouterr().err
    assert main(["train", "--resume", str(field), "--iters", "3", "--layers", "4"]) == 2
    assert f"--layers 4 sets the depth of a planar flow; the run in {str(field / 'checkpoint.pt')!r} (a cnf flow) takes --hidden" in capsys.readouterr().err
    assert main(["train", "--resume", str(planar), "--iters", "3", "--layers", "2"]) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--latent-dim", "4", "--kl-warmup", "5"], "--latent-dim 4, --kl-warmup 5 apply to --model vae only"),
        (["--iwae-samples", "5"], "--iwae-samples 5 applies to --model vae only; drop it, or pass --model vae"),
        (["--model", "vae", "--data", "digits", "--divergence", "hutchinson", "--sigma-min", "0.1"],
         "--model vae trains by the ELBO on binarised images with an exactly scored posterior, so --divergence hutchinson, --sigma-min 0.1 would be ignored"),
        (["--model", "vae", "--data", "digits", "--posterior", "gaussian", "--layers", "3"],
         "--layers 3 applies to --posterior planar or iaf, got --posterior gaussian"),
        (["--model", "vae", "--data", "digits", "--posterior", "planar", "--no-adjoint"],
         "--no-adjoint applies to --posterior cnf, got --posterior planar"),
    ],
)  # fmt: skip
def test_flags_of_the_other_kind_of_run_are_refused(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """VAE flags on a flow's run, flow flags on a VAE's run and one posterior family's flags on
    another's used to be dropped silently."""
    base = ["train", "--data", "moons", "--iters", "1", "--out", str(tmp_path / "run")]
    assert main([*base, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_patience_stops_a_flow_run_early(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--patience applies to flows too (it was a VAE flag that flows ignored): at a learning rate
    too small to move float32 weights no validation improves, so the run stops after the first
    validation and the N without gain."""
    out = tmp_path / "run"
    flags = ["--hidden", "8", "--iters", "50", "--val-every", "2", "--lr", "1e-30", "--patience", "3"]
    assert main(["train", "--data", "moons", *flags, "--out", str(out)]) == 0
    assert "early stopping after 3 validations without gain" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "early_stopping" and summary["steps"] == 8


def test_planar_on_a_table_trains_by_maximum_likelihood(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Tables default to OT flow matching, which needs a velocity field: a planar flow takes maximum
    likelihood instead, and an explicit flow-matching objective is refused naming both flags."""
    table = tmp_path / "table.npy"
    np.save(table, np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32))
    out = tmp_path / "planar"
    assert main(["train", "--data", str(table), "--model", "planar", "--layers", "2", "--iters", "2", "--out", str(out)]) == 0
    assert "training likelihood with" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["model"] == "planar"
    bad = ["train", "--data", str(table), "--model", "planar", "--objective", "ot_flow_matching", "--out", str(tmp_path / "b")]
    assert main(bad) == 2
    assert "--model planar trains by maximum likelihood (--objective likelihood), got --objective ot_flow_matching" in capsys.readouterr().err


def test_train_says_its_model_and_help_names_the_recipes_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A new run prints the model it built (a table gets the real-data field, not the toys'), and
    the help's defaults are the recipes' (it used to say alpha 0.05 and 64 64 64 for every run)."""
    import cnf
    from cnf import tuning
    from cnf.cli import build_parser
    from cnf.images import IMAGE_RECIPE
    from cnf.recipes import model_recipe
    from cnf.transforms import DEFAULT_ALPHA

    table = tmp_path / "table.npy"  # 1,040 training rows: a continuous table that is not small
    np.save(table, np.random.default_rng(0).normal(size=(1300, 3)).astype(np.float32))
    assert main(["train", "--data", str(table), "--hidden", "8", "8", "--iters", "2", "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "model: CNF, MLPField 8-8 silu, time concatsquash_log; solves with dopri5 (rtol 0.001, atol 0.001) and the exact divergence" in printed
    assert "test log p with the exact divergence, dopri5 (rtol 1e-05, atol 1e-05)" in printed
    flow, _ = cnf.load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    field = inner_flow(flow).field
    assert isinstance(field.activations[0], torch.nn.SiLU) and field.time_embedding == "concatsquash_log"
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "r"), "--time-embedding", "concat", "--iters", "3"]) == 2
    assert "cannot change --time-embedding when resuming" in capsys.readouterr().err
    args = ["train", "--data", str(table), "--hidden", "8", "--activation", "elu", "--iters", "2"]
    assert main([*args, "--time-embedding", "concat", "--out", str(tmp_path / "t")]) == 0
    assert "model: CNF, MLPField 8 elu, time concat;" in capsys.readouterr().out
    small = tmp_path / "small.npy"  # under 1,000 training rows: the small tables' tanh field
    np.save(small, np.random.default_rng(1).normal(size=(100, 3)).astype(np.float32))
    assert main(["train", "--data", str(small), "--hidden", "8", "--iters", "1", "--out", str(tmp_path / "s")]) == 0
    assert "model: CNF, MLPField 8 tanh, time concatsquash;" in capsys.readouterr().out
    integers = tmp_path / "integers.npy"  # dequantised: no thin structure near t = 1, gates on t alone
    np.save(integers, np.random.default_rng(0).integers(0, 5, size=(100, 3)).astype(np.float32))
    assert main(["train", "--data", str(integers), "--hidden", "8", "--iters", "1", "--out", str(tmp_path / "i")]) == 0
    printed = capsys.readouterr().out
    assert "dequantize" in printed and "model: CNF, MLPField 8 silu, time concatsquash;" in printed
    assert main(["train", "--data", "moons", "--hidden", "8", "--iters", "1", "--out", str(tmp_path / "m")]) == 0
    assert "model: CNF, MLPField 8 tanh, time concatsquash;" in capsys.readouterr().out
    vae = ["train", "--model", "vae", "--data", "digits", "--time-embedding", "concat", "--out", str(tmp_path / "v")]
    assert main(vae) == 2
    assert "--time-embedding concat sets the MLP field of vectors" in capsys.readouterr().err
    assert main(["train", "--model", "planar", "--layers", "3", "--iters", "2", "--out", str(tmp_path / "p")]) == 0
    assert "model: planar flow, 3 layers" in capsys.readouterr().out

    text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    table_widths = " ".join(map(str, model_recipe(3, "tabular")["hidden"]))
    assert f"{table_widths} on tables and files with d > 2" in text
    assert f"default tanh on 2-D toys, {model_recipe(3, 'tabular')['activation']} on tables" in text
    assert f"default concatsquash on 2-D toys, {model_recipe(3, 'tabular')['time_embedding']} on tables" in text
    assert f"logit margin alpha (default {DEFAULT_ALPHA:g} for tables and vectors, {IMAGE_RECIPE.alpha:g} for images)" in text
    assert "ot_flow_matching on tables and files with d > 2" in text
    tune = " ".join(build_parser()._subparsers._group_actions[0].choices["tune"].format_help().split())
    assert f"points scored per setting (default: {tuning.DEFAULT_N_LOGP})" in tune
    assert "(default: None)" not in tune and "(default: True)" not in tune


def test_a_large_continuous_table_ends_with_maximum_likelihood(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The recipe's closing likelihood phase reaches `cnf train` with no flag (and --likelihood-finetune 0
    turns it off); the phase's records are marked in the log."""
    table = tmp_path / "table.npy"  # 1,040 training rows
    np.save(table, np.random.default_rng(0).normal(size=(1300, 3)).astype(np.float32))
    args = ["train", "--data", str(table), "--hidden", "8", "--iters", "10", "--val-every", "100"]
    assert main([*args, "--out", str(tmp_path / "r")]) == 0
    assert "then maximum likelihood for the last 10% at lr 0.0003" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("objective") for r in log if r["step"] >= 9][-1] == "likelihood"
    assert not any(r.get("objective") for r in log if r["step"] < 9)
    assert main([*args, "--likelihood-finetune", "0", "--out", str(tmp_path / "off")]) == 0
    assert "maximum likelihood for the last" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--likelihood-finetune", "1", "--out", str(tmp_path / "bad")])
    assert "--likelihood-finetune: must lie in [0, 1), got '1'" in capsys.readouterr().err


def test_a_table_run_with_whitening_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The whitening's mean and matrix are tensors in the config that resuming compares (it used
    to stop with 'Boolean value of Tensor with more than one value is ambiguous')."""
    from cnf.checkpoint import config_differences

    table = tmp_path / "table.npy"
    rng = np.random.default_rng(0)
    np.save(table, (rng.normal(size=(200, 3)) @ [[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 2.0]]).astype(np.float32))
    out = tmp_path / "run"
    assert main(["train", "--data", str(table), "--iters", "2", "--hidden", "8", "--out", str(out)]) == 0
    assert "whiten" in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "--iters", "4"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    config = {"transforms": [{"kind": "whiten", "matrix": torch.eye(2)}], "hidden": [8]}
    same = {"transforms": [{"kind": "whiten", "matrix": torch.eye(2)}], "hidden": [8]}
    assert config_differences(config, same) == []
    other = {"transforms": [{"kind": "whiten", "matrix": 2 * torch.eye(2)}], "hidden": [16]}
    assert config_differences(config, other) == [
        "hidden: [8] in the checkpoint, [16] here",
        "transforms.0.matrix: the checkpoint's tensor differs from this one",
    ]


def test_score_writes_log_p_and_p_values_against_the_held_out_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`cnf score`: each row's log p equals the flow's exact log p, and its p-value is the fraction
    of the run's test rows (the 80/10/10 split of its file) with a lower density."""
    import cnf
    from cnf.data import split
    from cnf.recipes import exact_evaluation

    rng = np.random.default_rng(0)
    table = tmp_path / "table.npy"
    np.save(table, rng.normal(size=(200, 3)).astype(np.float32))
    out = tmp_path / "run"
    assert main(["train", "--data", str(table), "--hidden", "8", "--iters", "3", "--out", str(out)]) == 0
    new = tmp_path / "new.csv"
    rows = np.concatenate([rng.normal(size=(5, 3)), 6.0 + rng.normal(size=(5, 3))]).astype(np.float32)
    np.savetxt(new, rows, delimiter=",")
    scores = tmp_path / "scores.csv"
    capsys.readouterr()
    assert main(["score", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(new), "--out", str(scores)]) == 0
    assert "against the 20 held-out test rows" in capsys.readouterr().out
    written = np.loadtxt(scores, delimiter=",", skiprows=1)
    flow, _ = cnf.load_checkpoint(out / "checkpoint.pt")
    test_rows = split(torch.from_numpy(np.load(table)), seed=0)[2]
    with torch.no_grad(), exact_evaluation(flow):
        log_p = flow.log_prob(torch.from_numpy(rows)).double().numpy()
        reference = flow.log_prob(test_rows).double().numpy()
    np.testing.assert_allclose(written[:, 1], log_p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(written[:, 2], [(reference < v).mean() for v in log_p], atol=1e-6)
    assert (written[5:, 2] == 0).all()  # far from the data: below every held-out row

    # integer data are dequantised with a seeded draw: scoring twice writes the same file
    counts = tmp_path / "counts.npy"
    np.save(counts, rng.integers(0, 4, size=(100, 2)).astype(np.float32))
    assert main(["train", "--data", str(counts), "--hidden", "8", "--iters", "2", "--out", str(tmp_path / "c")]) == 0
    assert "dequantize" in capsys.readouterr().out
    score = ["score", "--checkpoint", str(tmp_path / "c" / "checkpoint.pt"), "--data", str(counts)]
    assert main([*score, "--out", str(tmp_path / "s1.csv")]) == 0 and main([*score, "--out", str(tmp_path / "s2.csv")]) == 0
    assert (tmp_path / "s1.csv").read_text() == (tmp_path / "s2.csv").read_text()
    # and cnf evaluate repeats the test NLL cnf train printed (the same seeded draw), as it does on
    # continuous data; unseeded, two evaluations of the same file differed in the first decimal
    capsys.readouterr()
    evaluate = ["evaluate", "--checkpoint", str(tmp_path / "c" / "checkpoint.pt"), "--data", str(counts), "--json"]
    assert main(evaluate) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["nll"] == pytest.approx(json.loads((tmp_path / "c" / "summary.json").read_text())["test_nll"], rel=1e-6)
    assert main([*evaluate, "--seed", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["nll"] != first["nll"]  # another draw

    wide = tmp_path / "wide.npy"
    np.save(wide, rng.normal(size=(4, 5)).astype(np.float32))
    assert main(["score", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(wide), "--out", str(scores)]) == 2
    assert "has points of shape (5,); the checkpoint" in capsys.readouterr().err


def test_file_errors_name_the_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run folder given as --checkpoint, an output path in a missing folder and data of the wrong
    width for cnf tune each get an error that names the path or the flag."""
    out = tmp_path / "run"
    assert main(["train", "--hidden", "8", "--iters", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(out), "--out", str(tmp_path / "s.npy")]) == 2
    assert "is a folder; pass a file in it: best.pt (the best validation weights) or checkpoint.pt" in capsys.readouterr().err
    missing = tmp_path / "no" / "s.npy"
    assert main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(missing)]) == 2
    assert f"No such file or directory: {str(missing)!r}" in capsys.readouterr().err
    table = tmp_path / "t.npy"
    np.save(table, np.zeros((30, 3), dtype=np.float32))
    assert main(["tune", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(table)]) == 2
    assert "has points of shape (3,); the checkpoint" in capsys.readouterr().err
