"""RNODE regulariser states against independent computations on a linear field (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch

import cnf
from cnf.data import sample_toy
from cnf.flow import AugmentedDynamics
from cnf.losses import make_objective
from cnf.regularizers import rnode_penalty, tracked_norm

TIGHT = cnf.Solver(method="dopri5", rtol=1e-10, atol=1e-10)


def matrix(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.7 * torch.randn(2, 2, dtype=torch.float64, generator=generator)


def test_kinetic_and_jacobian_states_match_quadrature_and_closed_form() -> None:
    A = matrix()
    flow = cnf.CNF(cnf.LinearField(A), solver=TIGHT)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, dtype=torch.float64, generator=generator)
    eps = torch.randn(4, 2, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        log_prob, kinetic, jacobian = flow.regularized_log_prob(x, probe=eps)
        torch.testing.assert_close(log_prob, flow.log_prob(x), atol=1e-9, rtol=0)
    a = A.numpy()
    for i in range(4):
        # Scoring starts at x(1) = x, so x(t) = expm(A (t - 1)) x and u = A x(t).
        speed2 = lambda t, i=i: float(np.sum((a @ scipy.linalg.expm(a * (t - 1)) @ x[i].numpy()) ** 2))
        expected, _ = scipy.integrate.quad(speed2, 0.0, 1.0, epsabs=1e-12, epsrel=1e-12)
        assert kinetic[i].item() == pytest.approx(expected, rel=1e-8)
    # du/dx = A at all times: the integral of ||eps^T A||^2 over [0, 1] is ||A^T eps||^2.
    torch.testing.assert_close(jacobian, ((eps @ A) ** 2).sum(1), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_jacobian_state_is_unbiased_for_the_frobenius_norm(divergence: str) -> None:
    A = matrix(2)
    flow = cnf.CNF(cnf.LinearField(A), divergence=divergence, solver=cnf.Solver(rtol=1e-8, atol=1e-8))
    x = torch.randn(40_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, _, jacobian = flow.regularized_log_prob(x, generator=torch.Generator().manual_seed(4))
    stderr = jacobian.std() / jacobian.numel() ** 0.5
    assert abs(jacobian.mean() - (A**2).sum()) < 4 * stderr


def test_hutchinson_regularized_solve_uses_the_same_probe_for_the_divergence() -> None:
    A = matrix(5)
    flow = cnf.CNF(cnf.LinearField(A), divergence="hutchinson", solver=TIGHT)
    x = torch.randn(6, 2, dtype=torch.float64)
    eps = torch.randn(6, 2, dtype=torch.float64)
    with torch.no_grad():
        log_prob, _, jacobian = flow.regularized_log_prob(x, probe=eps)
        torch.testing.assert_close(log_prob, flow.log_prob(x, probe=eps), atol=1e-9, rtol=0)
    torch.testing.assert_close(jacobian, ((eps @ A) ** 2).sum(1), atol=1e-9, rtol=1e-9)


def test_regulariser_states_take_no_part_in_step_size_control() -> None:
    torch.manual_seed(0)
    flow = cnf.CNF(cnf.MLPField(2, hidden=(16, 16)), solver=cnf.Solver(rtol=1e-6, atol=1e-6)).double()
    x = 2 * torch.randn(64, 2, dtype=torch.float64)
    with torch.no_grad():
        plain = flow.log_prob(x)
        plain_nfe = flow.stats.nfe_forward
        regularized, kinetic, jacobian = flow.regularized_log_prob(x)
    assert flow.stats.nfe_forward == plain_nfe
    # The same steps; log p to rounding (log_prob scores through the forward mode's logistic
    # form, the regularised solve through the field's own forward and autograd).
    torch.testing.assert_close(regularized, plain, atol=1e-12, rtol=0)
    assert (kinetic > 0).all() and (jacobian > 0).all()
    state = (torch.ones(3), torch.full((3,), 2.0), torch.full((3,), 1e6))
    assert tracked_norm(state).item() == 2.0


def test_rnode_loss_uses_rnode_scaling_and_backpropagates() -> None:
    torch.manual_seed(0)
    flow = cnf.CNF(cnf.MLPField(2, hidden=(8,)), solver=cnf.Solver(rtol=1e-7, atol=1e-7)).double()
    batch = torch.randn(32, 2, dtype=torch.float64)
    loss = make_objective("likelihood", kinetic_weight=0.5)(flow, batch)
    log_prob, kinetic, _ = flow.regularized_log_prob(batch)
    expected = -log_prob.mean() + 0.5 * kinetic.mean() / (2 * 2)  # lambda_K * 0.5 * mean_d(u^2)
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=0)
    loss = make_objective("likelihood", kinetic_weight=0.01, jacobian_weight=0.01)(flow, batch)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow.parameters())
    penalty = rnode_penalty(torch.tensor([4.0]), torch.tensor([6.0]), 2, 1.0, 1.0)
    assert penalty.item() == pytest.approx(4.0 / 4 + 6.0 / 2)


def test_rnode_errors_name_the_argument() -> None:
    field = cnf.MLPField(2, hidden=(4,))
    with pytest.raises(ValueError, match="regularization=True needs a probe"):
        AugmentedDynamics(field, "exact", None, regularization=True)
    with pytest.raises(TypeError, match="need a CNF .* got PlanarFlow"):
        make_objective("likelihood", jacobian_weight=0.1)(cnf.PlanarFlow(2, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="jacobian_weight must be a non-negative finite float, got nan"):
        cnf.TrainSettings(jacobian_weight=float("nan"))
    flow = cnf.CNF(field)
    with pytest.raises(ValueError, match=r"probe must have the shape of x \(3, 2\)"):
        flow.regularized_log_prob(torch.zeros(3, 2), probe=torch.zeros(2, 2))


def test_training_with_rnode_runs_and_logs(tmp_path) -> None:
    torch.manual_seed(0)
    flow = cnf.CNF(cnf.MLPField(2, hidden=(16, 16)), solver=cnf.Solver(rtol=1e-3, atol=1e-3))
    data = sample_toy("moons", 1000, seed=0)
    result = cnf.train(
        flow,
        data,
        iters=5,
        batch_size=128,
        lr=1e-2,
        kinetic_weight=0.01,
        jacobian_weight=0.01,
        progress=False,
    )
    assert result.step == 5 and all(np.isfinite(r["loss"]) for r in result.history)
