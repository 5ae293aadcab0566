"""Uniform dequantisation of data on a grid of ``levels`` values (pixels, counts, ratings).

Data take the values x = low + k * step, k = 0 .. levels - 1. The forward map adds uniform noise
within each bin and rescales to [0, 1):

    y = ((x - low) / step + u) / levels,    u ~ U[0, 1)^D,    log|dy/dx| = -D log(step * levels).

Discrete likelihood bound (Theis et al. 2016; Ho et al. 2019, section 3.1): for a continuous
model density q on [0, 1)^D, the probability it gives to the bin of x satisfies, by Jensen,

    log P(x) = log E_u[q(y) levels^-D] >= E_u[log q(y)] - D log(levels).

:class:`cnf.transforms.TransformedFlow` reports log p(x + step u) = log q(y) - D log(step * levels),
the density of the dequantised data in the user's units; one draw of u is an unbiased estimate
of the bound plus D log(step), and bits per dimension are
-(log q(y) - D log levels) / (D ln 2) (:func:`cnf.transforms.bits_per_dim`).

The inverse quantises: x = low + step * clamp(floor(y * levels), 0, levels - 1), so samples are
values of the original grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cnf.transforms.base import Transform, check_sample_batch, sample_size

# x counts as on the grid when (x - low) / step is within this of an integer (float32 data).
_GRID_TOLERANCE = 1e-3


class Dequantize(Transform):
    """Uniform dequantisation of data on the grid low + k * step, k < levels (see module docstring)."""

    kind = "dequantize"

    def __init__(self, levels: int, low: float = 0.0, step: float = 1.0) -> None:
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an int >= 2, got {levels!r}")
        if not isinstance(low, (int, float)) or isinstance(low, bool) or not math.isfinite(low):
            raise ValueError(f"low must be a finite float, got {low!r}")
        if (
            not isinstance(step, (int, float))
            or isinstance(step, bool)
            or not (math.isfinite(step) and step > 0)
        ):
            raise ValueError(f"step must be a positive float, got {step!r}")
        self.levels = levels
        self.low = float(low)
        self.step = float(step)

    @property
    def bin_width(self) -> float:
        """Width of one bin in the data's units (``step``)."""
        return self.step

    def log_abs_det(self, like: torch.Tensor) -> torch.Tensor:
        per_sample = -sample_size(like) * math.log(self.step * self.levels)
        return torch.full((like.shape[0],), per_sample, dtype=like.dtype, device=like.device)

    def _check_grid(self, x: torch.Tensor) -> torch.Tensor:
        k = (x - self.low) / self.step
        nearest = torch.round(k)
        bad = ((k - nearest).abs() > _GRID_TOLERANCE) | (nearest < 0) | (nearest > self.levels - 1)
        if bool(bad.any()):
            value = x[bad][0].item()
            raise ValueError(
                f"x must take the values low + k * step = {self.low:g} + k * {self.step:g} with "
                f"k in 0..{self.levels - 1}; got {value!r} ({int(bad.sum())} entries off the grid)"
            )
        return k

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_sample_batch(x)
        k = self._check_grid(x)
        u = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        return (k + u) / self.levels, self.log_abs_det(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_sample_batch(y, "y")
        k = torch.floor(y * self.levels).clamp(0, self.levels - 1)
        return self.low + self.step * k

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "levels": self.levels, "low": self.low, "step": self.step}
