"""Pictures of image flows: samples beside real images, the path from noise to images, and
latent interpolation strips (linear and spherical).

Every function takes a flow from :func:`cnf.images.image_flow` (or any flow with the same
surface on (n, C, H, W) images), draws one figure, saves it when ``path`` is given and returns
the matplotlib Figure. Grey levels are shown on the data's own scale 0 .. levels-1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from cnf.images import dequantization_levels, image_trajectory, latent_interpolation
from cnf.plots import _save
from cnf.transforms.flow import inner_flow

PATH_TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)
DPI = 120


def image_grid(images: torch.Tensor | np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images (n, C, H, W) into one (rows*(H+pad), columns*(W+pad)[, C]) array, gaps NaN."""
    array = np.asarray(torch.as_tensor(images).detach().cpu().double())
    if array.ndim != 4:
        raise ValueError(f"images must have shape (n, C, H, W); got shape {array.shape}")
    n, c, h, w = array.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad, c), np.nan)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[r * (h + pad) : r * (h + pad) + h, col * (w + pad) : col * (w + pad) + w] = array[i].transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def _figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    """An Agg figure (no pyplot, no global backend) with a grid of axes."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))


def _show(ax: Axes, images: torch.Tensor, levels: int, columns: int | None, title: str) -> None:
    grid = image_grid(images, columns)
    if grid.ndim == 3:  # colour: scale to [0, 1], gaps white
        ax.imshow(np.nan_to_num(grid / (levels - 1), nan=1.0))
    else:
        cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="#c9d3df")  # gaps: pale blue-grey
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=levels - 1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _levels(flow: nn.Module, levels: int | None) -> int:
    levels = levels or dequantization_levels(flow)
    if levels is None:
        raise ValueError("levels is needed for a flow without Dequantize preprocessing, got None")
    return levels


def plot_samples_and_data(
    flow: nn.Module,
    real: torch.Tensor | None,
    n: int = 64,
    *,
    levels: int | None = None,
    generator: torch.Generator | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """A grid of ``n`` samples beside ``n`` real images (samples alone when ``real`` is None)."""
    levels = _levels(flow, levels)
    with torch.no_grad():
        samples = flow.sample(n, generator=generator)
    panels = 1 if real is None else 2
    fig, axes = _figure(1, panels, 4 * panels, 4.3)
    _show(axes[0, 0], samples, levels, None, f"{n} samples of the flow")
    if real is not None:
        real = torch.as_tensor(real)[:n]
        _show(axes[0, 1], real, levels, None, f"{len(real)} real images")
    return _save(fig, path, DPI)


def plot_image_path(
    flow: nn.Module,
    n: int = 8,
    times: Sequence[float] = PATH_TIMES,
    *,
    levels: int | None = None,
    generator: torch.Generator | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """The probability path as images: one row per base draw, one column per time, the same
    draws carried along the flow from the base (t = 0) to the data (t = 1)."""
    levels = _levels(flow, levels)
    inner = inner_flow(flow)
    base = inner.base
    z = base.sample((n,), generator=generator)
    frames = image_trajectory(flow, z, times)  # (T, n, C, H, W)
    fig, axes = _figure(1, len(times), 1.3 * len(times), 1.2 * n + 0.4)
    for k, t in enumerate(times):
        _show(axes[0, k], frames[k], levels, 1, f"t = {t:g}")
    return _save(fig, path, DPI)


def plot_interpolation(
    flow: nn.Module,
    first: torch.Tensor,
    second: torch.Tensor,
    steps: int = 9,
    *,
    levels: int | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Two images mapped to the base, joined by a linear and a spherical path, mapped back:
    two strips from ``first`` to ``second``."""
    levels = _levels(flow, levels)
    fig, axes = _figure(2, 1, 0.9 * steps, 2.8)
    for ax, spherical in zip(axes[:, 0], (False, True)):
        strip = latent_interpolation(flow, first, second, steps, spherical=spherical)
        _show(ax, strip, levels, steps, "spherical (slerp) in the base" if spherical else "linear in the base")
    return _save(fig, path, DPI)
