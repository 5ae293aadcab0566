"""Solver tuning: the sweep, its recommendations, the files and `cnf tune` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cnf
from cnf.cli import main, solver_from_file
from cnf.data import sample_toy
from cnf.tuning import BASELINE, TuneResult, candidate_solvers, error_summary, label, mean_upper_bound, tune

SMALL = dict(
    methods=("dopri5", "rk4"),
    tolerances=(1e-2, 1e-5),
    step_sizes=(0.25,),
    mixed=((1e-3, 1e-5),),
    n_logp=64,
    n_grad=16,
    repeats=1,
    reference=cnf.Solver("dopri5", rtol=1e-9, atol=1e-9, max_steps=10_000),
)


@pytest.fixture(scope="module")
def result() -> TuneResult:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        flow = cnf.CNF(cnf.MLPField(2, hidden=(8, 8)))
    # 64 points for the grid, then two fresh blocks of 64 (and a short remainder, left out).
    return tune(flow, sample_toy("8gaussians", 64 * 3 + 10, seed=1), **SMALL, fresh_blocks=2)


def test_candidate_grid() -> None:
    solvers = candidate_solvers(("dopri5", "rk4"), (1e-3, 1e-5), (0.1,), ((1e-3, 1e-6),))
    labels = [label(s) for s in solvers]
    assert labels == [
        "dopri5 rtol=1e-03 atol=1e-03",
        "dopri5 rtol=1e-05 atol=1e-05",
        "dopri5 rtol=1e-03 atol=1e-06",
        "rk4 h=0.1",
    ]
    with pytest.raises(ValueError, match="unknown method 'rk5'"):
        candidate_solvers(("rk5",))
    with pytest.raises(ValueError, match="tolerances must be a positive finite float, got -1"):
        candidate_solvers(("dopri5",), (-1.0,))


def test_rows_and_recommendations(result: TuneResult) -> None:
    settings = [r["setting"] for r in result.rows]
    assert label(BASELINE) in settings and "rk4 h=0.25" in settings
    for row in result.rows:
        assert row["status"] == "ok"
        assert row["nfe"] > 0 and row["seconds"] > 0 and row["grad_seconds"] > 0
        assert 0 <= row["logp_err_median"] <= row["logp_err_q99"] <= row["logp_err_max"]
        assert row["logp_err_mean"] <= row["logp_err_ucb"] <= row["logp_err_max"]
        assert row["roundtrip_err"] >= 0 and row["grad_rel_err"] >= 0
    tight = next(r for r in result.rows if r["setting"] == label(BASELINE))
    loose = next(r for r in result.rows if r["setting"] == "dopri5 rtol=1e-02 atol=1e-02")
    assert tight["logp_err_mean"] <= loose["logp_err_mean"] + 1e-6
    evaluation = result.recommended["evaluation"]
    assert evaluation["error_key"] == "logp_err_ucb"  # judged by the bound, not the plain mean
    assert evaluation["met_budget"] and evaluation["error"] <= result.budget
    within = [r for r in result.rows if r["logp_err_ucb"] <= result.budget]
    assert evaluation["nfe"] == min(r["nfe"] for r in within)
    # Re-checked on the fresh blocks of 64 points that took no part in the choice.
    assert result.meta["fresh_blocks"] == 2 and [b["n"] for b in evaluation["fresh"]] == [64, 64]
    for block in evaluation["fresh"]:
        assert block["met_budget"] == (block["logp_err_mean"] <= result.budget)
    assert evaluation["fresh_met_budget"] == all(b["met_budget"] for b in evaluation["fresh"])
    assert "fresh blocks of points" in evaluation["note"]
    training = result.recommended["training"]
    assert training["error"] <= result.grad_budget
    for rec in (evaluation, training):
        # Speed-ups are re-timed in back-to-back pairs with the baseline, not read off the grid.
        assert rec["setting"] != label(BASELINE)
        assert rec["speedup_measured"] == "median of 3 back-to-back pairs"
        assert rec["speedup_vs_baseline"] > 0 and f"{rec['speedup_vs_baseline']:.2f}x faster" in rec["note"]


def test_files_apply_to_evaluate(result: TuneResult, tmp_path: Path) -> None:
    paths = result.save(tmp_path)
    payload = json.loads(paths["json"].read_text())
    assert payload["recommended"]["evaluation"]["solver"] == result.recommended["evaluation"]["solver"]
    assert paths["plot"].stat().st_size > 0 and "| setting |" in paths["markdown"].read_text()
    solver = solver_from_file(str(paths["json"]))
    assert solver == cnf.Solver.from_dict(result.recommended["evaluation"]["solver"])


def test_upper_bound_covers_a_known_mean() -> None:
    # Exponential errors (mean 1, heavy enough to skew the mean): the 90% one-sided bound
    # must lie above the true mean in ~90% of independent samples of 200 points.
    generator = torch.Generator().manual_seed(0)
    exponential = torch.distributions.Exponential(torch.tensor(1.0, dtype=torch.float64))
    trials, covered = 300, 0
    for _ in range(trials):
        errors = -torch.log(torch.rand(200, dtype=torch.float64, generator=generator))
        covered += (
            mean_upper_bound(errors, 0.9, resamples=400, generator=generator) >= exponential.mean.item()
        )
    assert 0.84 <= covered / trials <= 0.95, covered / trials
    summary = error_summary(torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0]), 0.95, generator)
    assert summary["logp_err_median"] == 2.0 and summary["logp_err_max"] == 100.0
    assert summary["logp_err_mean"] == 21.2 and 21.2 < summary["logp_err_ucb"] <= 100.0
    with pytest.raises(ValueError, match="confidence must lie in \\(0, 1\\), got 1.5"):
        mean_upper_bound(torch.ones(3), 1.5)


def test_nothing_within_budget_is_flagged() -> None:
    flow = cnf.CNF(cnf.MLPField(2, hidden=(4,)))
    out = tune(flow, sample_toy("moons", 32, seed=0), **{**SMALL, "budget": 1e-30, "gradients": False})
    assert out.recommended["evaluation"]["met_budget"] is False
    assert "NO setting met the budget" in out.recommended["evaluation"]["note"]
    assert "training" not in out.recommended


def test_hutchinson_flow_uses_one_fixed_probe() -> None:
    flow = cnf.CNF(cnf.MLPField(2, hidden=(4,)), divergence="hutchinson")
    out = tune(flow, sample_toy("moons", 32, seed=0), **{**SMALL, "gradients": False})
    rk4 = next(r for r in out.rows if r["setting"] == "rk4 h=0.25")
    assert rk4["logp_err_mean"] < 1e-2  # same probe as the reference: only solver error remains


def test_errors_name_the_argument() -> None:
    data = sample_toy("moons", 8, seed=0)
    with pytest.raises(TypeError, match="flow must be a cnf.CNF"):
        tune(cnf.PlanarFlow(2, 2), data)
    flow = cnf.CNF(cnf.MLPField(2, hidden=(4,)))
    with pytest.raises(ValueError, match="budget must be a positive finite float, got 0"):
        tune(flow, data, budget=0)
    with pytest.raises(ValueError, match="n_logp must be a positive int, got 0"):
        tune(flow, data, n_logp=0)
    with pytest.raises(ValueError, match="fresh_blocks must be a non-negative int, got -1"):
        tune(flow, data, fresh_blocks=-1)
    with pytest.raises(ValueError, match="confidence must be a float in \\(0, 1\\), got 1.0"):
        tune(flow, data, confidence=1.0)


def test_cli_tune_then_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        "moons",
        "--iters",
        "2",
        "--out",
        str(run),
        "--n-train",
        "200",
        "--hidden",
        "8",
    ]
    assert main([*args, "--rtol", "1e-3", "--atol", "1e-3"]) == 0
    capsys.readouterr()
    checkpoint = str(run / "checkpoint.pt")
    code = main(
        ["tune", "--checkpoint", checkpoint, "--data", "moons", "--methods", "dopri5", "rk4",
         "--tolerances", "1e-2", "1e-5", "--step-sizes", "0.25", "--no-mixed", "--n", "32",
         "--fresh-blocks", "1", "--n-grad", "8", "--repeats", "1", "--out", str(tmp_path / "tune")]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "fresh points" in printed
    assert "**evaluation**" in printed and "--solver-from" in printed
    tune_json = tmp_path / "tune" / "tune.json"
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", "moons", "--n", "50", "--json",
                 "--solver-from", str(tune_json)]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["n"] == 50
    planar = tmp_path / "planar"
    assert main(["train", "--model", "planar", "--layers", "2", "--iters", "1", "--out", str(planar)]) == 0
    capsys.readouterr()
    assert main(["tune", "--checkpoint", str(planar / "checkpoint.pt"), "--data", "moons"]) == 2
    assert "needs a CNF checkpoint" in capsys.readouterr().err


def test_cli_tune_measures_a_preprocessed_flow_in_data_units(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A CLI run on a table is a TransformedFlow: tune measures the CNF inside the preprocessing,
    whose log p errors equal those of the whole flow in data units (checked here independently)."""
    table = tmp_path / "table.npy"
    rng = np.random.default_rng(0)
    np.save(table, (rng.normal(size=(200, 3)) * [100.0, 1.0, 0.01] + [5.0, 0.0, -3.0]).astype(np.float32))
    run = tmp_path / "run"
    assert main(["train", "--data", str(table), "--preprocess", "standardize", "--iters", "2", "--hidden", "8",
                 "--out", str(run)]) == 0  # fmt: skip
    capsys.readouterr()
    checkpoint = str(run / "checkpoint.pt")
    code = main(
        ["tune", "--checkpoint", checkpoint, "--data", str(table), "--methods", "euler", "--step-sizes", "0.5",
         "--no-mixed", "--n", "16", "--fresh-blocks", "1", "--repeats", "1", "--no-gradients",
         "--out", str(tmp_path / "tune")]
    )  # fmt: skip
    assert code == 0
    assert "tuning the CNF inside the preprocessing (standardize)" in capsys.readouterr().out
    rows = json.loads((tmp_path / "tune" / "tune.json").read_text())["rows"]
    row = next(r for r in rows if r["method"] == "euler")
    flow, _ = cnf.load_checkpoint(checkpoint)
    reference, _ = cnf.load_checkpoint(checkpoint)
    x = torch.from_numpy(np.load(table)[:16])
    flow.flow.solver = cnf.Solver("euler", step_size=0.5)
    reference.flow.solver = cnf.Solver("dopri8", rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        coarse = flow.log_prob(x).double()
        exact = reference.double().log_prob(x.double())
    assert row["logp_err_mean"] > 1e-4  # a coarse solve: the comparison below has something to see
    np.testing.assert_allclose(row["logp_err_mean"], (coarse - exact).abs().mean().item(), rtol=1e-3)


def test_cli_tune_refuses_a_conditional_flow(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = tmp_path / "table.npy"
    np.save(table, np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32))
    run = tmp_path / "run"
    assert main(["train", "--data", str(table), "--context-columns", "2", "--iters", "1", "--hidden", "4",
                 "--out", str(run)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["tune", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(table)]) == 2
    assert "cnf tune measures unconditional CNFs" in capsys.readouterr().err


def test_cli_tune_without_gradients_draws_its_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Used to crash in the plot ("Data cannot be log-scaled") with an empty gradient panel.
    run = tmp_path / "run"
    assert main(["train", "--data", "moons", "--iters", "1", "--out", str(run), "--n-train", "100",
                 "--hidden", "4"]) == 0  # fmt: skip
    code = main(
        ["tune", "--checkpoint", str(run / "checkpoint.pt"), "--data", "moons", "--methods", "rk4",
         "--step-sizes", "0.5", "0.25", "--no-mixed", "--n", "16", "--fresh-blocks", "1", "--repeats", "1",
         "--no-gradients", "--out", str(tmp_path / "tune")]
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "tune" / "tune.png").stat().st_size > 0
    payload = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert "training" not in payload["recommended"] and payload["rows"][0]["grad_rel_err"] is None
