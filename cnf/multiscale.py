"""A multi-scale continuous normalizing flow on images (FFJORD / RealNVP / Glow architecture).

Scoring (data -> base) at scale i = 0 .. S-1: a CNF block on the current tensor, then (except
at the last scale) a squeeze (space-to-depth, (c, h, w) -> (4c, h/2, w/2)) and a factor-out:
the first half of the channels goes to the base, the rest goes on to the next scale. The
squeeze is a permutation of the entries (log|det| = 0), so

    log p(x) = sum_i delta_logp_i + log N(z; 0, I),

with z the factored-out parts and the last scale's output packed, in that order, into one
tensor of the image's shape. ``sample``, ``log_prob``, ``transform`` and ``inverse`` keep
their :class:`cnf.CNF` meaning with that packed latent: the whole flow is one bijection of
R^(C H W) with a standard-normal base.

References: Dinh et al. (2017), "Density estimation using Real NVP" (squeeze, factor-out);
Kingma & Dhariwal (2018), "Glow"; Grathwohl et al. (2019), "FFJORD" (multi-scale CNF).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cnf.data import check_batch
from cnf.data.checks import _check_positive_int, check_image_shape
from cnf.fields.conv import ConvField
from cnf.flow import CNF, StandardNormal
from cnf.solver import Solver, SolveStats


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """Space-to-depth: (n, c, h, w) -> (n, 4c, h/2, w/2), each 2x2 patch becoming 4 channels."""
    if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"squeeze needs images (n, C, H, W) with even H and W; got shape {tuple(x.shape)}")
    return nn.functional.pixel_unshuffle(x, 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Depth-to-space, the inverse of :func:`squeeze`: (n, 4c, h, w) -> (n, c, 2h, 2w)."""
    if x.ndim != 4 or x.shape[1] % 4:
        raise ValueError(f"unsqueeze needs images (n, C, H, W) with C divisible by 4; got shape {tuple(x.shape)}")
    return nn.functional.pixel_shuffle(x, 2)


def scale_shapes(shape: tuple[int, int, int], scales: int) -> list[tuple[int, int, int]]:
    """Shape of the tensor each scale's CNF block sees."""
    c, h, w = shape
    if h % 2 ** (scales - 1) or w % 2 ** (scales - 1):
        raise ValueError(
            f"shape {shape} cannot be squeezed {scales - 1} times: H and W must be divisible by "
            f"{2 ** (scales - 1)} for scales={scales}"
        )
    shapes = [(c, h, w)]
    for _ in range(scales - 1):
        c, h, w = 2 * c, h // 2, w // 2  # squeeze to (4c, h/2, w/2), factor out half of the channels
        shapes.append((c, h, w))
    return shapes


class MultiScaleCNF(nn.Module):
    """CNF blocks on images with squeeze and factor-out between scales.

    Args:
        shape: ``(C, H, W)`` of one image; H and W must be divisible by 2^(scales-1).
        scales: number of scales S (S-1 squeezes, each factoring out half of the channels).
        blocks: CNF blocks per scale, each with its own :class:`cnf.fields.ConvField`.
        hidden, activation: the fields' hidden channels and activation.
        divergence, noise, solver: as in :class:`cnf.CNF`, shared by every block.
    """

    kind = "multiscale"

    def __init__(
        self,
        shape: Sequence[int],
        scales: int = 2,
        blocks: int = 1,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str = "softplus",
        *,
        divergence: str = "hutchinson",
        noise: str = "rademacher",
        solver: Solver | None = None,
    ) -> None:
        super().__init__()
        shape = check_image_shape(shape)
        self.scales = _check_positive_int(scales, "scales")
        self.blocks_per_scale = _check_positive_int(blocks, "blocks")
        self.shapes = scale_shapes(shape, self.scales)
        self.dim = shape
        self.hidden = tuple(hidden)
        self.activation = activation
        self.base = StandardNormal(shape)
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                CNF(ConvField(s, self.hidden, activation), divergence=divergence, noise=noise, solver=solver)
                for _ in range(self.blocks_per_scale)
            )
            for s in self.shapes
        )
        # Sizes of the factored-out parts and of the last scale's output, in packing order.
        self.latent_shapes = [(2 * c, h // 2, w // 2) for c, h, w in self.shapes[:-1]] + [self.shapes[-1]]

    # -- settings shared by the blocks ----------------------------------------------------
    def _cnfs(self) -> list[CNF]:
        return [block for scale in self.blocks for block in scale]

    @property
    def solver(self) -> Solver:
        return self._cnfs()[0].solver

    @solver.setter
    def solver(self, solver: Solver) -> None:
        if not isinstance(solver, Solver):
            raise TypeError(f"solver must be a cnf.Solver, got {solver!r}")
        for block in self._cnfs():
            block.solver = solver

    @property
    def divergence(self) -> str:
        return self._cnfs()[0].divergence

    @property
    def stats(self) -> SolveStats:
        """Counts of the last solve summed over the blocks (read after backward() for nfe_backward)."""
        parts = [block.stats for block in self._cnfs()]
        return SolveStats(
            nfe_forward=sum(p.nfe_forward for p in parts),
            nfe_backward=sum(p.nfe_backward for p in parts),
            steps=sum(p.steps for p in parts),
            solve=parts[-1].solve,
        )

    # -- packing the latents ---------------------------------------------------------------
    def pack(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The factored-out parts and the last scale's output as one tensor of the image's shape."""
        n = parts[0].shape[0]
        return torch.cat([p.reshape(n, -1) for p in parts], dim=1).reshape(n, *self.dim)

    def unpack(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`pack`."""
        sizes = [math.prod(s) for s in self.latent_shapes]
        flat = torch.split(z.reshape(z.shape[0], -1), sizes, dim=1)
        return [f.reshape(z.shape[0], *s) for f, s in zip(flat, self.latent_shapes)]

    # -- public surface --------------------------------------------------------------------
    def transform(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> base: ``(z, delta_logp)`` with log p(x) = log N(z; 0, I) + delta_logp, z packed."""
        check_batch(x, self.dim, "x")
        delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        parts = []
        for i, scale in enumerate(self.blocks):
            for block in scale:
                x, d = block.transform(x, generator=generator)
                delta = delta + d
            if i < self.scales - 1:
                x = squeeze(x)
                half = x.shape[1] // 2
                parts.append(x[:, :half])
                x = x[:, half:]
        parts.append(x)
        return self.pack(parts), delta

    def log_prob(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """log p(x) per sample, shape (batch,)."""
        z, delta = self.transform(x, generator=generator)
        return self.base.log_prob(z) + delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def _run_inverse(self, z: torch.Tensor, t: float) -> torch.Tensor:
        """Base -> data up to flow time ``t`` in [0, 1]: the scales run in turn (coarsest first),
        each over an equal share of the time; the parts not yet reached are reassembled as is."""
        parts = self.unpack(z)
        x = parts[-1]
        order = list(range(self.scales - 1, -1, -1))
        for k, i in enumerate(order):
            if i < self.scales - 1:
                x = unsqueeze(torch.cat([parts[i], x], dim=1))
            local = min(max(t * self.scales - k, 0.0), 1.0)
            if local > 0:
                for block in reversed(self.blocks[i]):
                    x = block.inverse(x, local)
        return x

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Base -> data: the packed latent ``z`` (n, C, H, W) to images."""
        check_batch(z, self.dim, "z")
        return self._run_inverse(z, 1.0)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples, shape (n, C, H, W)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return self.inverse(self.base.sample((n,), generator=generator))

    def trajectory(self, z: torch.Tensor, ts: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """The images along the flow from the base draws ``z`` at the times ``ts``:
        (len(ts), n, C, H, W). The S scales share [0, 1] equally, coarsest first."""
        check_batch(z, self.dim, "z")
        times = [float(t) for t in torch.as_tensor(ts).flatten()]
        if not times or any(not 0.0 <= t <= 1.0 for t in times):
            raise ValueError(f"ts must be a non-empty sequence of times in [0, 1], got {ts!r}")
        return torch.stack([self._run_inverse(z, t) for t in times])

    def config(self) -> dict[str, Any]:
        """What rebuilds this flow from a checkpoint (:func:`cnf.checkpoint.build_flow`)."""
        first = self._cnfs()[0]
        return {
            "kind": self.kind,
            "shape": list(self.dim),
            "scales": self.scales,
            "blocks": self.blocks_per_scale,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "divergence": first.divergence,
            "noise": first.noise,
            "solver": first.solver.to_dict(),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MultiScaleCNF:
        settings = {k: v for k, v in config.items() if k != "kind"}
        settings["solver"] = Solver.from_dict(settings["solver"])
        return cls(**settings)
