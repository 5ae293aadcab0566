"""Discrete against continuous flows, each trained for the same wall-clock budget.

    python -m benchmarks.discrete_vs_continuous                 # 4 datasets, ~20 min on 2 cores
    python -m benchmarks.discrete_vs_continuous --quick         # seconds; what the tests run

On moons, 8gaussians, checkerboard and pinwheel: planar flows with K = 2..64 layers, the CNF
trained with the exact and with the Hutchinson divergence (both scored exactly), and, when zuko
is importable (the `bench` extra), RealNVP, MAF and IAF through cnf.adapters. Per model: test
NLL on 10,000 fresh points, the true NLL of those points where the density is known
(8gaussians), parameters, training seconds and steps, median seconds and NFE to score the test
points, median seconds to draw as many samples. Writes
benchmarks/results/discrete_vs_continuous.{json,md,png}.

References: Rezende & Mohamed (2015) (planar flows); Grathwohl et al. (2019) (FFJORD, the toy
datasets); Dinh et al. (2017); Papamakarios et al. (2017); Kingma et al. (2016).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, median_seconds, write_results
from cnf import CNF, MLPField, PlanarFlow, Solver
from cnf.adapters import MISSING_ZUKO, ZUKO_MODELS, make_zuko_flow, zuko_available
from cnf.data import sample_toy, true_log_prob
from cnf.training import train

DATASETS = ("moons", "8gaussians", "checkerboard", "pinwheel")
LAYERS = (2, 4, 8, 16, 32, 64)
SOLVER = Solver(rtol=1e-5, atol=1e-5)
TEST_SEED = 2024
# Learning rates: cnf's CLI default for the CNF; planar flows as in benchmarks/train_toy.py;
# zuko's README recipe (Adam 1e-3) for its flows.
LEARNING_RATES = {"cnf": 5e-3, "planar": 1e-2, "zuko": 1e-3}
COLUMNS = (
    "data",
    "model",
    "K",
    "test_nll",
    "nll_se",
    "true_nll",
    "params",
    "train_seconds",
    "steps",
    "score_seconds",
    "score_nfe",
    "sample_seconds",
)


def build(kind: str, layers: int | None, hidden: tuple[int, ...], solver: Solver = SOLVER) -> torch.nn.Module:
    if kind == "planar":
        return PlanarFlow(2, layers)
    if kind == "cnf-exact":
        return CNF(MLPField(2, hidden=hidden), divergence="exact", solver=solver)
    if kind == "cnf-hutchinson":
        return CNF(MLPField(2, hidden=hidden), divergence="hutchinson", noise="rademacher", solver=solver)
    return make_zuko_flow(kind, 2)


def run_one(
    kind: str, layers: int | None, dataset: str, budget: float, test: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = build(kind, layers, tuple(args.hidden), Solver(rtol=args.tol, atol=args.tol))
    data = sample_toy(dataset, args.n_train, seed=args.seed)
    family = "cnf" if kind.startswith("cnf") else ("planar" if kind == "planar" else "zuko")
    result = train(
        model,
        data,
        iters=10**9,
        time_limit=budget,
        lr=LEARNING_RATES[family],
        batch_size=512,
        val_every=10**9,
        progress=False,
    )
    model.eval()
    if kind == "cnf-hutchinson":  # trained with the estimator, scored exactly
        model.divergence = "exact"
    with torch.no_grad():
        score_seconds = median_seconds(lambda: model.log_prob(test), repeats=args.repeats)
        log_p = model.log_prob(test)
        score_nfe = model.stats.nfe_forward
        sample_seconds = median_seconds(lambda: model.sample(test.shape[0]), repeats=args.repeats)
    try:
        true_nll = -true_log_prob(dataset, test.double()).mean().item()
    except ValueError:
        true_nll = None
    return {
        "data": dataset,
        "model": kind,
        "K": layers,
        "test_nll": -log_p.mean().item(),
        "nll_se": log_p.std().item() / math.sqrt(test.shape[0]),
        "true_nll": true_nll,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": result.seconds,
        "steps": result.step,
        "score_seconds": score_seconds,
        "score_nfe": score_nfe,
        "sample_seconds": sample_seconds,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Test NLL against K per dataset; CNFs as horizontal bands (+-2 standard errors)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(r["data"] for r in rows))
    fig = Figure(figsize=(4.2 * len(datasets), 3.8))
    FigureCanvasAgg(fig)
    for i, dataset in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), i + 1)
        mine = [r for r in rows if r["data"] == dataset]
        planar = sorted((r for r in mine if r["model"] == "planar"), key=lambda r: r["K"])
        ax.plot([r["K"] for r in planar], [r["test_nll"] for r in planar], "o-", color="C0", label="planar")
        others = [r for r in mine if r["model"] != "planar"]
        for j, r in enumerate(others):
            color = f"C{j + 1}"
            low, high = r["test_nll"] - 2 * r["nll_se"], r["test_nll"] + 2 * r["nll_se"]
            if r["model"].startswith("cnf"):
                ax.axhspan(low, high, color=color, alpha=0.3, label=r["model"])
            else:
                ax.axhline(r["test_nll"], color=color, linestyle="--", label=f"{r['model']} (zuko)")
        if mine and mine[0]["true_nll"] is not None:
            ax.axhline(mine[0]["true_nll"], color="k", linewidth=1, label="true NLL")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("planar layers K")
        ax.set_ylabel("test NLL (nats)")
        ax.set_title(dataset)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=20.0, help="training seconds per model")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS), help="planar K values")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64], help="CNF field widths")
    parser.add_argument("--test-n", type=int, default=10_000)
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--tol", type=float, default=1e-5, help="CNF rtol = atol (training and scoring)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median) after a warm-up")
    parser.add_argument("--no-zuko", action="store_true", help="leave out RealNVP/MAF/IAF")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (for the tests)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget, args.test_n, args.n_train, args.repeats, args.tol = 0.2, 200, 5000, 1, 1e-3
        args.datasets, args.layers, args.hidden = ["8gaussians"], [2], [8]
    notes = []
    kinds: list[tuple[str, int | None]] = [("planar", k) for k in args.layers]
    kinds += [("cnf-exact", None), ("cnf-hutchinson", None)]
    if args.no_zuko:
        notes.append("zuko baselines left out (--no-zuko)")
    elif zuko_available():
        kinds += [(name, None) for name in ZUKO_MODELS]
    else:
        notes.append(f"RealNVP/MAF/IAF skipped: {MISSING_ZUKO}")
        print(notes[-1])
    start = time.perf_counter()
    rows = []
    for dataset in args.datasets:
        test = sample_toy(dataset, args.test_n, seed=TEST_SEED)
        for kind, layers in kinds:
            rows.append(run_one(kind, layers, dataset, args.budget, test, args))
    out = Path(args.out) if args.out else RESULTS
    write_results(
        "discrete_vs_continuous",
        rows,
        COLUMNS,
        {
            "budget_seconds": args.budget,
            "test_n": args.test_n,
            "solver": Solver(rtol=args.tol, atol=args.tol).to_dict(),
            "notes": notes,
            "total_seconds": time.perf_counter() - start,
        },
        out,
    )
    plot(rows, out / "discrete_vs_continuous.png")
    return rows


if __name__ == "__main__":
    main()
