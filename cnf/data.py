"""Data for continuous normalizing flows: 2-D toy samplers, target energies, user tables.

* Toy samplers follow the definitions of FFJORD's ``lib/toy_data.py``
  (Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
  Generative Models", ICLR 2019), rewritten with a seeded :class:`numpy.random.Generator`
  and without scikit-learn. Where FFJORD lays points out deterministically (``linspace``
  angles, fixed counts per component) we draw them i.i.d. from the same distribution, so
  that every sample is an independent draw and ``n`` points are always returned.
* Energies are the unnormalised 2-D targets U1..U4 of Rezende & Mohamed, "Variational
  Inference with Normalizing Flows", ICML 2015, Table 1.
* :func:`check_batch` is the one validation function called before every solve.
"""

from __future__ import annotations

import itertools
import math
import operator
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ENERGIES",
    "TOY_DATASETS",
    "check_batch",
    "eight_gaussians_log_prob",
    "energy",
    "load_data",
    "sample_toy",
    "split",
    "target_log_density",
    "true_log_prob",
]

TOY_DATASETS: tuple[str, ...] = (
    "moons",
    "8gaussians",
    "pinwheel",
    "checkerboard",
    "circles",
    "rings",
    "2spirals",
    "swissroll",
)
"""Names accepted by :func:`sample_toy` (FFJORD's 2-D density-estimation benchmarks)."""

ENERGIES: tuple[str, ...] = ("u1", "u2", "u3", "u4")
"""Names accepted by :func:`energy` (Rezende & Mohamed 2015, Table 1)."""

# 8gaussians constants, exactly as in FFJORD: centres on the unit circle every 45 degrees,
# scaled by 4, unit-normal noise times 0.5, and the whole sample divided by 1.414.
_EIGHT_SCALE = 4.0
_EIGHT_STD = 0.5
_EIGHT_DIVISOR = 1.414
_EIGHT_CENTERS = np.array(
    [
        (1.0, 0.0),
        (-1.0, 0.0),
        (0.0, 1.0),
        (0.0, -1.0),
        (1.0 / math.sqrt(2), 1.0 / math.sqrt(2)),
        (1.0 / math.sqrt(2), -1.0 / math.sqrt(2)),
        (-1.0 / math.sqrt(2), 1.0 / math.sqrt(2)),
        (-1.0 / math.sqrt(2), -1.0 / math.sqrt(2)),
    ]
)

_LOADABLE_SUFFIXES = (".npy", ".csv")


# --------------------------------------------------------------------------- validation


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


def check_batch(x: torch.Tensor, dim: int | None = None, name: str = "x") -> torch.Tensor:
    """Validate a batch of points of shape ``(n, dim)`` before a solve; return it unchanged.

    Checks, in order: a :class:`torch.Tensor`, a floating dtype, two dimensions, at least one
    row and one column, ``x.shape[1] == dim`` when ``dim`` is given, and all entries finite.
    Raises :class:`TypeError` or :class:`ValueError` naming ``name`` and echoing what was got.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} must have a floating dtype, got {x.dtype}; use {name}.to(torch.float32) or torch.float64"
        )
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


# --------------------------------------------------------------------------- toy samplers


def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    # Two interleaved half circles as in sklearn.datasets.make_moons(noise=0.1), then
    # FFJORD's affine map x * 2 + (-1, -0.2).
    angle = rng.uniform(0.0, math.pi, size=n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    pts = np.stack([x, y], axis=1) + rng.normal(scale=0.1, size=(n, 2))
    return pts * 2.0 + np.array([-1.0, -0.2])


def _eight_gaussians(rng: np.random.Generator, n: int) -> np.ndarray:
    idx = rng.integers(8, size=n)
    pts = _EIGHT_SCALE * _EIGHT_CENTERS[idx] + _EIGHT_STD * rng.standard_normal((n, 2))
    return pts / _EIGHT_DIVISOR


def _pinwheel(rng: np.random.Generator, n: int) -> np.ndarray:
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    arm_angles = np.linspace(0.0, 2.0 * math.pi, num_classes, endpoint=False)
    feats = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    labels = rng.integers(num_classes, size=n)
    angles = arm_angles[labels] + rate * np.exp(feats[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    # Row vector times the rotation [[c, -s], [s, c]], as FFJORD's einsum("ti,tij->tj").
    out = np.stack([feats[:, 0] * c + feats[:, 1] * s, -feats[:, 0] * s + feats[:, 1] * c], 1)
    return 2.0 * out


def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    x1 = rng.random(n) * 4.0 - 2.0
    x2 = rng.random(n) - rng.integers(0, 2, size=n) * 2.0 + np.floor(x1) % 2
    return np.stack([x1, x2], axis=1) * 2.0


def _circles(rng: np.random.Generator, n: int) -> np.ndarray:
    # sklearn.datasets.make_circles(factor=0.5, noise=0.08), times 3.
    angle = rng.uniform(0.0, 2.0 * math.pi, size=n)
    radius = np.where(rng.random(n) < 0.5, 1.0, 0.5)
    pts = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return (pts + rng.normal(scale=0.08, size=(n, 2))) * 3.0


def _rings(rng: np.random.Generator, n: int) -> np.ndarray:
    # Four concentric circles of radii 3 * (1, 0.75, 0.5, 0.25), noise std 0.08.
    angle = rng.uniform(0.0, 2.0 * math.pi, size=n)
    radius = 3.0 * np.array([1.0, 0.75, 0.5, 0.25])[rng.integers(4, size=n)]
    pts = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return pts + rng.normal(scale=0.08, size=(n, 2))


def _two_spirals(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.sqrt(rng.random(n)) * 540.0 * (2.0 * math.pi) / 360.0
    arm = np.stack([-np.cos(t) * t + rng.random(n) * 0.5, np.sin(t) * t + rng.random(n) * 0.5], axis=1)
    sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    return sign[:, None] * arm / 3.0 + rng.normal(scale=0.1, size=(n, 2))


def _swissroll(rng: np.random.Generator, n: int) -> np.ndarray:
    # sklearn.datasets.make_swiss_roll(noise=1.0), columns (0, 2), divided by 5.
    t = 1.5 * math.pi * (1.0 + 2.0 * rng.random(n))
    pts = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    return (pts + rng.standard_normal((n, 2))) / 5.0


_SAMPLERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "checkerboard": _checkerboard,
    "circles": _circles,
    "rings": _rings,
    "2spirals": _two_spirals,
    "swissroll": _swissroll,
}


def _check_toy_name(name: object) -> str:
    if not isinstance(name, str) or name not in _SAMPLERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(TOY_DATASETS)}")
    return name


def sample_toy(
    name: str, n: int, seed: int | None = None, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Draw ``n`` i.i.d. points of a 2-D toy distribution as an ``(n, 2)`` tensor.

    ``name`` is one of :data:`TOY_DATASETS`; definitions follow FFJORD's ``toy_data.py``
    (Grathwohl et al. 2019). The same ``seed`` gives the same points; ``seed=None`` draws
    fresh entropy from the OS.
    """
    name = _check_toy_name(name)
    n = _check_positive_int(n, "n")
    seed = _check_seed(seed)
    dtype = _check_dtype(dtype)
    rng = np.random.default_rng(seed)
    pts = _SAMPLERS[name](rng, n)
    return torch.from_numpy(np.ascontiguousarray(pts, dtype=np.float64)).to(dtype)


# --------------------------------------------------------------------------- true densities


def eight_gaussians_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Exact log density of the ``8gaussians`` distribution at points ``x`` of shape (..., 2).

    An equal-weight mixture of 8 isotropic Gaussians with means ``4 * c_k / 1.414`` and
    standard deviation ``0.5 / 1.414`` (FFJORD, Grathwohl et al. 2019); evaluated with
    ``logsumexp``. Returns shape ``x.shape[:-1]`` in ``x``'s dtype and device.
    """
    x = _check_points(x, "x")
    means = torch.as_tensor(_EIGHT_SCALE * _EIGHT_CENTERS / _EIGHT_DIVISOR, dtype=x.dtype, device=x.device)
    std = _EIGHT_STD / _EIGHT_DIVISOR
    sq = ((x.unsqueeze(-2) - means) ** 2).sum(dim=-1)  # (..., 8)
    log_norm = -math.log(8.0) - math.log(2.0 * math.pi * std**2)
    return torch.logsumexp(-0.5 * sq / std**2, dim=-1) + log_norm


_TRUE_LOG_PROBS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "8gaussians": eight_gaussians_log_prob,
}


def true_log_prob(name: str, x: torch.Tensor) -> torch.Tensor:
    """Exact log density of toy dataset ``name`` at ``x``, where known in closed form.

    Only ``"8gaussians"`` has one; other datasets raise :class:`ValueError`.
    """
    name = _check_toy_name(name)
    if name not in _TRUE_LOG_PROBS:
        raise ValueError(
            f"dataset {name!r} has no closed-form density; "
            f"true_log_prob is known for: {', '.join(_TRUE_LOG_PROBS)}"
        )
    return _TRUE_LOG_PROBS[name](x)


# --------------------------------------------------------------------------- target energies


def _w1(z1: torch.Tensor) -> torch.Tensor:
    return torch.sin(2.0 * math.pi * z1 / 4.0)


def _w2(z1: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.exp(-0.5 * ((z1 - 1.0) / 0.6) ** 2)


def _w3(z1: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.sigmoid((z1 - 1.0) / 0.3)


def _neg_log_sum_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """-log(exp(a) + exp(b)), computed stably."""
    return -torch.logaddexp(a, b)


def _u1(z: torch.Tensor) -> torch.Tensor:
    z1 = z[..., 0]
    ring = 0.5 * ((torch.linalg.vector_norm(z, dim=-1) - 2.0) / 0.4) ** 2
    modes = _neg_log_sum_exp(-0.5 * ((z1 - 2.0) / 0.6) ** 2, -0.5 * ((z1 + 2.0) / 0.6) ** 2)
    return ring + modes


# U2-U4 as printed do not decay along z1 (exp(-U) has infinite mass), so they are confined to
# the square of the paper's figures: outside |z1| <= 4 a Gaussian wall of width 0.4 is added.
# Inside the square the energies are exactly the paper's; the wall makes log Z finite.
ENERGY_BOX = 4.0
_WALL_WIDTH = 0.4


def _wall(z1: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.relu(z1.abs() - ENERGY_BOX) / _WALL_WIDTH) ** 2


def _u2(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((z[..., 1] - _w1(z[..., 0])) / 0.4) ** 2 + _wall(z[..., 0])


def _u3(z: torch.Tensor) -> torch.Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    a = z2 - _w1(z1)
    return _neg_log_sum_exp(-0.5 * (a / 0.35) ** 2, -0.5 * ((a + _w2(z1)) / 0.35) ** 2) + _wall(z1)


def _u4(z: torch.Tensor) -> torch.Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    a = z2 - _w1(z1)
    return _neg_log_sum_exp(-0.5 * (a / 0.4) ** 2, -0.5 * ((a + _w3(z1)) / 0.35) ** 2) + _wall(z1)


_ENERGY_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "u1": _u1,
    "u2": _u2,
    "u3": _u3,
    "u4": _u4,
}


def _check_energy_name(name: object) -> str:
    key = name.lower() if isinstance(name, str) else name
    if key not in _ENERGY_FNS:
        raise ValueError(f"unknown energy {name!r}; choose one of {', '.join(ENERGIES)}")
    return key  # type: ignore[return-value]


def energy(name: str, z: torch.Tensor) -> torch.Tensor:
    """Unnormalised energy ``U(z)`` of Rezende & Mohamed (2015), Table 1.

    ``name`` is one of :data:`ENERGIES` (``"u1"`` is the ring, ``"u2"``-``"u4"`` the sine
    waves); ``z`` has shape ``(..., 2)``; returns shape ``z.shape[:-1]``, differentiable.
    The target density is proportional to ``exp(-U(z))``. U2-U4 get a Gaussian wall outside
    |z1| <= 4 (width 0.4) so that they are normalisable; inside that band they are unchanged.
    """
    key = _check_energy_name(name)
    z = _check_points(z, "z")
    return _ENERGY_FNS[key](z)


def target_log_density(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``z -> -U(z)``, the unnormalised log density of energy ``name``."""
    key = _check_energy_name(name)

    def log_density(z: torch.Tensor) -> torch.Tensor:
        return -energy(key, z)

    log_density.__name__ = f"neg_{key}"
    return log_density


# --------------------------------------------------------------------------- user data


def _is_numeric_row(line: str) -> bool:
    try:
        [float(tok) for tok in line.split(",")]
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> np.ndarray:
    with path.open(encoding="utf-8-sig") as fh:
        lines = fh.read().splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise ValueError(f"data file {str(path)!r} is empty")
    skip = first + (0 if _is_numeric_row(lines[first]) else 1)
    body = [line for line in lines[skip:] if line.strip()]
    if not body:
        raise ValueError(f"data file {str(path)!r} has a header but no data rows")
    try:
        return np.loadtxt(body, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise ValueError(f"data file {str(path)!r} is not a numeric comma-separated table: {err}") from None


def _read_file(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix not in _LOADABLE_SUFFIXES:
        raise ValueError(
            f"unknown file extension {path.suffix!r} for source {str(path)!r}; "
            f"use one of {', '.join(_LOADABLE_SUFFIXES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {str(path)!r}")
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"cannot read .npy file {str(path)!r}: {err}") from None
    return _read_csv(path)


def _to_tensor(data: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.is_complex() or data.dtype == torch.bool:
            raise TypeError(f"data must be real numeric, got dtype {data.dtype}")
        return data.detach().to(dtype)
    if data.dtype.kind not in "iuf":
        raise TypeError(f"data must be a real numeric array, got dtype {data.dtype}")
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float64)).to(dtype)


def load_data(
    source: str | os.PathLike[str] | np.ndarray | torch.Tensor,
    *,
    n: int = 10_000,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Load a dataset as a validated ``(n, d)`` floating tensor.

    ``source`` is a toy dataset name (see :data:`TOY_DATASETS`; ``n`` points drawn with
    ``seed``), a path to a ``.npy`` or ``.csv`` file (comma separated, numeric, an optional
    non-numeric header row is skipped), a numpy array or a torch tensor. The result is
    checked with :func:`check_batch` (2-D, non-empty, finite) and cast to ``dtype``.
    """
    dtype = _check_dtype(dtype)
    if isinstance(source, str) and source in _SAMPLERS:
        return sample_toy(source, n, seed, dtype=dtype)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if isinstance(source, str) and not path.suffix and not path.exists():
            raise ValueError(
                f"unknown dataset {source!r}; choose one of {', '.join(TOY_DATASETS)}, "
                f"or give a path to a {' or '.join(_LOADABLE_SUFFIXES)} file"
            )
        array: np.ndarray | torch.Tensor = _read_file(path)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        array = source
    else:
        raise TypeError(
            "source must be a dataset name, a path, a numpy array or a torch.Tensor, "
            f"got {type(source).__name__}"
        )
    if array.ndim != 2:
        hint = " (reshape a single point with [None, :])" if array.ndim == 1 else ""
        raise ValueError(f"data must be a batch of shape (n, d); got shape {tuple(array.shape)}{hint}")
    return check_batch(_to_tensor(array, dtype), name="data")


def split(
    data: torch.Tensor,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int | None = 0,
) -> tuple[torch.Tensor, ...]:
    """Randomly split the rows of ``data`` into parts of the given ``fractions``.

    ``fractions`` must be positive and sum to 1; part sizes are rounded from the cumulative
    fractions so that every row lands in exactly one part. Returns one tensor per fraction
    (``train, val, test`` for the default).
    """
    check_batch(data, name="data")
    try:
        fracs = [float(f) for f in fractions]
    except (TypeError, ValueError):
        raise TypeError(f"fractions must be a sequence of numbers, got {fractions!r}") from None
    if not fracs or any(not math.isfinite(f) or f <= 0 for f in fracs):
        raise ValueError(f"fractions must be positive numbers, got {fractions!r}")
    if abs(sum(fracs) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions!r} (sum {sum(fracs)!r})")
    seed = _check_seed(seed)
    n = data.shape[0]
    bounds = [0, *(round(c * n) for c in np.cumsum(fracs)[:-1]), n]
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    if any(s <= 0 for s in sizes):
        raise ValueError(f"fractions {fractions!r} of data with {n} rows leave an empty part (sizes {sizes})")
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(data.device)
    return tuple(data[perm[a:b]] for a, b in itertools.pairwise(bounds))
