"""Maximum-likelihood fine-tuning probes: continue a flow-matching checkpoint by maximum likelihood.

    cnf train --data galaxies --time-limit 600 --threads 1 --likelihood-finetune 0 --out runs/g600
    python -m benchmarks.likelihood_finetune --checkpoint runs/g600/best.pt --data galaxies \\
        --seconds 60 --lrs 3e-4 1e-3 --divergences hutchinson exact
    python -m benchmarks.likelihood_finetune --checkpoint runs/g600/best.pt --data galaxies \\
        --divergences hutchinson --solvers dopri5:1e-3 dopri5:1e-4 rk4:0.25 rk4:0.125
    python -m benchmarks.likelihood_finetune --quick          # a smoke test (trains its own checkpoint)

Each probe loads the checkpoint afresh, trains it by maximum likelihood (``cnf.train``, objective
``likelihood``, Adam with a cosine schedule over ``--seconds``, no EMA) with the chosen divergence
in its training solves (Hutchinson with Rademacher probes, or the exact trace) and training solver
(``--solvers``: ``dopri5:TOL`` at rtol = atol = TOL, or fixed-step ``rk4:STEP``), and scores the first
``--test-n`` test points before and after, with the exact divergence at the evaluation tolerance
(``cnf.recipes.exact_evaluation``). This is how the recipe's closing likelihood phase
(``TrainSettings.likelihood_finetune``: its divergence, learning rate and length) was chosen.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import cnf
from benchmarks.common import RESULTS, write_results
from cnf.checkpoint import load_checkpoint
from cnf.cli import main as cnf_main
from cnf.data.real import REAL_DATASETS, load_real
from cnf.recipes import exact_evaluation
from cnf.transforms.flow import inner_flow

COLUMNS = ("divergence", "solver", "lr", "batch_size", "seconds", "steps", "test_nll_before", "test_nll_after", "gain")


def test_nll(flow: torch.nn.Module, points: torch.Tensor) -> float:
    with exact_evaluation(flow), torch.no_grad():
        return -flow.log_prob(points).mean().item()


def training_solver(spec: str) -> dict[str, Any]:
    """``dopri5:TOL`` (adaptive, rtol = atol = TOL) or ``rk4:STEP`` (fixed step) as Solver settings."""
    method, _, value = spec.partition(":")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if method not in ("dopri5", "rk4") or not number > 0:
        raise argparse.ArgumentTypeError(f"must be dopri5:TOL or rk4:STEP with a positive number, got {spec!r}")
    if method == "rk4":
        return {"method": "rk4", "step_size": number}
    return {"method": "dopri5", "rtol": number, "atol": number, "step_size": None}


def solver_spec(text: str) -> str:
    training_solver(text)  # checks it
    return text


def probe(
    checkpoint: Path, data: Any, divergence: str, solver: str, lr: float, batch_size: int, seconds: float, test_n: int
) -> dict[str, Any]:
    flow, _ = load_checkpoint(checkpoint)
    inner = inner_flow(flow)
    inner.divergence, inner.noise = divergence, "rademacher"
    inner.solver = inner.solver.with_(**training_solver(solver))
    before = test_nll(flow, data.test[:test_n])
    start = time.perf_counter()
    result = cnf.train(
        flow, data.train, objective="likelihood", lr=lr, batch_size=batch_size, iters=None, time_limit=seconds,
        lr_schedule="cosine", ema_decay=None, threads=torch.get_num_threads(), progress=False,
    )  # fmt: skip
    trained = time.perf_counter() - start
    after = test_nll(flow, data.test[:test_n])
    return {
        "divergence": divergence, "solver": solver, "lr": lr, "batch_size": batch_size, "seconds": round(trained, 1),
        "steps": result.step, "test_nll_before": before, "test_nll_after": after, "gain": before - after,
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a flow-matching run's checkpoint or best.pt")
    parser.add_argument("--data", default="galaxies", choices=REAL_DATASETS, help="the dataset the checkpoint was trained on")
    parser.add_argument("--seconds", type=float, default=60.0, help="training seconds per probe")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--divergences", nargs="+", default=["hutchinson", "exact"], choices=("hutchinson", "exact"))
    parser.add_argument(
        "--solvers", nargs="+", default=["dopri5:1e-3"], type=solver_spec,
        help="training solvers: dopri5:TOL (rtol = atol = TOL; the recipe's is dopri5:1e-3) or rk4:STEP",
    )  # fmt: skip
    parser.add_argument("--test-n", type=int, default=3000, help="test points scored before and after")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--name", default="likelihood_finetune", help="results file name")
    parser.add_argument("--quick", action="store_true", help="a few seconds on wine, from a checkpoint trained here")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory()
    if args.quick:
        args.data, args.seconds, args.test_n, args.lrs, args.batch_sizes = "wine", 0.5, 10, [1e-3], [32]
        args.solvers = ["dopri5:1e-3", "rk4:0.5"]
        argv_train = ["train", "--data", "wine", "--hidden", "8", "--iters", "20", "--out", scratch.name]
        if cnf_main(argv_train) != 0:
            raise RuntimeError("the quick checkpoint could not be trained")
        args.checkpoint = Path(scratch.name) / "checkpoint.pt"
    if args.checkpoint is None:
        parser.error("--checkpoint is required (a flow-matching run's checkpoint.pt or best.pt)")
    data = load_real(args.data)
    rows = []
    grid = itertools.product(args.divergences, args.solvers, args.lrs, args.batch_sizes)
    for divergence, solver, lr, batch_size in grid:
        rows.append(probe(args.checkpoint, data, divergence, solver, lr, batch_size, args.seconds, args.test_n))
        print(rows[-1])
    meta = {"checkpoint": str(args.checkpoint), "data": args.data, "test_n": args.test_n, "threads": args.threads}
    write_results(args.name, rows, COLUMNS, meta, Path(args.out) if args.out else RESULTS)
    scratch.cleanup()
    return rows


if __name__ == "__main__":
    main()
