"""Planar flows: the discrete baseline, and their link to CNFs by forward Euler.

A planar layer (Rezende & Mohamed, 2015) maps

    x_k = x_{k-1} + h(w_k . x_{k-1} + b_k) u_hat_k,        h = tanh,

with log|det J_k| = log|1 + h'(w_k . x_{k-1} + b_k) u_hat_k . w_k| (matrix determinant lemma).
The reparameterisation u_hat = u + (m(w.u) - w.u) w / |w|^2 with m(a) = -1 + softplus(a) gives
w . u_hat = m(w.u) > -1, so every layer is invertible; it is applied on every call, so the flow
stays invertible during training.

Direction: as in :class:`cnf.CNF`, "time" runs from the base (t=0) to the data (t=1): layer k
is applied at t = (k-1)/K. Sampling (base -> data) applies the layers; scoring (data -> base)
inverts each layer by solving its scalar equation alpha + h(alpha) (w . u_hat) = w . y + b with
a safeguarded Newton / bisection iteration, then differentiates through the solution by one
Newton step taken with gradients (the implicit-function theorem).

Euler link: K planar layers are exactly K forward-Euler steps of size 1/K of the piecewise
constant-in-time field u(x, t) = K h(w_k . x + b_k) u_hat_k, k = floor(t K)
(:meth:`PlanarFlow.as_field`). The Euler estimate of the log-density integrates the divergence
K h' u_hat_k . w_k, i.e. replaces log(1 + s) by s per layer, an O(1/K) error overall.

Conditional variant (:class:`ConditionalPlanarFlow`): each layer's (w, b, u) are the learnt
ones plus a small network's output from the context c, with the u-hat constraint applied per
sample, so every p(x | c) is an invertible planar flow.

Reference: Rezende & Mohamed (2015), "Variational Inference with Normalizing Flows".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnf.context import ContextStandardization, check_context, conditional_base_draws
from cnf.data import check_batch
from cnf.flow import base_log_prob, base_sample, check_base
from cnf.solver import SolveStats

ACTIVATIONS = ("tanh",)

# floor(t K + _GRID_SLACK): times within rounding of a grid point k/K count as that grid point.
_GRID_SLACK = 1e-6
_MAX_ITERATIONS = 200


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _layer_count(t: torch.Tensor | float, layers: int) -> torch.Tensor:
    """Number of layers applied by time t: floor(t K), robust to rounding at t = k/K."""
    t = torch.as_tensor(t)
    return torch.floor(t.double() * layers + _GRID_SLACK).long()


def _softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    """log(exp(y) - 1) for y > 0, stable for large y."""
    return y + torch.log(-torch.expm1(-y))


def u_hat(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """u + (m(w.u) - w.u) w / |w|^2 with m(a) = -1 + softplus(a), over the last axis: then
    w . u_hat = m(w.u) > -1 and the layer is invertible (for any leading axes, e.g. per sample)."""
    wu = (w * u).sum(-1)
    m = F.softplus(wu) - 1
    return u + ((m - wu) / (w * w).sum(-1)).unsqueeze(-1) * w


def solve_planar_scalar(
    c: torch.Tensor, m: torch.Tensor, max_iterations: int = _MAX_ITERATIONS
) -> torch.Tensor:
    """The root alpha of alpha + m tanh(alpha) = c (elementwise, m > -1), without gradients.

    The left side is strictly increasing (derivative 1 + m sech^2 > 0) and the root lies in
    [c - |m|, c + |m|]. As in Numerical Recipes' ``rtsafe``, a Newton step is taken when it
    stays inside the shrinking bracket and at least halves the step before last, a bisection
    step otherwise (plain Newton can cycle on tanh); iteration stops at steps of a few ulps.
    """
    with torch.no_grad():
        c = c.detach()
        m = m.detach().expand_as(c)
        radius = m.abs()
        lo, hi = c - radius, c + radius
        alpha = c.clone()
        step = step_before = hi - lo
        tol = 4 * torch.finfo(c.dtype).eps
        for _ in range(max_iterations):
            th = torch.tanh(alpha)
            value = alpha + m * th - c
            slope = 1 + m * (1 - th * th)
            lo = torch.where(value < 0, alpha, lo)
            hi = torch.where(value > 0, alpha, hi)
            newton = alpha - value / slope
            use_newton = (
                (newton >= lo)
                & (newton <= hi)
                & torch.isfinite(newton)
                & (2 * value.abs() <= (step_before * slope).abs())
            )
            new = torch.where(use_newton, newton, 0.5 * (lo + hi))
            step_before, step = step, new - alpha
            scale = 1 + new.abs()
            done = (step.abs() <= tol * scale) | (hi - lo <= tol * scale)
            alpha = new
            if bool(done.all()):
                break
        return alpha


class PlanarFlow(nn.Module):
    """A stack of ``layers`` planar layers on R^dim with the surface of :class:`cnf.CNF`.

    Args:
        dim: data dimension.
        layers: number of planar layers K.
        base: the base distribution p0 (default: standard normal).
        activation: the nonlinearity h; only ``"tanh"``.

    Parameters are stacked: ``w`` and ``u`` of shape (K, dim), ``b`` of shape (K,).
    ``stats.nfe_forward`` (and ``stats.steps``) count the layers applied by the last call.
    """

    kind = "planar"
    context_dim: int | None = None
    context_columns: list[int] | None = None

    def __init__(self, dim: int, layers: int, *, base: Any = None, activation: str = "tanh") -> None:
        super().__init__()
        self.dim = _check_positive_int("dim", dim)
        self.layers = _check_positive_int("layers", layers)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        self.activation = activation
        self.base = check_base(base, dim)
        # Small random start: w . x = O(1) and displacements of about 0.1 per layer, so a new
        # flow is not the identity yet every layer is well conditioned (w . u_hat near -0.3).
        self.w = nn.Parameter(torch.randn(layers, dim) / dim**0.5)
        self.b = nn.Parameter(torch.zeros(layers))
        self.u = nn.Parameter(0.1 * torch.randn(layers, dim))
        self.stats = SolveStats()

    # -- parameters --------------------------------------------------------------------------
    def layer_parameters(
        self, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w, b, u_hat)`` of all layers, with the invertibility reparameterisation applied:
        shapes (K, dim), (K,), (K, dim) (with a leading batch axis for a conditional flow)."""
        if context is not None:
            raise ValueError(
                f"context of shape {tuple(context.shape)} given to an unconditional PlanarFlow; "
                "use ConditionalPlanarFlow for p(x | c)"
            )
        return self.w, self.b, u_hat(self.w, self.u)

    def _parameters_for(
        self, context: torch.Tensor | None, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.layer_parameters(check_context(context, self.context_dim, x.shape[0], x))

    @torch.no_grad()
    def set_layer(self, k: int, w: torch.Tensor, b: float | torch.Tensor, u_hat: torch.Tensor) -> None:
        """Set layer ``k`` (0-based) so that its reparameterised parameters are (w, b, u_hat).

        Needs w != 0 and w . u_hat > -1 (the invertible layers).
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.layers:
            raise ValueError(f"k must be an int in [0, {self.layers}), got {k!r}")
        w = torch.as_tensor(w, dtype=self.w.dtype, device=self.w.device).reshape(-1)
        u_hat = torch.as_tensor(u_hat, dtype=self.u.dtype, device=self.u.device).reshape(-1)
        if w.numel() != self.dim or u_hat.numel() != self.dim:
            raise ValueError(f"w and u_hat must have {self.dim} entries, got {w.numel()} and {u_hat.numel()}")
        norm2 = (w * w).sum()
        if not norm2 > 0:
            raise ValueError(f"w must be non-zero, got {w.tolist()}")
        m = (w * u_hat).sum()
        if not m > -1:
            raise ValueError(f"w . u_hat must exceed -1 for an invertible layer, got {float(m)!r}")
        wu = _softplus_inverse(m + 1)
        self.w[k] = w
        self.b[k] = torch.as_tensor(b, dtype=self.b.dtype)
        self.u[k] = u_hat + (wu - m) / norm2 * w

    # -- the layers ---------------------------------------------------------------------------
    def _forward_layers(
        self, z: torch.Tensor, count: int, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the first ``count`` layers to z: (x, sum of log|det J_k|)."""
        w, b, u_hat = self._parameters_for(context, z)
        m = (w * u_hat).sum(-1)
        x = z
        logdet = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for k in range(count):
            th = torch.tanh((x * w[..., k, :]).sum(-1) + b[..., k])
            x = x + th.unsqueeze(-1) * u_hat[..., k, :]
            logdet = logdet + torch.log1p((1 - th * th) * m[..., k])
        self.stats = SolveStats(nfe_forward=count, steps=count, solve="sampling")
        return x, logdet

    def _inverse_layers(
        self, x: torch.Tensor, count: int, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Undo the first ``count`` layers (last one first): (z, sum of log|det J_k|)."""
        w, b, u_hat = self._parameters_for(context, x)
        m = (w * u_hat).sum(-1)
        y = x
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for k in reversed(range(count)):
            c = (y * w[..., k, :]).sum(-1) + b[..., k]
            m_k = m[..., k]
            root = solve_planar_scalar(c, m_k)
            # One Newton step with gradients: its value is the root (to rounding) and, since
            # the residual vanishes there, its derivative is the implicit-function derivative.
            th = torch.tanh(root)
            residual = root + m_k * th - c
            alpha = root - residual / (1 + m_k * (1 - th * th))
            th = torch.tanh(alpha)
            y = y - th.unsqueeze(-1) * u_hat[..., k, :]
            logdet = logdet + torch.log1p((1 - th * th) * m_k)
        self.stats = SolveStats(nfe_forward=count, steps=count, solve="scoring")
        return y, logdet

    def _count(self, t: float) -> int:
        t = float(t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {t!r}")
        return min(int(_layer_count(t, self.layers)), self.layers)

    # -- public surface (that of cnf.CNF) ----------------------------------------------------
    def log_prob(
        self,
        x: torch.Tensor,
        t: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        probe: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p_t(x) per sample (default t=1: the model density), shape (batch,).

        Exact; ``generator`` and ``probe`` are accepted for the surface of :class:`cnf.CNF`
        and ignored. At time t the flow is the first floor(t K) layers.
        """
        z, delta_logp = self.transform(x, t, context=context)
        return base_log_prob(self.base, z) + delta_logp

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_prob(x, context=context)

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
        z, logdet = self._inverse_layers(x, self._count(t), context)
        return z, -logdet

    def inverse(
        self, z: torch.Tensor, t: float = 1.0, *, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Base -> data: apply the first floor(t K) layers (all by default)."""
        check_batch(z, self.dim, "z")
        return self._forward_layers(z, self._count(t), context)[0]

    def inverse_and_log_prob(
        self,
        z: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        probe: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Base -> data with densities: ``(x, log p1(x))``; no root finding needed."""
        check_batch(z, self.dim, "z")
        x, logdet = self._forward_layers(z, self.layers, context)
        return x, base_log_prob(self.base, z) - logdet

    def sample(
        self, n: int, generator: torch.Generator | None = None, *, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``n`` samples of p1, shape (n, dim); (n, B, dim) for a context of shape (B, k)."""
        z, context, shape = conditional_base_draws(
            lambda m: self._base_sample(m, generator), n, context, self.context_dim
        )
        return self.inverse(z, context=context).reshape(*shape, self.dim)

    def sample_and_log_prob(
        self, n: int, generator: torch.Generator | None = None, *, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples and their log densities (differentiable: used by variational inference)."""
        z, context, shape = conditional_base_draws(
            lambda m: self._base_sample(m, generator), n, context, self.context_dim
        )
        x, log_prob = self.inverse_and_log_prob(z, context=context)
        return x.reshape(*shape, self.dim), log_prob.reshape(shape)

    def _base_sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        z = base_sample(self.base, n, generator)
        return z.to(self.w.dtype) if z.is_floating_point() else z

    def trajectory(
        self, x0: torch.Tensor, ts: Sequence[float] | torch.Tensor, *, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Positions of x0 (at t=0) after floor(t K) layers for each t in ``ts``.

        Shape (len(ts), batch, dim); the grid times k/K give the layer outputs exactly.
        """
        check_batch(x0, self.dim, "x0")
        w, b, u_hat = self._parameters_for(context, x0)
        times = torch.as_tensor(ts, dtype=torch.float64).flatten()
        if times.numel() == 0 or not torch.isfinite(times).all():
            raise ValueError(f"ts must be a non-empty sequence of finite times, got {ts!r}")
        if (times < 0).any() or (times > 1).any():
            raise ValueError(f"ts must lie in [0, 1], got {times.tolist()}")
        counts = _layer_count(times, self.layers).clamp(0, self.layers).tolist()
        last = max(counts)
        positions = [x0]
        x = x0
        for k in range(last):
            x = x + torch.tanh((x * w[..., k, :]).sum(-1) + b[..., k]).unsqueeze(-1) * u_hat[..., k, :]
            positions.append(x)
        self.stats = SolveStats(nfe_forward=last, steps=last, solve="trajectory")
        return torch.stack([positions[c] for c in counts])

    def as_field(self) -> PlanarVelocityField:
        """The velocity field whose K forward-Euler steps of size 1/K are this flow's layers."""
        return PlanarVelocityField(self)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "layers": self.layers, "activation": self.activation}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, layers={self.layers}, activation={self.activation!r}"


class ConditionalPlanarFlow(PlanarFlow):
    """Planar flow of p(x | c): layer k's (w, b, u) are the learnt ones plus the output of a
    small tanh network of the context, the u-hat constraint applied per sample.

    Args:
        dim, layers, base, activation: as :class:`PlanarFlow`.
        context_dim: k, the context's size; every method takes ``context=`` of shape (k,) or
            (batch, k) as :class:`cnf.CNF` does.
        hidden: widths of the hidden layers of the context network.
    """

    kind = "conditional_planar"

    def __init__(
        self,
        dim: int,
        layers: int,
        context_dim: int,
        *,
        hidden: Sequence[int] = (64,),
        base: Any = None,
        activation: str = "tanh",
    ) -> None:
        super().__init__(dim, layers, base=base, activation=activation)
        self.context_dim = _check_positive_int("context_dim", context_dim)
        self.hidden = tuple(_check_positive_int("hidden", h) for h in hidden)
        widths = (context_dim, *self.hidden)
        modules: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            modules += [nn.Linear(a, b), nn.Tanh()]
        head = nn.Linear(widths[-1], layers * (2 * dim + 1))
        with torch.no_grad():  # start near the unconditional flow: small context effects
            head.weight.mul_(0.1)
            head.bias.zero_()
        self.context_net = nn.Sequential(*modules, head)
        self.context_standardization = ContextStandardization(context_dim)

    def layer_parameters(
        self, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample ``(w, b, u_hat)`` of shapes (B, K, dim), (B, K), (B, K, dim) for a checked
        context (B, k) (B = 1: one context for the batch)."""
        if context is None:
            raise ValueError(f"this flow is conditional (context_dim={self.context_dim}): pass context=")
        layers, dim = self.layers, self.dim
        out = self.context_net(self.context_standardization(context)).reshape(-1, layers, 2 * dim + 1)
        w = self.w + out[..., :dim]
        u = self.u + out[..., dim : 2 * dim]
        b = self.b + out[..., 2 * dim]
        return w, b, u_hat(w, u)

    def as_field(self) -> PlanarVelocityField:
        raise NotImplementedError("the Euler-link field of a ConditionalPlanarFlow is not implemented")

    def config(self) -> dict[str, Any]:
        config = {**super().config(), "context_dim": self.context_dim, "hidden": list(self.hidden)}
        if self.context_columns:
            config["context_columns"] = list(self.context_columns)
        return config


class PlanarVelocityField(nn.Module):
    """u(x, t) = K h(w_k . x + b_k) u_hat_k with k = floor(t K) clamped to [0, K-1].

    Shares its parameters with the :class:`PlanarFlow` it came from: forward-Euler with step
    1/K from t=0 reproduces the flow's layers exactly. ``t`` may be a scalar or one time per
    sample.
    """

    def __init__(self, flow: PlanarFlow) -> None:
        super().__init__()
        if not isinstance(flow, PlanarFlow):
            raise TypeError(f"flow must be a PlanarFlow, got {type(flow).__name__}")
        self.flow = flow
        self.dim = flow.dim

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        layers = self.flow.layers
        w, b, u_hat = self.flow.layer_parameters()
        k = _layer_count(t, layers).clamp(0, layers - 1).to(w.device)
        if k.numel() == 1:
            k = k.reshape(())
            return layers * torch.tanh(x @ w[k] + b[k]).unsqueeze(-1) * u_hat[k]
        k = k.reshape(x.shape[0])
        pre = (x * w[k]).sum(-1) + b[k]
        return layers * torch.tanh(pre).unsqueeze(-1) * u_hat[k]
