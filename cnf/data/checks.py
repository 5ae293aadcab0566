"""Input validation shared by every solve and loader: :func:`check_batch` is the one function
called before every solve."""

from __future__ import annotations

import operator

import torch


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    try:
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {value!r}") from None
    if out <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return out


def _check_seed(seed: object) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool):
        raise TypeError(f"seed must be a non-negative int or None, got {seed!r}")
    try:
        out = operator.index(seed)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"seed must be a non-negative int or None, got {seed!r}") from None
    if out < 0:
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    return out


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


def _check_finite(x: torch.Tensor, name: str) -> None:
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    bad_rows = (~finite).reshape(x.shape[0], -1).any(dim=1).nonzero()
    first = int(bad_rows[0, 0])
    raise ValueError(f"{name} must be finite; got {n_nan} NaN and {n_inf} Inf entries, first in row {first}")


def check_event_shape(dim: object, name: str = "dim") -> int | tuple[int, ...]:
    """A data dimension ``d`` (flat points) or a shape tuple such as ``(C, H, W)`` (images)."""
    if isinstance(dim, (tuple, list, torch.Size)):
        if not dim:
            raise ValueError(f"{name} must be a positive int or a non-empty shape tuple, got {dim!r}")
        return tuple(_check_positive_int(s, name) for s in dim)
    return _check_positive_int(dim, name)


def check_image_shape(shape: object, name: str = "shape") -> tuple[int, ...]:
    """One image's shape ``(C, H, W)`` of positive ints, as a tuple."""
    shape = check_event_shape(shape, name)
    if not isinstance(shape, tuple) or len(shape) != 3:
        raise ValueError(f"{name} must be (C, H, W), got {shape!r}")
    return shape


def check_channels(hidden: object, name: str = "hidden") -> tuple[int, ...]:
    """Channels of hidden layers: a non-empty sequence of positive ints, as a tuple."""
    hidden = tuple(hidden)
    if not hidden or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {hidden!r}")
    return hidden


def check_batch(x: torch.Tensor, dim: int | tuple[int, ...] | None = None, name: str = "x") -> torch.Tensor:
    """Validate a batch of points of shape ``(n, dim)`` before a solve; return it unchanged.

    Checks, in order: a :class:`torch.Tensor`, a floating dtype, two dimensions, at least one
    row and one column, ``x.shape[1] == dim`` when ``dim`` is given, and all entries finite.
    ``dim`` may also be a shape tuple such as ``(C, H, W)``: then ``x`` must have shape
    ``(n, *dim)``. Raises :class:`TypeError` or :class:`ValueError` naming ``name`` and echoing
    what was got.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} must have a floating dtype, got {x.dtype}; use {name}.to(torch.float32) or torch.float64"
        )
    if isinstance(dim, (tuple, list, torch.Size)):
        shape = check_event_shape(dim)
        if tuple(x.shape[1:]) != shape or x.shape[0] == 0:
            expected = ", ".join(str(s) for s in shape)
            raise ValueError(f"{name} must be a non-empty batch of shape (n, {expected}); got shape {tuple(x.shape)}")
        _check_finite(x, name)
        return x
    if x.ndim != 2:
        hint = f" — use {name}.unsqueeze(0) for one point" if x.ndim == 1 else ""
        raise ValueError(f"{name} must be a batch of shape (n, dim); got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty; got shape {tuple(x.shape)}")
    if dim is not None:
        dim = _check_positive_int(dim, "dim")
        if x.shape[1] != dim:
            raise ValueError(f"{name} must have {dim} columns (shape (n, {dim})); got shape {tuple(x.shape)}")
    _check_finite(x, name)
    return x


def _check_points(z: torch.Tensor, name: str) -> torch.Tensor:
    """Validate a floating tensor of 2-D points of shape ``(..., 2)`` (no finiteness check)."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if not z.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {z.dtype}")
    if z.ndim == 0 or z.shape[-1] != 2:
        raise ValueError(f"{name} must have shape (..., 2); got shape {tuple(z.shape)}")
    return z
