"""A flow with its preprocessing: likelihoods in the units of the data the user gave.

``TransformedFlow(flow, preprocess)`` models data x by letting ``flow`` model y = T(x), with T
the ``preprocess`` transform (standardise, dequantise, logit, ...). By the change of variables

    log p(x) = log q(T(x)) + log|det dT/dx|,

so :meth:`TransformedFlow.log_prob` is a density of x itself, comparable with any other model
of the same data, and :meth:`TransformedFlow.sample` undoes T. With a :class:`Dequantize` first,
discrete data are scored by the dequantised density and :meth:`bits_per_dim` converts it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cnf.transforms.base import Transform, sample_size
from cnf.transforms.dequantize import Dequantize


def bits_per_dim(log_prob: torch.Tensor, num_dims: int, bin_width: float = 1.0) -> torch.Tensor:
    """Bits per dimension of discrete data from the dequantised log-density in the data's units.

    With bins of width ``bin_width`` (the Dequantize ``step``), log P(x) >= log p(x + step u) +
    D log(step), so bits/dim = -(log_prob + D log(bin_width)) / (D ln 2). For data rescaled to
    [0, 1) by ``levels`` this equals the usual -(log q(y) - D log levels) / (D ln 2).
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"num_dims must be a positive int, got {num_dims!r}")
    if not (isinstance(bin_width, (int, float)) and math.isfinite(bin_width) and bin_width > 0):
        raise ValueError(f"bin_width must be a positive float, got {bin_width!r}")
    return -(log_prob + num_dims * math.log(bin_width)) / (num_dims * math.log(2))


def _with_generator(kwargs: dict[str, Any], generator: torch.Generator | None) -> dict[str, Any]:
    """Pass ``generator`` on only when given, so flows without that keyword work too."""
    return kwargs if generator is None else {**kwargs, "generator": generator}


def leading_dequantize(preprocess: Transform | None) -> Dequantize | None:
    """The :class:`Dequantize` that opens ``preprocess`` (discrete data), else None."""
    if preprocess is None:
        return None
    first = next(preprocess.leaves())
    return first if isinstance(first, Dequantize) else None


def inner_flow(flow: nn.Module) -> nn.Module:
    """The flow inside any :class:`TransformedFlow` wrappers (``flow`` itself when there are none)."""
    while isinstance(flow, TransformedFlow):
        flow = flow.flow
    return flow


class TransformedFlow(nn.Module):
    """``flow`` on preprocessed data, with the surface of :class:`cnf.CNF` in the data's units.

    Args:
        flow: any flow with ``log_prob``, ``sample``, ``transform``, ``inverse`` (a CNF, a
            PlanarFlow, ...), modelling the preprocessed data.
        preprocess: a :class:`cnf.transforms.Transform` (often a :class:`Compose`) from the
            data to the flow's space.

    ``generator`` seeds the Hutchinson probe of the flow and the dequantisation noise alike.
    """

    kind = "transformed"

    def __init__(self, flow: nn.Module, preprocess: Transform) -> None:
        super().__init__()
        if not isinstance(flow, nn.Module) or not callable(getattr(flow, "log_prob", None)):
            raise TypeError(f"flow must be an nn.Module with log_prob and sample, got {type(flow).__name__}")
        if not isinstance(preprocess, Transform):
            raise TypeError(f"preprocess must be a cnf.transforms.Transform, got {preprocess!r}")
        self.flow = flow
        self.preprocess = preprocess
        self.dim = getattr(flow, "dim", None)
        self.context_dim = getattr(flow, "context_dim", None)

    @property
    def stats(self) -> Any:
        """The counts of the inner flow's last solve."""
        return self.flow.stats

    @stats.setter
    def stats(self, value: Any) -> None:
        self.flow.stats = value

    def log_prob(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """log p(x) per sample in the units of x (nats), shape (n,)."""
        y, logdet = self.preprocess(x, generator=generator)
        return self.flow.log_prob(y, **_with_generator(kwargs, generator)) + logdet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def regularized_log_prob(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RNODE: log p(x) in data units, with the flow's kinetic and Jacobian integrals."""
        y, logdet = self.preprocess(x, generator=generator)
        log_prob, kinetic, jacobian = self.flow.regularized_log_prob(y, **_with_generator(kwargs, generator))
        return log_prob + logdet, kinetic, jacobian

    def transform(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> base: ``(z, delta_logp)`` with log p(x) = log p0(z) + delta_logp."""
        y, logdet = self.preprocess(x, generator=generator)
        z, delta = self.flow.transform(y, **_with_generator(kwargs, generator))
        return z, delta + logdet

    def inverse(self, z: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Base -> data: the flow's inverse, then the preprocessing undone."""
        return self.preprocess.inverse(self.flow.inverse(z, **kwargs))

    def sample(self, n: int, *, generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        """``n`` samples in the data's units (on the data's grid when dequantised); a conditional
        flow's ``context=`` of shape (B, k) gives (n, B, ...)."""
        samples = self.flow.sample(n, **_with_generator(kwargs, generator))
        context = kwargs.get("context")
        if context is None or context.ndim < 2:
            return self.preprocess.inverse(samples)
        return self.preprocess.inverse(samples.flatten(0, 1)).unflatten(0, samples.shape[:2])

    def trajectory(self, x0: torch.Tensor, ts: Sequence[float] | torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The flow's trajectory of base points x0, mapped back to the data's units."""
        path = self.flow.trajectory(x0, ts, **kwargs)
        return self.preprocess.inverse(path.flatten(0, 1)).reshape(path.shape)  # (T, n, ...): images too

    @property
    def bin_width(self) -> float | None:
        """Bin width of discrete data (the first step is a :class:`Dequantize`), else None."""
        first = leading_dequantize(self.preprocess)
        return None if first is None else first.bin_width

    def bits_per_dim(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bits per dimension of discrete data x, per sample (an upper bound; see :func:`bits_per_dim`).

        Needs a :class:`Dequantize` as the first preprocessing step: it defines the bins.
        """
        if self.bin_width is None:
            first = next(self.preprocess.leaves())
            raise ValueError(
                "bits_per_dim needs discrete data: the preprocessing must start with Dequantize, "
                f"got {type(first).__name__}"
            )
        return bits_per_dim(self.log_prob(x, generator=generator), sample_size(x), self.bin_width)

    def config(self) -> dict[str, Any]:
        flow_config = self.flow.config() if callable(getattr(self.flow, "config", None)) else None
        return {"kind": self.kind, "flow": flow_config, "preprocess": self.preprocess.config()}
