"""Training speed for torch thread counts, on a quiet machine and beside a busy process.

    python -m benchmarks.threads            # ~2-3 min
    python -m benchmarks.threads --quick                            # a smoke test

For each data dimension (2-D 8gaussians, and d = 64 correlated Gaussian data) and each thread
setting (1, 2 and ``auto`` = :func:`cnf.recipes.default_threads`), ``cnf.train`` runs the same
fixed number of maximum-likelihood steps (same initial weights, same batches: the same
arithmetic) with the CLI's recipe and model, once on its own ("quiet") and once beside a process
that spins one core (``python -c "while True: pass"``, "busy"). The table gives steps per second
and the busy/quiet ratio; quiet and busy cells alternate so that drift of a shared machine hits
both alike.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, write_results
from cnf import CNF, MLPField, Solver
from cnf.data import sample_toy
from cnf.recipes import available_cores, default_threads, recipe
from cnf.training import train

SPIN = "while True: pass"


def steps_per_second(steps: int, dim: int, threads: int, seed: int = 0) -> float:
    """Maximum-likelihood steps per second of ``cnf.train`` on ``dim``-D data (``steps`` timed)."""
    torch.manual_seed(seed)
    if dim == 2:
        data = sample_toy("8gaussians", 20_000, seed=seed)
    else:
        data = torch.randn(20_000, dim) @ (torch.eye(dim) + 0.3 * torch.randn(dim, dim))
    flow = CNF(MLPField(dim, hidden=(64, 64, 64)), solver=Solver(rtol=1e-5, atol=1e-5))
    settings = {**recipe("likelihood", dim), "iters": steps, "lr_schedule": "constant"}
    start = time.perf_counter()
    train(flow, data, progress=False, threads=threads, **settings)
    return steps / (time.perf_counter() - start)


def busy_neighbour() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SPIN])


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-2d", type=int, default=100, help="timed steps per cell at d = 2")
    parser.add_argument("--steps-64", type=int, default=5, help="timed steps per cell at d = 64")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 64], choices=[2, 64])
    parser.add_argument("--threads", nargs="+", default=["1", "2", "auto"])
    parser.add_argument("--quick", action="store_true", help="a second per cell, 2-D only")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps_2d, args.dims, args.threads = 3, [2], ["1", "auto"]
    rows = []
    for dim in args.dims:
        for setting in args.threads:
            threads = default_threads(dim) if setting == "auto" else int(setting)
            steps = args.steps_2d if dim == 2 else args.steps_64
            quiet = steps_per_second(steps, dim, threads)
            neighbour = busy_neighbour()
            try:
                busy = steps_per_second(steps, dim, threads)
            finally:
                neighbour.kill()
                neighbour.wait()
            row = {
                "dim": dim,
                "threads": setting,
                "torch_threads": threads,
                "steps": steps,
                "quiet_steps_per_s": quiet,
                "busy_steps_per_s": busy,
                "busy_vs_quiet": busy / quiet,
            }
            print(row)
            rows.append(row)
    columns = ["dim", "threads", "torch_threads", "steps", "quiet_steps_per_s", "busy_steps_per_s", "busy_vs_quiet"]
    meta = {"cores": available_cores(), "neighbour": f'python -c "{SPIN}"'}
    path = write_results("threads", rows, columns, meta, Path(args.out) if args.out else RESULTS)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
