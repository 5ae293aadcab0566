"""Flow matching and OT flow matching: the loss, the coupling, training and the CLI (float64)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import cnf
from cnf.cli import main
from cnf.data import sample_toy
from cnf.fields import time_column
from cnf.losses import conditional_path, flow_matching_loss, make_objective, ot_pairing
from cnf.pairings import assignment_threads

MU = torch.tensor([2.0, -1.0], dtype=torch.float64)
SCALE = 0.5
SIGMA_MIN = 0.01


class GaussianMarginalField(nn.Module):
    """The exact marginal field of the linear path from N(0, I) to N(mu, s^2 I).

    x_t = a_t x0 + t x1 with a_t = 1 - (1 - sigma_min) t is Gaussian with mean t mu and variance
    v_t = a_t^2 + t^2 s^2 per coordinate, and u = x1 - (1 - sigma_min) x0 is jointly Gaussian
    with it, so E[u | x_t] = mu + (t s^2 - (1 - sigma_min) a_t) / v_t (x_t - t mu): linear in x.
    ``shift`` and ``gain`` scale its two terms; (1, 1) is the exact field.
    """

    def __init__(self, shift: float = 1.0, gain: float = 1.0) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(shift, dtype=torch.float64))
        self.gain = nn.Parameter(torch.tensor(gain, dtype=torch.float64))
        self.dim = 2

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        tt = time_column(t, x)
        a = 1 - (1 - SIGMA_MIN) * tt
        coefficient = (tt * SCALE**2 - (1 - SIGMA_MIN) * a) / (a**2 + tt**2 * SCALE**2)
        return self.shift * MU + self.gain * coefficient * (x - tt * MU)


def gaussian_data(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return MU + SCALE * torch.randn(n, 2, dtype=torch.float64, generator=generator)


def fm_gradients(
    shift: float, gain: float, batches: int = 16, n: int = 20_000, time_exponent: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over independent batches of the FM-loss gradient."""
    flow = cnf.CNF(GaussianMarginalField(shift, gain)).double()
    grads = []
    for b in range(batches):
        flow.zero_grad()
        loss = flow_matching_loss(
            flow,
            gaussian_data(n, b),
            sigma_min=SIGMA_MIN,
            time_exponent=time_exponent,
            generator=torch.Generator().manual_seed(100 + b),
        )
        loss.backward()
        grads.append(torch.stack([flow.field.shift.grad, flow.field.gain.grad]))
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / math.sqrt(batches)


@pytest.mark.parametrize("time_exponent", [1.0, 2.0])
def test_flow_matching_gradient_vanishes_at_the_exact_marginal_field(time_exponent: float) -> None:
    # Any draw of the training times has the same minimiser: the marginal field at every t.
    mean, stderr = fm_gradients(1.0, 1.0, time_exponent=time_exponent)
    assert (mean.abs() < 4 * stderr).all(), (mean, stderr)
    # A perturbed field is clearly not a stationary point: the test can tell the difference.
    mean, stderr = fm_gradients(1.1, 1.3, time_exponent=time_exponent)
    assert (mean.abs() > 10 * stderr).all(), (mean, stderr)


class TimeRecorder(nn.Module):
    """A zero field that keeps the times it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.dim = 2
        self.times: list[torch.Tensor] = []

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.times.append(t.detach().clone())
        return self.weight * x


def test_time_exponent_draws_training_times_from_beta_one_over_k() -> None:
    from scipy import stats

    uniform = TimeRecorder()
    flow_matching_loss(cnf.CNF(uniform), torch.zeros(20_000, 2), generator=torch.Generator().manual_seed(0))
    skewed = TimeRecorder()
    flow_matching_loss(
        cnf.CNF(skewed), torch.zeros(20_000, 2), time_exponent=2.0, generator=torch.Generator().manual_seed(0)
    )
    t1, t2 = uniform.times[0].double().numpy(), skewed.times[0].double().numpy()
    # k = 1 is the uniform draw; k = 2 is the same u mapped to 1 - (1 - u)^2, i.e. Beta(1, 1/2).
    assert stats.kstest(t1, "uniform").pvalue > 1e-3
    assert abs(t2 - (1 - (1 - t1) ** 2)).max() < 1e-6
    assert stats.kstest(t2, stats.beta(1, 0.5).cdf).pvalue > 1e-3
    assert stats.kstest(t2, "uniform").pvalue < 1e-12  # the test can tell the two draws apart
    assert t2.mean() > 0.6  # E[t] = 2/3 under Beta(1, 1/2), 1/2 uniform


def test_time_exponent_is_checked_and_only_for_flow_matching() -> None:
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"time_exponent must be a positive float, got {bad!r}"):
            make_objective("flow_matching", time_exponent=bad)
    with pytest.raises(TypeError, match="time_exponent must be a positive float, got True"):
        make_objective("flow_matching", time_exponent=True)
    with pytest.raises(ValueError, match="time_exponent=2.0 applies only to flow matching.*'likelihood'"):
        cnf.TrainSettings(objective="likelihood", time_exponent=2.0)
    assert cnf.TrainSettings(objective="ot_flow_matching", time_exponent=2.0).time_exponent == 2.0
    with pytest.raises(SystemExit):
        main(["train", "--objective", "flow_matching", "--time-exponent", "0", "--iters", "1"])


def test_conditional_path_endpoints_and_velocity() -> None:
    x0 = torch.randn(5, 2, dtype=torch.float64)
    x1 = torch.randn(5, 2, dtype=torch.float64)
    zeros, ones = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    start, _ = conditional_path(x0, x1, zeros, 0.1)
    end, velocity = conditional_path(x0, x1, ones, 0.1)
    torch.testing.assert_close(start, x0)
    torch.testing.assert_close(end, x1 + 0.1 * x0)
    # The velocity is the time derivative of the path.
    t, h = torch.full((5,), 0.3, dtype=torch.float64), 1e-6
    ahead, _ = conditional_path(x0, x1, t + h, 0.1)
    behind, _ = conditional_path(x0, x1, t - h, 0.1)
    torch.testing.assert_close((ahead - behind) / (2 * h), velocity, atol=1e-8, rtol=0)


def test_ot_pairing_is_optimal_and_beats_random_pairing() -> None:
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, dtype=torch.float64, generator=generator)
    x1 = torch.randn(6, 2, dtype=torch.float64, generator=generator) + 1.0
    perm = ot_pairing(x0, x1)
    assert sorted(perm.tolist()) == list(range(6))
    cost = ((x0[perm] - x1) ** 2).sum()
    brute = min(((x0[list(p)] - x1) ** 2).sum() for p in itertools.permutations(range(6)))
    torch.testing.assert_close(cost, brute)

    x0 = torch.randn(256, 2, dtype=torch.float64, generator=generator)
    x1 = sample_toy("8gaussians", 256, seed=1, dtype=torch.float64)
    paired = ((x0[ot_pairing(x0, x1)] - x1) ** 2).sum(1).mean()
    independent = ((x0 - x1) ** 2).sum(1).mean()
    assert paired < 0.5 * independent


def test_ot_batch_size_solves_each_group_of_rows_alone() -> None:
    """``ot_batch_size`` m: rows i and their partners stay in the same group of m consecutive rows
    (the last group smaller), each group paired at its own minimum, found here by brute force."""
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(11, 2, dtype=torch.float64, generator=generator)
    x1 = torch.randn(11, 2, dtype=torch.float64, generator=generator) + 0.5
    perm = ot_pairing(x0, x1, ot_batch_size=4)
    assert sorted(perm.tolist()) == list(range(11))
    for start in (0, 4, 8):
        rows = list(range(start, min(start + 4, 11)))
        assert sorted(perm[rows].tolist()) == rows
        cost = ((x0[perm[rows]] - x1[rows]) ** 2).sum()
        brute = min(((x0[list(p)] - x1[rows]) ** 2).sum() for p in itertools.permutations(rows))
        torch.testing.assert_close(cost, brute)
    whole = ((x0[ot_pairing(x0, x1)] - x1) ** 2).sum()
    assert whole < ((x0[perm] - x1) ** 2).sum()  # the groups' coupling is not the whole batch's
    assert torch.equal(ot_pairing(x0, x1, ot_batch_size=11), ot_pairing(x0, x1))
    assert torch.equal(ot_pairing(x0, x1, ot_batch_size=50), ot_pairing(x0, x1))
    assert torch.equal(ot_pairing(x0, x1, ot_batch_size=1), torch.arange(11))
    for m in (None, 4):  # no rows, no pairs (as the whole-batch solver always gave)
        assert ot_pairing(x0[:0], x1[:0], ot_batch_size=m).shape == (0,)
    from cnf.distributed import global_ot_pairing  # without a process group: this process's pairing

    assert torch.equal(global_ot_pairing(x0, x1, ot_batch_size=4), x0[perm])


def test_ot_batch_size_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="ot_batch_size must be a positive int or None .* got 0"):
        ot_pairing(torch.zeros(3, 2), torch.zeros(3, 2), ot_batch_size=0)
    with pytest.raises(ValueError, match="ot_batch_size must be a positive int or None .* got 2.5"):
        make_objective("ot_flow_matching", ot_batch_size=2.5)
    with pytest.raises(ValueError, match="ot_batch_size=64 applies only to objective='ot_flow_matching'"):
        make_objective("flow_matching", ot_batch_size=64)
    with pytest.raises(ValueError, match="ot_batch_size=64 applies only to objective='ot_flow_matching'"):
        cnf.TrainSettings(objective="likelihood", ot_batch_size=64)
    flow = cnf.CNF(cnf.MLPField(2, hidden=(8,)))
    with pytest.raises(ValueError, match="ot_batch_size=8 applies only to coupling='ot'"):
        flow_matching_loss(flow, torch.zeros(16, 2), ot_batch_size=8)
    assert "OT pairing within groups of 64" in cnf.TrainSettings(objective="ot_flow_matching", ot_batch_size=64).describe()


def test_ot_pairing_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"same shape, got \(3, 2\) and \(4, 2\)"):
        ot_pairing(torch.zeros(3, 2), torch.zeros(4, 2))


def test_flow_matching_errors_name_the_argument() -> None:
    flow = cnf.CNF(cnf.MLPField(2, hidden=(8,)))
    with pytest.raises(ValueError, match="sigma_min must be a float in \\[0, 1\\), got 1.5"):
        make_objective("flow_matching", sigma_min=1.5)
    with pytest.raises(ValueError, match="apply only to objective='likelihood'"):
        make_objective("ot_flow_matching", kinetic_weight=0.01)
    with pytest.raises(ValueError, match="kinetic_weight must be a non-negative finite float, got -1.0"):
        cnf.TrainSettings(kinetic_weight=-1.0)
    with pytest.raises(TypeError, match="flow matching needs a CNF"):
        flow_matching_loss(cnf.PlanarFlow(2, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="unknown coupling 'sinkhorn'"):
        flow_matching_loss(flow, torch.zeros(4, 2), coupling="sinkhorn")


@pytest.mark.parametrize("objective", ["flow_matching", "ot_flow_matching"])
def test_flow_matching_training_fits_a_gaussian(objective: str) -> None:
    torch.manual_seed(0)
    flow = cnf.CNF(cnf.MLPField(2, hidden=(32, 32)), solver=cnf.Solver(rtol=1e-4, atol=1e-4)).double()
    data, test = gaussian_data(4000, 0), gaussian_data(1000, 1)
    before = cnf.evaluate_nll(flow, test)
    result = cnf.train(flow, data, iters=150, lr=1e-2, batch_size=256, objective=objective, progress=False)
    after = cnf.evaluate_nll(flow, test)
    true_nll = 1 + math.log(2 * math.pi * SCALE**2)  # entropy of N(mu, s^2 I) in 2-D
    assert result.history[-1]["nfe_forward"] == 1  # one field evaluation per step, no solve
    assert before > true_nll + 2
    assert after < true_nll + 0.15, (after, true_nll)


def test_cli_trains_by_ot_flow_matching(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "otfm"
    args = ["train", "--data", "moons", "--iters", "5", "--n-train", "500", "--hidden", "8"]
    args += ["--rtol", "1e-3", "--atol", "1e-3", "--out", str(out), "--objective", "ot_flow_matching"]
    assert main(args) == 0
    solvers = assignment_threads("auto")  # one per core: the line says so where there are several
    printed = capsys.readouterr().out
    assert (f"OT assignments solved ahead in {solvers} threads" in printed) == (solvers > 1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and math.isfinite(summary["test_nll"])
    payload = torch.load(out / "checkpoint.pt", weights_only=False)
    assert payload["settings"]["objective"] == "ot_flow_matching"
    assert main([*args, "--threads", "1", "--overwrite"]) == 0  # an explicit count caps the solvers
    assert "OT assignments" not in capsys.readouterr().out
    bad = ["train", "--objective", "flow_matching", "--kinetic-weight", "0.01", "--out", str(tmp_path / "x")]
    assert main(bad) == 2
    assert "apply only to objective='likelihood'" in capsys.readouterr().err
