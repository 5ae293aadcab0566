"""Standardisation y = (x - mean) / scale with statistics from the training data only."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from cnf.transforms.base import Transform, check_sample_batch


class Standardize(Transform):
    """The affine map y = (x - mean) / scale, log|det| = -sum log(scale) over a sample.

    ``mean`` and ``scale`` broadcast against one sample (shape ``x.shape[1:]`` or with ones
    where statistics are pooled, e.g. (C, 1, 1) per channel of an image). Build it with
    :meth:`fit` on the training split only, so that validation and test data never leak into the
    model. Both are buffers (they follow ``.to()``) and are part of :meth:`config`.
    """

    kind = "standardize"

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        mean = torch.as_tensor(mean)
        scale = torch.as_tensor(scale)
        if not mean.dtype.is_floating_point or not scale.dtype.is_floating_point:
            raise TypeError(f"mean and scale must be floating tensors, got {mean.dtype} and {scale.dtype}")
        if mean.shape != scale.shape:
            raise ValueError(
                f"mean and scale must have the same shape, got {tuple(mean.shape)} and {tuple(scale.shape)}"
            )
        if not bool(torch.isfinite(mean).all()):
            raise ValueError(f"mean must be finite, got {mean}")
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise ValueError(f"scale must be positive and finite, got {scale}")
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("scale", scale.detach().clone())

    @classmethod
    def fit(cls, data: torch.Tensor, pooled_dims: Sequence[int] = (), *, name: str = "data") -> Standardize:
        """Mean and standard deviation of the training ``data`` (n, ...) per feature.

        ``pooled_dims`` lists non-batch dimensions whose statistics are shared, e.g. ``(2, 3)``
        for one mean and scale per channel of (n, C, H, W) images. A feature that is constant in
        ``data`` (standard deviation 0 or below 1e-12 of its magnitude) keeps scale 1, so that it
        is only centred; a warning names it, because a flow then has to model a point mass there
        (dequantise or drop such columns).
        """
        check_sample_batch(data, name)
        dims = sorted({int(d) % data.ndim for d in pooled_dims})
        if 0 in dims or any(d >= data.ndim for d in pooled_dims):
            raise ValueError(
                f"pooled_dims must be non-batch dimensions of {name} of shape {tuple(data.shape)}, "
                f"got {tuple(pooled_dims)}"
            )
        reduce = [0, *dims]
        values = data.detach().double()
        mean = values.mean(dim=reduce, keepdim=True)
        std = values.std(dim=reduce, keepdim=True, correction=0)
        mean, std = mean.squeeze(0), std.squeeze(0)
        constant = std <= 1e-12 * mean.abs().clamp_min(1.0)
        if bool(constant.any()):
            where = constant.nonzero().tolist()
            shown = [tuple(i) if len(i) > 1 else i[0] for i in where[:10]]
            more = f" and {len(where) - 10} more" if len(where) > 10 else ""
            warnings.warn(
                f"Standardize: {len(where)} feature(s) of {name} are constant in the training data "
                f"(index {shown}{more}); they are centred with scale 1. A flow puts a point mass "
                "there: dequantize integer data or drop constant columns.",
                UserWarning,
                stacklevel=2,
            )
        scale = torch.where(constant, torch.ones_like(std), std)
        return cls(mean.to(data.dtype), scale.to(data.dtype))

    def _check_shape(self, x: torch.Tensor, name: str) -> None:
        try:
            shape = torch.broadcast_shapes(self.mean.shape, x.shape[1:])
        except RuntimeError:
            shape = None
        if shape != x.shape[1:]:
            raise ValueError(
                f"{name} of shape {tuple(x.shape)} does not fit Standardize statistics of shape "
                f"{tuple(self.mean.shape)} (fitted on samples of another shape)"
            )

    def log_abs_det(self, like: torch.Tensor) -> torch.Tensor:
        """-sum log(scale) over one sample, repeated for each row of ``like``: shape (n,)."""
        per_sample = -torch.log(self.scale).expand(like.shape[1:]).sum()
        return per_sample.to(like.dtype).expand(like.shape[0]).clone()

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_sample_batch(x)
        self._check_shape(x, "x")
        return (x - self.mean) / self.scale, self.log_abs_det(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_sample_batch(y, "y")
        self._check_shape(y, "y")
        return y * self.scale + self.mean

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mean": self.mean.detach().cpu().clone(),
            "scale": self.scale.detach().cpu().clone(),
        }
