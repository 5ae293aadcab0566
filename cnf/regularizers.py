"""RNODE regularisers: kinetic energy and Jacobian Frobenius norm of the velocity field.

Finlay et al. (2020), "How to train your neural ODE: the world of Jacobian and kinetic
regularization" (RNODE), add to the maximum-likelihood loss

    lambda_K * integral_0^1 ||u(x(t), t)||^2 dt + lambda_J * integral_0^1 ||d u / d x||_F^2 dt,

both integrated along each trajectory as extra states of the augmented ODE. The Frobenius norm
is estimated from the vector-Jacobian product eps^T (du/dx) that the Hutchinson divergence
already computes: E ||eps^T J||^2 = ||J||_F^2 for Gaussian or Rademacher eps.

The extra states take no part in step-size control (:func:`tracked_norm`), as in the authors'
code, which gives them rtol = atol = 1e20.

Scaling (ffjord-rnode, ``lib/layers/wrappers/cnf_regularization.py`` and
``lib/layers/odefunc.py``): the kinetic state integrates ``0.5 * mean_d(u^2)`` and the Jacobian
state ``mean_d((eps^T J)^2)``, i.e. both are divided by the dimension d (and the kinetic one by 2),
then averaged over the batch and added to the NLL with weights lambda_K, lambda_J (0.01 each
in the paper). :func:`rnode_penalty` applies exactly this scaling to the raw integrals
returned by :meth:`cnf.CNF.regularized_log_prob`.
"""

from __future__ import annotations

import math

import torch

#: Weights used by Finlay et al. (2020) for both terms.
RNODE_DEFAULT_WEIGHT = 0.01


def probe_vjp(f: torch.Tensor, x: torch.Tensor, probe: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """The vector-Jacobian product eps^T (df/dx) per sample, shape like x."""
    (vjp,) = torch.autograd.grad(f, x, probe, create_graph=create_graph, retain_graph=True)
    return vjp


def kinetic_rate(f: torch.Tensor) -> torch.Tensor:
    """||u||^2 per sample: the integrand of the kinetic energy."""
    return f.pow(2).flatten(1).sum(dim=1)


def jacobian_rate(vjp: torch.Tensor) -> torch.Tensor:
    """||eps^T du/dx||^2 per sample: an unbiased estimate of ||du/dx||_F^2."""
    return vjp.pow(2).flatten(1).sum(dim=1)


def tracked_norm(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Step-size-control norm of the augmented state that looks only at x and log p.

    The max of the RMS norms of the first two states (torchdiffeq's default mixed norm restricted
    to them), so the regulariser states never shrink the steps.
    """
    return torch.stack([s.pow(2).mean().sqrt() for s in state[:2]]).max()


def check_weight(name: str, value: float) -> float:
    """A regulariser weight: a finite float >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a non-negative float, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite float, got {value!r}")
    return float(value)


def rnode_penalty(
    kinetic: torch.Tensor,
    jacobian: torch.Tensor,
    dim: int,
    kinetic_weight: float,
    jacobian_weight: float,
) -> torch.Tensor:
    """lambda_K E[integral ||u||^2 / (2 d)] + lambda_J E[integral ||eps^T J||^2 / d] (RNODE's scaling).

    ``kinetic`` and ``jacobian`` are the raw per-sample integrals (batch,).
    """
    penalty = kinetic.new_zeros(())
    if kinetic_weight:
        penalty = penalty + kinetic_weight * 0.5 * kinetic.mean() / dim
    if jacobian_weight:
        penalty = penalty + jacobian_weight * jacobian.mean() / dim
    return penalty
