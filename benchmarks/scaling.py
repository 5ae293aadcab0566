"""Cost of log_prob against dimension and batch size: exact divergence against Hutchinson.

    python -m benchmarks.scaling                # d = 2..64, batches 128 and 1024; ~3 min on 2 cores
    python -m benchmarks.scaling --quick        # seconds; what the tests run

For a random MLPField on R^d (64x3), one scoring solve with a fixed-step solver (rk4, h=0.25:
16 evaluations, so every divergence does the same number of field evaluations) is timed in two
modes: ``evaluation`` (no gradients) and ``training`` (log_prob + backward, as in one maximum
likelihood step). Divergences: exact (MLPField's forward-mode divergence), Hutchinson
with Gaussian and with Rademacher probes. For Hutchinson, the standard deviation of the log p
estimate over ``--probes`` independent probes (mean over points) and its mean bias against the
exact value. The crossover is the smallest d from which Hutchinson (the faster noise) is faster
than the exact divergence, per mode and batch; the three divergences take turns within each
round (median of --repeats rounds). Writes benchmarks/results/scaling.{json,md}.

References: Hutchinson (1990); Grathwohl et al. (2019), "FFJORD", section on scaling.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, interleaved_seconds, write_results
from cnf import CNF, MLPField, Solver

SOLVER = Solver("rk4", step_size=0.25)
DIVERGENCES = (("exact", "gaussian"), ("hutchinson", "gaussian"), ("hutchinson", "rademacher"))
COLUMNS = ("mode", "batch", "dim", "divergence", "seconds", "nfe", "hutchinson_std", "hutchinson_bias")


def name(divergence: str, noise: str) -> str:
    return "exact" if divergence == "exact" else f"hutchinson-{noise}"


def measure(dim: int, batch: int, mode: str, probes: int, repeats: int, seed: int) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    field = MLPField(dim)
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        exact = CNF(field, solver=SOLVER).log_prob(x)
    flows = {
        name(divergence, noise): CNF(field, divergence=divergence, noise=noise, solver=SOLVER)
        for divergence, noise in DIVERGENCES
    }

    def runner(flow: CNF) -> Callable[[], None]:
        if mode == "evaluation":

            def run() -> None:
                with torch.no_grad():
                    flow.log_prob(x)
        else:

            def run() -> None:
                flow.zero_grad(set_to_none=True)
                (-flow.log_prob(x).mean()).backward()

        return run

    # The three divergences take turns within each round, so machine drift hits them alike.
    rounds = interleaved_seconds({key: runner(flow) for key, flow in flows.items()}, repeats=repeats)
    rows = []
    for key, flow in flows.items():
        row: dict[str, Any] = {
            "mode": mode,
            "batch": batch,
            "dim": dim,
            "divergence": key,
            "seconds": statistics.median(rounds[key]),
            "nfe": flow.stats.nfe_forward,
            "hutchinson_std": None,
            "hutchinson_bias": None,
        }
        if flow.divergence == "hutchinson" and mode == "evaluation":
            generator = torch.Generator().manual_seed(seed + 2)
            with torch.no_grad():
                estimates = torch.stack([flow.log_prob(x, generator=generator) for _ in range(probes)])
            row["hutchinson_std"] = estimates.std(0).mean().item()
            row["hutchinson_bias"] = (estimates.mean(0) - exact).mean().item()
        rows.append(row)
    return rows


def crossovers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Smallest d from which the fastest Hutchinson beats exact, per (mode, batch)."""
    out = []
    for mode, batch in dict.fromkeys((r["mode"], r["batch"]) for r in rows):
        mine = [r for r in rows if r["mode"] == mode and r["batch"] == batch]
        dims = sorted({r["dim"] for r in mine})
        found = None
        for dim in dims:
            at = {r["divergence"]: r["seconds"] for r in mine if r["dim"] == dim}
            hutch = min(v for k, v in at.items() if k.startswith("hutchinson"))
            if hutch < at["exact"] and found is None:
                found = dim
            elif hutch >= at["exact"]:
                found = None  # the crossover must hold from there on
        out.append({"mode": mode, "batch": batch, "hutchinson_faster_from_dim": found})
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    parser.add_argument(
        "--modes", nargs="+", default=["evaluation", "training"], choices=["evaluation", "training"]
    )
    parser.add_argument("--probes", type=int, default=20, help="probes for the Hutchinson standard deviation")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (for the tests)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.batches, args.probes, args.repeats = [2, 4], [16], 3, 1
    start = time.perf_counter()
    rows = [
        row
        for mode in args.modes
        for batch in args.batches
        for dim in args.dims
        for row in measure(dim, batch, mode, args.probes, args.repeats, args.seed)
    ]
    cross = crossovers(rows)
    for c in cross:
        print(
            f"{c['mode']}, batch {c['batch']}: Hutchinson faster from d = {c['hutchinson_faster_from_dim']}"
        )
    write_results(
        "scaling",
        rows,
        COLUMNS,
        {
            "solver": SOLVER.to_dict(),
            "probes": args.probes,
            "crossover": cross,
            "total_seconds": time.perf_counter() - start,
        },
        Path(args.out) if args.out else RESULTS,
    )
    return rows


if __name__ == "__main__":
    main()
