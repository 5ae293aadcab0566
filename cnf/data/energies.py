"""Unnormalised 2-D target energies U1..U4 of Rezende & Mohamed, "Variational Inference with
Normalizing Flows", ICML 2015, Table 1 (variational-inference targets)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cnf.data.checks import _check_points

ENERGIES: tuple[str, ...] = ("u1", "u2", "u3", "u4")
"""Names accepted by :func:`energy` (Rezende & Mohamed 2015, Table 1)."""


def _w1(z1: torch.Tensor) -> torch.Tensor:
    return torch.sin(2.0 * math.pi * z1 / 4.0)


def _w2(z1: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.exp(-0.5 * ((z1 - 1.0) / 0.6) ** 2)


def _w3(z1: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.sigmoid((z1 - 1.0) / 0.3)


def _neg_log_sum_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """-log(exp(a) + exp(b)), computed stably."""
    return -torch.logaddexp(a, b)


def _u1(z: torch.Tensor) -> torch.Tensor:
    z1 = z[..., 0]
    ring = 0.5 * ((torch.linalg.vector_norm(z, dim=-1) - 2.0) / 0.4) ** 2
    modes = _neg_log_sum_exp(-0.5 * ((z1 - 2.0) / 0.6) ** 2, -0.5 * ((z1 + 2.0) / 0.6) ** 2)
    return ring + modes


# U2-U4 as printed do not decay along z1 (exp(-U) has infinite mass), so they are confined to
# the square of the paper's figures: outside |z1| <= 4 a Gaussian wall of width 0.4 is added.
# Inside the square the energies are exactly the paper's; the wall makes log Z finite.
ENERGY_BOX = 4.0
_WALL_WIDTH = 0.4


def _wall(z1: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.relu(z1.abs() - ENERGY_BOX) / _WALL_WIDTH) ** 2


def _u2(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((z[..., 1] - _w1(z[..., 0])) / 0.4) ** 2 + _wall(z[..., 0])


def _u3(z: torch.Tensor) -> torch.Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    a = z2 - _w1(z1)
    return _neg_log_sum_exp(-0.5 * (a / 0.35) ** 2, -0.5 * ((a + _w2(z1)) / 0.35) ** 2) + _wall(z1)


def _u4(z: torch.Tensor) -> torch.Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    a = z2 - _w1(z1)
    return _neg_log_sum_exp(-0.5 * (a / 0.4) ** 2, -0.5 * ((a + _w3(z1)) / 0.35) ** 2) + _wall(z1)


_ENERGY_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "u1": _u1,
    "u2": _u2,
    "u3": _u3,
    "u4": _u4,
}


def _check_energy_name(name: object) -> str:
    key = name.lower() if isinstance(name, str) else name
    if key not in _ENERGY_FNS:
        raise ValueError(f"unknown energy {name!r}; choose one of {', '.join(ENERGIES)}")
    return key  # type: ignore[return-value]


def energy(name: str, z: torch.Tensor) -> torch.Tensor:
    """Unnormalised energy ``U(z)`` of Rezende & Mohamed (2015), Table 1.

    ``name`` is one of :data:`ENERGIES` (``"u1"`` is the ring, ``"u2"``-``"u4"`` the sine
    waves); ``z`` has shape ``(..., 2)``; returns shape ``z.shape[:-1]``, differentiable.
    The target density is proportional to ``exp(-U(z))``. U2-U4 get a Gaussian wall outside
    |z1| <= 4 (width 0.4) so that they are normalisable; inside that band they are unchanged.
    """
    key = _check_energy_name(name)
    z = _check_points(z, "z")
    return _ENERGY_FNS[key](z)


def target_log_density(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``z -> -U(z)``, the unnormalised log density of energy ``name``."""
    key = _check_energy_name(name)

    def log_density(z: torch.Tensor) -> torch.Tensor:
        return -energy(key, z)

    log_density.__name__ = f"neg_{key}"
    return log_density
