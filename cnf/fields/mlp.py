"""Velocity-field networks u(x, t) with time conditioning.

Any ``nn.Module`` whose ``forward(t, x)`` returns a tensor shaped like ``x`` can drive a
:class:`cnf.CNF`; :class:`MLPField` is the default, with FFJORD's concat-squash layers
(Grathwohl et al. 2019): ``Linear(x) * sigmoid(Linear(t)) + Linear_nobias(t)``.

When one time is shared by the batch (always, inside an ODE solve) each layer is an affine
map of x whose weight and bias depend on t only; :meth:`MLPField.velocity_and_divergence`
uses that to carry the d Jacobian columns through the layers (forward mode) and returns the
exact divergence from the same pass, without autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "silu": nn.SiLU, "relu": nn.ReLU}
TIME_EMBEDDINGS = ("concatsquash", "concat")


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
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str | nn.Module = "tanh",
        time_embedding: str = "concatsquash",
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

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        tt = time_column(t, x)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(tt, h)
            if i < len(self.activations):
                h = self.activations[i](h)
        return h

    @property
    def has_analytic_divergence(self) -> bool:
        """True when every activation's derivative is known (all the named ones)."""
        probe = torch.zeros(1)
        return all(activation_derivative(a, probe, probe) is not None for a in self.activations)

    def velocity_and_divergence(
        self, t: torch.Tensor | float, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u(x, t), div u(x, t))`` from one pass, the divergence exact.

        Forward-mode Jacobian: with layer l's affine map (W_l, b_l) at time t and D_l = diag
        sigma'(z_l), the columns J e_j = W_L D_{L-1} W_{L-1} ... D_1 W_1 e_j are carried as a
        (d, batch, width) tensor and the trace takes the diagonal at the last layer. Same
        matrix products as d autograd VJPs, but no graph, fewer elementwise passes, and when
        training the gradient is a plain backward instead of a double backward. ``t`` must be
        one time shared by the batch.
        """
        tt = time_column(t, x)
        if tt.shape[0] != 1:
            raise ValueError(
                f"velocity_and_divergence needs one time shared by the batch, got t of shape {tuple(torch.as_tensor(t).shape)}"
            )
        h, columns = x, None  # columns[j] = d h / d x_j, shape (d, batch, width)
        for layer, activation in zip(self.layers[:-1], self.activations):
            weight, bias = layer.affine(tt)
            pre = nn.functional.linear(h, weight, bias)
            h = activation(pre)
            slope = activation_derivative(activation, pre, h)
            if slope is None:
                raise ValueError(
                    f"no analytic derivative for activation {self.activation_name!r}; use cnf.exact_divergence"
                )
            if columns is None:
                # (d, batch, width), contiguous so that the next layer's reshape is free
                columns = slope.unsqueeze(0) * weight.t().contiguous().unsqueeze(1)
            else:
                dim, batch, width = columns.shape
                columns = (columns.reshape(dim * batch, width) @ weight.t()).reshape(dim, batch, -1) * slope
        weight, bias = self.layers[-1].affine(tt)
        out = nn.functional.linear(h, weight, bias)
        if columns is None:  # no hidden layer: u is affine in x
            return out, torch.diagonal(weight).sum().expand(x.shape[0])
        # div u = sum_j (W_L J_{L-1} e_j)_j: only the diagonal of the last product is needed.
        return out, (columns * weight.unsqueeze(1)).sum(dim=(0, 2))

    def config(self) -> dict:
        """Keyword arguments that rebuild this field (for checkpoints)."""
        return {
            "dim": self.dim,
            "hidden": list(self.hidden),
            "activation": self.activation_name,
            "time_embedding": self.time_embedding,
        }


class AutogradField(nn.Module):
    """A field seen without its ``velocity_and_divergence``: a CNF around it takes the exact
    divergence from autograd VJPs instead (to compare the two; same values)."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.dim = field.dim

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        return self.field(t, x)


class LinearField(nn.Module):
    """``u(x, t) = A x``: the analytic test case (x(1) = expm(A) x(0))."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.as_tensor(matrix).clone())
        self.dim = self.matrix.shape[0]

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.T
