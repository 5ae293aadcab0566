"""Velocity-field networks u(x, t): any ``nn.Module`` with ``forward(t, x)`` drives a CNF.

* :mod:`cnf.fields.mlp`: :class:`MLPField` (time-conditioned MLP with a forward-mode exact
  divergence), :class:`LinearField` (the analytic test case), :class:`AutogradField`.
"""

from cnf.fields.mlp import (
    ACTIVATIONS,
    CONTEXT_MODES,
    TIME_EMBEDDINGS,
    AutogradField,
    ConcatLinear,
    ConcatSquashLinear,
    LinearField,
    MLPField,
    activation_derivative,
    time_column,
)

__all__ = [
    "ACTIVATIONS",
    "CONTEXT_MODES",
    "TIME_EMBEDDINGS",
    "AutogradField",
    "ConcatLinear",
    "ConcatSquashLinear",
    "LinearField",
    "MLPField",
    "activation_derivative",
    "time_column",
]
