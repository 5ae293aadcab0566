"""A time-conditioned convolutional velocity field u(x, t) on images (n, C, H, W).

FFJORD's image networks (Grathwohl et al. 2019, ``ConcatSquashConv2d``) gate each convolution
by the time: ``conv(x) * sigmoid(a t + c) + b t`` per output channel, with 3x3 convolutions
("same" padding) so that the field maps an image to an image of the same shape. Its exact
divergence is the trace of a (C H W)^2 Jacobian: affordable by autograd for small images
(``divergence="exact"`` in :class:`cnf.CNF`, one vector-Jacobian product per pixel), and
estimated by Hutchinson's one-probe trick otherwise (the default for images).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnf.data.checks import check_channels, check_image_shape
from cnf.fields.mlp import ACTIVATIONS, time_column


class ConcatSquashConv2d(nn.Module):
    """FFJORD's time-gated convolution: ``conv(x) * sigmoid(a t + c) + b t`` per output channel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.gate = nn.Linear(1, out_channels)
        self.shift = nn.Linear(1, out_channels, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # t: (1, 1) for one time shared by the batch or (batch, 1); gates broadcast per channel.
        gate = torch.sigmoid(self.gate(t))[:, :, None, None]
        shift = self.shift(t)[:, :, None, None]
        return torch.addcmul(shift, self.conv(x), gate)


class ConvField(nn.Module):
    """Velocity field on images of shape ``(C, H, W)``: concat-squash convolutions.

    Args:
        shape: ``(C, H, W)`` of one image (``C`` fixes the convolutions; ``H, W`` are the
            shape the flow's base distribution and input checks use).
        hidden: channels of the hidden convolutions (FFJORD's MNIST model: 64, 64, 64).
        activation: ``softplus`` (FFJORD's choice for images), ``tanh``, ``elu``, ``silu``, ``relu``.
        kernel_size: odd kernel size of every convolution.
    """

    def __init__(
        self,
        shape: Sequence[int],
        hidden: Sequence[int] = (64, 64, 64),
        activation: str = "softplus",
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        shape = check_image_shape(shape)
        hidden = check_channels(hidden)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {tuple(ACTIVATIONS)}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        channels = (shape[0], *hidden, shape[0])
        self.dim = shape
        self.hidden = hidden
        self.activation_name = activation
        self.kernel_size = kernel_size
        self.layers = nn.ModuleList(
            ConcatSquashConv2d(a, b, kernel_size) for a, b in zip(channels[:-1], channels[1:])
        )
        self.activations = nn.ModuleList(ACTIVATIONS[activation]() for _ in hidden)

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.dim[0]:
            raise ValueError(
                f"x must be images of shape (n, {self.dim[0]}, H, W) for this field; got shape {tuple(x.shape)}"
            )
        tt = time_column(t, x)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(tt, h)
            if i < len(self.activations):
                h = self.activations[i](h)
        return h

    def config(self) -> dict:
        """Keyword arguments that rebuild this field, with ``kind`` for :func:`cnf.checkpoint.build_flow`."""
        return {
            "kind": "conv",
            "shape": list(self.dim),
            "hidden": list(self.hidden),
            "activation": self.activation_name,
            "kernel_size": self.kernel_size,
        }
