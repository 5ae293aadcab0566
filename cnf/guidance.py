"""Classifier-free guidance for conditional flows (Ho & Salimans 2022, "Classifier-Free
Diffusion Guidance"; for flow matching, e.g. Zheng et al. 2023).

Train one field on both p(x | c) and p(x) by giving a fraction of the training rows a null
context (:func:`with_null_contexts`), then sample with the guided velocity

    u_w(x, t, c) = (1 + w) u(x, t, c) - w u(x, t, null)

(:class:`GuidedField`), which sharpens samples towards their class for w > 0. The guided
field is an ordinary velocity field: ``cnf.CNF(GuidedField(field, w))`` samples it and its
log_prob is the exact density of the guided flow (no longer p(x | c) itself).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _null_like(context_dim: int, null: torch.Tensor | None) -> torch.Tensor:
    if null is None:
        return torch.zeros(context_dim)
    null = torch.as_tensor(null).reshape(-1)
    if null.numel() != context_dim:
        raise ValueError(
            f"null must have {context_dim} entries (the context size), got shape {tuple(null.shape)}"
        )
    return null


def with_null_contexts(
    x: torch.Tensor,
    context: torch.Tensor,
    rate: float = 0.2,
    *,
    null: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set for guidance: (x, c) plus a random ``rate`` fraction of its rows again
    with the ``null`` context (zeros by default, distinct from every one-hot label), so that
    one field also learns the unconditional p(x)."""
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and 0 < rate <= 1):
        raise ValueError(f"rate must be a float in (0, 1], got {rate!r}")
    if context.ndim != 2 or context.shape[0] != x.shape[0]:
        raise ValueError(
            f"context must have one row per row of x ({x.shape[0]}), got shape {tuple(context.shape)}"
        )
    count = max(1, round(rate * x.shape[0]))
    rows = torch.randperm(x.shape[0], generator=generator)[:count]
    empty = _null_like(context.shape[1], null).to(context).expand(count, -1)
    return torch.cat([x, x[rows]]), torch.cat([context, empty])


class GuidedField(nn.Module):
    """``(1 + weight) u(x, t, c) - weight u(x, t, null)`` from one conditional ``field`` (shared
    weights, both evaluations in one batched call)."""

    def __init__(self, field: nn.Module, weight: float, null: torch.Tensor | None = None) -> None:
        super().__init__()
        context_dim = getattr(field, "context_dim", None)
        if context_dim is None:
            raise ValueError(
                "guidance needs a conditional field (with context_dim), got an unconditional one"
            )
        if not (isinstance(weight, (int, float)) and math.isfinite(weight)):
            raise ValueError(f"weight must be a finite float, got {weight!r}")
        self.field = field
        self.weight = float(weight)
        self.dim = getattr(field, "dim", None)
        self.context_dim = context_dim
        self.register_buffer("null", _null_like(context_dim, null).float(), persistent=False)

    def forward(self, t: torch.Tensor | float, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        context = context.expand(batch, -1) if context.shape[0] == 1 else context
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        both_t = t if t.numel() == 1 else torch.cat([t.reshape(-1), t.reshape(-1)])
        null = self.null.to(context).expand(batch, -1)
        u = self.field(both_t, torch.cat([x, x]), context=torch.cat([context, null]))
        conditional, unconditional = u[:batch], u[batch:]
        return (1 + self.weight) * conditional - self.weight * unconditional
