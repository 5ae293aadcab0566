"""CNF and planar flow on toy data for a fixed wall-clock budget (maximum likelihood).

    python -m benchmarks.train_toy                     # 60 s per model, moons and 8gaussians
    python -m benchmarks.train_toy --quick             # seconds; what the tests run

Writes benchmarks/results/train_toy.{json,md}: test NLL on 10,000 fresh points, the true NLL of
the same points where the density is known (8gaussians), parameters, training seconds and steps,
and the NFE of one scoring solve at rtol=atol=1e-5.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import write_results
from cnf import CNF, MLPField, PlanarFlow, Solver
from cnf.data import sample_toy, true_log_prob
from cnf.training import train

EVAL_SOLVER = Solver(rtol=1e-5, atol=1e-5)


def make_model(kind: str, layers: int) -> torch.nn.Module:
    if kind == "cnf":
        return CNF(MLPField(2), solver=EVAL_SOLVER)
    return PlanarFlow(2, layers)


def run_one(kind: str, dataset: str, budget: float, layers: int, test_n: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = make_model(kind, layers)
    data = sample_toy(dataset, 100_000, seed=seed)
    val = sample_toy(dataset, 2_000, seed=seed + 1)
    test = sample_toy(dataset, test_n, seed=2024)
    lr = 5e-3 if kind == "cnf" else 1e-2
    result = train(
        model,
        data,
        val,
        iters=10**9,
        time_limit=budget,
        lr=lr,
        lr_schedule="cosine",
        batch_size=512,
        val_every=10**9,
        progress=False,
    )
    start = time.perf_counter()
    with torch.no_grad():
        nll = -model.log_prob(test).mean().item()
    score_seconds = time.perf_counter() - start
    try:
        true_nll = -true_log_prob(dataset, test.double()).mean().item()
    except ValueError:
        true_nll = None
    return {
        "model": kind if kind == "cnf" else f"planar K={layers}",
        "data": dataset,
        "test_nll": nll,
        "true_nll": true_nll,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": result.seconds,
        "steps": result.step,
        "nfe_eval": model.stats.nfe_forward,
        "score_seconds": score_seconds,
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per model")
    parser.add_argument("--datasets", nargs="+", default=["moons", "8gaussians"])
    parser.add_argument("--layers", type=int, default=32, help="planar layers K")
    parser.add_argument("--test-n", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (for the tests)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget, args.test_n, args.datasets = 1.0, 500, ["8gaussians"]
    rows = [
        run_one(kind, dataset, args.budget, args.layers, args.test_n, args.seed)
        for dataset in args.datasets
        for kind in ("cnf", "planar")
    ]
    write_results(
        "train_toy",
        rows,
        [
            "model",
            "data",
            "test_nll",
            "true_nll",
            "params",
            "train_seconds",
            "steps",
            "nfe_eval",
            "score_seconds",
        ],
        {"budget_seconds": args.budget, "test_n": args.test_n},
        Path(args.out) if args.out else None,
    )
    return rows


if __name__ == "__main__":
    main()
