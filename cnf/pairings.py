"""OT flow matching's assignments, solved ahead of the training steps and in parallel.

The exact minibatch assignment of OT-CFM (Tong et al. 2023; :func:`cnf.losses.ot_pairing`) is
serial: on 8gaussians with 512 points it is most of an OT flow-matching step. SciPy's
``linear_sum_assignment`` releases the GIL, so :class:`PairingsAhead` solves the assignments of
the next block of steps in background threads while the current block trains: with T solver
threads, a block is T steps per process, and with N processes each rank solves T of the N * T
steps of a block, every one on that step's gathered global batch (still one assignment of the
N * b points, exactly as one process with batch N * b pairs them;
:func:`cnf.distributed.global_ot_pairing` is the one-step form).

Pairing a step before it runs needs its draws before it runs. So in OT flow matching (with the
standard normal base) each step draws from its own generators, seeded by (seed, rank, step): the
minibatch rows from one, the dequantisation noise, base points and times of the loss from the
other. A step's draws are then the same whenever they are made: the loss redraws exactly the x0
that was paired, a resumed run draws what the uninterrupted run would have drawn, and the run
does not depend on the number of threads.
"""

from __future__ import annotations

import functools
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cnf.distributed import Cluster, flow_device, gather_rows, threads_per_process
from cnf.flow import StandardNormal
from cnf.losses import assignment, context_groups, matching_draws, squared_distances
from cnf.transforms.flow import inner_flow

ROW_STREAM, LOSS_STREAM = 0, 1


def step_generator(seed: int, rank: int, step: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one step's draws (``stream``: ROW_STREAM for the minibatch rows,
    LOSS_STREAM for the loss), on ``device``, seeded by (seed, rank, step, stream)."""
    state = int(np.random.SeedSequence([seed, rank, step, stream]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)


def assignment_threads(threads: int | str | None) -> int:
    """Solver threads for a training run's ``threads`` setting: an explicit count caps them too;
    ``"auto"``/None gives one per core (C / N for N local processes), whatever the torch thread
    count, since the solvers wait on no thread team (a busy neighbour slows them, never stalls them)."""
    return threads if isinstance(threads, int) and not isinstance(threads, bool) else threads_per_process()


def describe_solvers(threads: int | str | None, world_size: int = 1) -> str:
    """How a run's OT assignments are solved, as ``cnf train`` appends it to its settings line
    (empty where each step solves its own in the training thread)."""
    solvers = assignment_threads(threads)
    if solvers > 1:
        return f", OT assignments solved ahead in {solvers} threads" + (" per rank" if world_size > 1 else "")
    return f", OT assignments split over the {world_size} ranks" if world_size > 1 else ""


def can_pair_ahead(flow: nn.Module) -> bool:
    """Whether a step's base draws can be made ahead: the base must take a generator (the
    standard normal does; an arbitrary torch Distribution draws from the global stream)."""
    inner = inner_flow(flow)
    return isinstance(getattr(inner, "base", None), StandardNormal)


@dataclass
class _Block:
    """A block of steps whose assignments are being solved: the global x0 of each step and, for
    this rank's share, the solver's futures with the context group each one pairs."""

    first: int
    x0s: torch.Tensor  # (K, N * b, ...): each step's global base draws, rank order
    tasks: list[tuple[int, torch.Tensor | None, Future | np.ndarray]]


class PairingsAhead:
    """Minibatch rows, loss generators and OT pairings of the training steps of this rank.

    ``rows(step)`` are the step's minibatch indices into this rank's ``data``;
    ``loss_kwargs(step)`` hands the loss the step's generator and a ``pairing`` that returns the
    x0 rows paired with the step's x1 (within groups of ``ot_batch_size`` rows when it is set).
    Steps go in blocks of ``world_size * threads``; when the first step of a block asks for its
    pairing, the block's assignments are collected (solved in the background since the previous
    block began) and the next block's are started. Every
    rank must ask for the same steps in the same order (the training loop's lockstep does that):
    a block starts with one all-gather of every rank's draws and ends with one of the assignments.
    With ``threads=1`` each block is solved when it is asked for, in the training thread.
    """

    def __init__(
        self,
        flow: nn.Module,
        data: torch.Tensor,
        context: torch.Tensor | None,
        batch_size: int,
        seed: int,
        cluster: Cluster,
        threads: int,
        ot_batch_size: int | None = None,
    ) -> None:
        self.flow, self.data, self.context = flow, data, context
        self.ot_batch_size = ot_batch_size  # OT within groups of this many rows (cnf.losses.assignment)
        self.batch_size, self.seed, self.cluster = batch_size, seed, cluster
        self.threads = max(1, int(threads))
        self.block = cluster.world_size * self.threads
        self.device = flow_device(flow)  # where the loss sees the batch (data may stay on the CPU)
        self._paired: dict[int, torch.Tensor] = {}
        self._pending: _Block | None = None
        self._pool = ThreadPoolExecutor(self.threads, "cnf-assignment") if self.threads > 1 else None
        if self._pool is not None:
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

    def rows(self, step: int) -> torch.Tensor:
        generator = step_generator(self.seed, self.cluster.rank, step, ROW_STREAM)
        rows = torch.randint(0, self.data.shape[0], (self.batch_size,), generator=generator, device="cpu")
        return rows.to(self.data.device)

    def generator(self, step: int) -> torch.Generator:
        return step_generator(self.seed, self.cluster.rank, step, LOSS_STREAM, self.device)

    def loss_kwargs(self, step: int) -> dict[str, object]:
        return {"generator": self.generator(step), "pairing": functools.partial(self.paired, step)}

    def paired(
        self, step: int, x0: torch.Tensor, x1: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The x0 rows paired with this rank's x1 at ``step`` (the loss's own draws)."""
        if step not in self._paired:
            self._paired.clear()  # a block abandoned by a stop or a resume is not reused
            if self._pending is None or self._pending.first != step:
                self._pending = self._start(step)
            block, self._pending = self._pending, None
            if self._pool is not None:  # the next block's assignments run while this one trains
                self._pending = self._start(step + self.block)
            self._finish(block)
        paired = self._paired.pop(step)
        if paired.shape != x0.shape:
            raise RuntimeError(f"the pairing of step {step} has shape {tuple(paired.shape)}, the loss drew {tuple(x0.shape)}")
        return paired

    def draws(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x0, x1, context) of this rank at ``step``, drawn as the step's loss will draw them."""
        rows = self.rows(step)
        batch = self.data[rows].to(self.device)
        context = None
        if self.context is not None:
            context = self.context[rows] if self.context.shape[0] > 1 else self.context
        with torch.no_grad():
            _, x1, x0 = matching_draws(self.flow, batch, self.generator(step))
        return x0, x1, context

    def _start(self, first: int) -> _Block:
        """Draw the block's steps, gather them over ranks and start this rank's assignments. The
        cost matrices are made here, in torch; only SciPy's solver goes to the threads (it holds
        no GIL, and no torch call there starts an OpenMP team beside the training step's)."""
        world, rank, b = self.cluster.world_size, self.cluster.rank, self.batch_size
        draws = [self.draws(step) for step in range(first, first + self.block)]
        x0s = torch.stack([x0 for x0, _, _ in draws])  # (K, b, ...)
        x1s = torch.stack([x1.to(x0s.dtype) for _, x1, _ in draws])
        if world > 1:  # every rank's draws of every step of the block, in one collective
            both = gather_rows(torch.stack([x0s, x1s], dim=2), world)  # (N * K, b, 2, ...)
            both = both.reshape(world, self.block, b, 2, *x0s.shape[2:]).transpose(0, 1)
            both = both.reshape(self.block, world * b, 2, *x0s.shape[2:])  # step, global rows in rank order
            x0s, x1s = both[:, :, 0], both[:, :, 1]
        contexts: list[torch.Tensor | None] = [self.context] * self.block
        if self.context is not None and self.context.shape[0] > 1:
            local = torch.stack([c for _, _, c in draws])  # (K, b, k)
            if world > 1:
                local = gather_rows(local, world).reshape(world, self.block, b, -1).transpose(0, 1)
            contexts = list(local.reshape(self.block, world * b, -1))
        tasks: list[tuple[int, torch.Tensor | None, Future | np.ndarray]] = []
        for k in range(rank * self.threads, (rank + 1) * self.threads):  # this rank's share
            groups = context_groups(contexts[k], world * b)
            for rows in [None] if groups is None else groups:
                x0, x1 = (x0s[k], x1s[k]) if rows is None else (x0s[k][rows], x1s[k][rows])
                cost = squared_distances(x0, x1)
                solve = functools.partial(assignment, cost, self.ot_batch_size)
                tasks.append((k, rows, solve() if self._pool is None else self._pool.submit(solve)))
        return _Block(first, x0s, tasks)

    def _finish(self, block: _Block) -> None:
        """Wait for this rank's assignments of ``block``, gather every rank's, keep the pairings."""
        world, rank, b = self.cluster.world_size, self.cluster.rank, self.batch_size
        mine = range(rank * self.threads, (rank + 1) * self.threads)
        perms = {k: torch.arange(world * b, device="cpu") for k in mine}
        for k, rows, solved in block.tasks:
            perm = torch.from_numpy(solved.result() if isinstance(solved, Future) else solved)
            if rows is None:
                perms[k] = perm
            else:
                rows = rows.cpu()
                perms[k][rows] = rows[perm]
        perm = torch.stack([perms[k] for k in mine])  # (threads, N * b)
        if world > 1:  # every rank's assignments, in block order (rank r solved steps r*T .. r*T+T-1)
            perm = gather_rows(perm, world)
        for k in range(self.block):
            chosen = perm[k, rank * b : (rank + 1) * b].to(block.x0s.device)
            self._paired[block.first + k] = block.x0s[k][chosen]
