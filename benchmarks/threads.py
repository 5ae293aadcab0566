"""Training steps in a fixed time for torch thread counts, on a quiet machine and beside a busy process.

    flock /work/bench.lock python -m benchmarks.threads            # 10 s per cell, ~3 min
    python -m benchmarks.threads --quick                            # a smoke test

For each data dimension (2-D 8gaussians, and d = 64 Gaussian data) and each thread setting
(1, 2 and ``auto`` = :func:`cnf.recipes.default_threads`), ``cnf.train`` runs maximum likelihood
for ``--seconds`` with the CLI's recipe and model, once on its own ("quiet") and once beside a
process that spins one core (``python -c "while True: pass"``, "busy"). The table gives the steps
taken and the busy/quiet ratio. Cells run interleaved (quiet, busy, quiet, busy ...) so that
drift of a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
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


def steps_in(seconds: float, dim: int, threads: int, seed: int = 0) -> int:
    """Steps of maximum likelihood that ``cnf.train`` takes in ``seconds`` on ``dim``-D data."""
    torch.manual_seed(seed)
    if dim == 2:
        data = sample_toy("8gaussians", 20_000, seed=seed)
    else:
        data = torch.randn(20_000, dim) @ (torch.eye(dim) + 0.3 * torch.randn(dim, dim))
    flow = CNF(MLPField(dim, hidden=(64, 64, 64)), solver=Solver(rtol=1e-5, atol=1e-5))
    settings = recipe("likelihood", dim, time_limit=seconds)
    result = train(flow, data, progress=False, threads=threads, **{**settings, "val_every": 10**9})
    return result.step


def busy_neighbour() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SPIN])


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="training seconds per cell")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 64])
    parser.add_argument("--threads", nargs="+", default=["1", "2", "auto"])
    parser.add_argument("--quick", action="store_true", help="a second per cell, 2-D only")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.dims, args.threads = 0.5, [2], ["1", "auto"]
    rows = []
    for dim in args.dims:
        for setting in args.threads:
            threads = default_threads(dim) if setting == "auto" else int(setting)
            quiet = steps_in(args.seconds, dim, threads)
            neighbour = busy_neighbour()
            try:
                busy = steps_in(args.seconds, dim, threads)
            finally:
                neighbour.kill()
                neighbour.wait()
            row = {
                "dim": dim,
                "threads": setting,
                "torch_threads": threads,
                "quiet_steps": quiet,
                "busy_steps": busy,
                "busy_vs_quiet": busy / quiet if quiet else None,
            }
            print(row)
            rows.append(row)
    columns = ["dim", "threads", "torch_threads", "quiet_steps", "busy_steps", "busy_vs_quiet"]
    meta = {"seconds": args.seconds, "cores": available_cores(), "neighbour": f'python -c "{SPIN}"'}
    path = write_results("threads", rows, columns, meta, Path(args.out) if args.out else RESULTS)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
