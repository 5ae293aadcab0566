"""Conditional targets: the exact densities integrate to one and agree with their samplers."""

from __future__ import annotations

import math

import pytest
import torch

from cnf.data.conditional import (
    CONTEXT_DIMS,
    conditional_log_prob,
    sample_conditional,
    two_moons_log_likelihood,
    two_moons_log_posterior,
)


def grid(low: float, high: float, n: int) -> tuple[torch.Tensor, float]:
    axis = torch.linspace(low, high, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([gx, gy], -1).reshape(-1, 2), (axis[1] - axis[0]).item() ** 2


@pytest.mark.parametrize("name", ["rotated8gaussians", "mixture"])
@pytest.mark.parametrize("c", [-0.7, 0.2, 0.6])
def test_conditional_densities_integrate_to_one_and_match_samples(name: str, c: float) -> None:
    points, area = grid(-5, 5, 401)
    log_p = conditional_log_prob(name, points, torch.full((points.shape[0], 1), c, dtype=torch.float64))
    assert log_p.exp().sum().item() * area == pytest.approx(1.0, abs=1e-4)
    # samples near this context agree on statistics that see the rotation, weights and means
    x, ctx = sample_conditional(name, 40_000, seed=1, dtype=torch.float64)
    near = (ctx[:, 0] - c).abs() < 0.01
    if near.sum() < 100:  # the context lies outside this target's range
        return
    weights = log_p.exp() * area
    expected = (weights[:, None] * statistics(points)).sum(0)
    values = statistics(x[near])
    se = values.std(0) / near.sum().sqrt()
    assert ((values.mean(0) - expected).abs() < 4 * se + 0.02).all(), (values.mean(0), expected)


def statistics(x: torch.Tensor) -> torch.Tensor:
    """x_1, x_2 and cos / sin of 8 times the polar angle (the 8 Gaussians' rotation)."""
    angle = torch.atan2(x[:, 1], x[:, 0])
    return torch.stack([x[:, 0], x[:, 1], torch.cos(8 * angle), torch.sin(8 * angle)], 1)


def test_sample_shapes_and_context_dims() -> None:
    for name, k in CONTEXT_DIMS.items():
        x, c = sample_conditional(name, 10, seed=0)
        assert x.shape == (10, 2) and c.shape == (10, k) and x.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown conditional dataset 'moons'"):
        sample_conditional("moons", 3)


def test_two_moons_posterior_integrates_to_one() -> None:
    theta, x = sample_conditional("two_moons", 3, seed=2, dtype=torch.float64)
    points, area = grid(-1, 1, 1201)
    for i in range(3):
        log_post, se = two_moons_log_posterior(points, x[i : i + 1])
        assert log_post.exp().sum().item() * area == pytest.approx(1.0, abs=0.02)
        assert se.item() < 0.02
        assert math.isfinite(two_moons_log_posterior(theta[i : i + 1], x[i : i + 1])[0].item())


def test_two_moons_likelihood_integrates_to_one_over_x() -> None:
    theta = torch.tensor([[0.3, -0.5]], dtype=torch.float64)
    points, area = grid(-1.5, 1.0, 1501)
    log_lik = two_moons_log_likelihood(theta, points)
    assert log_lik.exp().sum().item() * area == pytest.approx(1.0, abs=0.01)
