"""Velocity-field networks u(x, t) with time conditioning.

Any ``nn.Module`` whose ``forward(t, x)`` returns a tensor shaped like ``x`` can drive a
:class:`cnf.CNF`; :class:`MLPField` is the default, with FFJORD's concat-squash layers
(Grathwohl et al. 2019): ``Linear(x) * sigmoid(Linear(t)) + Linear_nobias(t)``.

When one time is shared by the batch (always, inside an ODE solve) each layer is an affine
map of x whose weight and bias depend on t only; :meth:`MLPField.velocity_and_divergence`
uses that to carry the d Jacobian columns through the layers (forward mode) and returns the
exact divergence from the same pass, without autograd.

Conditional fields u(x, t, c) (``context_dim=k``): the context enters every layer. With
``context_mode="concat"`` it is an extra per-sample bias W_c e(c) of each layer's
pre-activation (concatenating c to the layer input), with ``"film"`` a per-sample scale and
shift of each hidden layer's pre-activation (FiLM, Perez et al. 2018); e is an optional user
``embedding`` module (identity by default), trained jointly. Neither changes how x enters,
so the forward-mode divergence keeps its structure (FiLM scales the Jacobian columns).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnf.context import ContextStandardization

ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "silu": nn.SiLU, "relu": nn.ReLU}
TIME_EMBEDDINGS = ("concatsquash", "concat")
CONTEXT_MODES = ("concat", "film")


class ConcatSquashLinear(nn.Module):
    """FFJORD's time-gated linear layer: ``W x * sigmoid(a t + c) + b t``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.shift = nn.Linear(1, out_features, bias=False)

    def affine(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of x -> layer(t, x) at one time ``t`` of shape (1, 1)."""
        gate = torch.sigmoid(self.gate(t)).reshape(-1)
        shift = self.shift(t).reshape(-1)
        return self.linear.weight * gate[:, None], torch.addcmul(shift, self.linear.bias, gate)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == 1:  # one time for the batch: a single fused x W^T + b
            return nn.functional.linear(x, *self.affine(t))
        return self.linear(x) * torch.sigmoid(self.gate(t)) + self.shift(t)


class ConcatLinear(nn.Module):
    """Linear layer on the input with time appended: ``W [x, t] + b``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features + 1, out_features)

    def affine(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of x -> layer(t, x) at one time ``t`` of shape (1, 1)."""
        weight = self.linear.weight
        return weight[:, :-1], self.linear.bias + weight[:, -1] * t.reshape(())

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == 1:
            return nn.functional.linear(x, *self.affine(t))
        return self.linear(torch.cat([x, t.expand(x.shape[0], 1)], dim=1))


def activation_derivative(activation: nn.Module, pre: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """sigma'(pre) given pre and out = sigma(pre), for the built-in activations (their default
    settings); None for anything else, which then takes the autograd divergence."""
    kind = type(activation)
    if kind is nn.Tanh:
        return torch.addcmul(torch.ones((), dtype=out.dtype, device=out.device), out, out, value=-1)
    if kind is nn.Softplus and activation.beta == 1:
        return torch.sigmoid(pre)
    if kind is nn.ELU and activation.alpha == 1:
        return torch.where(pre > 0, torch.ones_like(out), out + 1)
    if kind is nn.SiLU:
        sig = torch.sigmoid(pre)
        return sig * (1 + pre * (1 - sig))
    if kind is nn.ReLU:
        return (pre > 0).to(out.dtype)
    return None


def time_column(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Time as a column that broadcasts against ``x``: shape (1, 1) for one time shared by the
    batch (so time gates are computed once, not per sample), else (batch, 1).

    Accepts a scalar, shape (batch,) or (batch, 1)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0 or t.numel() == 1:
        return t.reshape(1, 1)
    if t.numel() != x.shape[0]:
        raise ValueError(
            f"t must be a scalar or hold one time per sample ({x.shape[0]}), got shape {tuple(t.shape)}"
        )
    return t.reshape(x.shape[0], 1)


class MLPField(nn.Module):
    """A time-conditioned MLP velocity field ``u(x, t)`` on R^dim.

    Args:
        dim: data dimension.
        hidden: widths of the hidden layers.
        activation: name (``tanh``, ``softplus``, ``elu``, ``silu``, ``relu``) or an nn.Module.
        time_embedding: ``concatsquash`` (FFJORD default) or ``concat``.
        context_dim: k for a conditional field u(x, t, c) with c of shape (batch, k) or (1, k);
            None (default) for an unconditional one.
        context_mode: ``concat`` (per-sample bias in every layer) or ``film`` (per-sample
            scale and shift of every hidden layer).
        embedding: optional nn.Module applied to c first ((batch, k) -> (batch, e)).
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str | nn.Module = "tanh",
        time_embedding: str = "concatsquash",
        *,
        context_dim: int | None = None,
        context_mode: str = "concat",
        embedding: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        hidden = tuple(hidden)
        if not all(isinstance(h, int) and h > 0 for h in hidden):
            raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}")
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"unknown time_embedding {time_embedding!r}; choose one of {TIME_EMBEDDINGS}")
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError(f"unknown activation {activation!r}; choose one of {tuple(ACTIVATIONS)}")
            make_activation = ACTIVATIONS[activation]
        else:
            make_activation = lambda: activation  # noqa: E731
        layer = ConcatSquashLinear if time_embedding == "concatsquash" else ConcatLinear
        widths = (dim, *hidden, dim)
        self.dim = dim
        self.hidden = hidden
        self.time_embedding = time_embedding
        self.activation_name = activation if isinstance(activation, str) else type(activation).__name__
        self.layers = nn.ModuleList(layer(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activations = nn.ModuleList(make_activation() for _ in hidden)
        self._init_context(context_dim, context_mode, embedding, widths[1:])

    def _init_context(
        self, context_dim: int | None, mode: str, embedding: nn.Module | None, widths: Sequence[int]
    ) -> None:
        self.context_dim = context_dim
        self.context_mode = mode
        self.embedding = embedding
        self.context_layers = None
        self.context_standardization = None
        if context_dim is None:
            if embedding is not None:
                raise ValueError(f"embedding={embedding!r} needs context_dim=k, got context_dim=None")
            return
        if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 1:
            raise ValueError(f"context_dim must be a positive int or None, got {context_dim!r}")
        if mode not in CONTEXT_MODES:
            raise ValueError(f"unknown context_mode {mode!r}; choose one of {CONTEXT_MODES}")
        self.context_standardization = ContextStandardization(context_dim)
        features = context_dim
        if embedding is not None:
            if not isinstance(embedding, nn.Module):
                raise TypeError(f"embedding must be an nn.Module, got {type(embedding).__name__}")
            with torch.no_grad():
                probe = next(embedding.parameters(), torch.zeros(())).new_zeros(1, context_dim)
                out = embedding(probe)
            if out.ndim != 2 or out.shape[0] != 1:
                raise ValueError(
                    f"embedding must map (batch, {context_dim}) to (batch, e), got shape {tuple(out.shape)}"
                )
            features = out.shape[1]
        if mode == "concat":  # a bias W_c e(c) for every layer's pre-activation
            self.context_layers = nn.ModuleList(nn.Linear(features, w, bias=False) for w in widths)
        else:  # FiLM: (scale - 1, shift) of every hidden layer, the identity at zero weights
            self.context_layers = nn.ModuleList(nn.Linear(features, 2 * w) for w in widths[:-1])
            for layer in self.context_layers:
                nn.init.zeros_(layer.bias)

    def prepare_context(self, context: torch.Tensor | None, batch: int) -> PreparedContext | None:
        """The per-layer terms of ``context`` for a batch of ``batch`` points, computed once: a
        solve hands them to every evaluation instead of recomputing them (c does not change
        during a solve). Gradients still reach c and the embedding through them."""
        return None if context is None else PreparedContext(self.context_terms(context, batch), batch)

    def context_terms(
        self, context: torch.Tensor | PreparedContext | None, batch: int
    ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per layer ``(scale, shift)`` from the context, each (1 or batch, width) or None.

        A layer's pre-activation z becomes ``z * scale + shift``; both None without a context."""
        if isinstance(context, PreparedContext):
            if context.batch not in (1, batch):
                raise ValueError(f"a context prepared for {context.batch} points was given {batch} points")
            return context.terms
        count = len(self.layers)
        if self.context_dim is None:
            if context is not None:
                raise ValueError(
                    f"context of shape {tuple(context.shape)} given to an unconditional MLPField "
                    "(build it with context_dim=k)"
                )
            return [(None, None)] * count
        if context is None:
            raise ValueError(f"this MLPField is conditional (context_dim={self.context_dim}); pass context=")
        if context.ndim == 1:
            context = context.unsqueeze(0)
        if context.ndim != 2 or context.shape[1] != self.context_dim or context.shape[0] not in (1, batch):
            raise ValueError(
                f"context must have shape ({self.context_dim},), (1, {self.context_dim}) or "
                f"({batch}, {self.context_dim}); got shape {tuple(context.shape)}"
            )
        features = self.context_standardization(context)
        if self.embedding is not None:
            features = self.embedding(features)
        if self.context_mode == "concat":
            return [(None, layer(features)) for layer in self.context_layers]
        terms = []
        for layer in self.context_layers:
            scale, shift = layer(features).chunk(2, dim=-1)
            terms.append((scale + 1, shift))
        return [*terms, (None, None)]

    def forward(
        self, t: torch.Tensor | float, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        tt = time_column(t, x)
        terms = self.context_terms(context, x.shape[0])
        h = x
        for i, layer in enumerate(self.layers):
            h = _modulate(layer(tt, h), *terms[i])
            if i < len(self.activations):
                h = self.activations[i](h)
        return h

    @property
    def has_analytic_divergence(self) -> bool:
        """True when every activation's derivative is known (all the named ones)."""
        probe = torch.zeros(1)
        return all(activation_derivative(a, probe, probe) is not None for a in self.activations)

    def velocity_and_divergence(
        self, t: torch.Tensor | float, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u(x, t), div u(x, t))`` from one pass, the divergence exact.

        Forward-mode Jacobian: with layer l's affine map (W_l, b_l) at time t and D_l = diag
        sigma'(z_l), the columns J e_j = W_L D_{L-1} W_{L-1} ... D_1 W_1 e_j are carried as a
        (d, batch, width) tensor and the trace takes the diagonal at the last layer. Same
        matrix products as d autograd VJPs, but no graph, fewer elementwise passes, and when
        training the gradient is a plain backward instead of a double backward. ``t`` must be
        one time shared by the batch. A context adds a per-sample shift (c does not change
        d/dx) and, with FiLM, a per-sample scale that multiplies the columns like sigma'.
        """
        tt = time_column(t, x)
        if tt.shape[0] != 1:
            raise ValueError(
                f"velocity_and_divergence needs one time shared by the batch, got t of shape {tuple(torch.as_tensor(t).shape)}"
            )
        terms = self.context_terms(context, x.shape[0])
        h, columns = x, None  # columns[j] = d h / d x_j, shape (d, batch, width)
        for layer, activation, (scale, shift) in zip(self.layers[:-1], self.activations, terms):
            weight, bias = layer.affine(tt)
            pre = _modulate(nn.functional.linear(h, weight, bias), scale, shift)
            h = activation(pre)
            slope = activation_derivative(activation, pre, h)
            if slope is None:
                raise ValueError(
                    f"no analytic derivative for activation {self.activation_name!r}; use cnf.exact_divergence"
                )
            if scale is not None:
                slope = slope * scale
            if columns is None:
                # (d, batch, width), contiguous so that the next layer's reshape is free
                columns = slope.unsqueeze(0) * weight.t().contiguous().unsqueeze(1)
            else:
                dim, batch, width = columns.shape
                columns = (columns.reshape(dim * batch, width) @ weight.t()).reshape(dim, batch, -1) * slope
        weight, bias = self.layers[-1].affine(tt)
        out = _modulate(nn.functional.linear(h, weight, bias), *terms[-1])
        if columns is None:  # no hidden layer: u is affine in x
            return out, torch.diagonal(weight).sum().expand(x.shape[0])
        # div u = sum_j (W_L J_{L-1} e_j)_j: only the diagonal of the last product is needed.
        return out, (columns * weight.unsqueeze(1)).sum(dim=(0, 2))

    def config(self) -> dict | None:
        """Keyword arguments that rebuild this field (for checkpoints); None with a user
        embedding module (restore into a flow built by hand)."""
        if self.embedding is not None:
            return None
        config = {
            "dim": self.dim,
            "hidden": list(self.hidden),
            "activation": self.activation_name,
            "time_embedding": self.time_embedding,
        }
        if self.context_dim is not None:
            config.update(context_dim=self.context_dim, context_mode=self.context_mode)
        return config


class PreparedContext:
    """An MLPField's per-layer context terms for one solve (see :meth:`MLPField.prepare_context`)."""

    def __init__(self, terms: list[tuple[torch.Tensor | None, torch.Tensor | None]], batch: int) -> None:
        self.terms = terms
        self.batch = batch


def _modulate(pre: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """``pre * scale + shift`` with either factor absent (one fused pass when both are there)."""
    if scale is not None and shift is not None:
        return torch.addcmul(shift, pre, scale)
    if scale is not None:
        return pre * scale
    if shift is not None:
        return pre + shift
    return pre


class AutogradField(nn.Module):
    """A field seen without its ``velocity_and_divergence``: a CNF around it takes the exact
    divergence from autograd VJPs instead (to compare the two; same values)."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.dim = field.dim
        self.context_dim = getattr(field, "context_dim", None)

    def forward(self, t: torch.Tensor | float, x: torch.Tensor, **context: torch.Tensor) -> torch.Tensor:
        return self.field(t, x, **context)


class LinearField(nn.Module):
    """``u(x, t) = A x``: the analytic test case (x(1) = expm(A) x(0))."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.as_tensor(matrix).clone())
        self.dim = self.matrix.shape[0]

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.T
