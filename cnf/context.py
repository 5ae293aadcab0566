"""The context c of a conditional flow p(x | c): one check and the broadcasting rules.

Shapes (DESIGN.md): c of shape (k,) is one context for the whole batch; (B, k) is one context
per sample of x (B, d). :func:`check_context` is the one function that validates a context
before a solve and returns it as a (1, k) or (B, k) tensor in x's dtype and device. The context
is an argument of the dynamics (handed to the field on every evaluation), never module state
nor part of the ODE state, so concurrent calls cannot see each other's c and the adjoint method
can return its gradient (:func:`cnf.solver.solve` lists it among the adjoint parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def context_dim_of(model: nn.Module) -> int | None:
    """The context dimension k of a field or flow (None: unconditional)."""
    return getattr(model, "context_dim", None)


def check_context(
    context: torch.Tensor | None,
    context_dim: int | None,
    batch: int | None,
    like: torch.Tensor,
    name: str = "context",
) -> torch.Tensor | None:
    """Validate ``context`` for a flow with ``context_dim`` (None: unconditional) and a batch of
    ``batch`` points (None: any); return it as (1, k) or (batch, k) in ``like``'s dtype/device.

    Raises ValueError naming the shape for a wrong k, a batch mismatch, a non-finite entry, a
    context given to an unconditional flow and none given to a conditional one.
    """
    if context_dim is None:
        if context is not None:
            shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(
                f"{name} was given (shape {shape}) but this flow is unconditional (its field has no "
                "context_dim); build the field with context_dim=k for p(x | c)"
            )
        return None
    if context is None:
        raise ValueError(
            f"this flow is conditional (context_dim={context_dim}): pass {name}= of shape "
            f"({context_dim},) for the whole batch or (batch, {context_dim}) per sample, got None"
        )
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(context).__name__}")
    if not (context.dtype.is_floating_point or context.dtype in (torch.int32, torch.int64, torch.bool)):
        raise TypeError(f"{name} must be a real tensor, got dtype {context.dtype}")
    shape = tuple(context.shape)
    if context.ndim == 1:
        context = context.unsqueeze(0)
    if context.ndim != 2 or context.shape[1] != context_dim:
        raise ValueError(
            f"{name} must have shape ({context_dim},) or (batch, {context_dim}); got shape {shape}"
        )
    if batch is not None and context.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} of shape {shape} does not match the batch of {batch} points: "
            f"pass ({context_dim},) for all or ({batch}, {context_dim}), one per point"
        )
    context = context.to(dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(context).all()):
        bad = int((~torch.isfinite(context)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name} of shape {shape} must be finite; first NaN/Inf in row {bad}")
    return context


def split_context_columns(
    table: torch.Tensor, columns: Sequence[int], name: str = "--context-columns"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, c)``: the table's ``columns`` as the context c and the remaining columns as x."""
    width = table.shape[1]
    columns = list(columns)
    if not columns or len(set(columns)) != len(columns) or any(not -width <= i < width for i in columns):
        raise ValueError(
            f"{name} must be distinct column indices of a table with {width} columns, got {columns}"
        )
    chosen = sorted({i % width for i in columns})
    if len(chosen) == width:
        raise ValueError(f"{name} {columns} leave no data columns of the table's {width}")
    rest = [i for i in range(width) if i not in chosen]
    return table[:, rest], table[:, [i % width for i in columns]]


def parse_context(text: str, name: str = "--context") -> torch.Tensor:
    """A context written as comma-separated numbers, e.g. ``"0.3,1.2"``, as a (k,) tensor."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers like '0.3,1.2', got {text!r}") from None
    return torch.tensor(values)


def expand_context(context: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A checked (1, k) or (batch, k) context as (batch, k) (a view where possible)."""
    if context is None or context.shape[0] == batch:
        return context
    return context.expand(batch, -1)


def conditional_base_draws(
    draw: Callable[[int], torch.Tensor], n: int, context: torch.Tensor | None, context_dim: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """Base points for ``sample(n, context=c)``: ``(z, c, shape)``.

    Without a context or with one c of shape (k,), n draws and shape (n,). With c of shape (B, k),
    n * B draws, each context repeated n times (row i * B + b has context b) and shape (n, B), so
    the caller solves once and reshapes to (n, B, ...), sample dimensions first."""
    z = draw(n)
    if context is None or (isinstance(context, torch.Tensor) and context.ndim == 1):
        return z, context, (n,)
    context = check_context(context, context_dim, None, z)
    batch = context.shape[0]
    if batch > 1:
        z = torch.cat([z, draw(n * (batch - 1))])
    return z, context.repeat(n, 1), (n, batch)


class ContextStandardization(nn.Module):
    """(c - mean) / std with the statistics kept as buffers, so that they travel with the weights
    in checkpoints; the identity until :meth:`fit` is called (e.g. by ``cnf train``)."""

    def __init__(self, context_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(context_dim))
        self.register_buffer("std", torch.ones(context_dim))

    @torch.no_grad()
    def fit(self, contexts: torch.Tensor) -> ContextStandardization:
        """Take the mean and standard deviation of ``contexts`` (n, k); constant columns keep std 1."""
        std = contexts.std(0) if contexts.shape[0] > 1 else torch.ones_like(contexts[0])
        self.mean.copy_(contexts.mean(0))
        self.std.copy_(torch.where(std > 0, std, torch.ones_like(std)))
        return self

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return (context - self.mean) / self.std
