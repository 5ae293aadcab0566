"""One training loop for every flow: Adam on minibatches, validation, checkpoints, resume.

Work is never lost: the latest good state is checkpointed every ``checkpoint_every`` steps, at
the end (iteration count or wall-clock limit reached), on Ctrl-C / SIGTERM and when training
fails (a NaN/Inf loss or a failed solve raises :class:`TrainingError` naming the checkpoint).
The time limit also bounds the step in progress: every solve checks the deadline between field
evaluations. The run folder ``out`` holds ``checkpoint.pt`` (last state), ``best.pt`` (the weights
with the best validation NLL) and ``train_log.jsonl`` (one JSON record per step); it is locked
while a run writes into it. See :mod:`cnf.checkpoint` and :mod:`cnf.outputs`.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import statistics
import sys
import threading
import time
import warnings
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cnf.checkpoint import (
    config_differences,
    load_weights,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cnf.context import check_context
from cnf.data import check_batch
from cnf.distributed import (
    CONTINUE,
    FAILED,
    NONFINITE,
    SIGNAL,
    SOLVER_FAILED,
    TIME_LIMIT,
    Cluster,
    current_cluster,
    flow_device,
    global_ot_pairing,
    place,
    threads_per_process,
)
from cnf.divergence import DIVERGENCES
from cnf.ema import ExponentialMovingAverage
from cnf.losses import (
    DEFAULT_SIGMA_MIN,
    DEFAULT_TIME_EXPONENT,
    OBJECTIVES,
    Loss,
    kl_warmup_weight,
    make_objective,
    nll_loss_with_divergence,
)
from cnf.outputs import (
    RunLock,
    append_line,
    atomic_write_text,
    prepare_folder,
    remove_stale_temporaries,
    strict_json,
)
from cnf.pairings import PairingsAhead, assignment_threads, can_pair_ahead
from cnf.recipes import default_threads
from cnf.solver import SolveInterrupted, SolverError, stop_check

#: Adam's learning rate in the maximum-likelihood phase after flow matching
#: (``TrainSettings.likelihood_finetune``); see cnf.recipes.TABLE_LIKELIHOOD_FINETUNE.
DEFAULT_FINETUNE_LR = 3e-4
#: The checkpoint's ``phase`` entry in the maximum-likelihood phase after flow matching.
FINETUNE_PHASE = "likelihood_finetune"
CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
LR_SCHEDULES = ("constant", "cosine")
LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "summary.json"
RUN_FILES = (CHECKPOINT_NAME, BEST_NAME, LOG_NAME, SUMMARY_NAME)
#: Seconds the first step of a call may run past the time limit (or the limit itself if longer).
FIRST_STEP_GRACE = 30.0


class TrainingError(RuntimeError):
    """Training stopped on a NaN/Inf loss or a failed solve; the last good state is checkpointed."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C or SIGTERM stopped training; a checkpoint to resume from was written first."""


@dataclass
class TrainSettings:
    """Settings of :func:`train` (all stored in the checkpoint).

    ``objective`` is ``likelihood`` (maximum likelihood; with ``kinetic_weight`` /
    ``jacobian_weight`` > 0 it is RNODE, Finlay et al. 2020), ``flow_matching`` or
    ``ot_flow_matching`` (no ODE solve per step; ``sigma_min`` of the path, ``time_exponent`` k of
    its training times t ~ Beta(1, 1/k), ``ot_batch_size`` m: OT pairs within groups of m rows of
    each batch, None: the whole batch), see
    :mod:`cnf.losses`. ``iters=None`` means no step cap (then ``time_limit`` is required).
    ``ema_decay`` keeps an exponential moving average of the weights, which is validated,
    checkpointed and left in the flow at the end. :func:`cnf.recipes.recipe` gives the
    recommended values per objective. ``elbo`` trains a :class:`cnf.vae.VAE` on dynamically
    binarised images, the KL term's weight rising linearly to 1 over ``kl_warmup`` steps.
    ``patience``: stop after that many validations without improvement and keep the best weights
    (early stopping). ``likelihood_finetune`` f > 0 (flow matching only) trains the last fraction f
    of the run (by the progress the cosine schedule uses) by maximum likelihood instead, starting
    from the EMA weights, with a fresh Adam at ``finetune_lr`` (cosine within that phase) and
    ``finetune_divergence`` in its training solves (Hutchinson by default: an unbiased gradient at
    a fraction of the exact trace's cost): flow matching regresses the velocity and never sees the
    likelihood; a short maximum-likelihood phase (FFJORD's objective, Grathwohl et al. 2019) then
    corrects what it leaves.
    """

    iters: int | None = 1000
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    objective: str = "likelihood"
    kinetic_weight: float = 0.0
    jacobian_weight: float = 0.0
    sigma_min: float = DEFAULT_SIGMA_MIN
    time_exponent: float = DEFAULT_TIME_EXPONENT
    time_limit: float | None = None
    lr_schedule: str = "constant"
    lr_horizon: float | None = None
    val_every: int = 100
    val_size: int = 2000
    checkpoint_every: int = 100
    ema_decay: float | None = None
    seed: int = 0
    kl_warmup: int = 0
    patience: int | None = None
    likelihood_finetune: float = 0.0
    finetune_lr: float = DEFAULT_FINETUNE_LR
    finetune_divergence: str = "hutchinson"
    ot_batch_size: int | None = None

    def __post_init__(self) -> None:
        self._check_vae_options()
        self._check_finetune_options()
        for name in ("batch_size", "val_every", "val_size", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.iters is None:
            if self.time_limit is None:
                raise ValueError("iters=None (no step cap) needs a time_limit, got time_limit=None")
        elif isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"iters must be a positive int, got {self.iters!r} (None: no cap, with a time_limit)")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive float, got {self.lr!r}")
        if self.lr_horizon is not None and not (self.lr_horizon > 0):
            raise ValueError(f"lr_horizon must be positive seconds, got {self.lr_horizon!r}")
        if self.time_limit is not None and not (self.time_limit > 0):
            raise ValueError(f"time_limit must be positive seconds, got {self.time_limit!r}")
        if self.ema_decay is not None and not (
            isinstance(self.ema_decay, (int, float)) and 0 < self.ema_decay < 1
        ):
            raise ValueError(f"ema_decay must lie in (0, 1) or be None, got {self.ema_decay!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {tuple(OBJECTIVES)}")
        self.loss_function()  # checks the objective's options

    def _check_vae_options(self) -> None:
        if isinstance(self.kl_warmup, bool) or not isinstance(self.kl_warmup, int) or self.kl_warmup < 0:
            raise ValueError(f"kl_warmup must be a non-negative int (steps), got {self.kl_warmup!r}")
        if self.kl_warmup and self.objective != "elbo":
            raise ValueError(f"kl_warmup={self.kl_warmup!r} applies only to objective='elbo', got {self.objective!r}")
        if self.patience is not None and (
            isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1
        ):
            raise ValueError(f"patience must be a positive int (validations) or None, got {self.patience!r}")

    def _check_finetune_options(self) -> None:
        f = self.likelihood_finetune
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 <= f < 1):
            raise ValueError(f"likelihood_finetune must be a fraction of the run in [0, 1), got {f!r}")
        if f and self.objective not in ("flow_matching", "ot_flow_matching"):
            raise ValueError(
                f"likelihood_finetune={f!r} follows flow matching with maximum likelihood; objective "
                f"{self.objective!r} is not flow matching"
            )
        lr = self.finetune_lr
        if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"finetune_lr must be a positive float, got {lr!r}")
        if self.finetune_divergence not in DIVERGENCES:
            raise ValueError(
                f"unknown finetune_divergence {self.finetune_divergence!r}; choose one of {DIVERGENCES}"
            )

    def describe(self) -> str:
        """The objective and optimiser settings in words, as ``cnf train`` prints them."""
        return (
            f"{self.objective} with lr {self.lr:g}, batch {self.batch_size}, {self.lr_schedule} schedule"
            + (f", EMA {self.ema_decay:g}" if self.ema_decay else "")
            + (f", times t ~ Beta(1, 1/{self.time_exponent:g})" if self.time_exponent != DEFAULT_TIME_EXPONENT else "")
            + (f", OT pairing within groups of {self.ot_batch_size}" if self.ot_batch_size else "")
            + (
                f", then maximum likelihood for the last {self.likelihood_finetune:.0%} at lr {self.finetune_lr:g} "
                f"({self.finetune_divergence} divergence)"
                if self.likelihood_finetune
                else ""
            )
            + (f", early stopping after {self.patience} validations without gain" if self.patience else "")
        )

    def progress(self, step: int, elapsed: float) -> float:
        """How far the run is, in [0, 1]: the larger of step / iters and elapsed / time_limit
        (``lr_horizon`` replaces time_limit when set)."""
        progress = step / self.iters if self.iters is not None else 0.0
        horizon = self.lr_horizon if self.lr_horizon is not None else self.time_limit
        if horizon is not None:
            progress = max(progress, elapsed / horizon)
        return min(progress, 1.0)

    def finetuning(self, step: int, elapsed: float) -> bool:
        """Whether the run is in its maximum-likelihood phase (the last ``likelihood_finetune``)."""
        return self.likelihood_finetune > 0 and self.progress(step, elapsed) >= 1 - self.likelihood_finetune

    def finetune_loss_function(self) -> Loss:
        """The loss of the maximum-likelihood phase (``likelihood_finetune``): the NLL with
        ``finetune_divergence`` in its training solves, whatever the flow's own divergence."""
        return functools.partial(nll_loss_with_divergence, divergence=self.finetune_divergence)

    def loss_kwargs(self, step: int) -> dict[str, Any]:
        """Step-dependent options of the loss: the KL warm-up weight of the ``elbo`` objective."""
        return {"kl_weight": kl_warmup_weight(step, self.kl_warmup)} if self.objective == "elbo" else {}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSettings:
        """Settings from a checkpoint's dict (entries this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def learning_rate(self, step: int, elapsed: float) -> float:
        """The learning rate at ``step`` after ``elapsed`` seconds.

        ``cosine`` decays from ``lr`` to ``lr / 20`` over the run, whose progress is the larger of
        step / iters and elapsed / time_limit, so a wall-clock-limited run also ends annealed
        (Loshchilov & Hutter 2017, without restarts). ``lr_horizon`` (seconds) replaces
        time_limit there, for a run trained in resumed segments towards one total budget. With
        ``likelihood_finetune`` f the flow-matching phase anneals over its share 1 - f of the run
        and the maximum-likelihood phase over the rest, from ``finetune_lr``."""
        lr, progress, f = self.lr, self.progress(step, elapsed), self.likelihood_finetune
        if f:
            if progress >= 1 - f:
                lr, progress = self.finetune_lr, (progress - (1 - f)) / f
            else:
                progress = progress / (1 - f)
        if self.lr_schedule == "constant":
            return lr
        progress = min(progress, 1.0)
        floor = lr / 20
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def loss_function(self) -> Loss:
        """``loss(flow, batch)`` of the chosen objective with its options bound."""
        return make_objective(
            self.objective,
            kinetic_weight=self.kinetic_weight,
            jacobian_weight=self.jacobian_weight,
            sigma_min=self.sigma_min,
            time_exponent=self.time_exponent,
            ot_batch_size=self.ot_batch_size,
        )


@dataclass
class TrainResult:
    """What a training run did: final step, seconds, validation NLL and the log records.

    ``best_step`` / ``best_val_nll``: the validation with the lowest NLL (its weights are in
    ``best.pt`` beside the checkpoint); ``threads``: the torch thread count used.
    """

    step: int
    seconds: float
    val_nll: float | None
    stopped_by: str
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_val_nll: float | None = None
    best_checkpoint: Path | None = None
    threads: int | None = None


def evaluate_nll(
    flow: nn.Module, data: torch.Tensor, batch_size: int = 10_000, context: torch.Tensor | None = None
) -> float:
    """Mean negative log-likelihood (nats) of ``data`` under ``flow``, without gradients; with
    ``context`` (one row per point, or one for all) the conditional NLL, mean of -log p(x | c)."""
    total = 0.0
    device = flow_device(flow)  # data are scored on the flow's device, a chunk at a time
    with torch.no_grad():
        for i, chunk in enumerate(torch.split(data, batch_size)):
            kwargs = {} if context is None else {"context": _rows(context, i * batch_size, chunk.shape[0])}
            total += -flow.log_prob(chunk.to(device), **kwargs).sum().item()
    return total / data.shape[0]


def _global_nll(flow: nn.Module, data: torch.Tensor, context: torch.Tensor | None, cluster: Cluster) -> float:
    """Mean NLL over all ranks' shards of the validation data (each rank scores its own rows)."""
    local = evaluate_nll(flow, data, context=context) * data.shape[0] if data.shape[0] else 0.0
    total, count = cluster.sum([local, data.shape[0]])
    return total / count


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


def _parameter_dtype(flow: nn.Module) -> torch.dtype | None:
    param = next(flow.parameters(), None)
    return None if param is None else param.dtype


def resolve_threads(threads: int | str | None, dim: int | tuple[int, ...] | None) -> int:
    """The torch thread count for ``threads``: an int, or ``"auto"``/None, which is
    :func:`cnf.recipes.default_threads` capped by the current ``torch.get_num_threads()`` (a
    program that lowered it keeps its choice); among N local training processes on C cores,
    C / N (:func:`cnf.distributed.threads_per_process`)."""
    if (threads is None or threads == "auto") and current_cluster().distributed:
        return threads_per_process()  # C cores / N local processes
    if threads is None or threads == "auto":
        size = math.prod(event_shape(dim)) if dim is not None else 2
        return min(default_threads(size), torch.get_num_threads())
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int or 'auto', got {threads!r}")
    return threads


class _StopRequest:
    """Ctrl-C / SIGTERM during training: remembered, acted on at the next field evaluation or step.

    A second signal gets the previous handler (Ctrl-C twice stops at once)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def event_shape(dim: Any) -> tuple[int, ...] | None:
    """A flow's ``dim`` (an int, or a (C, H, W) tuple/list for images) as a shape tuple."""
    if dim is None:
        return None
    return (int(dim),) if isinstance(dim, int) else tuple(int(d) for d in dim)


def _existing_run_files(folder: Path) -> list[str]:
    return [name for name in RUN_FILES if (folder / name).exists() or (folder / name).is_symlink()]


def read_log(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (one per step; the last copy of a step wins)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill -9 mid-write
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and (up_to_step is None or step <= up_to_step):
            by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]


def train(
    flow: nn.Module,
    data: torch.Tensor,
    val_data: torch.Tensor | None = None,
    *,
    settings: TrainSettings | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool | None = None,
    threads: int | str | None = "auto",
    overwrite: bool | None = None,
    run_info: dict[str, Any] | None = None,
    context: torch.Tensor | None = None,
    val_context: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``flow`` on ``data`` (n, dim), or integer images (n, C, H, W) for a flow that dequantises
    them (:func:`cnf.images.image_flow`), by the chosen objective with Adam.

    A conditional flow p(x | c) takes ``context`` (n, k) with one row per data point (and
    ``val_context`` for ``val_data``); each minibatch's rows go to the loss with their points.

    Args:
        settings: a :class:`TrainSettings`; keyword ``overrides`` (``iters=``, ``lr=``, ...)
            replace single fields. With ``resume`` and no ``settings`` the run's own settings
            from the checkpoint are used (with the overrides applied).
        out: folder for ``checkpoint.pt``, ``best.pt`` and the log ``train_log.jsonl``; locked
            while training (a second writer gets a RuntimeError).
        resume: a checkpoint to continue from (weights, EMA, optimiser, step, RNG; the log is
            taken from ``train_log.jsonl`` beside it).
        progress: tqdm bar on/off (default: on when stderr is a terminal).
        threads: torch threads while training (``"auto"``: :func:`cnf.recipes.default_threads`);
            the previous count is restored afterwards. OT flow matching solves its assignments in
            this many threads too (``"auto"``: one per core, :mod:`cnf.pairings`).
        overwrite: what to do when ``out`` already holds a run and ``resume`` is not given:
            ``True`` replaces it, ``False`` raises ValueError, ``None`` replaces it with a warning.
        run_info: plain values stored in the checkpoint under ``"run"`` (the CLI stores its data
            source and model flags there, to resume with them).
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``:
            the flow is moved there and each minibatch follows it (default: where the flow is).

    Inside an initialised process group (``torchrun``; :mod:`cnf.distributed`) every rank trains
    on its shard of ``data`` with its own seed, gradients are averaged over ranks (the global batch
    is world_size * batch_size), the ranks agree after each forward pass whether to go on (time
    limit, signal, NaN, failed solve), the log holds all-reduced values and rank 0 alone writes.
    """
    cluster = current_cluster()
    if device is not None:
        place(flow, device, cluster.local_rank)
    payload = read_checkpoint(resume) if resume is not None else None
    base = settings
    if base is None:
        base = TrainSettings.from_dict(payload["settings"]) if payload is not None else TrainSettings()
    settings = TrainSettings(**{**asdict(base), **overrides}) if overrides else base
    dim = getattr(flow, "dim", None)
    data, val_data = _float_if_dequantized(flow, data), _float_if_dequantized(flow, val_data)
    if payload is not None:
        saved_dim = event_shape((payload.get("config") or {}).get("dim"))
        if saved_dim is not None and isinstance(data, torch.Tensor) and tuple(data.shape[1:]) != saved_dim:
            raise ValueError(
                f"cannot resume {str(resume)!r} on this data: the run was trained on data of shape "
                f"(n, {', '.join(map(str, saved_dim))}), the data given has shape {tuple(data.shape)}"
            )
    check_batch(data, dim, "data")
    if val_data is not None:
        check_batch(val_data, dim, "val_data")
    context_dim = getattr(flow, "context_dim", None)
    context = check_context(context, context_dim, data.shape[0], data)
    if val_data is not None:
        val_context = check_context(val_context, context_dim, val_data.shape[0], val_data)
    dtype = _parameter_dtype(flow)
    if dtype is not None:  # data follow the flow's dtype (torch.from_numpy gives float64)
        data = data.to(dtype)
        val_data = val_data.to(dtype) if val_data is not None else None
    if settings.likelihood_finetune and cluster.distributed:
        raise ValueError(
            f"likelihood_finetune={settings.likelihood_finetune!r} runs in one process only; pass "
            "likelihood_finetune=0 (cnf train: --likelihood-finetune 0) to train on several"
        )
    loss_fn = settings.loss_function()
    # foreach: one call per step for all parameters (torch picks it by default on CUDA only); on
    # CPU it takes the per-parameter Python loop out of a step that is short for flow matching.
    optimizer = torch.optim.Adam(flow.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)

    if out is not None and not cluster.is_main:  # rank 0 alone owns, locks and writes the run folder
        out_dir, lock = Path(out), None
    else:
        out_dir = prepare_folder(out) if out is not None else None
        lock = RunLock(out_dir).acquire() if out_dir is not None else None
    previous_threads = torch.get_num_threads()
    chosen_threads = resolve_threads(threads, dim)
    torch.set_num_threads(chosen_threads)
    try:
        if out_dir is not None and cluster.is_main:
            remove_stale_temporaries(out_dir)
            existing = _existing_run_files(out_dir)
            if existing and payload is None:
                if overwrite is False:
                    raise ValueError(
                        f"out {str(out_dir)!r} already holds a run ({', '.join(existing)}); resume it, "
                        "pass overwrite=True to replace it, or choose another folder"
                    )
                if overwrite is None:
                    warnings.warn(f"replacing the run in {str(out_dir)!r} ({', '.join(existing)})", stacklevel=2)
                for name in existing:
                    (out_dir / name).unlink()
        return _train_loop(
            flow, data, val_data, settings, out_dir, payload, resume, progress, optimizer, loss_fn,
            chosen_threads, run_info, context, val_context, cluster,
            assignment_threads(threads),
        )
    finally:
        torch.set_num_threads(previous_threads)
        if lock is not None:
            lock.release()


def _train_loop(
    flow: nn.Module,
    data: torch.Tensor,
    val_data: torch.Tensor | None,
    settings: TrainSettings,
    out_dir: Path | None,
    payload: dict[str, Any] | None,
    resume: str | Path | None,
    progress: bool | None,
    optimizer: torch.optim.Optimizer,
    loss_fn: Loss,
    threads: int,
    run_info: dict[str, Any] | None,
    context: torch.Tensor | None,
    val_context: torch.Tensor | None,
    cluster: Cluster,
    assignment_threads: int,
) -> TrainResult:
    checkpoint_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    writes = out_dir is not None and cluster.is_main
    best_path = out_dir / BEST_NAME if writes else None
    log_path = out_dir / LOG_NAME if writes else None
    target = flow_device(flow)
    n_total = data.shape[0]
    data, context = cluster.shard(data), cluster.shard(context)
    pairs_ahead = settings.objective == "ot_flow_matching" and can_pair_ahead(flow)
    ot_collectives = cluster.distributed and settings.objective == "ot_flow_matching"  # the loss gathers
    if ot_collectives and not pairs_ahead:
        pairing = functools.partial(global_ot_pairing, ot_batch_size=settings.ot_batch_size)
        loss_fn = functools.partial(loss_fn, pairing=pairing)  # one assignment, global batch
    # DDP around the loss; building it copies rank 0's weights to every rank (before the EMA copies them).
    step_loss = cluster.wrap_loss(flow, loss_fn)
    ema = ExponentialMovingAverage(flow, settings.ema_decay) if settings.ema_decay is not None else None
    # The maximum-likelihood phase after flow matching (settings.likelihood_finetune): a checkpoint
    # written in it holds that phase's weights (no EMA) and optimiser.
    finetuning = payload is not None and payload.get("phase") == FINETUNE_PHASE

    def start_finetuning() -> None:
        nonlocal ema, optimizer, step_loss, ahead, finetuning
        if ema is not None:  # the averaged weights are where maximum likelihood starts
            flow.load_state_dict(ema.shadow)
            ema = None
        optimizer = torch.optim.Adam(flow.parameters(), lr=settings.finetune_lr, foreach=True)
        step_loss = cluster.wrap_loss(flow, settings.finetune_loss_function())
        ahead, finetuning = None, True

    step, elapsed, history = 0, 0.0, []
    best: dict[str, Any] | None = None
    ahead = None
    if finetuning:
        start_finetuning()
    if payload is not None:
        config = payload.get("config")
        if config is not None and callable(getattr(flow, "config", None)):
            diffs = [d for d in config_differences(config, flow.config()) if not d.startswith("solver")]
            if any(not d.startswith(("divergence", "noise")) for d in diffs):
                raise ValueError(f"cannot resume {str(resume)!r} into a different model: {'; '.join(diffs)}")
        load_weights(flow, payload.get("train_state_dict", payload["state_dict"]), config, resume)
        if ema is not None:
            ema.shadow = {k: v.clone() for k, v in payload["state_dict"].items()}
            ema.updates = int((payload.get("ema") or {}).get("updates", payload["step"]))
        optimizer.load_state_dict(payload["optimizer"])
        step, elapsed = payload["step"], payload.get("seconds", 0.0)
        best = payload.get("best")
        if payload.get("world_size", 1) == 1 and not cluster.distributed:
            set_rng_state(payload["rng"])
        else:  # N -> M processes: fresh per-rank streams, distinct from the run's earlier ones
            torch.manual_seed(cluster.seed(settings.seed, step))
        history = read_log(Path(resume).parent / LOG_NAME, up_to_step=step)
    else:
        torch.manual_seed(cluster.seed(settings.seed))
    if log_path is not None:
        atomic_write_text(log_path, "".join(strict_json(r) + "\n" for r in history))
    # The step whose state is in checkpoint_path already (a resume from that very file).
    resumed_here = payload is not None and checkpoint_path is not None and Path(resume).resolve() == checkpoint_path.resolve()
    saved_step = step if resumed_here else None

    def checkpoint() -> None:
        nonlocal saved_step
        if checkpoint_path is None or not cluster.is_main:
            return
        extra: dict[str, Any] = {"phase": FINETUNE_PHASE} if finetuning else {}
        if ema is not None:
            extra["train_state_dict"] = {k: v.detach().clone() for k, v in flow.state_dict().items()}
            extra["ema"] = {"decay": settings.ema_decay, "updates": ema.updates}
        with ema.applied(flow) if ema is not None else nullcontext():
            save_checkpoint(
                checkpoint_path,
                flow,
                optimizer=optimizer.state_dict(),
                step=step,
                seconds=elapsed,
                settings=asdict(settings),
                rng=rng_state(),
                best=best,
                data={"shape": list(data.shape[1:]), "dtype": str(data.dtype).removeprefix("torch.")},
                run=run_info,
                world_size=cluster.world_size,
                **extra,
            )
        saved_step = step

    def kept() -> str:
        if checkpoint_path is None:
            return "pass out= to keep checkpoints"
        if step == 0:
            return "no step had completed, so no checkpoint was written"
        return f"the last good checkpoint is {str(checkpoint_path)!r} (step {step})"

    def save_then_fail(message: str, error: BaseException | None = None) -> None:
        bar.close()
        if step > 0 and saved_step != step:
            flow.eval()
            checkpoint()
        raise TrainingError(f"{message}; {kept()}") from error

    val_subset = cluster.shard(val_data[: settings.val_size]) if val_data is not None else None
    if val_context is not None and val_context.shape[0] > 1:
        val_context = cluster.shard(val_context[: settings.val_size])
    val_nll = None

    def validate() -> float:
        nonlocal best
        with ema.applied(flow) if ema is not None else nullcontext():
            value = _global_nll(flow, val_subset, val_context, cluster)
            if math.isfinite(value) and (best is None or value < best["val_nll"]):
                best = {"step": step, "val_nll": value}
                if best_path is not None:
                    save_checkpoint(best_path, flow, step=step, val_nll=value, run=run_info)
        flow.train()
        return value

    n = data.shape[0]
    batch_size = cluster.batch_size(settings.batch_size, n_total)
    # OT flow matching: each step draws from its own generators, and the assignments of the next
    # world_size * assignment_threads steps are solved ahead, in parallel (cnf.pairings).
    if pairs_ahead and not finetuning:
        ahead = PairingsAhead(
            flow, data, context, batch_size, settings.seed, cluster, assignment_threads, settings.ot_batch_size
        )
    show_bar = _use_progress_bar(progress) and cluster.is_main
    bar = tqdm(total=settings.iters, initial=step, disable=not show_bar, unit="it")
    start = time.perf_counter() - elapsed
    deadline = start + settings.time_limit if settings.time_limit is not None else math.inf
    stopped_by = "iters"
    early_stopping = EarlyStopping(settings.patience)
    durations: deque[float] = deque(maxlen=50)
    stop = _StopRequest()

    def should_stop() -> str | None:
        if cluster.distributed:  # several ranks stop together, between steps (Cluster.agree)
            return None
        if stop.signal_name is not None:
            return f"{stop.signal_name} received"
        # The first step of a call may run past the limit by a grace period (a limit shorter than
        # one step still gives one); later ones are cut at the limit itself.
        limit = deadline if durations else deadline + max(FIRST_STEP_GRACE, settings.time_limit or 0.0)
        if time.perf_counter() >= limit:
            return f"time limit of {settings.time_limit:g} s reached"
        return None

    flow.train()
    with stop, stop_check(should_stop):
        while settings.iters is None or step < settings.iters:
            if not cluster.distributed:
                if stop.signal_name is not None:
                    break
                if time.perf_counter() >= deadline:
                    stopped_by = "time_limit"
                    break
            if not finetuning and settings.finetuning(step, time.perf_counter() - start):
                validated = bool(history) and "val_nll" in history[-1]
                if val_subset is not None and step > 0 and not validated:  # kept in best.pt if better
                    try:
                        val_nll = validate()
                    except SolveInterrupted:
                        flow.train()
                        continue  # the time is up: the loop stops above
                    history[-1]["val_nll"] = val_nll
                    if log_path is not None:  # the log gets the last flow-matching record again, validated
                        append_line(log_path, strict_json(history[-1]))
                start_finetuning()
                durations.clear()  # a likelihood step costs a solve: time it afresh
            step_start = time.perf_counter()
            rng_before_step = torch.get_rng_state()  # an abandoned step must not consume randomness
            rows = torch.randint(0, n, (batch_size,), device=data.device) if ahead is None else ahead.rows(step)
            batch = data[rows].to(target)
            batch_context = {} if context is None else {"context": context[rows] if context.shape[0] > 1 else context}
            step_kwargs = {**batch_context, **settings.loss_kwargs(step), **(ahead.loss_kwargs(step) if ahead else {})}
            optimizer.zero_grad(set_to_none=True)
            try:
                if cluster.distributed:
                    local = SIGNAL if stop.signal_name else TIME_LIMIT if time.perf_counter() >= deadline else CONTINUE
                    loss, nfe_forward, agreed, reporter, logged = _agreed_forward(
                        cluster, step_loss, batch, step_kwargs, flow, step, local, collective_loss=ot_collectives
                    )
                    if agreed == SIGNAL:  # every rank stops as interrupted, rank 0 checkpoints below
                        stop.signal_name = stop.signal_name or f"a signal on rank {reporter}"
                        break
                    if agreed == TIME_LIMIT:
                        stopped_by = "time_limit"
                        break
                else:
                    loss = step_loss(batch, **step_kwargs)
                    nfe_forward = getattr(getattr(flow, "stats", None), "nfe_forward", 0)
                    if not torch.isfinite(loss):
                        raise TrainingError(f"loss became {loss.item()} at step {step + 1}")
                loss.backward()
            except SolveInterrupted as error:
                torch.set_rng_state(rng_before_step)
                if stop.signal_name is not None:
                    break
                stopped_by = "time_limit"
                spent = time.perf_counter() - step_start
                typical = statistics.median(durations) if durations else None
                if typical is None or spent > max(1.0, 20 * typical):
                    usual = f"steps took {typical:.3g} s before" if typical else "no step had finished"
                    save_then_fail(
                        f"training stopped at step {step + 1}: the time limit ran out inside one step that "
                        f"ran {spent:.3g} s ({usual}): {error}. The field has probably become stiff; "
                        "try a smaller learning rate, a looser solver tolerance or regularisation "
                        "(kinetic / Jacobian weights)",
                        error,
                    )
                break
            except (TrainingError, SolverError) as error:
                save_then_fail(
                    f"training stopped at step {step + 1}: {error} "
                    "(try a smaller learning rate, a looser solver tolerance or regularisation)",
                    error,
                )
            grads_finite = _all_finite([p.grad for p in flow.parameters() if p.grad is not None])
            if not grads_finite:
                save_then_fail(f"training stopped at step {step + 1}: gradients became NaN/Inf")
            nfe_backward = getattr(getattr(flow, "stats", None), "nfe_backward", 0)
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate(step, time.perf_counter() - start)
            optimizer.step()
            if ema is not None:
                ema.update(flow)
            step += 1
            elapsed = time.perf_counter() - start
            durations.append(time.perf_counter() - step_start)
            if cluster.distributed:  # the log holds the means over ranks (the global batch's loss)
                loss_value, nfe_forward = logged  # averaged by the agreement's collective
                if nfe_backward:  # adjoint solves only, on every rank alike: one more collective
                    (nfe_backward,) = cluster.mean([nfe_backward])
            else:
                loss_value = loss.item()
            record: dict[str, Any] = {
                "step": step,
                "seconds": round(elapsed, 4),
                "loss": loss_value,
                "lr": optimizer.param_groups[0]["lr"],
                "nfe_forward": nfe_forward,
                "nfe_backward": nfe_backward,
            }
            if finetuning:
                record["objective"] = "likelihood"
            if val_subset is not None and (step % settings.val_every == 0 or step == settings.iters):
                try:
                    val_nll = validate()
                    record["val_nll"] = val_nll
                    record["val_nfe"] = getattr(getattr(flow, "stats", None), "nfe_forward", 0)
                    bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_nll:.3f}")
                    if early_stopping.should_stop(val_nll, ema.shadow if ema is not None else flow.state_dict(), step):
                        stopped_by = "early_stopping"
                except SolveInterrupted:
                    flow.train()
            else:
                bar.set_postfix(loss=f"{loss_value:.3f}")
            history.append(record)
            if log_path is not None:
                append_line(log_path, strict_json(record))
            bar.update(1)
            if stopped_by == "early_stopping":  # the best weights are checkpointed below
                val_nll = early_stopping.restore(flow, ema)
                break
            if step % settings.checkpoint_every == 0:
                checkpoint()
        bar.close()
        if stop.signal_name is not None:
            elapsed = time.perf_counter() - start
            flow.train()
            if checkpoint_path is not None and step > 0:
                checkpoint()
                where = (
                    f"checkpoint saved to {str(checkpoint_path)!r}; resume with `cnf train --resume "
                    f"{checkpoint_path}` or cnf.train(..., resume={str(checkpoint_path)!r})"
                )
            else:
                where = kept()
            raise TrainingInterrupted(f"training interrupted by {stop.signal_name} after step {step}; {where}")
    # The final validation, when the last step had none, gets a short budget of its own.
    if val_subset is not None and (not history or "val_nll" not in history[-1]):
        budget = settings.time_limit and not cluster.distributed  # ranks must all finish it (a collective)
        grace = time.perf_counter() + (max(5.0, 0.1 * settings.time_limit) if budget else math.inf)
        with stop_check(lambda: "final validation over its time budget" if time.perf_counter() > grace else None):
            try:
                val_nll = validate()
            except SolveInterrupted:
                flow.train()
        if history and val_nll is not None:
            history[-1]["val_nll"] = val_nll
            if log_path is not None:  # the log gets the final record again, now with val_nll
                append_line(log_path, strict_json(history[-1]))
    flow.eval()
    checkpoint()
    if ema is not None:  # the averaged weights are the result
        flow.load_state_dict(ema.shadow)
    has_best = best is not None and best_path is not None and best_path.is_file()
    return TrainResult(
        step,
        elapsed,
        val_nll,
        stopped_by,
        checkpoint_path,
        history,
        best_step=best["step"] if best else None,
        best_val_nll=best["val_nll"] if best else None,
        best_checkpoint=best_path if has_best else None,
        threads=threads,
    )


class EarlyStopping:
    """Stop after ``patience`` validations in a row without a new best validation NLL (None:
    never), then restore the best weights (kept in memory; a resumed run starts counting afresh).
    For a VAE the validation NLL is minus its bound (:meth:`cnf.vae.VAE.log_prob`)."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.best: float | None = None
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale = 0

    def should_stop(self, val_nll: float, weights: dict[str, torch.Tensor], step: int) -> bool:
        """Record a validation of ``weights`` (the validated state dict); True when it is time to stop."""
        if self.patience is None:
            return False
        if self.best is None or val_nll < self.best:
            self.best, self.best_step, self.stale = val_nll, step, 0
            self.best_state = {k: v.detach().clone() for k, v in weights.items()}
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore(self, flow: nn.Module, ema: ExponentialMovingAverage | None = None) -> float | None:
        """Put the best weights into ``flow`` (or into the EMA, whose weights are the result);
        return their validation NLL."""
        if self.best_state is not None:
            if ema is not None:
                ema.shadow = {k: v.clone() for k, v in self.best_state.items()}
            else:
                flow.load_state_dict(self.best_state)
        return self.best


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite, with one sync. The tensors' 2-norms (one
    fused pass, no copy) are finite when every entry is; only when one is not (a NaN or Inf, or
    finite entries whose squares overflow) are the entries themselves checked."""
    if not tensors:
        return True
    if bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
        return True
    return bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors])).all())


def _agreed_forward(
    cluster: Cluster,
    step_loss: nn.Module,
    batch: torch.Tensor,
    kwargs: dict[str, Any],
    flow: nn.Module,
    step: int,
    stop_code: int,
    collective_loss: bool = False,
) -> tuple[torch.Tensor | None, int, int, int, list[float]]:
    """One rank's forward pass, then the agreement of all ranks (:meth:`Cluster.agree`) before any
    of them enters the gradient all-reduce: ``(loss, nfe, code, rank, [mean loss, mean nfe])``
    (the means over ranks, for the log, ride on the same collective) with code CONTINUE to go on,
    TIME_LIMIT or SIGNAL (loss None) when some rank reached the time limit or got a signal; a NaN,
    failed solve or error on any rank raises TrainingError on every rank, naming the rank and the cause.

    ``collective_loss``: the loss itself takes part in collectives (OT flow matching gathers the
    ranks' draws), so every rank computes it even when it wants to stop: a rank that skipped it
    would meet the others' gather with its agreement, a different collective."""
    code, failure, loss, nfe = stop_code, None, None, 0
    if code == CONTINUE or collective_loss:
        try:
            loss = step_loss(batch, **kwargs)
            nfe = getattr(getattr(flow, "stats", None), "nfe_forward", 0)
            if not torch.isfinite(loss) and code == CONTINUE:
                code, failure = NONFINITE, f"loss became {loss.item()} at step {step + 1}"
        except SolverError as error:
            code, failure = SOLVER_FAILED, str(error)
        except Exception as error:  # the other ranks must hear of it before they wait for our gradients
            code, failure = FAILED, f"{type(error).__name__}: {error}"
    value = loss.item() if code == CONTINUE and loss is not None else 0.0
    agreed, reporter, logged = cluster.agree(code, [value, nfe])
    if agreed in (TIME_LIMIT, SIGNAL):
        return None, 0, agreed, reporter, logged
    if agreed != CONTINUE:
        if failure is not None and reporter == cluster.rank:
            raise TrainingError(f"{cluster.describe()}: {failure}")
        raise TrainingError(cluster.cause(agreed, reporter))
    return loss, nfe, agreed, reporter, logged
