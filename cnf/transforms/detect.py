"""Choosing the preprocessing a table needs, from its training split (``cnf train`` uses this).

Rules of ``steps="auto"``, applied in order and each reported in one line:

1. **dequantize** when every entry is an integer and they span at most :data:`MAX_LEVELS`
   values (pixels, counts): levels = max - min + 1 (or the given ``levels``), low = min.
   Tables that mix integer and continuous columns are treated as continuous (said so).
2. **logit** when the values lie in [0, 1] (after dequantisation they always do).
3. **standardize** after a logit, or when a column's standard deviation lies outside
   [1/4, 4] or its mean is further than one standard deviation from 0 (data on unit scale,
   like the 2-D toys, are left as they are); in more than 2 dimensions, with at least twice as
   many rows as dimensions, **whiten** instead (full covariance, :class:`Whiten`), so that the
   flow starts from the data's Gaussian fit (measured on digits: README, "Recipes by dimension").

Every statistic comes from the training split; dequantisation noise for fitting the
standardisation is drawn from a fixed seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from cnf.transforms.base import Compose, Transform, check_sample_batch
from cnf.transforms.dequantize import Dequantize
from cnf.transforms.logit import DEFAULT_ALPHA, Logit
from cnf.transforms.standardize import Standardize
from cnf.transforms.whiten import Whiten

STEPS = ("dequantize", "logit", "standardize", "whiten")
#: The most distinct integer values that ``auto`` still treats as levels of discrete data.
MAX_LEVELS = 256
_SCALE_RANGE = (0.25, 4.0)
#: From this dimension on ``auto`` whitens (full covariance) instead of standardising columns.
WHITEN_MIN_DIM = 2


def _integer_columns(x: torch.Tensor) -> torch.Tensor:
    return (x == x.round()).reshape(x.shape[0], -1).all(dim=0)


def _needs_standardizing(x: torch.Tensor) -> bool:
    flat = x.reshape(x.shape[0], -1)
    std = flat.std(dim=0, correction=0)
    mean = flat.mean(dim=0)
    low, high = _SCALE_RANGE
    return bool(((std < low) | (std > high) | (mean.abs() > std)).any())


def _parse_steps(steps: str | Sequence[str]) -> list[str] | None:
    if isinstance(steps, str):
        if steps == "auto":
            return None
        steps = [] if steps == "none" else [s.strip() for s in steps.split(",") if s.strip()]
    chosen = list(steps)
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        raise ValueError(
            f"unknown preprocessing step(s) {unknown!r} in steps={steps!r}; use 'auto', 'none' or a "
            f"comma-separated subset of {STEPS} in this order"
        )
    if chosen != [s for s in STEPS if s in chosen]:
        raise ValueError(f"preprocessing steps must keep the order {STEPS}, got {chosen!r}")
    return chosen


def choose_preprocessing(
    train: torch.Tensor,
    steps: str | Sequence[str] = "auto",
    *,
    levels: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
) -> tuple[Transform | None, list[str]]:
    """The fitted preprocessing for ``train`` (n, ...) and one line per decision.

    ``steps`` is ``"auto"`` (the rules of the module docstring), ``"none"``, or a list (or
    comma-separated string) of ``dequantize``, ``logit``, ``standardize`` to apply in that order.
    ``levels`` fixes the number of integer levels (e.g. 17 for digits, 256 for 8-bit pixels).
    Returns ``(None, notes)`` when nothing is applied.
    """
    check_sample_batch(train, "train")
    chosen = _parse_steps(steps)
    auto = chosen is None
    notes: list[str] = []
    integer = _integer_columns(train)
    minimum, maximum = train.min().item(), train.max().item()
    if minimum == maximum:
        raise ValueError(
            f"every value of the training data is {minimum:g}: one constant, no distribution to fit"
        )
    if auto:
        chosen = []
        span = int(round(maximum - minimum)) + 1
        if bool(integer.all()) and (levels is not None or span <= MAX_LEVELS):
            chosen.append("dequantize")
        elif bool(integer.any()):
            columns = integer.nonzero().flatten().tolist()
            notes.append(
                f"columns {columns} are integer-valued among continuous ones: the table is treated as continuous"
            )
    transforms: list[Transform] = []
    current = train
    generator = torch.Generator(device=train.device).manual_seed(seed)
    if "dequantize" in chosen:
        if not bool(integer.all()):
            raise ValueError("steps include 'dequantize' but train has non-integer values; use integer data")
        low = int(round(minimum)) if levels is None else 0
        count = int(round(maximum - low)) + 1 if levels is None else levels
        transforms.append(Dequantize(count, low=float(low)))
        notes.append(
            f"dequantize: every value is an integer, {count} levels from {low} (uniform noise per bin)"
        )
        current, _ = transforms[-1](current, generator=generator)
    if auto and current.min().item() >= 0.0 and current.max().item() <= 1.0:
        chosen.append("logit")
    if "logit" in chosen:
        transforms.append(Logit(alpha))
        notes.append(f"logit: values lie in [0, 1]; alpha={alpha}")
        current, _ = transforms[-1](current)
    if auto and ("logit" in chosen or _needs_standardizing(current)):
        flat = current.reshape(current.shape[0], -1)
        # Whitening needs a covariance estimate: more rows than twice the dimension.
        if flat.shape[1] > WHITEN_MIN_DIM and flat.shape[0] >= 2 * flat.shape[1]:
            chosen.append("whiten")
        else:
            chosen.append("standardize")
    if "standardize" in chosen:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            transforms.append(Standardize.fit(current, name="train"))
        notes.extend(str(w.message) for w in caught)
        notes.append("standardize: per-column mean and scale of the training split")
    if "whiten" in chosen:
        transforms.append(Whiten.fit(current, name="train"))
        notes.append("whiten: mean and covariance of the training split (ZCA)")
    if not transforms:
        notes.append("no preprocessing: the data are continuous and on unit scale")
        return None, notes
    return Compose(*transforms), notes
