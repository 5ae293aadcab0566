"""Velocity-field networks u(x, t): any ``nn.Module`` with ``forward(t, x)`` drives a CNF.

* :mod:`cnf.fields.mlp`: :class:`MLPField` (time-conditioned MLP with a forward-mode exact
  divergence), :class:`LinearField` (the analytic test case), :class:`AutogradField`.
* :mod:`cnf.fields.conv`: :class:`ConvField` (concat-squash convolutions on images).
* :mod:`cnf.fields.unet`: :class:`UNetField` (a small time-conditioned U-Net on images).
"""

from cnf.fields.conv import ConcatSquashConv2d, ConvField
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
from cnf.fields.unet import UNetField

__all__ = [
    "ACTIVATIONS",
    "CONTEXT_MODES",
    "TIME_EMBEDDINGS",
    "AutogradField",
    "ConcatSquashConv2d",
    "ConvField",
    "ConcatLinear",
    "ConcatSquashLinear",
    "LinearField",
    "MLPField",
    "activation_derivative",
    "UNetField",
    "time_column",
]
