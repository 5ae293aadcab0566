"""Recipes, --resume with the run's own settings, clear errors for bad inputs, dtypes, chunked scoring."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import cnf
from cnf.checkpoint import read_checkpoint
from cnf.cli import main
from cnf.data import load_data, sample_toy
from cnf.recipes import BY_OBJECTIVE, default_threads, recipe
from cnf.training import train

SMALL = ["--hidden", "8", "--n-train", "300", "--rtol", "1e-3", "--atol", "1e-3"]


def test_cli_defaults_are_the_recipe_and_the_benchmark_reads_it(tmp_path: Path, capsys) -> None:
    from benchmarks.training_speed import OBJECTIVES

    assert OBJECTIVES["ot_flow_matching"] == recipe("ot_flow_matching")
    assert main(["train", "--objective", "ot_flow_matching", "--data", "8gaussians", "--time-limit", "1", "--out", str(tmp_path), *SMALL]) == 0
    assert "EMA 0.999" in capsys.readouterr().out
    settings = read_checkpoint(tmp_path / "checkpoint.pt")["settings"]
    expected = recipe("ot_flow_matching", 2, "toy", time_limit=1.0)
    assert {k: settings[k] for k in expected} == expected
    assert settings["iters"] is None  # a time-limited run is never cut short by a step cap
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["weights"] == "ema" and summary["threads"] == 1
    assert summary["excess_nll"] == pytest.approx(summary["test_nll"] - summary["true_nll"])
    with pytest.raises(ValueError, match="unknown objective 'score_matching'"):
        recipe("score_matching")
    assert default_threads(2, cores=16) == 1 and default_threads(784, cores=16) == 8


def test_resume_without_flags_continues_with_the_runs_own_settings(tmp_path: Path, capsys) -> None:
    first = ["train", "--out", str(tmp_path), "--iters", "3", "--divergence", "hutchinson", "--lr", "2e-3"]
    assert main([*first, "--lr-schedule", "constant", "--method", "bosh3", "--data", "8gaussians", *SMALL]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path), "--iters", "5"]) == 0
    printed = capsys.readouterr().out
    assert "with the run's own model, solver and settings; changed: iters 3 -> 5" in printed
    payload = read_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["step"] == 5 and payload["settings"]["lr"] == 2e-3
    assert payload["settings"]["lr_schedule"] == "constant"
    assert payload["config"]["divergence"] == "hutchinson" and payload["config"]["solver"]["method"] == "bosh3"
    assert payload["config"]["solver"]["rtol"] == 1e-3 and payload["run"]["data"] == "8gaussians"
    assert main(["train", "--resume", str(tmp_path), "--iters", "6", "--rtol", "1e-2"]) == 0
    assert "changed: rtol 0.001 -> 0.01, iters 5 -> 6" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path), "--hidden", "16"]) == 2
    assert "cannot change --hidden when resuming" in capsys.readouterr().err
    points = tmp_path / "three.npy"
    np.save(points, np.random.default_rng(0).normal(size=(100, 3)))
    assert main(["train", "--resume", str(tmp_path), "--data", str(points), "--iters", "7"]) == 2
    assert "the run's model takes points of shape (2,), the data has shape (3,)" in capsys.readouterr().err


def test_resume_into_a_different_model_names_the_setting(tmp_path: Path) -> None:
    data = sample_toy("moons", 200, seed=0)
    train(cnf.CNF(cnf.MLPField(2, hidden=(8,))), data, iters=2, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different model: field.hidden: \[8\] in the checkpoint, \[16\] here"):
        train(cnf.CNF(cnf.MLPField(2, hidden=(16,))), data, resume=tmp_path / "checkpoint.pt", out=tmp_path)
    with pytest.raises(ValueError, match=r"trained on data of shape \(n, 2\), the data given has shape \(50, 3\)"):
        train(cnf.CNF(cnf.MLPField(3)), torch.randn(50, 3), resume=tmp_path / "checkpoint.pt")


def test_existing_run_is_never_replaced_silently(tmp_path: Path, capsys) -> None:
    data = sample_toy("moons", 200, seed=0)
    train(cnf.CNF(cnf.MLPField(2, hidden=(8,))), data, iters=2, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="already holds a run .*checkpoint.pt"):
        train(cnf.CNF(cnf.MLPField(2, hidden=(8,))), data, iters=1, out=tmp_path, overwrite=False)
    with pytest.warns(UserWarning, match="replacing the run in"):
        train(cnf.CNF(cnf.MLPField(2, hidden=(8,))), data, iters=1, out=tmp_path, progress=False)
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1
    assert main(["train", "--iters", "1", "--out", str(tmp_path), *SMALL]) == 2
    assert "already holds a run" in capsys.readouterr().err and read_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


def test_ema_and_best_weights_are_kept_and_resume_exactly(tmp_path: Path) -> None:
    data, val = sample_toy("8gaussians", 1000, seed=0).double(), sample_toy("8gaussians", 100, seed=1).double()

    def flow() -> cnf.CNF:
        torch.manual_seed(0)
        return cnf.CNF(cnf.MLPField(2, hidden=(8,)).double(), solver=cnf.Solver(method="rk4", step_size=0.25))

    common = dict(objective="flow_matching", ema_decay=0.9, batch_size=64, val_every=10, progress=False)
    straight = flow()
    result = train(straight, data, val, iters=40, out=tmp_path / "a", **common)
    payload = read_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert payload["ema"]["updates"] == 40
    raw, averaged = payload["train_state_dict"], payload["state_dict"]
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)
    assert all(torch.equal(v, averaged[k]) for k, v in straight.state_dict().items())  # the EMA is the result
    best = read_checkpoint(tmp_path / "a" / "best.pt")
    assert result.best_step == best["step"] and result.best_val_nll == pytest.approx(best["val_nll"])
    assert result.best_val_nll == min(r["val_nll"] for r in result.history if "val_nll" in r)
    split = flow()
    train(split, data, val, iters=20, out=tmp_path / "b", **common)
    train(split, data, val, out=tmp_path / "b", resume=tmp_path / "b" / "checkpoint.pt", iters=40, progress=False)
    assert all(torch.equal(v, straight.state_dict()[k]) for k, v in split.state_dict().items())


def test_ema_update_is_the_warmed_up_average_by_hand() -> None:
    """ema <- d ema + (1 - d) w with d_n = min(decay, (1 + n) / (10 + n)), float entries only."""
    from cnf.ema import ExponentialMovingAverage

    module = torch.nn.Linear(3, 2).double()
    module.register_buffer("count", torch.tensor(0))
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    ema = ExponentialMovingAverage(module, decay=0.5)
    for n in range(1, 4):
        with torch.no_grad():
            module.weight.add_(n)
            module.bias.mul_(-2.0)
            module.count += 1
        d = min(0.5, (1 + n) / (10 + n))
        for key, value in module.state_dict().items():
            expected[key] = d * expected[key] + (1 - d) * value if value.is_floating_point() else value.clone()
        ema.update(module)
        for key, value in expected.items():
            assert torch.allclose(ema.shadow[key], value, rtol=0, atol=1e-12), (n, key)
    assert ema.shadow["count"].item() == 3 and ema.updates == 3


def test_threads_are_chosen_logged_and_restored() -> None:
    data = sample_toy("moons", 200, seed=0)
    before = torch.get_num_threads()
    result = train(cnf.CNF(cnf.MLPField(2, hidden=(8,))), data, iters=1, progress=False)
    assert result.threads == 1 and torch.get_num_threads() == before
    assert train(cnf.CNF(cnf.MLPField(2, hidden=(8,))), data, iters=1, threads=2, progress=False).threads == 2
    with pytest.raises(ValueError, match="threads must be a positive int or 'auto', got 0"):
        train(cnf.CNF(cnf.MLPField(2, hidden=(8,))), data, iters=1, threads=0)


def test_data_file_errors_and_warnings(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.npy' is empty \(0 bytes\)"):
        load_data(empty)
    no_rows = tmp_path / "no_rows.npy"
    np.save(no_rows, np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"no_rows.npy' holds no data: its array has shape \(0, 2\)"):
        load_data(no_rows)
    truncated = tmp_path / "cut.npy"
    np.save(truncated, np.ones((50, 2)))
    truncated.write_bytes(truncated.read_bytes()[:70])
    with pytest.raises(ValueError, match="cut.npy' .truncated or not a .npy file"):
        load_data(truncated)
    blank = tmp_path / "blank.csv"
    blank.write_text("\n\n")
    with pytest.raises(ValueError, match="blank.csv' is empty"):
        load_data(blank)
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "empty.npy' is empty" in capsys.readouterr().err
    indexed = tmp_path / "pandas.csv"  # what DataFrame.to_csv writes by default
    rows = np.random.default_rng(0).normal(size=(30, 2))
    indexed.write_text(",x,y\n" + "".join(f"{i},{a},{b}\n" for i, (a, b) in enumerate(rows)))
    with pytest.warns(UserWarning) as caught:
        load_data(indexed)
    messages = [str(w.message) for w in caught]
    assert any("first row ',x,y' is not numeric and was taken as a header" in m for m in messages)
    assert any("column 0 holds consecutive integers 0, 1, ... 29, which looks like a row index" in m for m in messages)
    plain = tmp_path / "plain.csv"
    plain.write_text("".join(f"{a},{b}\n" for a, b in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_data(plain).shape == (30, 2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1e-5, 1e-5]", r"the file must be a JSON object of solver settings .* got a list"),
        ('{"recommended": []}', "'recommended' must be a JSON object"),
        ('{"colour": "red"}', r"has no solver settings \(got keys \['colour'\]\)"),
        ('{"method": "dopri5", "rtol": -1}', "rtol must be a positive finite float, got -1"),
        ("not json", "is not JSON"),
    ],
)
def test_solver_from_errors(content: str, message: str, tmp_path: Path) -> None:
    from cnf.cli import solver_from_file

    path = tmp_path / "solver.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        solver_from_file(str(path))


def test_evaluate_json_is_strict(tmp_path: Path, capsys, monkeypatch) -> None:
    assert main(["train", "--iters", "1", "--out", str(tmp_path), *SMALL]) == 0
    capsys.readouterr()
    monkeypatch.setattr("cnf.cli.timed_nll", lambda flow, data, *args, **kwargs: {"nll": float("inf"), "nfe": 1, "seconds": 0.1, "n": 5})
    assert main(["evaluate", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--data", "moons", "--json"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))["nll"] is None


def test_dtype_mismatch_is_refused_by_name_or_converted() -> None:
    flow = cnf.CNF(cnf.MLPField(2, hidden=(8,)))
    x = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the flow's parameters are torch.float32"):
        flow.log_prob(x)
    result = train(flow, sample_toy("moons", 100, seed=0).double(), iters=1, progress=False)  # converted
    assert result.step == 1


def test_large_batches_are_scored_in_chunks_with_and_without_gradients() -> None:
    torch.manual_seed(0)
    seen = []

    class Spy(torch.nn.Module):
        dim = 2

        def __init__(self) -> None:
            super().__init__()
            self.inner = cnf.MLPField(2, hidden=(8,)).double()

        def forward(self, t, x):
            seen.append(x.shape[0])
            return self.inner(t, x)

    flow = cnf.CNF(Spy(), solver=cnf.Solver(method="rk4", step_size=0.25))
    x = torch.randn(50, 2, dtype=torch.float64)
    whole = flow.log_prob(x)
    whole.sum().backward()
    grads = [p.grad.clone() for p in flow.parameters()]
    flow.zero_grad()
    flow.chunk_size, flow.grad_chunk_size = 20, 16
    seen.clear()
    chunked = flow.log_prob(x)
    chunked.sum().backward()
    assert max(seen) <= 16  # the forward and the recomputation in backward
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for p, g in zip(flow.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    seen.clear()
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), whole.detach(), rtol=1e-12, atol=1e-12)
    assert max(seen) <= 20 and flow.stats.nfe_forward == 3 * 16
    assert BY_OBJECTIVE["likelihood"]["batch_size"] < cnf.CNF.grad_chunk_size  # training is never chunked


def test_non_finite_gradients_stop_training_and_keep_the_checkpoint(tmp_path: Path) -> None:
    """A finite loss whose gradient is infinite in ONE parameter (the last one checked) stops the
    run with an error that says so, after the last good weights were written."""
    from cnf.training import TrainingError, _all_finite

    assert _all_finite([]) and _all_finite([torch.zeros(3), torch.ones(2, 2)])
    assert not _all_finite([torch.zeros(3), torch.tensor([[1.0, float("inf")]])])
    assert not _all_finite([torch.tensor([float("nan")]), torch.zeros(2)])
    huge = torch.full((4,), 3e38)  # finite, but its 2-norm overflows: the entries decide
    assert not torch.isfinite(torch.linalg.vector_norm(huge)) and _all_finite([torch.zeros(3), huge])
    torch.manual_seed(0)
    flow = cnf.CNF(cnf.MLPField(2, hidden=(8,)))
    last = list(flow.parameters())[-1]
    calls = {"n": 0}

    def poison_after_two_steps(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("inf") if calls["n"] > 2 else grad

    last.register_hook(poison_after_two_steps)
    with pytest.raises(TrainingError, match="step 3: gradients became NaN/Inf"):
        train(flow, load_data("moons", n=256, seed=0), iters=5, batch_size=32, out=tmp_path / "run", progress=False)
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
