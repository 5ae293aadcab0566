"""Choosing the preprocessing from the training split, and `cnf train --data NAME` with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cnf.checkpoint import read_checkpoint
from cnf.cli import main
from cnf.data import sample_toy
from cnf.transforms import Dequantize, Logit, Standardize, Whiten, choose_preprocessing

F64 = torch.float64


def kinds(transform) -> list[type]:
    return [type(t) for t in transform.leaves()]


def test_integer_data_are_dequantized_logit_and_whitened() -> None:
    train = torch.randint(0, 17, (200, 5), generator=torch.Generator().manual_seed(0)).to(F64)
    transform, notes = choose_preprocessing(train)
    assert kinds(transform) == [Dequantize, Logit, Whiten]
    dequantize = next(transform.leaves())
    assert (dequantize.levels, dequantize.low) == (17, 0.0)
    assert notes[0].startswith("dequantize: every value is an integer, 17 levels")
    y, logdet = transform(train)
    # Whitened on the training split: the transformed training data have mean ~0, std ~1.
    assert y.mean(0).abs().max() < 0.15 and (y.std(0) - 1).abs().max() < 0.15
    assert torch.isfinite(logdet).all()


def test_unit_interval_scaled_and_unit_scale_data() -> None:
    unit = torch.rand(100, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert kinds(choose_preprocessing(unit)[0]) == [Logit, Whiten]
    wide = torch.randn(100, 3, dtype=F64) * torch.tensor([1.0, 100.0, 1.0], dtype=F64)
    assert kinds(choose_preprocessing(wide)[0]) == [Whiten]
    assert kinds(choose_preprocessing(wide[:5])[0]) == [Standardize]  # too few rows for a covariance
    shifted = torch.randn(100, 2, dtype=F64) + 20.0
    assert kinds(choose_preprocessing(shifted)[0]) == [Standardize]  # 2-D: columns only
    transform, notes = choose_preprocessing(sample_toy("moons", 1000, 0))
    assert transform is None and "no preprocessing" in notes[-1]


def test_mixed_integer_columns_are_said_and_flags_override() -> None:
    mixed = torch.randn(50, 3, dtype=F64) * 10
    mixed[:, 1] = mixed[:, 1].round()
    transform, notes = choose_preprocessing(mixed)
    assert "columns [1] are integer-valued among continuous ones" in notes[0]
    integers = torch.randint(0, 4, (50, 2)).to(F64)
    transform, _ = choose_preprocessing(integers, "dequantize", levels=8)
    assert kinds(transform) == [Dequantize] and next(transform.leaves()).levels == 8
    assert choose_preprocessing(integers, "none")[0] is None
    assert kinds(choose_preprocessing(integers, "standardize")[0]) == [Standardize]
    with pytest.raises(ValueError, match=r"unknown preprocessing step\(s\) \['squeeze'\]"):
        choose_preprocessing(integers, "squeeze")
    with pytest.raises(ValueError, match=r"must keep the order"):
        choose_preprocessing(integers, ["standardize", "dequantize"])
    with pytest.raises(ValueError, match=r"non-integer values"):
        choose_preprocessing(mixed, "dequantize")
    # data that are one constant used to fail as "levels must be an int >= 2, got 1"
    with pytest.raises(ValueError, match=r"every value of the training data is 1: one constant"):
        choose_preprocessing(torch.ones(20, 3, dtype=F64))


def test_cli_trains_digits_and_reports_bits_per_dim(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    tiny = ["--iters", "2", "--hidden", "8", "--rtol", "1e-2", "--atol", "1e-2", "--batch-size", "64"]
    assert main(["train", "--data", "digits", "--out", str(out), *tiny]) == 0
    printed = capsys.readouterr().out
    assert "preprocessing (auto): dequantize: every value is an integer, 17 levels" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_n"] == 180 and 0 < summary["test_bits_per_dim"] < 20
    checkpoint = str(out / "checkpoint.pt")
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", "digits", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 180 and metrics["bits_per_dim"] > 0
    samples = tmp_path / "samples.npy"
    assert main(["sample", "--checkpoint", checkpoint, "--n", "5", "--out", str(samples)]) == 0
    drawn = np.load(samples)
    assert drawn.shape == (5, 64) and np.array_equal(drawn, drawn.round()) and drawn.max() <= 16


def test_cli_preprocess_none_keeps_a_plain_cnf(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "wine"
    tiny = ["--iters", "1", "--hidden", "8", "--rtol", "1e-2", "--atol", "1e-2", "--preprocess", "none"]
    assert main(["train", "--data", "wine", "--out", str(out), *tiny]) == 0
    assert "no preprocessing" in capsys.readouterr().out
    assert main(["train", "--data", "wine", "--out", str(out), "--preprocess", "logit", *tiny[:-2]]) == 2
    assert "x must lie in the open interval" in capsys.readouterr().err


def test_recipes_by_dimension() -> None:
    from cnf.recipes import default_objective, model_recipe, recipe

    assert model_recipe(2, "toy") == {} and default_objective(2, "toy") == "likelihood"
    assert recipe("likelihood", 2, "toy")["lr"] == 5e-3  # the toys keep their measured recipe
    assert model_recipe(8, "tabular")["divergence"] == "exact"
    assert len(model_recipe(8, "tabular")["hidden"]) == 4 and model_recipe(8, "tabular")["time_embedding"] == "concatsquash_log"
    dequantized = model_recipe(64, "tabular", dequantized=True)
    assert len(dequantized["hidden"]) == 3 and dequantized["time_embedding"] == "concatsquash"
    small = model_recipe(13, "tabular", n_train=142)
    assert (small["activation"], len(small["hidden"]), small["time_embedding"]) == ("tanh", 3, "concatsquash")
    assert model_recipe(13, "tabular", n_train=1_000)["time_embedding"] == "concatsquash_log"
    assert model_recipe(64, "tabular")["divergence"] == "hutchinson"
    assert model_recipe(64, "tabular")["noise"] == "rademacher"
    assert default_objective(64, "tabular") == "ot_flow_matching"
    assert recipe("ot_flow_matching", 64, "tabular")["lr"] == 3e-3
    # small tables validate flow matching every 100 steps (they overfit within ~500), others every 500
    assert recipe("ot_flow_matching", 30, "tabular", n_train=455)["val_every"] == 100
    assert recipe("ot_flow_matching", 64, "tabular", n_train=1437)["val_every"] == 500
    assert recipe("ot_flow_matching", 30, "tabular")["val_every"] == 500
    assert recipe("ot_flow_matching", 7, "tabular", n_train=80_000)["val_every"] == 2000  # galaxies
    assert recipe("likelihood", 7, "tabular", n_train=80_000)["val_every"] == 50
    assert recipe("likelihood", 30, "tabular", n_train=455)["val_every"] == 50
    assert recipe("likelihood", 2, "toy", n_train=455)["val_every"] == 100
    # flow matching on continuous tables trains more near the data (t ~ Beta(1, 1/2)); dequantised
    # tables (digits), other objectives, the toys and images keep uniform times
    assert recipe("ot_flow_matching", 7, "tabular")["time_exponent"] == 2.0
    assert recipe("flow_matching", 13, "tabular", n_train=142)["time_exponent"] == 2.0
    assert "time_exponent" not in recipe("ot_flow_matching", 64, "tabular", dequantized=True)
    assert "time_exponent" not in recipe("likelihood", 7, "tabular")
    assert "time_exponent" not in recipe("ot_flow_matching", 2, "toy")
    assert "time_exponent" not in recipe("flow_matching", 64, "image")
    # OT within groups of 64 rows: OT flow matching on large continuous tables only
    assert recipe("ot_flow_matching", 7, "tabular", n_train=80_000)["ot_batch_size"] == 64
    assert "ot_batch_size" not in recipe("flow_matching", 7, "tabular", n_train=80_000)
    assert "ot_batch_size" not in recipe("ot_flow_matching", 7, "tabular", n_train=19_999)
    assert "ot_batch_size" not in recipe("ot_flow_matching", 64, "tabular", n_train=80_000, dequantized=True)
    assert "ot_batch_size" not in recipe("ot_flow_matching", 2, "toy", n_train=80_000)
    # images: the EMA'd weights; large images validate on 500 images every 1,000 steps, so that
    # validation stays ~10 % of training (digits, 64 pixels, keep every 100 steps on all 180)
    digits, fashion = recipe("flow_matching", 64, "image"), recipe("flow_matching", 784, "image")
    assert digits["ema_decay"] == fashion["ema_decay"] == 0.999
    assert digits["val_every"] == 100 and "val_size" not in digits
    assert fashion["val_every"] == 1000 and fashion["val_size"] == 500


def test_cli_picks_the_time_exponent_by_whether_the_table_is_dequantised(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("sklearn")
    tiny = ["--iters", "2", "--hidden", "8", "--val-every", "1"]
    assert main(["train", "--data", "wine", "--out", str(tmp_path / "wine"), *tiny]) == 0
    assert "times t ~ Beta(1, 1/2)" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "wine" / "checkpoint.pt")["settings"]["time_exponent"] == 2.0
    assert main(["train", "--data", "digits", "--out", str(tmp_path / "digits"), *tiny]) == 0
    assert "times t ~" not in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "digits" / "checkpoint.pt")["settings"]["time_exponent"] == 1.0
    given = ["--time-exponent", "3", "--out", str(tmp_path / "given")]
    assert main(["train", "--data", "digits", *given, *tiny]) == 0  # a flag overrides the recipe
    assert read_checkpoint(tmp_path / "given" / "checkpoint.pt")["settings"]["time_exponent"] == 3.0


def test_cli_pairs_within_ot_groups_on_large_continuous_tables(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A continuous table of 20,000+ training rows gets the recipe's OT groups of 64 (said and
    stored), a flag overrides them, and a bad value is refused by the flag's name."""
    table = tmp_path / "large.npy"
    np.save(table, np.random.default_rng(0).standard_normal((25_000, 3)) * [1.0, 2.0, 0.5])
    tiny = ["--iters", "2", "--hidden", "8", "--val-every", "1", "--test-n", "10"]
    assert main(["train", "--data", str(table), "--out", str(tmp_path / "a"), *tiny]) == 0
    assert "OT pairing within groups of 64" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "a" / "checkpoint.pt")["settings"]["ot_batch_size"] == 64
    assert main(["train", "--data", str(table), "--out", str(tmp_path / "b"), "--ot-batch-size", "16", *tiny]) == 0
    assert read_checkpoint(tmp_path / "b" / "checkpoint.pt")["settings"]["ot_batch_size"] == 16
    with pytest.raises(SystemExit):
        main(["train", "--data", str(table), "--out", str(tmp_path / "c"), "--ot-batch-size", "0", *tiny])
    assert "--ot-batch-size: " in capsys.readouterr().err


def test_exact_evaluation_scores_exactly_and_restores_training_settings() -> None:
    import cnf
    from cnf.recipes import EVALUATION_SOLVER, exact_evaluation

    torch.manual_seed(0)
    field = cnf.MLPField(3, hidden=(8,))
    training = cnf.Solver(method="rk4", step_size=0.5)
    inner = cnf.CNF(field, divergence="hutchinson", noise="rademacher", solver=training).double()
    flow = cnf.TransformedFlow(inner, Standardize(torch.ones(3, dtype=F64), 2 * torch.ones(3, dtype=F64)))
    x = torch.randn(6, 3, dtype=F64)
    reference = cnf.CNF(field, solver=cnf.Solver(**EVALUATION_SOLVER)).double()
    with torch.no_grad(), exact_evaluation(flow):
        scored = flow.log_prob(x)
    expected = reference.log_prob((x - 1) / 2) - 3 * np.log(2.0)
    torch.testing.assert_close(scored, expected, atol=1e-7, rtol=0)
    assert inner.divergence == "hutchinson" and inner.solver == training


def test_cli_also_scores_the_best_validation_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """When best.pt holds other weights than the last ones, `cnf train` scores it too, and the
    number equals `cnf evaluate` on best.pt (the same test split and dequantisation draws)."""
    pytest.importorskip("sklearn")
    out = tmp_path / "wine"
    args = ["--iters", "6", "--val-every", "2", "--hidden", "8", "--rtol", "1e-2", "--atol", "1e-2", "--lr", "0.3"]
    args += ["--time-exponent", "2"]  # a run whose last weights are known not to be its best (0.27 nats worse)
    assert main(["train", "--data", "wine", "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] in (2, 4)  # lr 0.3: the last weights are not the best ones
    assert f"best validation weights: test NLL {summary['best_test_nll']:.4f}" in printed
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--data", "wine", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nll"] == pytest.approx(summary["best_test_nll"], rel=1e-6)
