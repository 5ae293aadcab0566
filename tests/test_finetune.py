"""The maximum-likelihood phase after flow matching (TrainSettings.likelihood_finetune)."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

import cnf
from cnf.checkpoint import read_checkpoint
from cnf.data import sample_toy
from cnf.recipes import TABLE_LIKELIHOOD_FINETUNE, recipe
from cnf.training import DEFAULT_FINETUNE_LR, FINETUNE_PHASE, TrainingInterrupted, TrainSettings, train


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return sample_toy("moons", 512, seed=0).double()


def small_flow(signal_at: int | None = None) -> cnf.CNF:
    """A small CNF (the same initial weights each call); ``signal_at``: its field sends SIGINT then."""
    torch.manual_seed(0)
    field = cnf.MLPField(2, hidden=(8,)).double()
    field = field if signal_at is None else SignalAt(field, signal_at)
    return cnf.CNF(field, solver=cnf.Solver(method="rk4", step_size=0.25))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"likelihood_finetune": 0.1}, "likelihood_finetune=0.1 follows flow matching .* 'likelihood' is not"),
        ({"objective": "flow_matching", "likelihood_finetune": 1.0}, r"likelihood_finetune must .* \[0, 1\), got 1.0"),
        ({"objective": "flow_matching", "likelihood_finetune": -0.1}, "likelihood_finetune must .* got -0.1"),
        ({"objective": "flow_matching", "likelihood_finetune": True}, "likelihood_finetune must .* got True"),
        ({"objective": "flow_matching", "finetune_lr": 0.0}, "finetune_lr must be a positive float, got 0.0"),
        ({"objective": "flow_matching", "finetune_lr": math.nan}, "finetune_lr must be a positive float, got nan"),
    ],
)
def test_bad_finetune_settings_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainSettings(**options)


def test_each_phase_anneals_over_its_own_share_of_the_run() -> None:
    settings = TrainSettings(
        objective="ot_flow_matching", iters=100, lr=1e-2, lr_schedule="cosine", likelihood_finetune=0.25, finetune_lr=1e-3
    )
    assert settings.learning_rate(0, 0.0) == pytest.approx(1e-2)
    assert settings.learning_rate(37.5, 0.0) == pytest.approx(1e-2 / 20 + (1e-2 - 1e-2 / 20) / 2)  # half of 75 steps
    assert settings.learning_rate(75, 0.0) == pytest.approx(1e-3)  # the likelihood phase starts afresh
    assert settings.learning_rate(100, 0.0) == pytest.approx(1e-3 / 20)
    assert [settings.finetuning(s, 0.0) for s in (0, 74, 75, 99)] == [False, False, True, True]
    timed = TrainSettings(objective="flow_matching", iters=None, time_limit=60.0, likelihood_finetune=0.1)
    assert not timed.finetuning(10**6, 53.9) and timed.finetuning(0, 54.0)  # by time when time-limited
    constant = TrainSettings(objective="flow_matching", iters=10, likelihood_finetune=0.5, finetune_lr=1e-4)
    assert constant.learning_rate(4, 0.0) == constant.lr and constant.learning_rate(5, 0.0) == 1e-4
    assert "then maximum likelihood for the last 25% at lr 0.001" in settings.describe()


def test_the_likelihood_phase_starts_from_the_flow_matching_result(data: torch.Tensor, tmp_path: Path) -> None:
    """With a vanishing fine-tuning lr the run ends at the EMA weights of the same run without the
    phase (whose schedule spans the flow-matching share): the switch takes the averaged weights."""
    common = dict(objective="flow_matching", ema_decay=0.9, batch_size=64, lr=1e-2, lr_schedule="cosine", progress=False)
    reference = small_flow()
    train(reference, data, iters=30, **common)
    tuned = small_flow()
    result = train(tuned, data, data[:128], iters=40, likelihood_finetune=0.25, finetune_lr=1e-12, val_every=100,
                   out=tmp_path, **common)  # fmt: skip
    for a, b in zip(reference.parameters(), tuned.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    phases = [r.get("objective") for r in result.history]
    assert phases == [None] * 30 + ["likelihood"] * 10
    assert all(r["nfe_forward"] == 16 for r in result.history[30:])  # a likelihood step solves (RK4, 4 steps)
    payload = read_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["phase"] == FINETUNE_PHASE and "ema" not in payload  # no moving average after the switch
    # the flow-matching result was validated at the switch (step 30): best.pt may keep it
    assert "val_nll" in result.history[29] and result.best_step in (30, 40)
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "val_nll" in r] == [30, 40]


def test_the_likelihood_phase_lowers_the_training_nll(data: torch.Tensor) -> None:
    """A few maximum-likelihood steps after a little flow matching lower the NLL they optimise."""
    flow = small_flow()
    result = train(flow, data, iters=60, objective="flow_matching", batch_size=256, lr=1e-2, likelihood_finetune=0.5,
                   finetune_lr=1e-2, progress=False)  # fmt: skip
    losses = [r["loss"] for r in result.history[30:]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02


class SignalAt(torch.nn.Module):
    """A field that sends SIGINT to this process at its n-th evaluation."""

    def __init__(self, field: torch.nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls, self.dim = field, at, 0, field.dim

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner(t, x)


def test_a_run_interrupted_in_the_likelihood_phase_resumes_exactly(data: torch.Tensor, tmp_path: Path) -> None:
    common = dict(objective="flow_matching", ema_decay=0.9, batch_size=32, iters=12, likelihood_finetune=0.25,
                  lr_schedule="cosine", checkpoint_every=100, progress=False)  # fmt: skip
    # 9 flow-matching steps (one evaluation each), then likelihood steps of 16: inside step 11's solve
    flow = small_flow(signal_at=9 + 16 + 3)
    with pytest.raises(TrainingInterrupted, match="after step 10"):
        train(flow, data, out=tmp_path, **common)
    payload = read_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["step"] == 10 and payload["phase"] == FINETUNE_PHASE
    flow.field.at = -1
    result = train(flow, data, out=tmp_path, resume=tmp_path / "checkpoint.pt", progress=False)
    assert result.step == 12 and [r.get("objective") for r in result.history][8:] == [None] + ["likelihood"] * 3
    reference = small_flow(signal_at=-1)
    train(reference, data, **common)
    for a, b in zip(reference.parameters(), flow.parameters()):
        assert torch.equal(a, b)


def test_the_recipe_fine_tunes_large_continuous_tables_with_a_time_limit_only() -> None:
    def finetune(**options) -> float:
        return recipe("ot_flow_matching", 7, "tabular", **options).get("likelihood_finetune", 0.0)

    assert finetune(time_limit=600.0, n_train=80_000) == TABLE_LIKELIHOOD_FINETUNE
    assert finetune(n_train=80_000) == 0.0  # by steps the phase would cost a solve per step for hours
    assert finetune(time_limit=30.0, n_train=142) == 0.0  # small tables: not measured
    assert finetune(time_limit=600.0, n_train=80_000, dequantized=True) == 0.0  # digits: not measured
    assert recipe("ot_flow_matching", 2, "toy", time_limit=60.0).get("likelihood_finetune", 0.0) == 0.0
    assert "likelihood_finetune" not in recipe("likelihood", 7, "tabular", time_limit=600.0, n_train=80_000)
    assert DEFAULT_FINETUNE_LR == 3e-4


class Linear(torch.nn.Module):
    """u(x, t) = A x: divergence tr(A); a Rademacher probe's estimate is off by sum_{i != j} A_ij e_i e_j."""

    dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([[0.3, 0.8], [-0.5, -0.1]], dtype=torch.float64))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T


def test_the_phase_can_use_hutchinson_and_gives_the_flow_back_its_divergence() -> None:
    from cnf.losses import nll_loss, nll_loss_with_divergence

    flow = cnf.CNF(Linear(), divergence="exact", solver=cnf.Solver(method="rk4", step_size=0.05))
    x = torch.randn(4096, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = nll_loss(flow, x)
    torch.manual_seed(1)
    one = nll_loss_with_divergence(flow, x[:1], divergence="hutchinson")
    assert flow.divergence == "exact" and flow.noise == "gaussian"  # restored
    assert abs(one.item() - nll_loss(flow, x[:1]).item()) > 0.1  # the probe's off-diagonal terms: not exact
    many = nll_loss_with_divergence(flow, x, divergence="hutchinson")
    assert many.item() == pytest.approx(exact.item(), abs=0.05)  # unbiased: the batch mean averages them out
    many.backward()
    assert flow.field.a.grad is not None and torch.isfinite(flow.field.a.grad).all()
    assert nll_loss_with_divergence(flow, x, divergence="exact").item() == pytest.approx(exact.item(), rel=1e-12)
    with pytest.raises(ValueError, match="unknown divergence 'trace'"):
        nll_loss_with_divergence(flow, x, divergence="trace")
    with pytest.raises(ValueError, match="unknown finetune_divergence 'trace'"):
        TrainSettings(objective="flow_matching", finetune_divergence="trace")
