"""One training loop for every flow: Adam on minibatches, validation, checkpoints, resume.

Work is never lost: the latest good state is checkpointed every ``checkpoint_every`` steps and
at the end (iteration count or wall-clock limit reached); a NaN/Inf loss or a failed solve
stops training with :class:`TrainingError` and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cnf.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cnf.context import check_context
from cnf.data import check_batch
from cnf.losses import DEFAULT_SIGMA_MIN, OBJECTIVES, Loss, make_objective
from cnf.solver import SolverError

CHECKPOINT_NAME = "checkpoint.pt"
LR_SCHEDULES = ("constant", "cosine")
LOG_NAME = "train_log.jsonl"


class TrainingError(RuntimeError):
    """Training stopped on a NaN/Inf loss or a failed solve; the last good checkpoint is kept."""


@dataclass
class TrainSettings:
    """Settings of :func:`train` (all stored in the checkpoint).

    ``objective`` is ``likelihood`` (maximum likelihood; with ``kinetic_weight`` /
    ``jacobian_weight`` > 0 it is RNODE, Finlay et al. 2020), ``flow_matching`` or
    ``ot_flow_matching`` (no ODE solve per step; ``sigma_min`` of the path), see
    :mod:`cnf.losses`.
    """

    iters: int = 1000
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    objective: str = "likelihood"
    kinetic_weight: float = 0.0
    jacobian_weight: float = 0.0
    sigma_min: float = DEFAULT_SIGMA_MIN
    time_limit: float | None = None
    lr_schedule: str = "constant"
    lr_horizon: float | None = None
    val_every: int = 100
    val_size: int = 2000
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size", "val_every", "val_size", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive float, got {self.lr!r}")
        if self.lr_horizon is not None and not (self.lr_horizon > 0):
            raise ValueError(f"lr_horizon must be positive seconds, got {self.lr_horizon!r}")
        if self.time_limit is not None and not (self.time_limit > 0):
            raise ValueError(f"time_limit must be positive seconds, got {self.time_limit!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {tuple(OBJECTIVES)}")
        self.loss_function()  # checks the objective's options

    def learning_rate(self, step: int, elapsed: float) -> float:
        """The learning rate at ``step`` after ``elapsed`` seconds.

        ``cosine`` decays from ``lr`` to ``lr / 20`` over the run, whose progress is the larger of
        step / iters and elapsed / time_limit, so a wall-clock-limited run also ends annealed
        (Loshchilov & Hutter 2017, without restarts). ``lr_horizon`` (seconds) replaces
        time_limit there, for a run trained in resumed segments towards one total budget."""
        if self.lr_schedule == "constant":
            return self.lr
        progress = step / self.iters
        horizon = self.lr_horizon if self.lr_horizon is not None else self.time_limit
        if horizon is not None:
            progress = max(progress, elapsed / horizon)
        progress = min(progress, 1.0)
        floor = self.lr / 20
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def loss_function(self) -> Loss:
        """``loss(flow, batch)`` of the chosen objective with its options bound."""
        return make_objective(
            self.objective,
            kinetic_weight=self.kinetic_weight,
            jacobian_weight=self.jacobian_weight,
            sigma_min=self.sigma_min,
        )


@dataclass
class TrainResult:
    """What a training run did: final step, seconds, validation NLL and the log records."""

    step: int
    seconds: float
    val_nll: float | None
    stopped_by: str
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)


def evaluate_nll(
    flow: nn.Module, data: torch.Tensor, batch_size: int = 10_000, context: torch.Tensor | None = None
) -> float:
    """Mean negative log-likelihood (nats) of ``data`` under ``flow``, without gradients; with
    ``context`` (one row per point, or one for all) the conditional NLL, mean of -log p(x | c)."""
    total = 0.0
    with torch.no_grad():
        for i, chunk in enumerate(torch.split(data, batch_size)):
            kwargs = {} if context is None else {"context": _rows(context, i * batch_size, chunk.shape[0])}
            total += -flow.log_prob(chunk, **kwargs).sum().item()
    return total / data.shape[0]


def _rows(context: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """The contexts of rows start..start+count of the data (all of a shared (k,) context)."""
    return context if context.ndim == 1 or context.shape[0] == 1 else context[start : start + count]


def _float_if_dequantized(flow: nn.Module, data: torch.Tensor | None) -> torch.Tensor | None:
    """Integer data (e.g. uint8 images) as floats of the flow's dtype when the flow dequantises
    its input (a :class:`cnf.transforms.TransformedFlow`); anything else is left to check_batch."""
    if not isinstance(data, torch.Tensor) or data.dtype.is_floating_point or data.dtype == torch.bool:
        return data
    if getattr(flow, "preprocess", None) is None:
        return data
    param = next(flow.parameters(), None)
    return data.to(param.dtype if param is not None else torch.get_default_dtype())


def _use_progress_bar(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def train(
    flow: nn.Module,
    data: torch.Tensor,
    val_data: torch.Tensor | None = None,
    *,
    settings: TrainSettings | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool | None = None,
    context: torch.Tensor | None = None,
    val_context: torch.Tensor | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``flow`` on ``data`` (n, dim), or integer images (n, C, H, W) for a flow that dequantises
    them (:func:`cnf.images.image_flow`), by the chosen objective with Adam.

    A conditional flow p(x | c) takes ``context`` (n, k) with one row per data point (and
    ``val_context`` for ``val_data``); each minibatch's rows go to the loss with their points.

    Args:
        settings: a :class:`TrainSettings`; keyword ``overrides`` (``iters=``, ``lr=``, ...)
            replace single fields.
        out: folder for ``checkpoint.pt`` and the training log ``train_log.jsonl``.
        resume: a checkpoint to continue from (weights, optimiser, step, RNG, log).
        progress: tqdm bar on/off (default: on when stderr is a terminal).
    """
    settings = settings or TrainSettings()
    if overrides:
        settings = TrainSettings(**{**asdict(settings), **overrides})
    dim = getattr(flow, "dim", None)
    data, val_data = _float_if_dequantized(flow, data), _float_if_dequantized(flow, val_data)
    check_batch(data, dim, "data")
    if val_data is not None:
        check_batch(val_data, dim, "val_data")
    context_dim = getattr(flow, "context_dim", None)
    context = check_context(context, context_dim, data.shape[0], data)
    if val_data is not None:
        val_context = check_context(val_context, context_dim, val_data.shape[0], val_data)
    loss_fn = settings.loss_function()
    optimizer = torch.optim.Adam(flow.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    out_dir = Path(out) if out is not None else None
    checkpoint_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    log_path = out_dir / LOG_NAME if out_dir is not None else None

    step, elapsed, history = 0, 0.0, []
    if resume is not None:
        _, payload = load_checkpoint(resume, flow)
        optimizer.load_state_dict(payload["optimizer"])
        step, elapsed = payload["step"], payload.get("seconds", 0.0)
        history = payload.get("history", [])
        set_rng_state(payload["rng"])
    else:
        torch.manual_seed(settings.seed)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in history))

    def checkpoint() -> None:
        if checkpoint_path is not None:
            save_checkpoint(
                checkpoint_path,
                flow,
                optimizer=optimizer.state_dict(),
                step=step,
                seconds=elapsed,
                settings=asdict(settings),
                rng=rng_state(),
                history=history,
            )

    val_subset = val_data[: settings.val_size] if val_data is not None else None
    if val_context is not None and val_context.shape[0] > 1:
        val_context = val_context[: settings.val_size]
    n = data.shape[0]
    bar = tqdm(total=settings.iters, initial=step, disable=not _use_progress_bar(progress), unit="it")
    start = time.perf_counter() - elapsed
    stopped_by = "iters"
    val_nll = None
    flow.train()
    while step < settings.iters:
        if settings.time_limit is not None and time.perf_counter() - start >= settings.time_limit:
            stopped_by = "time_limit"
            break
        rows = torch.randint(0, n, (min(settings.batch_size, n),))
        batch = data[rows]
        batch_context = {} if context is None else {"context": context[rows] if context.shape[0] > 1 else context}
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = loss_fn(flow, batch, **batch_context)
            nfe_forward = getattr(getattr(flow, "stats", None), "nfe_forward", 0)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step + 1}")
            loss.backward()
        except (TrainingError, SolverError) as error:
            bar.close()
            kept = (
                f"the last good checkpoint is {str(checkpoint_path)!r}"
                if checkpoint_path
                else "pass out= to keep checkpoints"
            )
            raise TrainingError(
                f"training stopped at step {step + 1}: {error}; {kept} "
                "(try a smaller learning rate, a looser solver tolerance or regularisation)"
            ) from error
        grads_finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in flow.parameters())
        if not grads_finite:
            bar.close()
            raise TrainingError(
                f"gradients became NaN/Inf at step {step + 1}; last good checkpoint kept at {checkpoint_path}"
            )
        nfe_backward = getattr(getattr(flow, "stats", None), "nfe_backward", 0)
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate(step, time.perf_counter() - start)
        optimizer.step()
        step += 1
        elapsed = time.perf_counter() - start
        record: dict[str, Any] = {
            "step": step,
            "seconds": round(elapsed, 4),
            "loss": loss.item(),
            "lr": optimizer.param_groups[0]["lr"],
            "nfe_forward": nfe_forward,
            "nfe_backward": nfe_backward,
        }
        if val_subset is not None and (step % settings.val_every == 0 or step == settings.iters):
            val_nll = evaluate_nll(flow, val_subset, context=val_context)
            record["val_nll"] = val_nll
            record["val_nfe"] = getattr(getattr(flow, "stats", None), "nfe_forward", 0)
            flow.train()
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_nll:.3f}")
        else:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append(record)
        if log_path is not None:
            with log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        bar.update(1)
        if step % settings.checkpoint_every == 0:
            checkpoint()
    bar.close()
    if val_subset is not None and (not history or "val_nll" not in history[-1]):
        val_nll = evaluate_nll(flow, val_subset, context=val_context)
        if history:
            history[-1]["val_nll"] = val_nll
            if log_path is not None:  # the log gets the final record again, now with val_nll
                with log_path.open("a") as handle:
                    handle.write(json.dumps(history[-1]) + "\n")
    flow.eval()
    checkpoint()
    return TrainResult(step, elapsed, val_nll, stopped_by, checkpoint_path, history)
