"""Training loop, checkpoints, resume and the NaN guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import cnf
from cnf.checkpoint import load_checkpoint, save_checkpoint
from cnf.data import sample_toy
from cnf.training import TrainingError, evaluate_nll, train


def small_flow(seed: int = 0) -> cnf.CNF:
    torch.manual_seed(seed)
    return cnf.CNF(cnf.MLPField(2, hidden=(16, 16)), solver=cnf.Solver(rtol=1e-3, atol=1e-3))


@pytest.fixture(scope="module")
def moons() -> tuple[torch.Tensor, torch.Tensor]:
    return sample_toy("moons", 2000, seed=0), sample_toy("moons", 500, seed=1)


def test_short_training_lowers_validation_nll(moons, tmp_path: Path) -> None:
    data, val = moons
    flow = small_flow()
    before = evaluate_nll(flow, val)
    result = train(flow, data, val, iters=60, lr=1e-2, batch_size=256, val_every=30, out=tmp_path)
    assert result.step == 60 and result.stopped_by == "iters"
    assert result.val_nll < before - 0.3
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 61))
    assert {"loss", "seconds", "nfe_forward"} <= set(log[0])
    assert "val_nll" in log[29]


def test_checkpoint_round_trip_gives_identical_log_prob(moons, tmp_path: Path) -> None:
    data, val = moons
    flow = small_flow()
    train(flow, data, iters=5, batch_size=64, out=tmp_path)
    restored, payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["step"] == 5
    with torch.no_grad():
        torch.testing.assert_close(restored.log_prob(val[:50]), flow.log_prob(val[:50]), rtol=0, atol=0)
    assert restored.solver == flow.solver


def test_resume_continues_exactly_where_it_stopped(moons, tmp_path: Path) -> None:
    data, _ = moons
    straight = small_flow()
    train(straight, data, iters=8, batch_size=64, out=tmp_path / "straight")
    first = small_flow()
    train(first, data, iters=4, batch_size=64, out=tmp_path / "split")
    second = small_flow(seed=123)  # different init: everything must come from the checkpoint
    result = train(
        second,
        data,
        iters=8,
        batch_size=64,
        out=tmp_path / "split",
        resume=tmp_path / "split" / "checkpoint.pt",
    )
    assert result.step == 8 and len(result.history) == 8
    for a, b in zip(straight.parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_time_limit_stops_training_and_checkpoints(moons, tmp_path: Path) -> None:
    data, _ = moons
    result = train(small_flow(), data, iters=10_000, time_limit=0.5, batch_size=64, out=tmp_path)
    assert result.stopped_by == "time_limit"
    assert 0 < result.step < 10_000
    _, payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["step"] == result.step


class ExplodingField(nn.Module):
    """Finite for a few steps, then NaN: simulates a diverging run."""

    dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.calls = 0

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.linear(x) * 0.1
        return out * float("nan") if self.calls > 40 else out


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(moons, tmp_path: Path) -> None:
    data, _ = moons
    flow = cnf.CNF(ExplodingField(), solver=cnf.Solver(method="rk4", step_size=0.5))
    with pytest.raises(
        TrainingError, match=r"training stopped at step \d+: loss became nan.*last good checkpoint"
    ):
        train(flow, data, iters=100, batch_size=16, checkpoint_every=1, out=tmp_path)
    good, payload = load_checkpoint(tmp_path / "checkpoint.pt", flow=cnf.CNF(ExplodingField()))
    assert payload["step"] >= 1
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_bad_training_inputs(moons) -> None:
    data, _ = moons
    with pytest.raises(ValueError, match="lr must be a positive float, got -1"):
        train(small_flow(), data, lr=-1)
    with pytest.raises(ValueError, match="iters must be a positive int, got 0"):
        train(small_flow(), data, iters=0)
    with pytest.raises(ValueError, match="unknown objective 'score_matching'"):
        train(small_flow(), data, objective="score_matching")
    with pytest.raises(ValueError, match="data must have 2 columns"):
        train(small_flow(), torch.zeros(10, 3))


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint '.*nope.pt' does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint '.*corrupt.pt' is corrupt"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(ValueError, match="is not a cnf checkpoint"):
        load_checkpoint(foreign)
    custom = tmp_path / "custom.pt"
    save_checkpoint(custom, cnf.CNF(ExplodingField()))
    with pytest.raises(ValueError, match="custom velocity field .* load_checkpoint\\(path, flow=my_flow\\)"):
        load_checkpoint(custom)


def test_cosine_schedule_decays_by_steps_or_wall_clock() -> None:
    from cnf.training import TrainSettings

    settings = TrainSettings(iters=100, lr=1e-2, lr_schedule="cosine", time_limit=10.0)
    assert settings.learning_rate(0, 0.0) == pytest.approx(1e-2)
    assert settings.learning_rate(50, 0.0) == pytest.approx(0.5 * (1e-2 + 5e-4))
    assert settings.learning_rate(10, 5.0) == pytest.approx(0.5 * (1e-2 + 5e-4))  # time is further along
    assert settings.learning_rate(100, 0.0) == pytest.approx(5e-4)
    assert TrainSettings(lr=1e-2).learning_rate(99, 1e9) == 1e-2
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        TrainSettings(lr_schedule="step")


def test_training_log_records_the_scheduled_learning_rate(moons) -> None:
    data, _ = moons
    result = train(small_flow(), data, iters=4, batch_size=32, lr=1e-2, lr_schedule="cosine")
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] == pytest.approx(1e-2) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-2


def test_time_limited_run_logs_its_final_validation(moons, tmp_path: Path) -> None:
    from cnf.plots import read_train_log

    data, val = moons
    result = train(
        small_flow(), data, val, iters=10_000, time_limit=0.5, batch_size=64, val_every=10_000, out=tmp_path
    )
    records = read_train_log(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in records] == list(range(1, result.step + 1))
    assert records[-1]["val_nll"] == pytest.approx(result.val_nll)
