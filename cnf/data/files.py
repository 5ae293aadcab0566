"""User data: ``.npy`` / ``.csv`` files, arrays and tensors, loaded and split."""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cnf.data.checks import _check_dtype, _check_seed, check_batch
from cnf.data.toy import _SAMPLERS, TOY_DATASETS, sample_toy

_LOADABLE_SUFFIXES = (".npy", ".csv")
#: A column of at least this many consecutive integers is taken for a row index (a warning).
_INDEX_MIN_ROWS = 10

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
    header = not _is_numeric_row(lines[first])
    if header:
        warnings.warn(
            f"data file {str(path)!r}: the first row {lines[first][:80]!r} is not numeric and was taken "
            "as a header (skipped)",
            stacklevel=4,
        )
    skip = first + (1 if header else 0)
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
        if path.stat().st_size == 0:
            raise ValueError(f"data file {str(path)!r} is empty (0 bytes)")
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as err:
            raise ValueError(f"cannot read .npy file {str(path)!r} (truncated or not a .npy file): {err}") from None
        if not isinstance(array, np.ndarray):
            raise ValueError(f"data file {str(path)!r} holds several arrays (.npz); save one with np.save")
        if array.size == 0:
            raise ValueError(f"data file {str(path)!r} holds no data: its array has shape {array.shape}")
        return array
    return _read_csv(path)


def _warn_index_columns(array: np.ndarray | torch.Tensor, source: str) -> None:
    """Warn about columns of consecutive integers (a row index, as pandas' ``to_csv`` writes one)."""
    values = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < _INDEX_MIN_ROWS:
        return
    steps = np.diff(values, axis=0)
    for column in np.flatnonzero(np.all(steps == 1.0, axis=0)):
        first = values[0, column]
        if first == round(first):
            warnings.warn(
                f"{source}: column {column} holds consecutive integers {first:g}, {first + 1:g}, ... "
                f"{values[-1, column]:g}, which looks like a row index and would be modelled as data; "
                "drop it (pandas: to_csv(index=False))",
                stacklevel=3,
            )


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
        if array.ndim == 2:
            _warn_index_columns(array, f"data file {str(path)!r}")
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
