"""A small time-conditioned U-Net velocity field u(x, t) on images (n, C, H, W).

The flow-matching image models (Lipman et al. 2023; Tong et al. 2024, after the diffusion U-Net
of Ho et al. 2020) use a U-Net: residual blocks at several resolutions joined by skip
connections, the time entering every block through a learned embedding. Its receptive field
covers the whole image after a few halvings, where the concat-squash field of
:mod:`cnf.fields.conv` sees 9x9 pixels per evaluation and so learns local statistics only.

Group normalisation acts on each image alone, so the field of one image does not depend on the
others in the batch and its divergence (exact by autograd, or Hutchinson's estimate) is that of
a per-image map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cnf.data.checks import check_channels, check_image_shape
from cnf.fields.mlp import time_column


def _groups(channels: int) -> int:
    """The largest of 8, 4, 2, 1 groups that divides ``channels``."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] followed by a two-layer MLP (Vaswani et al. 2017)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("frequencies", torch.exp(torch.linspace(0.0, math.log(1000.0), dim // 2)))
        self.mlp = nn.Sequential(nn.Linear(2 * (dim // 2), dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t * self.frequencies.to(t.dtype)
        return self.mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))


class ResidualBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, plus a per-channel shift from the time embedding, twice."""

    def __init__(self, in_channels: int, out_channels: int, embedding: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embedding, out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNetField(nn.Module):
    """Velocity field on images of shape ``(C, H, W)``: a U-Net with one residual block per level.

    Args:
        shape: ``(C, H, W)`` of one image; ``H`` and ``W`` must be divisible by
            ``2 ** (len(hidden) - 1)`` (each level halves them by average pooling).
        hidden: channels at each resolution, from the full image down (``(32, 64, 64)`` on
            28x28 works at 28, 14 and 7 pixels).
        embedding: width of the time embedding.
    """

    def __init__(
        self, shape: Sequence[int], hidden: Sequence[int] = (32, 64, 64), embedding: int = 64
    ) -> None:
        super().__init__()
        shape = check_image_shape(shape)
        hidden = check_channels(hidden)
        if isinstance(embedding, bool) or not isinstance(embedding, int) or embedding < 2:
            raise ValueError(f"embedding must be an int >= 2, got {embedding!r}")
        factor = 2 ** (len(hidden) - 1)
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(
                f"a U-Net with {len(hidden)} levels halves the image {len(hidden) - 1} times: H and W "
                f"must be divisible by {factor}, got shape {shape!r}"
            )
        self.dim = shape
        self.hidden = hidden
        self.embedding = embedding
        self.time = TimeEmbedding(embedding)
        self.stem = nn.Conv2d(shape[0], hidden[0], 3, padding=1)
        self.down = nn.ModuleList(
            ResidualBlock(a, b, embedding) for a, b in zip((hidden[0], *hidden[:-1]), hidden)
        )
        self.middle = ResidualBlock(hidden[-1], hidden[-1], embedding)
        # Up path: from the deepest level back to the full image, each block sees the skip too.
        self.up = nn.ModuleList(
            ResidualBlock(
                2 * hidden[i] if i == len(hidden) - 1 else hidden[i + 1] + hidden[i], hidden[i], embedding
            )
            for i in reversed(range(len(hidden)))
        )
        self.out_norm = nn.GroupNorm(_groups(hidden[0]), hidden[0])
        self.out = nn.Conv2d(hidden[0], shape[0], 3, padding=1)

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.dim:
            raise ValueError(
                f"x must be images of shape (n, *{self.dim}) for this field; got shape {tuple(x.shape)}"
            )
        emb = self.time(time_column(t, x))
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                h = F.avg_pool2d(h, 2)
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for i, block in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))

    def config(self) -> dict:
        """Keyword arguments that rebuild this field, with ``kind`` for :func:`cnf.checkpoint.build_flow`."""
        return {
            "kind": "unet",
            "shape": list(self.dim),
            "hidden": list(self.hidden),
            "embedding": self.embedding,
        }
