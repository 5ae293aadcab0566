"""Divergence of a velocity field: exact (trace of the Jacobian) or Hutchinson's estimator.

Both take the field's output ``f = u(x, t)`` and its input ``x`` (which must require grad) and
return ``div u`` per sample, shape ``(batch,)``. ``create_graph`` decides whether the result can
be differentiated again (needed only when training).

References: Grathwohl et al. (2019), "FFJORD"; Hutchinson (1990), "A stochastic estimator of
the trace of the influence matrix".
"""

from __future__ import annotations

import torch

DIVERGENCES = ("exact", "hutchinson")
NOISES = ("gaussian", "rademacher")

# For fields without their own forward-mode divergence (MLPField has one: see cnf.fields),
# measured by benchmarks/divergence_forms.py (2 CPU cores, batch 512, 64-64-64 field, ms per
# evaluation, loop / batched, five runs, the last three with the forms interleaved): without a
# graph (evaluation) the batched call won at d=16 in all five (6.4 / 3.3 at best) and at d=8
# in four of five; with a graph for training the loop wins from d=8 (d=32: 29-48 / 48-88).
# So the batched vector-Jacobian product is used for evaluation from d=16 on, the loop of
# autograd.grad calls otherwise. Both compute the same exact trace.
BATCHED_EXACT_FROM_DIM = 16


def exact_divergence(f: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Trace of df/dx per sample, computed exactly (d vector-Jacobian products).

    ``x`` may have any shape ``(batch, ...)`` (images): d is then the number of entries per sample.
    """
    if not create_graph and x[0].numel() >= BATCHED_EXACT_FROM_DIM:
        return exact_divergence_batched(f, x, create_graph)
    return exact_divergence_loop(f, x, create_graph)


def exact_divergence_loop(f: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Exact divergence by one ``autograd.grad`` call per coordinate."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    f_flat = f.reshape(x.shape[0], -1)
    for i in range(f_flat.shape[1]):
        (grad,) = torch.autograd.grad(f_flat[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
        total = total + grad.reshape(x.shape[0], -1)[:, i]
    return total


def exact_divergence_batched(f: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Exact divergence by one batched ``autograd.grad`` over the d basis vectors."""
    batch, dim = x.shape[0], x[0].numel()
    eye = torch.eye(dim, dtype=x.dtype, device=x.device)
    basis = eye.reshape(dim, 1, *x.shape[1:]).expand(dim, *x.shape)
    (grads,) = torch.autograd.grad(
        f, x, basis, create_graph=create_graph, retain_graph=True, is_grads_batched=True
    )
    # grads[i, n, j] = d f_i / d x_j at sample n (entries flattened); the trace takes i == j.
    return torch.diagonal(grads.reshape(dim, batch, dim), dim1=0, dim2=2).sum(-1)


def hutchinson_divergence(
    f: torch.Tensor, x: torch.Tensor, probe: torch.Tensor, create_graph: bool
) -> torch.Tensor:
    """Unbiased estimate eps^T (df/dx) eps with a fixed probe eps of the same shape as x."""
    (vjp,) = torch.autograd.grad(f, x, probe, create_graph=create_graph, retain_graph=True)
    return (vjp * probe).flatten(1).sum(dim=1)


def draw_probe(like: torch.Tensor, noise: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Hutchinson probe shaped like ``like``: standard Gaussian or Rademacher (+-1)."""
    if noise == "gaussian":
        return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    if noise == "rademacher":
        bits = torch.randint(0, 2, like.shape, device=like.device, generator=generator)
        return bits.to(like.dtype) * 2 - 1
    raise ValueError(f"unknown noise {noise!r}; choose one of {NOISES}")
