"""The continuous normalizing flow: likelihoods from the continuity equation.

Time runs from t=0 (base p0) to t=1 (data p1) with dx/dt = u(x, t). Along a trajectory
d/dt log p_t(x(t)) = -div u(x(t), t), so

    log p1(x1) = log p0(x0) - integral_0^1 div u(x(t), t) dt,

computed by integrating the augmented state (x, a) with da/dt = div u from t=1 back to t=0:
then a(0) = -integral_0^1 div u and log p1(x1) = log p0(x(0)) + a(0).

References: Chen et al. (2018), "Neural ODEs"; Grathwohl et al. (2019), "FFJORD".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from cnf.context import check_context, conditional_base_draws, context_dim_of
from cnf.data import check_batch
from cnf.data.checks import check_event_shape
from cnf.divergence import (
    DIVERGENCES,
    NOISES,
    draw_probe,
    exact_divergence,
    hutchinson_divergence,
)
from cnf.regularizers import jacobian_rate, kinetic_rate, probe_vjp, tracked_norm
from cnf.solver import Solver, SolveStats, solve


class StandardNormal(nn.Module):
    """N(0, I) on R^dim (or on tensors of shape ``dim`` when it is a tuple such as (C, H, W))
    that follows the module's device and dtype."""

    def __init__(self, dim: int | tuple[int, ...]) -> None:
        super().__init__()
        self.dim = dim
        self.event_shape = tuple(dim) if isinstance(dim, tuple) else (dim,)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        event_dims = tuple(range(-len(self.event_shape), 0))
        size = math.prod(self.event_shape)
        return -0.5 * z.pow(2).sum(event_dims) - 0.5 * size * math.log(2 * math.pi)

    def sample(self, shape: Sequence[int] = (), generator: torch.Generator | None = None) -> torch.Tensor:
        anchor = self._anchor
        return torch.randn(
            (*shape, *self.event_shape), dtype=anchor.dtype, device=anchor.device, generator=generator
        )


def base_log_prob(base: Any, z: torch.Tensor) -> torch.Tensor:
    """log p0(z) per sample for cnf's StandardNormal or any torch Distribution."""
    logp = base.log_prob(z)
    if logp.shape == z.shape:  # a factorised distribution without Independent
        logp = logp.sum(-1)
    return logp


def base_sample(base: Any, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if isinstance(base, StandardNormal):
        return base.sample((n,), generator=generator)
    return base.sample((n,))


def check_base(base: Any, dim: int | tuple[int, ...]) -> Any:
    if base is None:
        return StandardNormal(dim)
    if not (callable(getattr(base, "log_prob", None)) and callable(getattr(base, "sample", None))):
        raise TypeError(f"base must have log_prob and sample (a torch Distribution), got {base!r}")
    return base


def context_arguments(field: nn.Module, context: torch.Tensor | None) -> dict[str, Any]:
    """The keyword arguments that hand a checked ``context`` ((1, k) or (batch, k)) to ``field``
    on each evaluation of one solve: none without a context, else the context itself, or the
    field's own prepared form of it (:meth:`cnf.MLPField.prepare_context`, computed once here
    instead of on every evaluation; gradients reach c through it, adjoint included)."""
    if context is None:
        return {}
    prepare = getattr(field, "prepare_context", None)
    return {"context": prepare(context, context.shape[0]) if callable(prepare) else context}


class AugmentedDynamics(nn.Module):
    """Right-hand side of the augmented ODE: (dx/dt, da/dt) = (u(x, t), div u(x, t)).

    With ``regularization=True`` two more states follow (RNODE, Finlay et al. 2020):
    d/dt of ||u||^2 and of ||probe^T du/dx||^2, the latter from the same vector-Jacobian
    product as the Hutchinson divergence (``probe`` is then required, also for ``exact``).
    For the exact divergence a field with ``velocity_and_divergence`` (MLPField with a named
    activation) supplies u and div u itself, from one forward-mode pass. A ``context`` (checked,
    (1, k) or (batch, k)) is handed to the field on every evaluation: an argument of this one
    solve's dynamics, never stored on the field.
    """

    def __init__(
        self,
        field: nn.Module,
        divergence: str,
        probe: torch.Tensor | None,
        regularization: bool = False,
        context: torch.Tensor | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if regularization and probe is None:
            raise ValueError("regularization=True needs a probe for the Jacobian-norm estimate, got None")
        self.field = field
        self.divergence = divergence
        self.probe = probe
        self.regularization = regularization
        self.field_kwargs = context_arguments(field, context)
        self.compile = compile
        # A field that knows its own exact divergence (MLPField) skips autograd altogether.
        self.analytic = (
            divergence == "exact"
            and not regularization
            and callable(getattr(field, "velocity_and_divergence", None))
            and bool(getattr(field, "has_analytic_divergence", False))
        )

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = state[0]
        if self.analytic:
            if self.compile:
                return self.field.velocity_and_divergence(t, x, **self.field_kwargs, compiled=True)
            return self.field.velocity_and_divergence(t, x, **self.field_kwargs)
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not create_graph or not x.requires_grad:
                x = x.detach().requires_grad_(True)
            f = self.field(t, x, **self.field_kwargs)
            jac = None
            if not f.requires_grad:  # the field does not depend on x
                div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
                jac = torch.zeros_like(div)
            elif self.regularization:
                vjp = probe_vjp(f, x, self.probe, create_graph)
                jac = jacobian_rate(vjp)
                if self.divergence == "exact":
                    div = exact_divergence(f, x, create_graph)
                else:
                    div = (vjp * self.probe).flatten(1).sum(dim=1)
            elif self.divergence == "exact":
                div = exact_divergence(f, x, create_graph)
            else:
                div = hutchinson_divergence(f, x, self.probe, create_graph)
        if not self.regularization:
            if not create_graph:
                f, div = f.detach(), div.detach()
            return f, div
        out = (f, div, kinetic_rate(f), jac)
        return out if create_graph else tuple(o.detach() for o in out)


class PositionDynamics(nn.Module):
    """dx/dt = u(x, t) (or u(x, t, c)) alone: sampling and inverses need no divergence."""

    def __init__(self, field: nn.Module, context: torch.Tensor | None = None) -> None:
        super().__init__()
        self.field = field
        self.field_kwargs = context_arguments(field, context)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.field(t, x, **self.field_kwargs)


class CNF(nn.Module):
    """A continuous normalizing flow driven by a velocity field ``field(t, x)``.

    Args:
        field: an ``nn.Module`` with ``forward(t, x)`` returning a tensor shaped like x.
        dim: data dimension (default: ``field.dim``), or a shape tuple such as (C, H, W) for
            image-shaped states (then x has shape (n, C, H, W) and the divergence is the trace
            over all C*H*W entries).
        base: the base distribution p0 (default: standard normal); any object with
            ``log_prob`` and ``sample``, e.g. a ``torch.distributions.Distribution``.
        divergence: ``exact`` (trace of the Jacobian) or ``hutchinson`` (one probe per solve).
        noise: Hutchinson probe distribution, ``gaussian`` or ``rademacher``.
        solver: a :class:`cnf.Solver` (default dopri5 at rtol=atol=1e-5).

    Conditional flows p(x | c): with a field that has ``context_dim=k`` (e.g.
    ``MLPField(dim, context_dim=k)``, or any field with ``forward(t, x, context)`` and a
    ``context_dim`` attribute) every method takes ``context=``: shape (k,) for the whole batch
    or (batch, k) per sample; ``sample(n, context=c)`` with c (B, k) returns (n, B, dim).
    """

    kind = "cnf"
    #: which columns of a table are the context (set by ``cnf train --context-columns``)
    context_columns: list[int] | None = None
    #: Rows that :meth:`log_prob` scores in one solve; a larger batch is split into chunks of this
    #: size, so memory stays bounded (without gradients the default leaves test sets whole).
    chunk_size: int = 65_536
    #: The same with gradients; each chunk is then recomputed in backward
    #: (``torch.utils.checkpoint``), so the autograd graph of one chunk is alive at a time.
    grad_chunk_size: int = 4_096

    def __init__(
        self,
        field: nn.Module,
        dim: int | tuple[int, ...] | None = None,
        *,
        base: Any = None,
        divergence: str = "exact",
        noise: str = "gaussian",
        solver: Solver | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(field, nn.Module) or not callable(getattr(field, "forward", None)):
            raise TypeError(f"field must be an nn.Module with forward(t, x), got {type(field).__name__}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
        if noise not in NOISES:
            raise ValueError(f"unknown noise {noise!r}; choose one of {NOISES}")
        if solver is None:
            solver = Solver()
        if not isinstance(solver, Solver):
            raise TypeError(f"solver must be a cnf.Solver, got {solver!r}")
        dim = getattr(field, "dim", None) if dim is None else dim
        if isinstance(dim, (tuple, list, torch.Size)):
            dim = check_event_shape(dim)
        elif isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int (or field.dim must exist), got {dim!r}")
        self.field = field
        self.dim = dim
        self.event_shape = dim if isinstance(dim, tuple) else (dim,)
        self.context_dim = context_dim_of(field)
        self.base = check_base(base, dim)
        self.divergence = divergence
        self.noise = noise
        self.solver = solver
        self.stats = SolveStats()

    # -- helpers ---------------------------------------------------------------------------
    def _times(self, start: float, end: float, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor([start, end], dtype=like.dtype, device=like.device)

    def _probe(
        self, x: torch.Tensor, generator: torch.Generator | None, probe: torch.Tensor | None
    ) -> torch.Tensor | None:
        if self.divergence != "hutchinson":
            return None
        if probe is not None:
            return self._probe_shape(x, probe)
        return draw_probe(x, self.noise, generator)

    @staticmethod
    def _probe_shape(x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        if probe.shape != x.shape:
            raise ValueError(f"probe must have the shape of x {tuple(x.shape)}, got {tuple(probe.shape)}")
        return probe

    def _context(self, context: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        return check_context(context, self.context_dim, x.shape[0], x)

    def _augmented_solve(
        self,
        x: torch.Tensor,
        start: float,
        end: float,
        name: str,
        generator: torch.Generator | None = None,
        probe: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        probe = self._probe(x, generator, probe)
        dynamics = AugmentedDynamics(
            self.field, self.divergence, probe, context=context, compile=self.solver.compile
        )
        a0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        self.stats = SolveStats()
        xs, a = solve(
            dynamics,
            (x, a0),
            self._times(start, end, x),
            self.solver,
            self.stats,
            name=name,
            arguments=(context,),
        )
        return xs[-1], a[-1]

    @staticmethod
    def _check_time(t: float, name: str = "t") -> float:
        t = float(t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {t!r}")
        return t

    # -- public surface --------------------------------------------------------------------
    def log_prob(
        self,
        x: torch.Tensor,
        t: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        probe: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p_t(x) (or log p_t(x | c)) per sample (default t=1: the model density), shape (batch,).

        Solves the augmented state from t back to 0. With ``divergence="hutchinson"`` one probe
        is drawn per call (from ``generator`` if given) and held fixed during the solve. Batches
        larger than :attr:`chunk_size` (:attr:`grad_chunk_size` with gradients) are scored in
        chunks, one solve each; ``stats`` then holds the summed counts.
        """
        limit = self.grad_chunk_size if torch.is_grad_enabled() else self.chunk_size
        if isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[0] > limit:
            return self._chunked_log_prob(x, t, limit, generator, probe, context)
        z, delta_logp = self.transform(x, t, generator=generator, probe=probe, context=context)
        return base_log_prob(self.base, z) + delta_logp

    def _chunked_log_prob(
        self,
        x: torch.Tensor,
        t: float,
        size: int,
        generator: torch.Generator | None,
        probe: torch.Tensor | None,
        context: torch.Tensor | None,
    ) -> torch.Tensor:
        check_batch(x, self.dim, "x")
        context = self._context(context, x)  # (1, k) for all rows or (B, k) per row
        if self.divergence == "hutchinson" and probe is None:
            probe = draw_probe(x, self.noise, generator)  # drawn once, so a recompute reuses it
        count = math.ceil(x.shape[0] / size)
        probes = probe.split(size) if probe is not None else [None] * count
        contexts = context.split(size) if context is not None and context.shape[0] > 1 else [context] * count
        parts, total = [], SolveStats(solve="scoring")

        def score(chunk: torch.Tensor, chunk_probe: torch.Tensor | None, chunk_context: torch.Tensor | None):
            z, delta_logp = self.transform(chunk, t, probe=chunk_probe, context=chunk_context)
            return base_log_prob(self.base, z) + delta_logp

        for chunk, chunk_probe, chunk_context in zip(x.split(size), probes, contexts):
            if torch.is_grad_enabled():
                parts.append(
                    torch.utils.checkpoint.checkpoint(
                        score, chunk, chunk_probe, chunk_context, use_reentrant=False
                    )
                )
            else:
                parts.append(score(chunk, chunk_probe, chunk_context))
            total.nfe_forward += self.stats.nfe_forward
            total.steps += self.stats.steps
        self.stats = total
        return torch.cat(parts)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_prob(x, context=context)

    def regularized_log_prob(
        self,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        probe: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log p1(x) and the RNODE integrals along each path, all of shape (batch,).

        Returns ``(log_prob, kinetic, jacobian)`` with kinetic = integral_0^1 ||u(x(t), t)||^2 dt
        and jacobian = integral_0^1 ||eps^T du/dx||^2 dt (an unbiased estimate of the Jacobian
        Frobenius norm integral) from one solve 1 -> 0 whose step-size control looks only at x
        and log p. With ``divergence="hutchinson"`` eps is the divergence probe; with ``exact``
        a Gaussian probe is drawn for this term (or ``probe`` is used). Finlay et al. (2020).
        """
        check_batch(x, self.dim, "x")
        context = self._context(context, x)
        if self.divergence == "hutchinson":
            eps = self._probe(x, generator, probe)
        elif probe is not None:
            eps = self._probe_shape(x, probe)
        else:
            eps = draw_probe(x, "gaussian", generator)
        dynamics = AugmentedDynamics(self.field, self.divergence, eps, regularization=True, context=context)
        zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        self.stats = SolveStats()
        z, a, kinetic, jacobian = solve(
            dynamics,
            (x, zeros, zeros, zeros),
            self._times(1.0, 0.0, x),
            self.solver,
            self.stats,
            name="scoring",
            norm=tracked_norm,
            arguments=(context,),
        )
        # Integrated from t=1 back to 0: each state ends at minus its integral over [0, 1].
        return base_log_prob(self.base, z[-1]) + a[-1], -kinetic[-1], -jacobian[-1]

    def transform(
        self,
        x: torch.Tensor,
        t: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        probe: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> base: ``(z, delta_logp)`` with log p_t(x) = log p0(z) + delta_logp."""
        check_batch(x, self.dim, "x")
        context = self._context(context, x)
        t = self._check_time(t)
        if t == 0.0:
            return x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return self._augmented_solve(x, t, 0.0, "scoring", generator, probe, context)

    def inverse(
        self, z: torch.Tensor, t: float = 1.0, *, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Base -> data: solve dx/dt = u from 0 to t (no divergence needed)."""
        check_batch(z, self.dim, "z")
        context = self._context(context, z)
        t = self._check_time(t)
        if t == 0.0:
            return z
        self.stats = SolveStats()
        xs = solve(
            PositionDynamics(self.field, context),
            z,
            self._times(0.0, t, z),
            self.solver,
            self.stats,
            name="sampling",
            arguments=(context,),
        )
        return xs[-1]

    def inverse_and_log_prob(
        self,
        z: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        probe: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Base -> data with densities: ``(x, log p1(x))`` from one forward solve 0 -> 1."""
        check_batch(z, self.dim, "z")
        context = self._context(context, z)
        x, a = self._augmented_solve(z, 0.0, 1.0, "sampling", generator, probe, context)
        # a(1) = integral_0^1 div u, so log p1(x1) = log p0(z) - a(1).
        return x, base_log_prob(self.base, z) - a

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``n`` samples of p1, shape (n, dim); with c of shape (B, k), (n, B, dim): n samples of
        each p(x | c_b), all from one batched solve."""
        z, context, shape = conditional_base_draws(
            lambda m: self._base_sample(m, generator), n, context, self.context_dim
        )
        return self.inverse(z, context=context).reshape(*shape, *self.event_shape)

    def sample_and_log_prob(
        self, n: int, *, generator: torch.Generator | None = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples and their log densities (differentiable: used by variational inference);
        shapes (n, dim) and (n,), or (n, B, dim) and (n, B) for a context of shape (B, k)."""
        z, context, shape = conditional_base_draws(
            lambda m: self._base_sample(m, generator), n, context, self.context_dim
        )
        x, log_prob = self.inverse_and_log_prob(z, generator=generator, context=context)
        return x.reshape(*shape, *self.event_shape), log_prob.reshape(shape)

    def _base_sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return base_sample(self.base, n, generator)

    def trajectory(
        self, x0: torch.Tensor, ts: Sequence[float] | torch.Tensor, *, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Positions of the points x0 (at t=0) at the times ``ts``: shape (len(ts), batch, dim)."""
        check_batch(x0, self.dim, "x0")
        context = self._context(context, x0)
        times = torch.as_tensor(ts, dtype=x0.dtype, device=x0.device).flatten()
        if times.numel() == 0 or not torch.isfinite(times).all():
            raise ValueError(f"ts must be a non-empty sequence of finite times, got {ts!r}")
        if (times < 0).any() or (times > 1).any():
            raise ValueError(f"ts must lie in [0, 1], got {times.tolist()}")
        order = torch.argsort(times)
        sorted_times = times[order]
        if (sorted_times[1:] == sorted_times[:-1]).any():
            raise ValueError(f"ts must not repeat a time, got {times.tolist()}")
        grid = torch.cat([sorted_times.new_zeros(1), sorted_times]) if sorted_times[0] > 0 else sorted_times
        self.stats = SolveStats()
        if grid.numel() == 1:
            path = x0.unsqueeze(0)
        else:
            path = solve(
                PositionDynamics(self.field, context),
                x0,
                grid,
                self.solver,
                self.stats,
                name="trajectory",
                arguments=(context,),
            )
        if sorted_times[0] > 0:
            path = path[1:]
        result = torch.empty_like(path)
        result[order] = path
        return result

    def config(self) -> dict[str, Any]:
        """What rebuilds this flow (with an :class:`MLPField`) from a checkpoint."""
        field_config = self.field.config() if callable(getattr(self.field, "config", None)) else None
        return {
            "kind": self.kind,
            "dim": list(self.dim) if isinstance(self.dim, tuple) else self.dim,
            "field": field_config,
            "divergence": self.divergence,
            "noise": self.noise,
            "solver": self.solver.to_dict(),
            **({"context_columns": list(self.context_columns)} if self.context_columns else {}),
        }
