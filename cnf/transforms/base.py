"""The transform contract, composition and rebuilding from a config.

A transform is an invertible map of a batch ``x`` of shape (n, ...) with

* ``forward(x, generator=None) -> (y, logdet)``: ``logdet`` of shape (n,) is
  log|det dy/dx| summed over every non-batch dimension of one sample,
* ``inverse(y) -> x``,
* ``config() -> dict``: plain Python types and tensors only (so a checkpoint holding it loads
  with ``torch.load(..., weights_only=True)``), with ``"kind"`` naming the class;
  :func:`build_transform` rebuilds the transform from it.

If y = T(x) and the model gives y the density q, x has the density
log p(x) = log q(T(x)) + log|det dT/dx|: this is how :class:`cnf.transforms.TransformedFlow`
reports likelihoods in the units of the data the user gave.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def check_sample_batch(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Validate a floating batch of shape (n, ...) with at least one non-batch dimension."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape (n, ...); got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite; got {int((~torch.isfinite(x)).sum())} NaN/Inf entries")
    return x


def sum_per_sample(values: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: (n, ...) -> (n,)."""
    return values.reshape(values.shape[0], -1).sum(dim=1)


def sample_size(x: torch.Tensor) -> int:
    """Number of scalars in one sample of the batch ``x`` (the D of bits per dimension)."""
    return x[0].numel()


class Transform(nn.Module):
    """Base class of the invertible preprocessing maps (see the module docstring)."""

    kind = "transform"

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def leaves(self) -> Iterator[Transform]:
        """The elementary transforms in the order they are applied (itself, for a leaf)."""
        yield self


class Compose(Transform):
    """Apply ``transforms`` in order; log|det| adds up (the chain rule)."""

    kind = "compose"

    def __init__(self, *transforms: Transform) -> None:
        super().__init__()
        for i, transform in enumerate(transforms):
            if not isinstance(transform, Transform):
                raise TypeError(f"transforms[{i}] must be a cnf.transforms.Transform, got {transform!r}")
        self.transforms = nn.ModuleList(transforms)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for transform in self.transforms:
            x, step = transform(x, generator=generator)
            logdet = logdet + step
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for transform in reversed(self.transforms):
            y = transform.inverse(y)
        return y

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "transforms": [t.config() for t in self.transforms]}

    def leaves(self) -> Iterator[Transform]:
        for transform in self.transforms:
            yield from transform.leaves()

    def __len__(self) -> int:
        return len(self.transforms)


def build_transform(config: dict[str, Any]) -> Transform:
    """Rebuild a transform from its ``config()``."""
    from cnf.transforms.dequantize import Dequantize
    from cnf.transforms.logit import Logit
    from cnf.transforms.standardize import Standardize
    from cnf.transforms.whiten import Whiten

    if not isinstance(config, dict):
        raise TypeError(f"a transform config must be a dict, got {config!r}")
    kinds: dict[str, Any] = {cls.kind: cls for cls in (Dequantize, Logit, Standardize, Whiten)}
    kind = config.get("kind")
    if kind == Compose.kind:
        return Compose(*(build_transform(c) for c in config["transforms"]))
    if kind not in kinds:
        raise ValueError(f"unknown transform kind {kind!r}; known: {(Compose.kind, *kinds)}")
    options = {key: value for key, value in config.items() if key != "kind"}
    return kinds[kind](**options)
