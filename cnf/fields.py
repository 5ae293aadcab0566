"""Velocity-field networks u(x, t) with time conditioning.

Any ``nn.Module`` whose ``forward(t, x)`` returns a tensor shaped like ``x`` can drive a
:class:`cnf.CNF`; :class:`MLPField` is the default, with FFJORD's concat-squash layers
(Grathwohl et al. 2019): ``Linear(x) * sigmoid(Linear(t)) + Linear_nobias(t)``.
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

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * torch.sigmoid(self.gate(t)) + self.shift(t)


class ConcatLinear(nn.Module):
    """Linear layer on the input with time appended: ``W [x, t] + b``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features + 1, out_features)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([x, t.expand(x.shape[0], 1)], dim=1))


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

    def config(self) -> dict:
        """Keyword arguments that rebuild this field (for checkpoints)."""
        return {
            "dim": self.dim,
            "hidden": list(self.hidden),
            "activation": self.activation_name,
            "time_embedding": self.time_embedding,
        }


class LinearField(nn.Module):
    """``u(x, t) = A x``: the analytic test case (x(1) = expm(A) x(0))."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.as_tensor(matrix).clone())
        self.dim = self.matrix.shape[0]

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.T
