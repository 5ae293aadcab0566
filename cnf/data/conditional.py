"""Conditional 2-D targets p(x | c) with known densities, and the two-moons SBI simulator.

* ``rotated8gaussians``: FFJORD's 8gaussians (:mod:`cnf.data.toy`) rotated by an angle
  c ~ U(0, pi/4) (a rotation by pi/4 maps the pattern onto itself); context k = 1.
* ``mixture``: two isotropic Gaussians whose weights, widths and means vary with c ~ U(-1, 1):
  weight sigmoid(2.5 c) on N((-1.5, c), (0.45 + 0.3 c)^2 I) and the rest on
  N((1.5, -c), (0.45 - 0.3 c)^2 I); context k = 1.
* ``two_moons``: the simulation-based-inference task of Greenberg et al. (2019), "Automatic
  posterior transformation" (APT): theta ~ U(-1, 1)^2, x = p + (-|theta_1 + theta_2| / sqrt 2,
  (theta_2 - theta_1) / sqrt 2) with p = (r cos a + 0.25, r sin a), a ~ U(-pi/2, pi/2),
  r ~ N(0.1, 0.01^2). :func:`sample_conditional` returns the posterior's variable theta as the
  data and the observation x as the context (k = 2). Its likelihood is closed-form in polar
  coordinates; the posterior's normaliser is one expectation under the simulator's noise,
  estimated by Monte Carlo (:func:`two_moons_log_posterior`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cnf.data.checks import _check_positive_int, _check_seed
from cnf.data.toy import _EIGHT_CENTERS, _EIGHT_DIVISOR, _EIGHT_SCALE, _EIGHT_STD

CONDITIONAL_DATASETS = ("rotated8gaussians", "mixture", "two_moons")
CONTEXT_DIMS = {"rotated8gaussians": 1, "mixture": 1, "two_moons": 2}
#: the range of the context of each target (the prior of theta's observation for two_moons)
CONTEXT_RANGES = {"rotated8gaussians": (0.0, math.pi / 4), "mixture": (-1.0, 1.0)}
_MOON_MEAN, _MOON_STD = 0.1, 0.01


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in CONDITIONAL_DATASETS:
        raise ValueError(
            f"unknown conditional dataset {name!r}; choose one of {', '.join(CONDITIONAL_DATASETS)}"
        )
    return name


def _rotate(points: np.ndarray, angle: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([cos * points[:, 0] - sin * points[:, 1], sin * points[:, 0] + cos * points[:, 1]], 1)


def _mixture_parameters(c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per context (..., 1): log weights (..., 2), means (..., 2, 2), stds (..., 2)."""
    c = c[..., 0]
    w1 = torch.sigmoid(2.5 * c)
    log_w = torch.stack([torch.log(w1), torch.log1p(-w1)], -1)
    means = torch.stack(
        [torch.stack([torch.full_like(c, -1.5), c], -1), torch.stack([torch.full_like(c, 1.5), -c], -1)], -2
    )
    stds = torch.stack([0.45 + 0.3 * c, 0.45 - 0.3 * c], -1)
    return log_w, means, stds


def _two_moons_shift(theta: np.ndarray | torch.Tensor) -> tuple:
    """(-|theta_1 + theta_2| / sqrt 2, (theta_2 - theta_1) / sqrt 2)."""
    lib = torch if isinstance(theta, torch.Tensor) else np
    s = 1 / math.sqrt(2)
    return -lib.abs(theta[..., 0] + theta[..., 1]) * s, (theta[..., 1] - theta[..., 0]) * s


def _simulate_moons(rng: np.random.Generator, theta: np.ndarray) -> np.ndarray:
    n = theta.shape[0]
    a = rng.uniform(-math.pi / 2, math.pi / 2, n)
    r = rng.normal(_MOON_MEAN, _MOON_STD, n)
    sx, sy = _two_moons_shift(theta)
    return np.stack([r * np.cos(a) + 0.25 + sx, r * np.sin(a) + sy], 1)


def sample_conditional(
    name: str, n: int, seed: int | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs (x, c) with c from its prior and x ~ p(x | c): tensors (n, 2) and (n, k).

    For ``two_moons`` x is the parameter theta and c the simulated observation."""
    name = _check_name(name)
    n = _check_positive_int(n, "n")
    rng = np.random.default_rng(_check_seed(seed))
    if name == "rotated8gaussians":
        c = rng.uniform(*CONTEXT_RANGES[name], n)
        idx = rng.integers(8, size=n)
        pts = (_EIGHT_SCALE * _EIGHT_CENTERS[idx] + _EIGHT_STD * rng.standard_normal((n, 2))) / _EIGHT_DIVISOR
        x, c = _rotate(pts, c), c[:, None]
    elif name == "mixture":
        c = rng.uniform(*CONTEXT_RANGES[name], n)
        log_w, means, stds = (t.numpy() for t in _mixture_parameters(torch.from_numpy(c)[:, None]))
        first = rng.random(n) < np.exp(log_w[:, 0])
        comp = np.where(first, 0, 1)
        rows = np.arange(n)
        x = means[rows, comp] + stds[rows, comp, None] * rng.standard_normal((n, 2))
        c = c[:, None]
    else:
        x = rng.uniform(-1, 1, (n, 2))
        c = _simulate_moons(rng, x)
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype), torch.from_numpy(np.ascontiguousarray(c)).to(
        dtype
    )


def conditional_log_prob(name: str, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Exact log p(x | c) of ``rotated8gaussians`` or ``mixture`` at x (n, 2), c (n, 1)."""
    name = _check_name(name)
    if name == "rotated8gaussians":
        angle = -context[..., 0]  # rotate x back and score the 8 Gaussians
        cos, sin = torch.cos(angle), torch.sin(angle)
        back = torch.stack([cos * x[..., 0] - sin * x[..., 1], sin * x[..., 0] + cos * x[..., 1]], -1)
        means = torch.as_tensor(_EIGHT_SCALE * _EIGHT_CENTERS / _EIGHT_DIVISOR, dtype=x.dtype)
        std = _EIGHT_STD / _EIGHT_DIVISOR
        sq = ((back.unsqueeze(-2) - means) ** 2).sum(-1)
        return torch.logsumexp(-0.5 * sq / std**2, -1) - math.log(8.0) - math.log(2 * math.pi * std**2)
    if name == "mixture":
        log_w, means, stds = _mixture_parameters(context)
        sq = ((x.unsqueeze(-2) - means) ** 2).sum(-1)
        log_comp = -0.5 * sq / stds**2 - torch.log(2 * math.pi * stds**2)
        return torch.logsumexp(log_w + log_comp, -1)
    raise ValueError("two_moons has no closed-form posterior density; use two_moons_log_posterior")


def two_moons_log_likelihood(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | theta) of the two-moons simulator: in polar coordinates (rho, phi) of
    q = x - shift(theta) - (0.25, 0), density N(rho; 0.1, 0.01^2) / (pi rho) for |phi| < pi/2."""
    sx, sy = _two_moons_shift(theta)
    qx, qy = x[..., 0] - sx - 0.25, x[..., 1] - sy
    rho = torch.sqrt(qx * qx + qy * qy)
    log_r = -0.5 * ((rho - _MOON_MEAN) / _MOON_STD) ** 2 - math.log(_MOON_STD * math.sqrt(2 * math.pi))
    log_p = log_r - math.log(math.pi) - torch.log(rho)
    return torch.where(qx > 0, log_p, torch.full_like(log_p, -math.inf))


def two_moons_log_posterior(
    theta: torch.Tensor, x: torch.Tensor, draws: int = 20_000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(theta | x) under the uniform prior on [-1, 1]^2, and the standard error of each
    value from the Monte Carlo normaliser.

    With u = (theta_1 + theta_2) / sqrt 2 and v = (theta_2 - theta_1) / sqrt 2 (a rotation) the
    likelihood is the density of the noise point p at (x_1 + |u|, x_2 - v), so
    Z(x) = integral over the prior box of p(x | theta) = 2 P_p(a >= 0, a + |v| <= sqrt 2) with
    a = p_1 - x_1 (the two signs of u), estimated from ``draws`` simulator noise draws."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-math.pi / 2, math.pi / 2, draws)
    r = rng.normal(_MOON_MEAN, _MOON_STD, draws)
    p = torch.as_tensor(np.stack([r * np.cos(a) + 0.25, r * np.sin(a)], 1), dtype=x.dtype)
    u = p[None, :, 0] - x[:, None, 0]
    v = x[:, None, 1] - p[None, :, 1]
    inside = ((u >= 0) & (u + v.abs() <= math.sqrt(2))).to(x.dtype)
    fraction = inside.mean(1)
    z = 2 * fraction
    se = torch.sqrt(fraction * (1 - fraction) / draws) / fraction.clamp_min(1e-12)
    box = ((theta.abs() <= 1).all(-1)).to(x.dtype)
    return two_moons_log_likelihood(theta, x) + torch.log(box) - torch.log(z), se
