"""2-D toy samplers and their closed-form densities.

Definitions follow FFJORD's ``lib/toy_data.py`` (Grathwohl et al., "FFJORD: Free-form
Continuous Dynamics for Scalable Reversible Generative Models", ICLR 2019), rewritten with a
seeded :class:`numpy.random.Generator` and without scikit-learn. Where FFJORD lays points out
deterministically (``linspace`` angles, fixed counts per component) we draw them i.i.d. from the
same distribution, so that every sample is an independent draw and ``n`` points are always
returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from cnf.data.checks import _check_dtype, _check_points, _check_positive_int, _check_seed

TOY_DATASETS: tuple[str, ...] = (
    "moons",
    "8gaussians",
    "pinwheel",
    "checkerboard",
    "circles",
    "rings",
    "2spirals",
    "swissroll",
)
"""Names accepted by :func:`sample_toy` (FFJORD's 2-D density-estimation benchmarks)."""

# 8gaussians constants, exactly as in FFJORD: centres on the unit circle every 45 degrees,
# scaled by 4, unit-normal noise times 0.5, and the whole sample divided by 1.414.
_EIGHT_SCALE = 4.0
_EIGHT_STD = 0.5
_EIGHT_DIVISOR = 1.414
_EIGHT_CENTERS = np.array(
    [
        (1.0, 0.0),
        (-1.0, 0.0),
        (0.0, 1.0),
        (0.0, -1.0),
        (1.0 / math.sqrt(2), 1.0 / math.sqrt(2)),
        (1.0 / math.sqrt(2), -1.0 / math.sqrt(2)),
        (-1.0 / math.sqrt(2), 1.0 / math.sqrt(2)),
        (-1.0 / math.sqrt(2), -1.0 / math.sqrt(2)),
    ]
)


def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    # Two interleaved half circles as in sklearn.datasets.make_moons(noise=0.1), then
    # FFJORD's affine map x * 2 + (-1, -0.2).
    angle = rng.uniform(0.0, math.pi, size=n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    pts = np.stack([x, y], axis=1) + rng.normal(scale=0.1, size=(n, 2))
    return pts * 2.0 + np.array([-1.0, -0.2])


def _eight_gaussians(rng: np.random.Generator, n: int) -> np.ndarray:
    idx = rng.integers(8, size=n)
    pts = _EIGHT_SCALE * _EIGHT_CENTERS[idx] + _EIGHT_STD * rng.standard_normal((n, 2))
    return pts / _EIGHT_DIVISOR


def _pinwheel(rng: np.random.Generator, n: int) -> np.ndarray:
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    arm_angles = np.linspace(0.0, 2.0 * math.pi, num_classes, endpoint=False)
    feats = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    labels = rng.integers(num_classes, size=n)
    angles = arm_angles[labels] + rate * np.exp(feats[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    # Row vector times the rotation [[c, -s], [s, c]], as FFJORD's einsum("ti,tij->tj").
    out = np.stack([feats[:, 0] * c + feats[:, 1] * s, -feats[:, 0] * s + feats[:, 1] * c], 1)
    return 2.0 * out


def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    x1 = rng.random(n) * 4.0 - 2.0
    x2 = rng.random(n) - rng.integers(0, 2, size=n) * 2.0 + np.floor(x1) % 2
    return np.stack([x1, x2], axis=1) * 2.0


def _circles(rng: np.random.Generator, n: int) -> np.ndarray:
    # sklearn.datasets.make_circles(factor=0.5, noise=0.08), times 3.
    angle = rng.uniform(0.0, 2.0 * math.pi, size=n)
    radius = np.where(rng.random(n) < 0.5, 1.0, 0.5)
    pts = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return (pts + rng.normal(scale=0.08, size=(n, 2))) * 3.0


def _rings(rng: np.random.Generator, n: int) -> np.ndarray:
    # Four concentric circles of radii 3 * (1, 0.75, 0.5, 0.25), noise std 0.08.
    angle = rng.uniform(0.0, 2.0 * math.pi, size=n)
    radius = 3.0 * np.array([1.0, 0.75, 0.5, 0.25])[rng.integers(4, size=n)]
    pts = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return pts + rng.normal(scale=0.08, size=(n, 2))


def _two_spirals(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.sqrt(rng.random(n)) * 540.0 * (2.0 * math.pi) / 360.0
    arm = np.stack([-np.cos(t) * t + rng.random(n) * 0.5, np.sin(t) * t + rng.random(n) * 0.5], axis=1)
    sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    return sign[:, None] * arm / 3.0 + rng.normal(scale=0.1, size=(n, 2))


def _swissroll(rng: np.random.Generator, n: int) -> np.ndarray:
    # sklearn.datasets.make_swiss_roll(noise=1.0), columns (0, 2), divided by 5.
    t = 1.5 * math.pi * (1.0 + 2.0 * rng.random(n))
    pts = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    return (pts + rng.standard_normal((n, 2))) / 5.0


_SAMPLERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "checkerboard": _checkerboard,
    "circles": _circles,
    "rings": _rings,
    "2spirals": _two_spirals,
    "swissroll": _swissroll,
}


def _check_toy_name(name: object) -> str:
    if not isinstance(name, str) or name not in _SAMPLERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(TOY_DATASETS)}")
    return name


def sample_toy(
    name: str, n: int, seed: int | None = None, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Draw ``n`` i.i.d. points of a 2-D toy distribution as an ``(n, 2)`` tensor.

    ``name`` is one of :data:`TOY_DATASETS`; definitions follow FFJORD's ``toy_data.py``
    (Grathwohl et al. 2019). The same ``seed`` gives the same points; ``seed=None`` draws
    fresh entropy from the OS.
    """
    name = _check_toy_name(name)
    n = _check_positive_int(n, "n")
    seed = _check_seed(seed)
    dtype = _check_dtype(dtype)
    rng = np.random.default_rng(seed)
    pts = _SAMPLERS[name](rng, n)
    return torch.from_numpy(np.ascontiguousarray(pts, dtype=np.float64)).to(dtype)


# --------------------------------------------------------------------------- true densities


def eight_gaussians_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Exact log density of the ``8gaussians`` distribution at points ``x`` of shape (..., 2).

    An equal-weight mixture of 8 isotropic Gaussians with means ``4 * c_k / 1.414`` and
    standard deviation ``0.5 / 1.414`` (FFJORD, Grathwohl et al. 2019); evaluated with
    ``logsumexp``. Returns shape ``x.shape[:-1]`` in ``x``'s dtype and device.
    """
    x = _check_points(x, "x")
    means = torch.as_tensor(_EIGHT_SCALE * _EIGHT_CENTERS / _EIGHT_DIVISOR, dtype=x.dtype, device=x.device)
    std = _EIGHT_STD / _EIGHT_DIVISOR
    sq = ((x.unsqueeze(-2) - means) ** 2).sum(dim=-1)  # (..., 8)
    log_norm = -math.log(8.0) - math.log(2.0 * math.pi * std**2)
    return torch.logsumexp(-0.5 * sq / std**2, dim=-1) + log_norm


_TRUE_LOG_PROBS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "8gaussians": eight_gaussians_log_prob,
}


def true_log_prob(name: str, x: torch.Tensor) -> torch.Tensor:
    """Exact log density of toy dataset ``name`` at ``x``, where known in closed form.

    Only ``"8gaussians"`` has one; other datasets raise :class:`ValueError`.
    """
    name = _check_toy_name(name)
    if name not in _TRUE_LOG_PROBS:
        raise ValueError(
            f"dataset {name!r} has no closed-form density; "
            f"true_log_prob is known for: {', '.join(_TRUE_LOG_PROBS)}"
        )
    return _TRUE_LOG_PROBS[name](x)
