"""Variational inference: fit a flow q to an unnormalised log density log p~ by reverse KL.

    KL(q || p) = E_q[log q(x) - log p~(x)] + log Z,        p = p~ / Z,

so minimising E_q[log q - log p~] over the flow's parameters (samples and their densities from
one differentiable ``flow.sample_and_log_prob(n)``, the reparameterisation trick) minimises the
KL without knowing Z. Works for :class:`cnf.CNF` (densities from the continuity equation along
the sampling solve) and :class:`cnf.PlanarFlow` (log|det| by the determinant lemma).

Diagnostics: the KL estimate, the effective sample size of the importance weights p~/q
normalised to [0, 1] (Kish), and for 2-D targets the true KL with log Z from trapezoidal
quadrature on a grid.

References: Rezende & Mohamed (2015), "Variational Inference with Normalizing Flows" (the
energies U1-U4 and the annealing schedule beta_t = min(1, 0.01 + t / 10000)); Kish (1965) for
the effective sample size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.integrate import trapezoid
from torch import nn
from tqdm.auto import tqdm

from cnf.solver import SolverError
from cnf.training import TrainingError, _use_progress_bar

LogDensity = Callable[[torch.Tensor], torch.Tensor]

#: Square on which :func:`log_normalizer` integrates 2-D targets: U1-U4 have less than 1e-6 of
#: their mass outside it (U2-U4's wall at |z1| = 4 is 5 widths down at 6; tested).
DEFAULT_BOUNDS = (-6.0, 6.0, -6.0, 6.0)


@dataclass
class VariationalResult:
    """What :func:`fit_variational` did: steps, seconds, last KL estimate, log records."""

    step: int
    seconds: float
    kl_estimate: float
    stopped_by: str
    history: list[dict[str, Any]] = field(default_factory=list)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_log_density(log_density: Any) -> LogDensity:
    if not callable(log_density):
        raise TypeError(f"log_density must be a callable x -> log p~(x) of shape (n,), got {log_density!r}")
    return log_density


def _target(log_density: LogDensity, x: torch.Tensor) -> torch.Tensor:
    log_p = log_density(x)
    if not isinstance(log_p, torch.Tensor) or log_p.shape != x.shape[:1]:
        shape = tuple(log_p.shape) if isinstance(log_p, torch.Tensor) else type(log_p).__name__
        raise ValueError(f"log_density must return a tensor of shape ({x.shape[0]},), got {shape}")
    return log_p


def log_weights(
    flow: nn.Module, log_density: LogDensity, n: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log q(x), log p~(x))`` of ``n`` samples x ~ q, differentiable w.r.t. the flow."""
    _check_positive_int("n", n)
    log_density = _check_log_density(log_density)
    x, log_q = flow.sample_and_log_prob(n, generator=generator)
    return log_q, _target(log_density, x)


def reverse_kl(
    flow: nn.Module,
    log_density: LogDensity,
    n: int,
    *,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Monte Carlo estimate of E_q[log q - beta log p~] (= KL(q || p) - log Z at beta=1).

    Differentiable: the loss of :func:`fit_variational`. ``beta`` < 1 anneals the target.
    """
    log_q, log_p = log_weights(flow, log_density, n, generator=generator)
    return (log_q - beta * log_p).mean()


def effective_sample_size(log_w: torch.Tensor) -> float:
    """Kish's effective sample size of importance weights exp(log_w), divided by n: in [0, 1].

    (sum w)^2 / (n sum w^2); 1 when q = p, about 1/n when one sample carries all the weight.
    """
    log_w = torch.as_tensor(log_w).detach().double().flatten()
    if log_w.numel() == 0:
        raise ValueError("log_w must hold at least one weight, got an empty tensor")
    if not torch.isfinite(log_w).all():
        raise ValueError(f"log_w must be finite, got {int((~torch.isfinite(log_w)).sum())} non-finite values")
    log_ess = 2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)
    return float(torch.exp(log_ess) / log_w.numel())


def log_normalizer(
    log_density: LogDensity,
    bounds: Sequence[float] = DEFAULT_BOUNDS,
    resolution: int = 601,
    dtype: torch.dtype = torch.float64,
) -> float:
    """log Z = log of the integral of exp(log p~) over a 2-D box, by the trapezoid rule.

    ``bounds`` = (xmin, xmax, ymin, ymax), ``resolution`` grid points per axis. The target must
    have negligible mass outside the box (true for U1-U4 on the default [-6, 6]^2).
    """
    log_density = _check_log_density(log_density)
    if len(bounds) != 4 or not bounds[0] < bounds[1] or not bounds[2] < bounds[3]:
        raise ValueError(f"bounds must be (xmin, xmax, ymin, ymax) with min < max, got {tuple(bounds)!r}")
    resolution = _check_positive_int("resolution", resolution)
    xs = np.linspace(bounds[0], bounds[1], resolution)
    ys = np.linspace(bounds[2], bounds[3], resolution)
    grid = torch.as_tensor(np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2), dtype=dtype)
    with torch.no_grad():
        log_p = _target(log_density, grid).double().numpy().reshape(resolution, resolution)
    shift = float(log_p.max())
    integral = trapezoid(trapezoid(np.exp(log_p - shift), ys, axis=1), xs)
    return math.log(integral) + shift


def variational_report(
    flow: nn.Module,
    log_density: LogDensity,
    n: int = 10_000,
    *,
    log_z: float | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float | None]:
    """KL diagnostics of a fitted flow from ``n`` fresh samples, without gradients.

    Returns ``kl_estimate`` = E_q[log q - log p~] with its standard error ``kl_stderr``, ``ess``
    (normalised effective sample size of p~/q), ``log_z`` and ``kl`` = kl_estimate + log_z
    (the true KL(q || p) up to Monte Carlo error) when ``log_z`` is given, else None.
    """
    with torch.no_grad():
        log_q, log_p = log_weights(flow, log_density, n, generator=generator)
    diff = (log_q - log_p).double()
    kl_estimate = float(diff.mean())
    stderr = float(diff.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "kl_estimate": kl_estimate,
        "kl_stderr": stderr,
        "ess": effective_sample_size(-diff),
        "log_z": log_z,
        "kl": None if log_z is None else kl_estimate + log_z,
    }


def fit_variational(
    flow: nn.Module,
    log_density: LogDensity,
    *,
    iters: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-2,
    time_limit: float | None = None,
    anneal_iters: int = 0,
    seed: int | None = 0,
    progress: bool | None = None,
) -> VariationalResult:
    """Fit ``flow`` to the unnormalised ``log_density`` by minimising the reverse KL with Adam.

    Each step draws ``batch_size`` samples with ``flow.sample_and_log_prob`` and takes a gradient
    step on E_q[log q - beta_t log p~]. With ``anneal_iters`` > 0 the target is annealed as in
    Rezende & Mohamed (2015): beta_t = min(1, 0.01 + t / anneal_iters). Stops after ``iters``
    steps or ``time_limit`` seconds. As :func:`cnf.train`, a NaN/Inf loss or gradient or a failed
    solve raises :class:`cnf.TrainingError`; ``progress`` is a tqdm bar (default: on a terminal).
    The ``history`` records hold ``step``, ``seconds``, ``loss`` (at beta_t), ``beta`` and ``nfe``.
    """
    log_density = _check_log_density(log_density)
    iters = _check_positive_int("iters", iters)
    batch_size = _check_positive_int("batch_size", batch_size)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive float, got {lr!r}")
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise ValueError(f"time_limit must be positive seconds, got {time_limit!r}")
    if isinstance(anneal_iters, bool) or not isinstance(anneal_iters, int) or anneal_iters < 0:
        raise ValueError(f"anneal_iters must be a non-negative int, got {anneal_iters!r}")
    if seed is not None:
        torch.manual_seed(seed)
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    bar = tqdm(total=iters, disable=not _use_progress_bar(progress), unit="it")
    history: list[dict[str, Any]] = []
    stopped_by = "iters"
    start = time.perf_counter()
    elapsed = 0.0
    loss_value = float("nan")
    flow.train()
    step = 0
    while step < iters:
        if time_limit is not None and time.perf_counter() - start >= time_limit:
            stopped_by = "time_limit"
            break
        beta = min(1.0, 0.01 + step / anneal_iters) if anneal_iters else 1.0
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = reverse_kl(flow, log_density, batch_size, beta=beta)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step + 1}")
            loss.backward()
        except (TrainingError, SolverError) as error:
            bar.close()
            raise TrainingError(
                f"variational fit stopped at step {step + 1}: {error} "
                "(try a smaller learning rate, a looser solver tolerance or annealing)"
            ) from error
        if not all(p.grad is None or torch.isfinite(p.grad).all() for p in flow.parameters()):
            bar.close()
            raise TrainingError(f"gradients became NaN/Inf at step {step + 1} of the variational fit")
        nfe = getattr(getattr(flow, "stats", None), "nfe_forward", 0)
        optimizer.step()
        step += 1
        elapsed = time.perf_counter() - start
        loss_value = loss.item()
        history.append(
            {"step": step, "seconds": round(elapsed, 4), "loss": loss_value, "beta": beta, "nfe": nfe}
        )
        bar.set_postfix(kl=f"{loss_value:.3f}")
        bar.update(1)
    bar.close()
    flow.eval()
    return VariationalResult(step, elapsed, loss_value, stopped_by, history)
