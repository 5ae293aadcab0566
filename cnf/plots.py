"""Pictures of what a flow does: probability paths, trajectories, velocity fields, animations.

Every plotting function takes a 2-D :class:`cnf.CNF` or :class:`cnf.PlanarFlow` (anything with
``log_prob(x, t)``, ``trajectory(x0, ts)`` and a ``base``), returns a
:class:`matplotlib.figure.Figure` and writes it to ``path`` when one is given. Figures are
built on the Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), so no global matplotlib
backend is selected or changed.

Densities on a grid are exact: ``flow.log_prob(points, t=t)`` solves the augmented state
(x, log p) from t back to 0 (Chen et al. 2018; Grathwohl et al. 2019, FFJORD), and a planar
flow at time t is its first floor(t K) layers (Rezende & Mohamed 2015). Each density panel
carries its grid mass (trapezoid rule) in its title, a check that the path integrates to 1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.animation import FuncAnimation, PillowWriter
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from scipy.integrate import trapezoid
from torch import nn

from cnf.flow import base_sample
from cnf.planar import PlanarFlow
from cnf.solver import Solver

__all__ = [
    "DEFAULT_TIMES",
    "PlanarFieldODE",
    "animate_path",
    "default_bounds",
    "density_grid",
    "grid_mass",
    "plot_all",
    "plot_densities",
    "plot_discrete_vs_continuous",
    "plot_probability_path",
    "plot_training_curves",
    "plot_trajectories",
    "plot_velocity_field",
    "read_train_log",
]

DEFAULT_TIMES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Times of the probability-path panels (t=0: base, t=1: data)."""

DENSITY_CMAP = "magma"
PathLike = str | os.PathLike
Bounds = tuple[float, float, float, float]

# Half-width of the box that holds a standard normal base: mass outside is below 1e-3.
_BASE_HALF_WIDTH = 3.5
_PANEL_INCHES = 2.6
# While plot_all runs, grids of the same flow, time, box and resolution are computed once.
_GRID_CACHE: ContextVar[dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] | None] = ContextVar(
    "cnf_plots_grid_cache", default=None
)


# --------------------------------------------------------------------------- validation
def _check_flow(flow: Any, name: str = "flow") -> nn.Module:
    if not callable(getattr(flow, "log_prob", None)):
        raise TypeError(
            f"{name} must be a flow with log_prob(x, t) (cnf.CNF or cnf.PlanarFlow), got {flow!r}"
        )
    dim = getattr(flow, "dim", None)
    if dim != 2:
        raise ValueError(f"{name} must be a 2-D flow to be plotted, got {name}.dim={dim!r}")
    return flow


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_times(times: Any, name: str = "times") -> list[float]:
    if isinstance(times, (int, float)) and not isinstance(times, bool):
        times = [times]
    try:
        values = [float(t) for t in times]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of floats in [0, 1], got {times!r}") from None
    if not values or not all(0.0 <= t <= 1.0 for t in values):
        raise ValueError(f"{name} must be a non-empty sequence of floats in [0, 1], got {times!r}")
    return values


def _check_bounds(bounds: Any) -> Bounds:
    try:
        values = tuple(float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"bounds must be four numbers (xmin, xmax, ymin, ymax), got {bounds!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"bounds must be four finite numbers (xmin, xmax, ymin, ymax), got {bounds!r}")
    if not (values[0] < values[1] and values[2] < values[3]):
        raise ValueError(f"bounds must satisfy xmin < xmax and ymin < ymax, got {bounds!r}")
    return values  # type: ignore[return-value]


def _to_numpy(data: Any, name: str = "data") -> np.ndarray | None:
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if not isinstance(data, np.ndarray):
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array of shape (n, 2), got {type(data).__name__}"
        )
    if data.ndim != 2 or data.shape[1] != 2 or data.shape[0] == 0:
        raise ValueError(f"{name} must have shape (n, 2) with n >= 1, got shape {data.shape}")
    return np.asarray(data, dtype=np.float64)


def _flow_dtype(flow: nn.Module) -> torch.dtype:
    for p in flow.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _flow_device(flow: nn.Module) -> torch.device:
    for p in flow.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- helpers
def _new_figure(
    ncols: int,
    nrows: int = 1,
    panel: float = _PANEL_INCHES,
    extra_width: float = 0.0,
    box: Sequence[float] | None = None,
    title_space: float = 0.5,
) -> Figure:
    """An Agg figure of ``nrows`` x ``ncols`` panels ``panel`` inches wide, as tall as ``box``."""
    aspect = 1.0 if box is None else (box[3] - box[2]) / (box[1] - box[0])
    width = panel * ncols + extra_width
    height = (panel * aspect + title_space) * nrows + 0.1
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: no pyplot, no global backend
    return fig


def _save(fig: Figure, path: PathLike | None, dpi: float) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


@contextmanager
def _plotting_solver(flow: nn.Module, tolerance: float | None) -> Iterator[None]:
    """Temporarily loosen an adaptive CNF solver to ``tolerance`` (never tighten it)."""
    solver = getattr(flow, "solver", None)
    if tolerance is None or not isinstance(solver, Solver) or not solver.is_adaptive:
        yield
        return
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive float or None, got {tolerance!r}")
    flow.solver = solver.with_(rtol=max(solver.rtol, tolerance), atol=max(solver.atol, tolerance))
    try:
        yield
    finally:
        flow.solver = solver


def default_bounds(flow: Any = None, data: Any = None, *, samples: int = 2000) -> Bounds:
    """A plotting box (xmin, xmax, ymin, ymax) holding the standard-normal base (+-3.5) and
    the bulk (99.6 %) of ``data``, or of ``samples`` draws of ``flow`` when no data is given."""
    data = _to_numpy(data)
    lo = np.full(2, -_BASE_HALF_WIDTH)
    hi = np.full(2, _BASE_HALF_WIDTH)
    points = data
    if points is None and flow is not None:
        with torch.no_grad(), _plotting_solver(flow, 1e-3):
            points = flow.sample(samples, generator=torch.Generator().manual_seed(0)).cpu().numpy()
    if points is not None:
        q_lo, q_hi = np.quantile(points, [0.002, 0.998], axis=0)
        pad = 0.15 * (q_hi - q_lo) + 0.25
        lo, hi = np.minimum(lo, q_lo - pad), np.maximum(hi, q_hi + pad)
    return (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))


def _layers_at(flow: nn.Module, t: float) -> int | None:
    if isinstance(flow, PlanarFlow):
        return min(int(math.floor(t * flow.layers + 1e-6)), flow.layers)
    return None


def _time_label(flow: nn.Module, t: float) -> str:
    k = _layers_at(flow, t)
    return f"t = {t:g}" if k is None else f"t = {t:g} ({k} layers)"


def density_grid(
    flow: Any,
    t: float = 1.0,
    *,
    bounds: Sequence[float] | None = None,
    resolution: int = 100,
    data: Any = None,
    tolerance: float | None = 1e-4,
    batch_size: int = 20_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The density p_t of ``flow`` on a ``resolution`` x ``resolution`` grid.

    ``flow`` is a flow (``log_prob(x, t=t)``: for a CNF the exact augmented solve from t back
    to 0, for a planar flow its first floor(t K) layers) or a callable returning log densities
    of an (m, 2) tensor (``t`` is then ignored). ``bounds`` is (xmin, xmax, ymin, ymax),
    by default a box holding the base and ``data``. ``tolerance`` loosens an adaptive CNF
    solver for speed (None keeps the flow's own). Returns ``(xs, ys, density)`` with
    ``density[i, j] = p_t(xs[j], ys[i])``.
    """
    resolution = _check_positive_int("resolution", resolution, 2)
    batch_size = _check_positive_int("batch_size", batch_size)
    is_flow = callable(getattr(flow, "log_prob", None))
    if is_flow:
        _check_flow(flow)
        (t,) = _check_times([t], "t")
    elif not callable(flow):
        raise TypeError(f"flow must be a 2-D flow or a log-density callable, got {flow!r}")
    data_np = _to_numpy(data)
    box = _check_bounds(bounds) if bounds is not None else default_bounds(flow if is_flow else None, data_np)
    cache = _GRID_CACHE.get()
    key = (id(flow), round(float(t), 12), box, resolution, tolerance)
    if cache is not None and key in cache:
        return cache[key]
    xs = np.linspace(box[0], box[1], resolution)
    ys = np.linspace(box[2], box[3], resolution)
    gx, gy = np.meshgrid(xs, ys)
    dtype = _flow_dtype(flow) if isinstance(flow, nn.Module) else torch.get_default_dtype()
    device = _flow_device(flow) if isinstance(flow, nn.Module) else torch.device("cpu")
    points = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], axis=1), dtype=dtype, device=device)
    chunks = []
    with torch.no_grad():
        if is_flow:
            with _plotting_solver(flow, tolerance):
                for chunk in torch.split(points, batch_size):
                    chunks.append(flow.log_prob(chunk, t=t))
        else:
            chunks = [flow(chunk) for chunk in torch.split(points, batch_size)]
    log_p = torch.cat(chunks).double().cpu().numpy().reshape(resolution, resolution)
    result = (xs, ys, np.exp(log_p))
    if cache is not None:
        cache[key] = result
        cache[("flow", id(flow))] = flow  # holds the flow, so that its id is not reused meanwhile
    return result


def grid_mass(xs: np.ndarray, ys: np.ndarray, density: np.ndarray) -> float:
    """Integral of ``density[i, j] = p(xs[j], ys[i])`` over the grid by the trapezoid rule."""
    return float(trapezoid(trapezoid(density, xs, axis=1), ys))


def _draw_density(
    ax: Any, xs: np.ndarray, ys: np.ndarray, density: np.ndarray, cmap: str = DENSITY_CMAP, **kwargs: Any
) -> Any:
    image = ax.imshow(
        density,
        origin="lower",
        extent=(xs[0], xs[-1], ys[0], ys[-1]),
        cmap=cmap,
        interpolation="nearest",
        vmin=0.0,
        vmax=float(np.nanmax(density)) or 1.0,
        **kwargs,
    )
    _style_axes(ax, (xs[0], xs[-1], ys[0], ys[-1]))
    return image


def _style_axes(ax: Any, box: Sequence[float]) -> None:
    ax.set_xlim(box[0], box[1])
    ax.set_ylim(box[2], box[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_data(
    ax: Any, data: np.ndarray, box: Sequence[float], resolution: int, cmap: str = DENSITY_CMAP
) -> None:
    """The data as a normalised 2-D histogram, on the same footing as the density panels."""
    bins = max(20, min(resolution, int(np.sqrt(data.shape[0]) * 1.5)))
    ax.hist2d(data[:, 0], data[:, 1], bins=bins, range=[box[:2], box[2:]], density=True, cmap=cmap)
    _style_axes(ax, box)
    ax.set_title(f"data (n={data.shape[0]})", fontsize=9)


# --------------------------------------------------------------------------- the plots
def plot_probability_path(
    flow: Any,
    times: Sequence[float] = DEFAULT_TIMES,
    *,
    data: Any = None,
    bounds: Sequence[float] | None = None,
    resolution: int = 100,
    tolerance: float | None = 1e-4,
    cmap: str = DENSITY_CMAP,
    title: str | None = None,
    path: PathLike | None = None,
    dpi: float = 100,
) -> Figure:
    """The probability path p_t of ``flow``: one density panel per time in ``times``.

    Each density is exact on the grid (:func:`density_grid`) and its panel title gives the
    grid mass (trapezoid rule), which is ~1 when the grid covers the support. ``data`` (an
    (n, 2) tensor or array) is drawn beside the panels as a histogram. The figure carries
    ``fig.path_times``, ``fig.path_masses`` and ``fig.path_densities`` (xs, ys, density).
    Reference: Lipman et al. (2023), "Flow Matching", for the probability-path picture.
    """
    _check_flow(flow)
    times = _check_times(times)
    data_np = _to_numpy(data)
    box = _check_bounds(bounds) if bounds is not None else default_bounds(flow, data_np)
    fig = _new_figure(len(times) + (data_np is not None), box=box, title_space=0.5 + 0.25 * bool(title))
    axes = fig.subplots(1, len(times) + (data_np is not None), squeeze=False)[0]
    masses, grids = [], []
    for ax, t in zip(axes, times):
        xs, ys, density = density_grid(flow, t, bounds=box, resolution=resolution, tolerance=tolerance)
        mass = grid_mass(xs, ys, density)
        masses.append(mass)
        grids.append((xs, ys, density))
        _draw_density(ax, xs, ys, density, cmap)
        ax.set_title(f"{_time_label(flow, t)}\nmass {mass:.3f}", fontsize=9)
    if data_np is not None:
        _draw_data(axes[-1], data_np, box, resolution, cmap)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.path_times = times
    fig.path_masses = masses
    fig.path_densities = grids
    return _save(fig, path, dpi)


def _trajectory_times(flow: nn.Module, steps: int) -> np.ndarray:
    if isinstance(flow, PlanarFlow) and flow.layers <= 512:
        return np.arange(flow.layers + 1) / flow.layers  # one point per layer: the exact steps
    return np.linspace(0.0, 1.0, steps)


def _base_points(flow: nn.Module, n: int, seed: int) -> torch.Tensor:
    z = base_sample(flow.base, n, torch.Generator().manual_seed(seed))
    return z.to(dtype=_flow_dtype(flow), device=_flow_device(flow))


def plot_trajectories(
    flow: Any,
    n: int = 300,
    *,
    steps: int = 41,
    bounds: Sequence[float] | None = None,
    data: Any = None,
    resolution: int = 100,
    tolerance: float | None = 1e-4,
    seed: int = 0,
    cmap: str = "viridis",
    title: str | None = None,
    path: PathLike | None = None,
    dpi: float = 100,
) -> Figure:
    """Paths of ``n`` base samples from t=0 to t=1, coloured by time, over the density p_1.

    A CNF is sampled at ``steps`` equally spaced times; a planar flow at every layer (each
    layer moves a point along a straight line). ``fig.trajectories`` holds the
    (len(ts), n, 2) positions and ``fig.trajectory_times`` the times.
    """
    _check_flow(flow)
    n = _check_positive_int("n", n)
    steps = _check_positive_int("steps", steps, 2)
    data_np = _to_numpy(data)
    box = _check_bounds(bounds) if bounds is not None else default_bounds(flow, data_np)
    ts = _trajectory_times(flow, steps)
    with torch.no_grad(), _plotting_solver(flow, tolerance):
        positions = flow.trajectory(_base_points(flow, n, seed), ts.tolist()).double().cpu().numpy()
    xs, ys, density = density_grid(flow, 1.0, bounds=box, resolution=resolution, tolerance=tolerance)
    fig = _new_figure(1, panel=4.2, extra_width=0.9, box=box)
    ax = fig.subplots()
    _draw_density(ax, xs, ys, density, "Greys", alpha=0.9)
    segments = np.stack([positions[:-1], positions[1:]], axis=2)  # (T-1, n, 2, 2)
    segments = segments.reshape(-1, 2, 2)
    mid_times = np.repeat(0.5 * (ts[:-1] + ts[1:]), n)
    lines = LineCollection(segments, array=mid_times, cmap=cmap, linewidths=0.7, alpha=0.8)
    lines.set_clim(0.0, 1.0)
    ax.add_collection(lines)
    ax.scatter(positions[0, :, 0], positions[0, :, 1], s=3, color="black", zorder=3, label="t = 0")
    ax.scatter(
        positions[-1, :, 0],
        positions[-1, :, 1],
        s=4,
        color="gold",
        edgecolors="none",
        zorder=3,
        label="t = 1",
    )
    ax.legend(loc="lower right", fontsize=7, framealpha=0.8, markerscale=2)
    fig.colorbar(lines, ax=ax, label="t", shrink=0.8)
    ax.set_title(title or f"trajectories of {n} samples over p_1", fontsize=10)
    fig.trajectories = positions
    fig.trajectory_times = ts
    return _save(fig, path, dpi)


def _velocity(flow: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if isinstance(flow, PlanarFlow):
        return flow.as_field()
    field = getattr(flow, "field", None)
    if not callable(field):
        raise TypeError(f"flow must be a cnf.CNF (flow.field) or a cnf.PlanarFlow (as_field()), got {flow!r}")
    return field


def plot_velocity_field(
    flow: Any,
    times: Sequence[float] = (0.0, 0.5, 1.0),
    *,
    arrows: int = 20,
    bounds: Sequence[float] | None = None,
    data: Any = None,
    background: bool = True,
    resolution: int = 80,
    tolerance: float | None = 1e-4,
    path: PathLike | None = None,
    dpi: float = 100,
) -> Figure:
    """The velocity field u(., t) as arrows (an ``arrows`` x ``arrows`` quiver) at ``times``.

    For a CNF u is ``flow.field(t, x)``; for a planar flow it is ``flow.as_field()``, the
    piecewise-constant field whose forward-Euler steps are the layers. With ``background``
    each panel shows the density p_t beneath the arrows, whose colour gives the speed |u|.
    """
    _check_flow(flow)
    times = _check_times(times)
    arrows = _check_positive_int("arrows", arrows, 2)
    data_np = _to_numpy(data)
    box = _check_bounds(bounds) if bounds is not None else default_bounds(flow, data_np)
    field = _velocity(flow)
    gx, gy = np.meshgrid(np.linspace(box[0], box[1], arrows), np.linspace(box[2], box[3], arrows))
    points = torch.as_tensor(
        np.stack([gx.ravel(), gy.ravel()], axis=1), dtype=_flow_dtype(flow), device=_flow_device(flow)
    )
    fig = _new_figure(len(times), extra_width=0.8, box=box, title_space=0.4)
    axes = fig.subplots(1, len(times), squeeze=False)[0]
    velocities = []
    for ax, t in zip(axes, times):
        if background:
            xs, ys, density = density_grid(flow, t, bounds=box, resolution=resolution, tolerance=tolerance)
            _draw_density(ax, xs, ys, density, "Blues")
        else:
            _style_axes(ax, box)
        with torch.no_grad():
            u = field(torch.tensor(t, dtype=points.dtype, device=points.device), points)
        velocities.append(u.double().cpu().numpy())
        ax.set_title(f"u(·, t = {t:g})", fontsize=9)
    # One arrow scale and one colour scale for every panel, so that times compare: the
    # fastest arrow spans about 1.5 grid cells.
    top = max(float(np.hypot(u[:, 0], u[:, 1]).max()) for u in velocities) or 1.0
    cell = min(box[1] - box[0], box[3] - box[2]) / (arrows - 1)
    for ax, u in zip(axes, velocities):
        quiver = ax.quiver(
            gx.ravel(),
            gy.ravel(),
            u[:, 0],
            u[:, 1],
            np.hypot(u[:, 0], u[:, 1]),
            cmap="plasma",
            clim=(0.0, 1.2 * top),  # keeps the fastest arrows off plasma's pale yellow
            angles="xy",
            scale_units="xy",
            scale=top / (1.5 * cell),
            width=0.006,
        )
    fig.colorbar(quiver, ax=list(axes), label="|u|", shrink=0.8)
    fig.velocity_fields = velocities
    fig.velocity_times = times
    return _save(fig, path, dpi)


def plot_densities(
    models: Mapping[str, Any],
    *,
    data: Any = None,
    bounds: Sequence[float] | None = None,
    resolution: int = 100,
    tolerance: float | None = 1e-4,
    cmap: str = DENSITY_CMAP,
    title: str | None = None,
    path: PathLike | None = None,
    dpi: float = 100,
) -> Figure:
    """Side-by-side model densities p_1, one panel per ``models`` entry, titled by its key.

    Values are 2-D flows or callables returning log densities of an (m, 2) tensor (e.g. a
    true density). ``data`` is drawn in an extra panel. ``fig.masses`` maps keys to grid masses.
    """
    if not isinstance(models, Mapping) or not models:
        raise TypeError(f"models must be a non-empty mapping of titles to flows, got {models!r}")
    data_np = _to_numpy(data)
    if bounds is not None:
        box = _check_bounds(bounds)
    else:
        first_flow = next((m for m in models.values() if callable(getattr(m, "log_prob", None))), None)
        box = default_bounds(first_flow, data_np)
    count = len(models) + (data_np is not None)
    fig = _new_figure(count, box=box, title_space=0.5 + 0.25 * bool(title))
    axes = fig.subplots(1, count, squeeze=False)[0]
    masses = {}
    for ax, (name, model) in zip(axes, models.items()):
        xs, ys, density = density_grid(model, 1.0, bounds=box, resolution=resolution, tolerance=tolerance)
        masses[name] = grid_mass(xs, ys, density)
        _draw_density(ax, xs, ys, density, cmap)
        ax.set_title(str(name), fontsize=9)
    if data_np is not None:
        _draw_data(axes[-1], data_np, box, resolution, cmap)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.masses = masses
    return _save(fig, path, dpi)


def default_contexts(flow: nn.Module) -> torch.Tensor:
    """Three contexts (3, k) of a conditional flow: the mean of its training contexts and the mean
    +- one standard deviation (from its :class:`cnf.context.ContextStandardization`; 0 and +-1
    when it has none)."""
    from cnf.context import ContextStandardization

    k = flow.context_dim
    found = next((m for m in flow.modules() if isinstance(m, ContextStandardization)), None)
    mean = found.mean.detach().cpu().double() if found is not None else torch.zeros(k, dtype=torch.float64)
    std = found.std.detach().cpu().double() if found is not None else torch.ones(k, dtype=torch.float64)
    return mean + torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)[:, None] * std


def conditional_bounds(flow: nn.Module, contexts: Any, *, samples: int = 1000) -> Bounds:
    """A box (as :func:`default_bounds`) holding ``samples`` draws of a conditional flow at each
    row of ``contexts``."""
    contexts = torch.as_tensor(np.asarray(contexts, dtype=np.float64)).to(_flow_dtype(flow))
    with torch.no_grad(), _plotting_solver(flow, 1e-3):
        points = flow.sample(samples, context=contexts, generator=torch.Generator().manual_seed(0))
    return default_bounds(data=points.reshape(-1, points.shape[-1]).cpu().numpy())


def plot_conditional_densities(
    flow: nn.Module,
    contexts: Any,
    *,
    true_log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    labels: Sequence[str] | None = None,
    bounds: Sequence[float] = (-4.0, 4.0, -4.0, 4.0),
    resolution: int = 100,
    tolerance: float | None = 1e-4,
    cmap: str = DENSITY_CMAP,
    path: PathLike | None = None,
    dpi: float = 100,
) -> Figure:
    """A conditional flow's p(x | c) as a row of panels, one per row of ``contexts`` (m, k),
    with the true densities ``true_log_prob(x, c)`` as a second row when given.

    ``fig.masses`` holds each model panel's grid mass (near 1 when the box holds the density).
    """
    _check_flow(flow)
    contexts = torch.as_tensor(np.asarray(contexts, dtype=np.float64)).to(_flow_dtype(flow))
    if contexts.ndim != 2 or contexts.shape[0] == 0:
        raise ValueError(f"contexts must have shape (m, k) with m >= 1, got {tuple(contexts.shape)}")
    box = _check_bounds(bounds)
    labels = list(labels) if labels is not None else [f"c = {', '.join(f'{v:.2g}' for v in c)}" for c in contexts]
    if len(labels) != contexts.shape[0]:
        raise ValueError(f"labels must name each of the {contexts.shape[0]} contexts, got {len(labels)}")
    rows = {"model": lambda c: (lambda x: flow.log_prob(x, context=c))}
    if true_log_prob is not None:
        rows["true"] = lambda c: (lambda x: true_log_prob(x, c.expand(x.shape[0], -1)))
    fig = _new_figure(contexts.shape[0], len(rows), box=box)
    axes = fig.subplots(len(rows), contexts.shape[0], squeeze=False)
    masses = []
    with _plotting_solver(flow, tolerance):
        for r, (kind, density_of) in enumerate(rows.items()):
            for j, c in enumerate(contexts):
                xs, ys, density = density_grid(density_of(c), bounds=box, resolution=resolution)
                if kind == "model":
                    masses.append(grid_mass(xs, ys, density))
                _draw_density(axes[r, j], xs, ys, density, cmap)
                axes[r, j].set_title(f"{kind}: {labels[j]}", fontsize=9)
    fig.masses = masses
    return _save(fig, path, dpi)


def _default_layers(layers: int) -> list[int]:
    if layers <= 8:
        return list(range(layers + 1))
    return sorted({round(k) for k in np.linspace(0, layers, 5)})


class PlanarFieldODE(nn.Module):
    """The exact continuous-time flow of a planar flow's velocity field ``planar.as_field()``.

    The K planar layers are forward-Euler steps of u(x, t) = K tanh(w_k . x + b_k) u_hat_k on
    the time slice [k/K, (k+1)/K); this module solves that ODE exactly instead, in closed
    form: on a slice a = w_k . x + b_k obeys da/dt = K m tanh(a) with m = w_k . u_hat_k, so
    sinh a(t) = sinh a(s) exp(K m (t - s)), x moves along u_hat_k by (a(t) - a(s)) / m, and
    the Jacobian determinant of the map is da(t)/da(s) = cosh a(s) exp(K m (t - s)) / cosh a(t).
    ``log_prob(x, t)`` undoes the slices from t back to 0 (float64 inside); it is what
    :func:`plot_discrete_vs_continuous` draws by default: same field, Euler versus exact.
    """

    kind = "planar-ode"

    def __init__(self, planar: PlanarFlow) -> None:
        super().__init__()
        if not isinstance(planar, PlanarFlow):
            raise TypeError(f"planar must be a cnf.PlanarFlow, got {type(planar).__name__}")
        self.planar = planar
        self.dim = planar.dim
        self.base = planar.base

    def log_prob(self, x: torch.Tensor, t: float = 1.0, **_: Any) -> torch.Tensor:
        """log p_t(x) of the exact flow, shape (batch,)."""
        (t,) = _check_times([t], "t")
        if not (isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == self.dim):
            raise ValueError(f"x must be a tensor of shape (n, {self.dim}), got {getattr(x, 'shape', x)!r}")
        K = self.planar.layers
        with torch.no_grad():
            w, b, u_hat = (p.detach().double() for p in self.planar.layer_parameters())
            m = (w * u_hat).sum(-1)
            y = x.detach().double()
            log_det = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
            span = t * K  # time in layer units
            for k in reversed(range(K)):
                duration = min(k + 1.0, span) - k  # of slice k, in layer units (K * seconds)
                if duration <= 0:
                    continue
                c = float(m[k]) * duration  # K m (t - s)
                a_end = (y @ w[k] + b[k]).clamp(-300.0, 300.0)
                if abs(float(m[k])) < 1e-10:  # da/dt = 0: a straight move at constant speed
                    y = y - (torch.tanh(a_end) * duration).unsqueeze(-1) * u_hat[k]
                    continue
                a_start = torch.asinh(torch.sinh(a_end) * math.exp(-c))
                y = y - ((a_end - a_start) / m[k]).unsqueeze(-1) * u_hat[k]
                log_det = log_det + _log_cosh(a_end) - c - _log_cosh(a_start)
            log_p = self.base.log_prob(y.to(x.dtype)).double() + log_det
        return log_p.to(x.dtype)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples of the Euler (planar) flow, for plotting bounds only."""
        return self.planar.sample(n, generator=generator)


def _log_cosh(a: torch.Tensor) -> torch.Tensor:
    return a.abs() + torch.log1p(torch.exp(-2 * a.abs())) - math.log(2.0)


def plot_discrete_vs_continuous(
    planar: PlanarFlow,
    flow: Any = None,
    *,
    layers: Sequence[int] | None = None,
    between: float | None = 1.5,
    data: Any = None,
    bounds: Sequence[float] | None = None,
    resolution: int = 80,
    tolerance: float | None = 1e-4,
    cmap: str = DENSITY_CMAP,
    path: PathLike | None = None,
    dpi: float = 100,
) -> Figure:
    """A planar flow's intermediate distributions (top) against a CNF's p_t at t = k/K (bottom).

    Column k shows the planar flow after k of its K layers and the continuous flow at
    t = k/K: the K = 4 picture of a discrete flow (Rezende & Mohamed 2015, Fig. 2 of the seed
    notes) next to its continuous counterpart. ``layers`` picks the k (default: all when
    K <= 8, else five evenly spaced). ``between`` (default 1.5) adds the column
    t = between/K that a discrete flow does not have: "what would z_1.5 be?" is answered by
    the continuous path. ``flow`` defaults to the CNF of the planar flow's own velocity field
    (``planar.as_field()``, whose forward-Euler steps are the layers) solved exactly.
    The figure carries ``fig.discrete_masses``, ``fig.continuous_masses`` and
    ``fig.continuous_times``.
    """
    if not isinstance(planar, PlanarFlow):
        raise TypeError(f"planar must be a cnf.PlanarFlow, got {type(planar).__name__}")
    _check_flow(planar, "planar")
    if flow is None:
        flow = PlanarFieldODE(planar)
    _check_flow(flow)
    K = planar.layers
    ks = _default_layers(K) if layers is None else list(layers)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= K for k in ks):
        raise ValueError(f"layers must be ints in [0, {K}], got {layers!r}")
    ks = sorted(set(ks))
    columns: list[tuple[float, int | None]] = [(k / K, k) for k in ks]
    if between is not None:
        if not (isinstance(between, (int, float)) and 0 < between < K and between != int(between)):
            raise ValueError(f"between must be a fractional layer index in (0, {K}), got {between!r}")
        columns.append((between / K, None))
        columns.sort(key=lambda c: c[0])
    data_np = _to_numpy(data)
    box = _check_bounds(bounds) if bounds is not None else default_bounds(planar, data_np)
    ncols = len(columns) + (data_np is not None)
    fig = _new_figure(ncols, 2, panel=2.2, box=box, title_space=0.6)
    axes = fig.subplots(2, ncols, squeeze=False)
    discrete_masses, continuous_masses, continuous_times = [], [], []
    for col, (t, k) in enumerate(columns):
        top, bottom = axes[0, col], axes[1, col]
        if k is None:
            _style_axes(top, box)
            top.set_facecolor("0.92")
            top.text(
                0.5,
                0.5,
                f"z_{between:g} is undefined:\na discrete flow has\nonly whole layers",
                ha="center",
                va="center",
                fontsize=8,
                transform=top.transAxes,
            )
            top.set_title(f"planar, layer {between:g}?", fontsize=9)
        else:
            xs, ys, density = density_grid(planar, t, bounds=box, resolution=resolution, tolerance=tolerance)
            mass = grid_mass(xs, ys, density)
            discrete_masses.append(mass)
            _draw_density(top, xs, ys, density, cmap)
            top.set_title(f"planar z_{k} (k={k}/{K})\nmass {mass:.3f}", fontsize=9)
        xs, ys, density = density_grid(flow, t, bounds=box, resolution=resolution, tolerance=tolerance)
        mass = grid_mass(xs, ys, density)
        continuous_masses.append(mass)
        continuous_times.append(t)
        _draw_density(bottom, xs, ys, density, cmap)
        label = f"t = {k}/{K}" if k is not None else f"t = {between:g}/{K}"
        bottom.set_title(f"continuous p_t, {label}\nmass {mass:.3f}", fontsize=9)
    if data_np is not None:
        _draw_data(axes[0, -1], data_np, box, resolution, cmap)
        axes[1, -1].set_axis_off()
    fig.suptitle(f"discrete (planar, K = {K}) versus continuous", fontsize=10)
    fig.discrete_masses = discrete_masses
    fig.continuous_masses = continuous_masses
    fig.continuous_times = continuous_times
    return _save(fig, path, dpi)


def animate_path(
    flow: Any,
    path: PathLike | None = None,
    *,
    frames: int = 17,
    n: int = 500,
    data: Any = None,
    bounds: Sequence[float] | None = None,
    resolution: int = 60,
    tolerance: float | None = 1e-4,
    fps: float = 8,
    seed: int = 0,
    cmap: str = DENSITY_CMAP,
    dpi: float = 80,
) -> Figure:
    """A GIF of the density p_t (left) and of ``n`` samples moving along the path (right).

    ``frames`` times equally spaced in [0, 1]; written with matplotlib's ``PillowWriter`` when
    ``path`` (a ``.gif``) is given. The figure carries ``fig.animation`` (the
    :class:`~matplotlib.animation.FuncAnimation`), ``fig.frame_times`` and ``fig.n_frames``.
    """
    _check_flow(flow)
    frames = _check_positive_int("frames", frames, 2)
    n = _check_positive_int("n", n)
    if path is not None and Path(path).suffix.lower() != ".gif":
        raise ValueError(f"path must end in .gif, got {str(path)!r}")
    data_np = _to_numpy(data)
    box = _check_bounds(bounds) if bounds is not None else default_bounds(flow, data_np)
    ts = np.linspace(0.0, 1.0, frames)
    densities = [
        density_grid(flow, float(t), bounds=box, resolution=resolution, tolerance=tolerance)[2] for t in ts
    ]
    xs = np.linspace(box[0], box[1], resolution)
    ys = np.linspace(box[2], box[3], resolution)
    with torch.no_grad(), _plotting_solver(flow, tolerance):
        positions = flow.trajectory(_base_points(flow, n, seed), ts.tolist()).double().cpu().numpy()
    fig = _new_figure(2, panel=3.0, box=box, title_space=0.6)
    ax_density, ax_samples = fig.subplots(1, 2)
    image = _draw_density(ax_density, xs, ys, densities[0], cmap)
    if data_np is not None:
        ax_samples.scatter(data_np[:2000, 0], data_np[:2000, 1], s=2, color="0.8", zorder=1)
    _style_axes(ax_samples, box)
    dots = ax_samples.scatter(positions[0, :, 0], positions[0, :, 1], s=3, color="tab:blue", zorder=2)
    ax_samples.set_title("samples", fontsize=9)
    heading = fig.suptitle("", fontsize=10)

    def update(i: int) -> tuple[Any, ...]:
        image.set_data(densities[i])
        image.set_clim(0.0, float(densities[i].max()) or 1.0)
        dots.set_offsets(positions[i])
        ax_density.set_title(f"p_t, {_time_label(flow, float(ts[i]))}", fontsize=9)
        heading.set_text(f"t = {ts[i]:.2f}")
        return image, dots

    update(0)
    animation = FuncAnimation(fig, update, frames=frames, blit=False, repeat=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        animation.save(str(path), writer=PillowWriter(fps=fps), dpi=dpi)
    fig.animation = animation
    fig.frame_times = ts
    fig.n_frames = frames
    return fig


def read_train_log(log: PathLike | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (one JSON object a line) or a list of records."""
    if isinstance(log, (str, os.PathLike)):
        log_path = Path(log)
        if not log_path.is_file():
            raise FileNotFoundError(f"training log {str(log_path)!r} does not exist")
        records = []
        for number, line in enumerate(log_path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"line {number} of {str(log_path)!r} is not JSON: {error}") from error
        # The trainer writes the last step again when it adds the final validation NLL.
        by_step = {r.get("step", i): r for i, r in enumerate(records)}
        return list(by_step.values())
    if isinstance(log, Sequence) and all(isinstance(r, Mapping) for r in log):
        return [dict(r) for r in log]
    raise TypeError(f"log must be a path to train_log.jsonl or a list of dicts, got {type(log).__name__}")


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, values.size))
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    head = cumulative[1:window] / np.arange(1, window)
    return np.concatenate([head, (cumulative[window:] - cumulative[:-window]) / window])


def plot_training_curves(
    log: PathLike | Sequence[Mapping[str, Any]],
    *,
    smooth: int = 25,
    title: str | None = None,
    path: PathLike | None = None,
    dpi: float = 100,
) -> Figure:
    """Training curves from ``train_log.jsonl``: NLL against iteration and wall time, and NFE.

    Panels: training loss (raw and a ``smooth``-step moving average) with validation NLL
    against the step; the same against seconds; the NFE of the forward (and adjoint backward)
    solves per step and of validation.
    """
    records = [r for r in read_train_log(log) if "step" in r and "loss" in r]
    if not records:
        raise ValueError(f"log has no training records (dicts with 'step' and 'loss'), got {log!r}")
    smooth = _check_positive_int("smooth", smooth)

    def column(key: str, rows: list[dict[str, Any]]) -> np.ndarray:
        return np.array([float(r.get(key, np.nan)) for r in rows], dtype=float)

    steps, seconds, loss = column("step", records), column("seconds", records), column("loss", records)
    val = [r for r in records if r.get("val_nll") is not None]
    fig = _new_figure(3, panel=3.2, title_space=0.4)
    ax_step, ax_time, ax_nfe = fig.subplots(1, 3)
    smoothed = _moving_average(loss, smooth)
    for ax, x, xv, label in (
        (ax_step, steps, column("step", val), "iteration"),
        (ax_time, seconds, column("seconds", val), "wall time (s)"),
    ):
        ax.plot(x, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
        ax.plot(
            x, smoothed, color="tab:blue", linewidth=1.5, label=f"train (mean of {min(smooth, loss.size)})"
        )
        if val:
            ax.plot(xv, column("val_nll", val), "o-", color="tab:red", markersize=3, label="validation NLL")
        ax.set_xlabel(label)
        ax.set_ylabel("loss / NLL (nats)")
        ax.grid(alpha=0.3)
    ax_step.legend(fontsize=7)
    ax_nfe.plot(steps, column("nfe_forward", records), color="tab:green", linewidth=0.8, label="forward")
    backward = column("nfe_backward", records)
    if np.nansum(backward) > 0:
        ax_nfe.plot(steps, backward, color="tab:purple", linewidth=0.8, label="backward (adjoint)")
    if val and any("val_nfe" in r for r in val):
        ax_nfe.plot(
            column("step", val),
            column("val_nfe", val),
            "o",
            color="tab:red",
            markersize=3,
            label="validation",
        )
    ax_nfe.set_xlabel("iteration")
    ax_nfe.set_ylabel("NFE per solve")
    ax_nfe.grid(alpha=0.3)
    ax_nfe.legend(fontsize=7)
    fig.suptitle(title or f"training: {int(steps[-1])} steps in {seconds[-1]:.1f} s", fontsize=10)
    return _save(fig, path, dpi)


def plot_sample_pairs(
    flow: Any,
    data: Any = None,
    *,
    dims: Sequence[int] | None = None,
    n: int = 2000,
    seed: int = 0,
    title: str | None = None,
    path: PathLike | None = None,
    dpi: float = 100,
) -> Figure:
    """Samples of a flow on any number of dimensions beside data: a pair plot of ``dims`` (default
    the first four), histograms of each on the diagonal, scatter of each pair below it; samples in
    orange, the data in grey (histograms) and black (scatter, on top). ``n`` samples (drawn with
    ``seed``) and at most ``n`` data rows."""
    if not callable(getattr(flow, "sample", None)):
        raise TypeError(f"flow must have sample(n), got {flow!r}")
    if getattr(flow, "context_dim", None) is not None:
        raise ValueError("plot_sample_pairs draws unconditional flows; this one needs a context")
    n = _check_positive_int("n", n)
    with torch.no_grad():
        generator = torch.Generator(device=_flow_device(flow)).manual_seed(seed)
        samples = flow.sample(n, generator=generator).detach().cpu().double().numpy().reshape(n, -1)
    dim = samples.shape[1]
    dims = list(range(min(dim, 4))) if dims is None else [int(d) for d in dims]
    if not dims or any(not 0 <= d < dim for d in dims):
        raise ValueError(f"dims must be indices of the flow's {dim} dimensions, got {dims!r}")
    data_np = None
    if data is not None:
        data_np = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        data_np = data_np.astype(float).reshape(data_np.shape[0], -1)[:n]
        if data_np.shape[1] != dim:
            raise ValueError(f"data has {data_np.shape[1]} dimensions, the flow {dim}")
    k = len(dims)
    fig = _new_figure(k, k, panel=2.2, title_space=0.1)
    axes = np.asarray(fig.subplots(k, k, squeeze=False))
    for row, i in enumerate(dims):
        for col, j in enumerate(dims):
            ax = axes[row, col]
            if col > row:
                ax.set_axis_off()
                continue
            if row == col:
                reference = samples[:, i] if data_np is None else np.concatenate([samples[:, i], data_np[:, i]])
                bins = np.histogram_bin_edges(reference, bins=40)
                if data_np is not None:
                    ax.hist(data_np[:, i], bins=bins, density=True, color="0.6", label="data")
                ax.hist(samples[:, i], bins=bins, density=True, histtype="step", color="tab:orange", label="flow")
            else:  # the data on top: often far fewer points than the samples
                ax.scatter(samples[:, j], samples[:, i], s=2, color="tab:orange", alpha=0.4, linewidths=0)
                if data_np is not None:
                    ax.scatter(data_np[:, j], data_np[:, i], s=3, color="black", alpha=0.7, linewidths=0)
            if row == k - 1:
                ax.set_xlabel(f"x{j}")
            if col == 0 and row > 0:
                ax.set_ylabel(f"x{i}")
            ax.tick_params(labelsize=6)
    if data_np is not None:
        axes[0, 0].legend(fontsize=6)
    fig.suptitle(title or f"{n} flow samples (orange) and the data (grey / black), dimensions {dims} of {dim}", fontsize=9)
    return _save(fig, path, dpi)


def plot_all(
    flow: Any,
    out: PathLike,
    *,
    data: Any = None,
    log: PathLike | Sequence[Mapping[str, Any]] | None = None,
    times: Sequence[float] = DEFAULT_TIMES,
    animate: bool = False,
    frames: int = 17,
    resolution: int = 80,
    planar: PlanarFlow | None = None,
    bounds: Sequence[float] | None = None,
    tolerance: float | None = 1e-4,
    title: str | None = None,
    dpi: float = 100,
    contexts: Any = None,
) -> list[Path]:
    """Write every plot of ``flow`` into the folder ``out``; return the written paths.

    ``probability_path.png`` (at ``times``), ``trajectories.png``, ``velocity_field.png``;
    ``discrete_vs_continuous.png`` for a planar flow (against the exact solve of its own
    field) or for a CNF when a ``planar`` flow to compare with is given; ``path.gif`` with
    ``animate`` (``frames`` frames; the default 17 puts a frame on every multiple of 1/16,
    so the other plots reuse its grids); ``training_curves.png`` when ``log`` (a
    train_log.jsonl or its records) has records. Grids are computed once per time.
    A flow on more dimensions (an unconditional one) gets ``sample_pairs.png``
    (:func:`plot_sample_pairs`, samples beside ``data``) and the training curves instead. A
    conditional 2-D flow gets ``conditional_densities.png``, p(x | c) at each row of ``contexts``
    (m, k) (:func:`plot_conditional_densities`; by default the training contexts' mean and mean
    +- one standard deviation, as its context standardisation holds them), in a box holding its
    samples at those contexts, and the training curves.
    """
    dim = getattr(flow, "dim", None)
    conditional = getattr(flow, "context_dim", None) is not None
    pairs = isinstance(dim, int) and dim > 2  # samples beside the data instead of grids
    if pairs and conditional:
        raise ValueError(
            f"flow is conditional on {dim} dimensions: plots draw 2-D flows and unconditional ones on "
            "more dimensions; draw its samples with `cnf sample --context`"
        )
    if conditional:
        if data is not None:
            raise ValueError("data are not drawn beside a conditional flow's densities; leave data out")
    elif contexts is not None:
        raise ValueError("contexts are for a conditional flow; this one is unconditional")
    if not pairs:
        _check_flow(flow)
        times = _check_times(times)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def keep(name: str) -> Path:
        written.append(out / name)
        return out / name

    if pairs:
        plot_sample_pairs(flow, data, title=title, path=keep("sample_pairs.png"), dpi=dpi)
    elif conditional:
        contexts = default_contexts(flow) if contexts is None else contexts
        box = _check_bounds(bounds) if bounds is not None else conditional_bounds(flow, contexts)
        plot_conditional_densities(
            flow, contexts, bounds=box, resolution=resolution, tolerance=tolerance,
            path=keep("conditional_densities.png"), dpi=dpi,
        )  # fmt: skip
    else:
        data_np = _to_numpy(data)
        box = _check_bounds(bounds) if bounds is not None else default_bounds(flow, data_np)
        grid = {"bounds": box, "resolution": resolution, "tolerance": tolerance}
        token = _GRID_CACHE.set({})
        try:
            if animate:
                animate_path(flow, keep("path.gif"), frames=frames, data=data_np, **grid)
            plot_probability_path(
                flow, times, data=data_np, title=title, path=keep("probability_path.png"), dpi=dpi, **grid
            )
            plot_trajectories(flow, title=title, path=keep("trajectories.png"), dpi=dpi, **grid)
            plot_velocity_field(flow, path=keep("velocity_field.png"), dpi=dpi, **grid)
            if isinstance(flow, PlanarFlow):
                plot_discrete_vs_continuous(
                    flow, data=data_np, path=keep("discrete_vs_continuous.png"), dpi=dpi, **grid
                )
            elif planar is not None:
                plot_discrete_vs_continuous(
                    planar, flow, data=data_np, path=keep("discrete_vs_continuous.png"), dpi=dpi, **grid
                )
        finally:
            _GRID_CACHE.reset(token)
    curves = plot_training_curves_if_logged(log, out / "training_curves.png", dpi=dpi)
    return written + ([curves] if curves is not None else [])


def plot_training_curves_if_logged(
    log: PathLike | Sequence[Mapping[str, Any]] | None, path: PathLike, *, dpi: float = 100
) -> Path | None:
    """:func:`plot_training_curves` into ``path`` when ``log`` (a train_log.jsonl that exists, or
    its records) holds training records; the path written, else None."""
    if log is None or (isinstance(log, (str, os.PathLike)) and not Path(log).is_file()):
        return None
    records = read_train_log(log)
    if not any("loss" in r for r in records):
        return None
    plot_training_curves(records, path=path, dpi=dpi)
    return Path(path)
