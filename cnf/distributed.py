"""Devices and multi-process training on torch.distributed.

One process or N: :func:`cnf.train` asks :func:`current_cluster` which rank it is and how many
there are (one, unless a process group is initialised, e.g. by ``cnf train`` under ``torchrun``).
With N ranks each one

- trains on its own shard of the data (rows ``rank::N``) with its own seed (minibatches,
  Hutchinson probes and flow-matching noise differ between ranks),
- averages gradients with :class:`~torch.nn.parallel.DistributedDataParallel` wrapped around a
  module that computes the LOSS (:class:`LossModule`), never around the velocity field the ODE
  solver calls: with adaptive solvers each rank takes its own number of steps, so a collective
  inside the field (DDP's buffer broadcast, SyncBatchNorm) would deadlock,
- agrees with the others after every forward pass whether to go on (:meth:`Cluster.agree`): a
  time limit, a signal, a NaN loss or a failed solve on one rank stops all of them together,
  with an error that names the rank and the cause,
- reports the loss, NFE and validation NLL all-reduced over ranks; rank 0 alone writes files.

For ``ot_flow_matching`` the optimal-transport pairing of each step is computed once on the
gathered global batch, so N ranks with batch b pair exactly as one process with batch N * b
(torchcfm pairs within each GPU's slice only); the ranks share out the steps' assignments and
solve them ahead (:mod:`cnf.pairings`; :func:`global_ot_pairing` is the one-step form, used for a
base that cannot draw with a per-step generator).

Backends: gloo on CPU, NCCL on CUDA. Reference: Li et al. (2020), "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training" (DDP's gradient buckets).
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
#: Seconds a collective waits for a silent peer before failing (a dead peer fails it at once).
DEFAULT_TIMEOUT = 300.0

# Codes each rank contributes to the per-step agreement (the largest wins).
CONTINUE, TIME_LIMIT, SIGNAL, NONFINITE, SOLVER_FAILED, FAILED = range(6)
_CAUSES = {
    NONFINITE: "a non-finite loss",
    SOLVER_FAILED: "a failed ODE solve",
    FAILED: "an error",
    SIGNAL: "a stop signal",
    TIME_LIMIT: "the time limit",
}


# -- devices ---------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """The torch device for ``device``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``. Under several processes ``auto``/``cuda`` mean ``cuda:<local rank>``.

    Raises ValueError naming the value for an unknown spelling or a device this machine lacks."""
    if device is None or (isinstance(device, str) and device == "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {device!r}") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} needs CUDA, but torch.cuda.is_available() is False here")
        index = local_rank if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if resolved.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r} needs Apple's MPS backend, which this machine lacks")
        return resolved
    if resolved.type != "cpu":
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {device!r}")
    return resolved


def check_device_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """ValueError for a dtype the device cannot hold (float64 on Apple's MPS)."""
    if torch.device(device).type == "mps" and dtype == torch.float64:
        raise ValueError(
            f"device {str(device)!r} (Apple MPS) has no float64; build the flow in float32 "
            "(flow.float()) or train on device='cpu'"
        )


def place(flow: nn.Module, device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """Move ``flow`` (in place) to ``device`` (see :func:`resolve_device`); return the device."""
    target = resolve_device(device, local_rank)
    for tensor in (*flow.parameters(), *flow.buffers()):
        if tensor.is_floating_point():
            check_device_dtype(target, tensor.dtype)
    flow.to(target)
    return target


def flow_device(flow: nn.Module) -> torch.device:
    """The device of the flow's first parameter or buffer (CPU for a flow with neither)."""
    for tensor in (*flow.parameters(), *flow.buffers()):
        return tensor.device
    return torch.device("cpu")


# -- the process group -----------------------------------------------------------------------------
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def launched_with_several_processes() -> bool:
    """True inside a process started by torchrun (or by hand) with WORLD_SIZE > 1."""
    return _env_int("WORLD_SIZE", 1) > 1


def init(device: str | torch.device | None = None, timeout: float = DEFAULT_TIMEOUT) -> Cluster:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    ...): NCCL when the device is CUDA, else gloo. ``timeout`` (seconds) bounds every collective.
    Returns the :class:`Cluster`; a no-op returning it when the group is already up."""
    if not dist.is_initialized():
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        local_rank = _env_int("LOCAL_RANK", 0)
        target = resolve_device(device, local_rank)
        backend = "nccl" if target.type == "cuda" else "gloo"
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return current_cluster()


def shutdown(wait_for_peers: bool = True) -> None:
    """Leave the process group (if one is up); first, unless told not to (a failing rank), wait at a
    barrier so that rank 0, which hosts the rendezvous store, is not torn down under the others."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_process(cores: int | None = None, local_processes: int | None = None) -> int:
    """C / N torch threads for N processes on C cores (at least 1)."""
    cores = available_cores() if cores is None else cores
    local_processes = _env_int("LOCAL_WORLD_SIZE", 1) if local_processes is None else local_processes
    return max(1, cores // max(1, local_processes))


@dataclass(frozen=True)
class Cluster:
    """This process's place among the training processes (rank 0 of 1 without a process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and prints."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    def seed(self, seed: int, step: int = 0) -> int:
        """The seed of this rank (and of a run resumed at ``step``); ``seed`` itself for one process
        at step 0, so single-process runs draw what they always drew."""
        if not self.distributed and step == 0:
            return seed
        return int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1)[0])

    def shard(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's rows ``rank::world_size`` (a per-point context follows its points; a shared
        (k,) or (1, k) context is returned whole)."""
        if rows is None or not self.distributed or rows.ndim == 1 or rows.shape[0] == 1:
            return rows
        return rows[self.rank :: self.world_size]

    def batch_size(self, requested: int, n: int) -> int:
        """The per-rank minibatch: ``requested``, but at most the smallest shard of ``n`` rows, so
        every rank holds the same number of rows (the global batch is world_size times it)."""
        return min(requested, max(1, n // self.world_size))

    def agree(self, code: int, values: Sequence[float] = ()) -> tuple[int, int, list[float]]:
        """All-gather each rank's code (CONTINUE, TIME_LIMIT, ...) with ``values`` to average;
        return ``(code, rank, means)``: the gravest code, the lowest rank among those that sent it
        (so every rank takes the same decision), and each value's mean over ranks. One collective
        carries both, since each costs a round trip (~0.3-0.4 ms with gloo on this machine)."""
        if not self.distributed:
            return code, self.rank, [float(v) for v in values]
        local = torch.tensor([[float(code), *map(float, values)]], dtype=torch.float64)
        rows = gather_rows(local, self.world_size)  # (world_size, 1 + len(values)), rank order
        codes = [int(c) for c in rows[:, 0].tolist()]
        worst = max(codes)
        return worst, codes.index(worst), rows[:, 1:].mean(dim=0).tolist()

    def cause(self, code: int, rank: int) -> str:
        return f"rank {rank} of {self.world_size} reported {_CAUSES.get(code, f'code {code}')}"

    def mean(self, values: Sequence[float]) -> list[float]:
        """Mean of each value over the ranks (the values themselves with one process)."""
        if not self.distributed:
            return [float(v) for v in values]
        return [v / self.world_size for v in self.sum(values)]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Sum of each value over the ranks, in float64."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def wrap_loss(self, flow: nn.Module, loss: Callable[..., torch.Tensor]) -> nn.Module:
        """``LossModule(flow, loss)``, inside DistributedDataParallel when there are several ranks."""
        module = LossModule(flow, loss)
        if not self.distributed:
            return module
        device = flow_device(flow)
        return nn.parallel.DistributedDataParallel(
            module,
            device_ids=[device] if device.type == "cuda" else None,
            forward_sync_buffers=False,  # no collective beyond the gradient all-reduce in backward
        )


def current_cluster() -> Cluster:
    """The running process group's view of this process (a single rank when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Cluster()
    world = dist.get_world_size()
    return Cluster(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", world),
    )


def _collective_device() -> torch.device:
    """Where collective tensors live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class LossModule(nn.Module):
    """``forward(batch, **kwargs) = loss(flow, batch, **kwargs)``: the module DistributedDataParallel
    wraps. The flow stays a plain submodule, so the solver calls its field with no collective."""

    def __init__(self, flow: nn.Module, loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.flow = flow
        self.loss = loss

    def forward(self, batch: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.loss(self.flow, batch, **kwargs)


# -- global optimal-transport coupling -------------------------------------------------------------
def gather_rows(local: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's ``local`` concatenated along the first dimension, in rank order."""
    device = _collective_device()
    local_on = local.detach().contiguous().to(device)
    gathered = [torch.empty_like(local_on) for _ in range(world_size)]
    dist.all_gather(gathered, local_on)
    return torch.cat(gathered).to(local.device)


def global_ot_pairing(
    x0: torch.Tensor, x1: torch.Tensor, context: torch.Tensor | None = None, ot_batch_size: int | None = None
) -> torch.Tensor:
    """The base points paired with this rank's data by ONE optimal assignment on the global batch.

    Every rank's base draws ``x0`` and data ``x1`` (b rows each, equal on all ranks) are gathered
    in rank order; rank 0 solves the assignment on the N * b rows
    (:func:`cnf.losses.ot_pairing_within_contexts`, within groups of equal context) and broadcasts
    it; this rank returns the x0 rows paired with its own x1, shape (b, ...). Without a process group
    it is the single-process pairing. Gradients do not flow through the pairing (it is a choice of
    noise). ``ot_batch_size`` m: pairs within groups of m consecutive rows of the global batch."""
    from cnf.losses import ot_pairing_within_contexts

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x0[ot_pairing_within_contexts(x0, x1, context, ot_batch_size)]
    world, rank, b = dist.get_world_size(), dist.get_rank(), x1.shape[0]
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    # one all-gather for both (a collective costs a round trip), split again below
    both = gather_rows(torch.stack([x0, x1.to(x0.dtype)], dim=1), world)
    all_x0, all_x1 = both[:, 0], both[:, 1]
    all_context = None
    if context is not None:
        all_context = context if context.shape[0] == 1 else gather_rows(context, world)
    device = _collective_device()
    if rank == 0:
        perm = ot_pairing_within_contexts(all_x0, all_x1, all_context, ot_batch_size).to(device)
    else:
        perm = torch.empty(world * b, dtype=torch.int64, device=device)
    dist.broadcast(perm, src=0)
    mine = perm[rank * b : (rank + 1) * b].to(x0.device)
    return all_x0[mine].to(x0.dtype)


# -- launching ---------------------------------------------------------------------------------------
def launch(nproc: int, module_argv: Sequence[str], *, monitor_interval: float = 0.5) -> int:
    """Run ``python -m <module_argv>`` on ``nproc`` local processes through torch's own launcher
    (``torch.distributed.run``, i.e. torchrun with a standalone rendezvous). Returns 0, or raises
    RuntimeError naming the failed ranks and their causes (torchrun stops the other ranks)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
            f"--monitor-interval={monitor_interval}",
            "--module",
            *module_argv,
        ]
    )
    try:
        run(args)
    except ChildFailedError as error:
        first, failure = error.get_first_failure()
        others = "; ".join(
            f"rank {rank} {_failure_text(f)}" for rank, f in sorted(error.failures.items()) if rank != first
        )
        raise RuntimeError(
            f"{nproc}-process run failed: rank {first} {_failure_text(failure)} first"
            + (f" (then {others})" if others else "")
            + "; torchrun stopped the other ranks"
        ) from None
    return 0


def _failure_text(failure: Any) -> str:
    exitcode = getattr(failure, "exitcode", None)
    if isinstance(exitcode, int) and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    message = getattr(failure, "message", "") or ""
    if message and "To enable traceback" not in message:
        return f"exited with code {exitcode}: {message}"
    return f"exited with code {exitcode} (its error is printed above)"
