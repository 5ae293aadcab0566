"""Reverse KL, effective sample size, log Z by quadrature and the variational fit (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.integrate import trapezoid

import cnf
from cnf.data import ENERGIES, target_log_density
from cnf.variational import (
    effective_sample_size,
    fit_variational,
    log_normalizer,
    reverse_kl,
    variational_report,
)

TIGHT = cnf.Solver(method="dopri5", rtol=1e-9, atol=1e-9)
MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.8, 0.3], [0.3, 1.5]], dtype=torch.float64)
LOG_Z = 1.7  # the target is exp(LOG_Z) N(MEAN, COV): unnormalised, with a known constant


def gaussian_target(x: torch.Tensor) -> torch.Tensor:
    normal = torch.distributions.MultivariateNormal(MEAN.to(x.dtype), COV.to(x.dtype))
    return normal.log_prob(x) + LOG_Z


def gaussian_kl(mean_q: np.ndarray, cov_q: np.ndarray, mean_p: np.ndarray, cov_p: np.ndarray) -> float:
    """KL(N(mean_q, cov_q) || N(mean_p, cov_p)) in closed form."""
    inv = np.linalg.inv(cov_p)
    diff = mean_p - mean_q
    d = len(mean_q)
    logdet = np.linalg.slogdet(cov_p)[1] - np.linalg.slogdet(cov_q)[1]
    return 0.5 * (np.trace(inv @ cov_q) + diff @ inv @ diff - d + logdet)


def test_reverse_kl_of_a_linear_cnf_matches_the_gaussian_kl() -> None:
    A = torch.tensor([[0.3, -0.4], [0.2, -0.1]], dtype=torch.float64)
    flow = cnf.CNF(cnf.LinearField(A), solver=TIGHT).double()
    E = scipy.linalg.expm(A.numpy())
    expected = gaussian_kl(np.zeros(2), E @ E.T, MEAN.numpy(), COV.numpy())
    report = variational_report(
        flow, gaussian_target, 20_000, log_z=LOG_Z, generator=torch.Generator().manual_seed(0)
    )
    assert abs(report["kl"] - expected) < 4 * report["kl_stderr"], (report, expected)
    assert report["kl_estimate"] == pytest.approx(report["kl"] - LOG_Z)
    assert 0 < report["ess"] < 1
    with torch.no_grad():
        estimate = reverse_kl(flow, gaussian_target, 20_000, generator=torch.Generator().manual_seed(1))
    assert abs(estimate.item() + LOG_Z - expected) < 4 * report["kl_stderr"]


def test_reverse_kl_of_a_planar_flow_matches_grid_quadrature() -> None:
    torch.manual_seed(0)
    flow = cnf.PlanarFlow(2, 3).double()
    report = variational_report(
        flow, gaussian_target, 20_000, log_z=LOG_Z, generator=torch.Generator().manual_seed(0)
    )
    xs = np.linspace(-8, 8, 401)
    grid = torch.as_tensor(np.stack(np.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2))
    with torch.no_grad():
        log_q = flow.log_prob(grid)
        log_p = gaussian_target(grid) - LOG_Z
    integrand = (log_q.exp() * (log_q - log_p)).numpy().reshape(401, 401)
    quadrature = trapezoid(trapezoid(integrand, xs, axis=1), xs)
    assert abs(report["kl"] - quadrature) < 4 * report["kl_stderr"] + 1e-4, (report, quadrature)


def test_exact_fit_has_zero_kl_and_full_effective_sample_size() -> None:
    flow = cnf.CNF(cnf.LinearField(torch.zeros(2, 2, dtype=torch.float64)), solver=TIGHT).double()

    def standard_normal(x: torch.Tensor) -> torch.Tensor:
        return -0.5 * (x**2).sum(1) + 3.0  # log Z = log(2 pi) + 3

    report = variational_report(flow, standard_normal, 1000, log_z=math.log(2 * math.pi) + 3.0)
    assert report["ess"] == pytest.approx(1.0, abs=1e-12)
    assert report["kl"] == pytest.approx(0.0, abs=1e-9)


def test_effective_sample_size_of_known_weights() -> None:
    assert effective_sample_size(torch.log(torch.tensor([1.0, 1.0, 2.0]))) == pytest.approx(16 / 18)
    assert effective_sample_size(torch.tensor([0.0, -1000.0, -1000.0, -1000.0])) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="log_w must be finite"):
        effective_sample_size(torch.tensor([0.0, float("nan")]))


def test_log_normalizer_of_a_gaussian() -> None:
    log_z = log_normalizer(lambda x: -0.5 * (x**2).sum(1), bounds=(-8, 8, -8, 8), resolution=401)
    assert log_z == pytest.approx(math.log(2 * math.pi), abs=1e-6)
    assert log_normalizer(gaussian_target, bounds=(-9, 11, -10, 9), resolution=401) == pytest.approx(
        LOG_Z, abs=1e-5
    )
    with pytest.raises(ValueError, match="bounds must be"):
        log_normalizer(gaussian_target, bounds=(1, 0, 0, 1))


def test_fit_variational_lowers_the_kl_of_a_planar_flow() -> None:
    torch.manual_seed(0)
    flow = cnf.PlanarFlow(2, 4).double()
    before = variational_report(flow, gaussian_target, 4000, log_z=LOG_Z)["kl"]
    result = fit_variational(flow, gaussian_target, iters=300, batch_size=128, lr=2e-2, anneal_iters=50)
    after = variational_report(flow, gaussian_target, 4000, log_z=LOG_Z)["kl"]
    assert result.step == 300 and result.stopped_by == "iters"
    assert result.history[0]["beta"] == pytest.approx(0.01) and result.history[-1]["beta"] == 1.0
    assert after < before / 3, (before, after)


def test_fit_variational_trains_a_cnf_briefly() -> None:
    torch.manual_seed(0)
    flow = cnf.CNF(cnf.MLPField(2, hidden=(8,)), solver=cnf.Solver(rtol=1e-3, atol=1e-3))
    result = fit_variational(flow, gaussian_target, iters=3, batch_size=64, time_limit=60)
    assert result.step == 3 and math.isfinite(result.kl_estimate) and result.history[-1]["nfe"] > 0


def test_fit_variational_guards_and_errors() -> None:
    flow = cnf.PlanarFlow(2, 2)
    with pytest.raises(cnf.TrainingError, match="loss became nan at step 1"):
        fit_variational(flow, lambda x: x.sum(1) * float("nan"), iters=3)
    with pytest.raises(TypeError, match="log_density must be a callable"):
        fit_variational(flow, 3.0)
    with pytest.raises(ValueError, match=r"log_density must return a tensor of shape \(8,\), got \(8, 2\)"):
        reverse_kl(flow, lambda x: x, 8)
    with pytest.raises(ValueError, match="iters must be a positive int, got 0"):
        fit_variational(flow, gaussian_target, iters=0)
    with pytest.raises(ValueError, match="lr must be a positive float, got -1"):
        fit_variational(flow, gaussian_target, lr=-1)


@pytest.mark.parametrize("name", ENERGIES)
def test_log_normalizer_of_the_energies_has_converged_on_the_default_square(name: str) -> None:
    # A larger, finer grid gives the same log Z: the default square holds all the mass, so the
    # true KL (estimate + log Z) of the variational benchmark is not biased low.
    log_density = target_log_density(name)
    default = log_normalizer(log_density)
    wider = log_normalizer(log_density, bounds=(-9, 9, -9, 9), resolution=1201)
    assert default == pytest.approx(wider, abs=1e-5)
