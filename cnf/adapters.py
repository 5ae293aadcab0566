"""Stronger discrete baselines from zuko behind cnf's flow surface (optional: the ``bench`` extra).

:class:`ZukoFlow` wraps a zuko flow (RealNVP, MAF, or IAF = MAF with its transforms inverted) so
that it has the surface of :class:`cnf.CNF` and :class:`cnf.PlanarFlow`: ``log_prob(x)``,
``sample(n)``, ``sample_and_log_prob(n)``, ``dim``, ``stats`` (network passes of the last call,
as ``nfe_forward``) and ``config()``. Benchmarks and :func:`cnf.train` use it unchanged.

zuko is not a dependency of cnf: install it with ``pip install --no-deps zuko`` (or the
``bench`` extra) — ``--no-deps`` so that pip keeps the installed torch. Without it,
:func:`zuko_available` is False and the constructors raise ImportError saying so.

References: Dinh et al. (2017), "Density estimation using Real NVP"; Papamakarios et al. (2017),
"Masked Autoregressive Flow for Density Estimation"; Kingma et al. (2016), "Improved
Variational Inference with Inverse Autoregressive Flow"; Rozet et al., zuko.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cnf.data import check_batch
from cnf.solver import SolveStats

ZUKO_MODELS = ("realnvp", "maf", "iaf")
MISSING_ZUKO = (
    "zuko is not installed; it is optional (the `bench` extra): pip install --no-deps zuko "
    "(--no-deps keeps the installed torch)"
)


def zuko_available() -> bool:
    """Whether zuko can be imported."""
    try:
        importlib.import_module("zuko")
    except ImportError:
        return False
    return True


def _zuko() -> Any:
    try:
        return importlib.import_module("zuko")
    except ImportError as error:
        raise ImportError(MISSING_ZUKO) from error


class ZukoFlow(nn.Module):
    """A zuko flow with cnf's surface.

    Args:
        flow: an unconditional zuko ``LazyDistribution`` (e.g. ``zuko.flows.MAF(2)``).
        dim: data dimension.
        name: ``realnvp``, ``maf``, ``iaf`` or any label.
        passes: network passes of (scoring, sampling), recorded in ``stats.nfe_forward``.
    """

    kind = "zuko"

    def __init__(self, flow: nn.Module, dim: int, name: str, passes: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        if not isinstance(flow, nn.Module):
            raise TypeError(f"flow must be a zuko flow (an nn.Module), got {type(flow).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.flow = flow
        self.dim = dim
        self.name = name
        self.passes = passes
        self.stats = SolveStats()

    def log_prob(self, x: torch.Tensor, t: float = 1.0, **ignored: Any) -> torch.Tensor:
        """log p(x) per sample, shape (batch,). Only t=1 (a discrete flow has no path)."""
        if float(t) != 1.0:
            raise ValueError(f"t must be 1.0 for a discrete zuko flow, got {t!r}")
        check_batch(x, self.dim, "x")
        self.stats = SolveStats(nfe_forward=self.passes[0], steps=self.passes[0], solve="scoring")
        return self.flow().log_prob(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples, shape (n, dim); ``generator`` is accepted for the surface and ignored
        (zuko draws from the global RNG: seed it with torch.manual_seed)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.stats = SolveStats(nfe_forward=self.passes[1], steps=self.passes[1], solve="sampling")
        return self.flow().sample((n,))

    def sample_and_log_prob(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.stats = SolveStats(nfe_forward=self.passes[1], steps=self.passes[1], solve="sampling")
        return self.flow().rsample_and_log_prob((n,))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "dim": self.dim}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}"


def make_zuko_flow(name: str, dim: int, *, transforms: int = 4, hidden: Sequence[int] = (64, 64)) -> ZukoFlow:
    """A zuko ``realnvp``, ``maf`` or ``iaf`` on R^dim with cnf's surface.

    MAF scores in one pass per transform and samples in ``dim``; IAF (MAF's transforms
    inverted) the other way round; RealNVP (affine coupling) one pass each way.
    """
    if name not in ZUKO_MODELS:
        raise ValueError(f"unknown zuko model {name!r}; choose one of {ZUKO_MODELS}")
    if isinstance(transforms, bool) or not isinstance(transforms, int) or transforms < 1:
        raise ValueError(f"transforms must be a positive int, got {transforms!r}")
    zuko = _zuko()
    hidden = tuple(hidden)
    if name == "realnvp":
        flow = zuko.flows.RealNVP(dim, transforms=transforms, hidden_features=hidden)
        return ZukoFlow(flow, dim, name, (transforms, transforms))
    flow = zuko.flows.MAF(dim, transforms=transforms, hidden_features=hidden)
    if name == "maf":
        return ZukoFlow(flow, dim, name, (transforms, transforms * dim))
    # IAF: the same autoregressive transforms used in the sampling direction (zuko's recipe).
    flow.transform = flow.transform.inv
    return ZukoFlow(flow, dim, name, (transforms * dim, transforms))
