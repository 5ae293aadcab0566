"""The CNF against analytic cases and independent computations (float64, fixed seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from scipy.integrate import trapezoid
from torch import nn

import cnf
from cnf.divergence import exact_divergence_batched, exact_divergence_loop

TIGHT = cnf.Solver(method="dopri5", rtol=1e-10, atol=1e-10)


def random_matrix(seed: int, dim: int = 2, scale: float = 0.6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, dim, dtype=torch.float64, generator=generator) * scale


def linear_reference_log_prob(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p1(x) = log N(expm(-A) x; 0, I) - tr(A) for the field u = A x."""
    inv = torch.as_tensor(scipy.linalg.expm(-A.numpy()))
    z = x @ inv.T
    dim = x.shape[1]
    return -0.5 * (z**2).sum(1) - 0.5 * dim * math.log(2 * math.pi) - torch.trace(A)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_linear_field_log_prob_matches_closed_form(dim: int) -> None:
    A = random_matrix(dim, dim)
    flow = cnf.CNF(cnf.LinearField(A), solver=TIGHT)
    x = torch.randn(50, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        log_prob = flow.log_prob(x)
    torch.testing.assert_close(log_prob, linear_reference_log_prob(A, x), atol=1e-8, rtol=0)


def test_linear_field_positions_are_matrix_exponential() -> None:
    A = random_matrix(3)
    flow = cnf.CNF(cnf.LinearField(A), solver=TIGHT)
    z = torch.randn(20, 2, dtype=torch.float64)
    expected = z @ torch.as_tensor(scipy.linalg.expm(A.numpy())).T
    torch.testing.assert_close(flow.inverse(z), expected, atol=1e-8, rtol=0)
    half = z @ torch.as_tensor(scipy.linalg.expm(0.5 * A.numpy())).T
    path = flow.trajectory(z, [0.0, 0.5, 1.0])
    assert path.shape == (3, 20, 2)
    torch.testing.assert_close(path[1], half, atol=1e-8, rtol=0)
    torch.testing.assert_close(path[2], expected, atol=1e-8, rtol=0)


def test_density_at_intermediate_time_matches_closed_form() -> None:
    A = random_matrix(4)
    flow = cnf.CNF(cnf.LinearField(A), solver=TIGHT)
    x = torch.randn(10, 2, dtype=torch.float64)
    with torch.no_grad():
        log_prob = flow.log_prob(x, t=0.3)
    torch.testing.assert_close(log_prob, linear_reference_log_prob(0.3 * A, x), atol=1e-8, rtol=0)


def test_gaussian_pushforward_matches_scipy() -> None:
    A = random_matrix(5)
    flow = cnf.CNF(cnf.LinearField(A), solver=TIGHT)
    expA = scipy.linalg.expm(A.numpy())
    cov = expA @ expA.T
    reference = scipy.stats.multivariate_normal(mean=np.zeros(2), cov=cov)
    x = torch.randn(30, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            flow.log_prob(x), torch.as_tensor(reference.logpdf(x.numpy())), atol=1e-8, rtol=0
        )
        flow.double()
        samples = flow.sample(200_000, generator=torch.Generator().manual_seed(0))
    assert samples.dtype == torch.float64
    # Sample covariance within a few standard errors of expm(A) expm(A)^T.
    np.testing.assert_allclose(np.cov(samples.numpy().T), cov, atol=0.03)
    np.testing.assert_allclose(samples.mean(0).numpy(), 0.0, atol=0.01)


def random_mlp_flow(seed: int, divergence: str = "exact", **solver: float) -> cnf.CNF:
    torch.manual_seed(seed)
    field = cnf.MLPField(2, hidden=(32, 32)).double()
    with torch.no_grad():  # make the random field visibly non-trivial
        for p in field.parameters():
            p.mul_(2.0)
    return cnf.CNF(field, divergence=divergence, solver=cnf.Solver(**{"rtol": 1e-7, "atol": 1e-7, **solver}))


def grid_mass(flow: nn.Module, half_width: float = 7.0, n: int = 241) -> float:
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        density = flow.log_prob(points).exp().reshape(n, n).numpy()
    return float(trapezoid(trapezoid(density, axis.numpy(), axis=1), axis.numpy()))


def test_random_cnf_density_integrates_to_one() -> None:
    flow = random_mlp_flow(0)
    assert abs(grid_mass(flow) - 1.0) < 1e-3


def test_inverse_round_trip() -> None:
    flow = random_mlp_flow(1, rtol=1e-9, atol=1e-9)
    x = torch.randn(100, 2, dtype=torch.float64)
    with torch.no_grad():
        z, delta = flow.transform(x)
        back = flow.inverse(z)
        x_again, log_prob = flow.inverse_and_log_prob(z)
    torch.testing.assert_close(back, x, atol=1e-7, rtol=0)
    torch.testing.assert_close(x_again, x, atol=1e-7, rtol=0)
    # Scoring x (1 -> 0) and pushing z forward (0 -> 1) give the same density.
    torch.testing.assert_close(log_prob, flow.base.log_prob(z) + delta, atol=1e-7, rtol=0)


@pytest.mark.parametrize("dim", [2, 5, 20])
def test_exact_divergence_is_jacobian_trace(dim: int) -> None:
    torch.manual_seed(dim)
    field = cnf.MLPField(dim, hidden=(16,)).double()
    x = torch.randn(7, dim, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.3, dtype=torch.float64)
    f = field(t, x)
    expected = torch.stack(
        [
            torch.trace(torch.autograd.functional.jacobian(lambda v: field(t, v[None])[0], x[i].detach()))
            for i in range(7)
        ]
    )
    torch.testing.assert_close(cnf.exact_divergence(f, x, False), expected)
    torch.testing.assert_close(exact_divergence_loop(f, x, False), expected)
    torch.testing.assert_close(exact_divergence_batched(f, x, False), expected)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_mean_within_four_standard_errors(noise: str) -> None:
    torch.manual_seed(0)
    field = cnf.MLPField(4, hidden=(16,)).double()
    x = torch.randn(1, 4, dtype=torch.float64).expand(20_000, 4).clone().requires_grad_(True)
    f = field(torch.tensor(0.5, dtype=torch.float64), x)
    exact = cnf.exact_divergence(f, x, False)[0]
    probe = cnf.divergence.draw_probe(x, noise, torch.Generator().manual_seed(3))
    estimates = cnf.hutchinson_divergence(f, x, probe, False)
    standard_error = estimates.std() / math.sqrt(estimates.numel())
    assert abs(estimates.mean() - exact) < 4 * standard_error
    assert standard_error > 0


def test_hutchinson_cnf_is_unbiased_for_linear_field() -> None:
    A = random_matrix(6)
    flow = cnf.CNF(cnf.LinearField(A), divergence="hutchinson", noise="rademacher", solver=TIGHT)
    x = torch.randn(1, 2, dtype=torch.float64).expand(4000, 2).contiguous()
    with torch.no_grad():
        estimates = flow.log_prob(x, generator=torch.Generator().manual_seed(0))
    exact = linear_reference_log_prob(A, x[:1])[0]
    standard_error = estimates.std() / math.sqrt(estimates.numel())
    assert abs(estimates.mean() - exact) < 4 * standard_error


def test_hutchinson_probe_is_reproducible_with_a_generator() -> None:
    flow = random_mlp_flow(2, divergence="hutchinson")
    x = torch.randn(10, 2, dtype=torch.float64)
    with torch.no_grad():
        a = flow.log_prob(x, generator=torch.Generator().manual_seed(5))
        b = flow.log_prob(x, generator=torch.Generator().manual_seed(5))
        c = flow.log_prob(x, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_adjoint_gradients_equal_direct_gradients() -> None:
    torch.manual_seed(0)
    field = cnf.MLPField(2, hidden=(16, 16)).double()
    x = torch.randn(32, 2, dtype=torch.float64)
    grads = {}
    for adjoint in (False, True):
        flow = cnf.CNF(field, solver=cnf.Solver(rtol=1e-10, atol=1e-10, adjoint=adjoint))
        loss = -flow.log_prob(x).mean()
        grads[adjoint] = torch.autograd.grad(loss, list(field.parameters()))
        if adjoint:
            assert flow.stats.nfe_backward > 0
        else:
            assert flow.stats.nfe_backward == 0
    for direct, adjoint in zip(grads[False], grads[True]):
        torch.testing.assert_close(adjoint, direct, atol=1e-7, rtol=1e-6)


def test_gradient_matches_finite_difference() -> None:
    A = random_matrix(7)
    field = cnf.LinearField(A)
    flow = cnf.CNF(field, solver=TIGHT)
    x = torch.randn(5, 2, dtype=torch.float64)
    (grad,) = torch.autograd.grad(flow.log_prob(x).sum(), [field.matrix])
    eps = 1e-6
    numeric = torch.zeros_like(A)
    for i in range(2):
        for j in range(2):
            dA = torch.zeros_like(A)
            dA[i, j] = eps
            plus = linear_reference_log_prob(A + dA, x).sum()
            minus = linear_reference_log_prob(A - dA, x).sum()
            numeric[i, j] = (plus - minus) / (2 * eps)
    torch.testing.assert_close(grad, numeric, atol=1e-5, rtol=1e-5)


def test_float32_and_no_grad_evaluation() -> None:
    torch.manual_seed(0)
    flow = cnf.CNF(cnf.MLPField(2, hidden=(16,)))
    x = torch.randn(8, 2)
    with torch.no_grad():
        log_prob = flow.log_prob(x)
    assert log_prob.dtype == torch.float32 and log_prob.shape == (8,)
    assert not log_prob.requires_grad
    assert flow.stats.nfe_forward > 0 and flow.stats.steps > 0
    assert flow.sample(4).dtype == torch.float32
    log_prob_grad = flow.log_prob(x)
    assert log_prob_grad.requires_grad
    torch.testing.assert_close(log_prob_grad.detach(), log_prob, atol=1e-5, rtol=1e-5)


def test_custom_field_and_torch_distribution_base() -> None:
    class Rotation(nn.Module):
        def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([-x[:, 1], x[:, 0]], 1)

    base = torch.distributions.MultivariateNormal(
        torch.zeros(2, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64)
    )
    flow = cnf.CNF(Rotation(), dim=2, base=base, solver=TIGHT)
    x = torch.randn(10, 2, dtype=torch.float64)
    # A rotation preserves an isotropic Gaussian: p1 == p0.
    torch.testing.assert_close(flow.log_prob(x), base.log_prob(x), atol=1e-8, rtol=0)
    assert flow.sample(5).shape == (5, 2)


def test_bad_inputs_name_argument_and_value() -> None:
    flow = cnf.CNF(cnf.MLPField(2, hidden=(8,)))
    with pytest.raises(ValueError, match=r"x must be a batch of shape \(n, dim\)"):
        flow.log_prob(torch.zeros(2))
    with pytest.raises(ValueError, match="x"):
        flow.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x"):
        flow.log_prob(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="NaN|nan|finite"):
        flow.log_prob(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="Inf|inf|finite"):
        flow.log_prob(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(TypeError, match="x"):
        flow.log_prob([[0.0, 1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown divergence 'trace'"):
        cnf.CNF(cnf.MLPField(2), divergence="trace")
    with pytest.raises(ValueError, match="unknown noise 'uniform'"):
        cnf.CNF(cnf.MLPField(2), divergence="hutchinson", noise="uniform")
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        flow.sample(0)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\], got 1.5"):
        flow.log_prob(torch.zeros(1, 2), t=1.5)
    with pytest.raises(ValueError, match=r"ts must lie in \[0, 1\]"):
        flow.trajectory(torch.zeros(1, 2), [0.0, 2.0])
    with pytest.raises(ValueError, match="dim must be a positive int"):
        cnf.MLPField(0)
    with pytest.raises(ValueError, match="unknown time_embedding 'film'"):
        cnf.MLPField(2, time_embedding="film")
    with pytest.raises(TypeError, match="base must have log_prob and sample"):
        cnf.CNF(cnf.MLPField(2), base=object())
