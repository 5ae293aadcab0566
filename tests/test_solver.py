"""Solver settings: validation, step budgets, NFE counting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cnf


class StiffField(nn.Module):
    """A field so fast that dopri5 at a tight tolerance needs thousands of steps."""

    dim = 2

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(500.0 * x) * 50.0


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"rtol": 0.0}, "rtol must be a positive finite float, got 0.0"),
        ({"atol": -1e-5}, "atol must be a positive finite float, got -1e-05"),
        ({"rtol": float("nan")}, "rtol must be a positive finite float, got nan"),
        ({"method": "rk45"}, "unknown solver method 'rk45'"),
        ({"max_steps": 0}, "max_steps must be a positive int, got 0"),
        ({"method": "dopri5", "step_size": 0.1}, "step_size=0.1 only applies to fixed-step methods"),
        ({"method": "euler", "step_size": -0.1}, "step_size must be a positive finite float, got -0.1"),
        ({"adjoint_rtol": 0.0}, "adjoint_rtol must be a positive finite float"),
    ],
)
def test_bad_settings_raise_with_name_and_value(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        cnf.Solver(**kwargs)


def test_rtol_must_be_a_number() -> None:
    with pytest.raises(TypeError, match="rtol must be a positive float, got '1e-5'"):
        cnf.Solver(rtol="1e-5")  # type: ignore[arg-type]


def test_step_budget_raises_solver_error_naming_the_solve() -> None:
    flow = cnf.CNF(StiffField(), solver=cnf.Solver(rtol=1e-9, atol=1e-9, max_steps=20))
    with (
        pytest.raises(
            cnf.SolverError,
            match=r"scoring solve .* step budget max_steps=20 at t=.* after \d+ accepted steps",
        ),
        torch.no_grad(),
    ):
        flow.log_prob(torch.randn(4, 2))
    with pytest.raises(cnf.SolverError, match="sampling solve .* looser tolerance"), torch.no_grad():
        flow.sample(4)


def test_fixed_step_budget_is_checked_before_solving() -> None:
    flow = cnf.CNF(cnf.MLPField(2), solver=cnf.Solver(method="euler", step_size=0.001, max_steps=100))
    with pytest.raises(cnf.SolverError, match="needs 1000 steps, over the step budget max_steps=100"):
        flow.sample(2)


def test_fixed_step_counts_evaluations() -> None:
    flow = cnf.CNF(cnf.MLPField(2), solver=cnf.Solver(method="rk4", step_size=0.25))
    with torch.no_grad():
        flow.sample(3)
    assert flow.stats.steps == 4
    assert flow.stats.nfe_forward == 16  # 4 steps x 4 stages
    assert flow.stats.solve == "sampling"


def test_solver_round_trips_through_dict() -> None:
    solver = cnf.Solver(method="bosh3", rtol=1e-3, atol=1e-4, adjoint=True, max_steps=50)
    assert cnf.Solver.from_dict(solver.to_dict()) == solver
    assert solver.with_(rtol=1e-2).rtol == 1e-2


def test_adjoint_backward_step_budget_raises_solver_error() -> None:
    torch.manual_seed(0)
    field = cnf.MLPField(2, hidden=(16,))
    flow = cnf.CNF(
        field,
        solver=cnf.Solver(
            rtol=1e-3, atol=1e-3, adjoint=True, adjoint_rtol=1e-12, adjoint_atol=1e-12, max_steps=30
        ),
    )
    loss = -flow.log_prob(torch.randn(64, 2)).mean()
    with pytest.raises(
        cnf.SolverError, match="adjoint backward pass of the scoring solve exceeded its step budget"
    ):
        loss.backward()


def _linear_case(dtype: torch.dtype) -> tuple[cnf.CNF, torch.Tensor, torch.Tensor]:
    """A float ``dtype`` flow of u = A x, points, and their analytic log p1 in float64."""
    matrix = torch.tensor([[0.3, -1.1], [0.9, -0.4]], dtype=torch.float64)
    x = 2 * torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = x @ torch.linalg.matrix_exp(-matrix).T
    truth = -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi) - torch.trace(matrix)
    return cnf.CNF(cnf.fields.LinearField(matrix.to(dtype))), x.to(dtype), truth


def test_float32_dopri5_end_point_is_the_step_solution_not_the_interpolant() -> None:
    # torchdiffeq returns the end point through the dopri5 interpolant, whose float32
    # coefficients leave ~1e-5 nats of rounding on this case; the step's own solution does not.
    flow, x, truth = _linear_case(torch.float32)
    flow.solver = cnf.Solver("dopri5", rtol=1e-7, atol=1e-7)
    with torch.no_grad():
        error = (flow.log_prob(x).double() - truth).abs().mean().item()
    assert error < 2e-6, error


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_exact_end_point_agrees_with_the_interpolant_in_float64(method: str, monkeypatch) -> None:
    flow, x, truth = _linear_case(torch.float64)
    flow.solver = cnf.Solver(method, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        exact = flow.log_prob(x)
        monkeypatch.setattr(cnf.solver.CountedDynamics, "final_state", lambda self: None)
        interpolated = flow.log_prob(x)
    torch.testing.assert_close(exact, interpolated, rtol=0, atol=1e-9)
    torch.testing.assert_close(exact, truth, rtol=0, atol=1e-6)
    assert not torch.equal(exact, interpolated)  # the end point really was replaced
