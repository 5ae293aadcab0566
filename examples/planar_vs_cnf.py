"""Planar flows with K = 2, 8, 32 layers against a CNF, on the same data.

A planar layer is one forward-Euler step of a velocity field (seed notes, "Continuous
Normalizing Flows"); more layers make a finer, more expressive discretisation, and the CNF is
the continuous limit with a free-form field. One figure shows the four fitted densities with
their test NLL in the titles, next to the data (Rezende & Mohamed 2015; Chen et al. 2018).

    python examples/planar_vs_cnf.py                      # about 2 minutes on 2 CPU cores
    python examples/planar_vs_cnf.py --data 8gaussians
    python examples/planar_vs_cnf.py --quick              # a few seconds
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import cnf
from cnf import plots
from cnf.data import TOY_DATASETS, sample_toy
from cnf.threads import torch_threads


def fit_flows(
    name: str,
    layers: Sequence[int] = (2, 8, 32),
    *,
    cnf_seconds: float = 50.0,
    planar_seconds: float = 40.0,
    quick: bool = False,
    seed: int = 0,
    out: Path | None = None,
) -> tuple[dict[str, torch.nn.Module], dict[str, float], torch.Tensor]:
    """Train one planar flow per K in ``layers`` and a CNF on dataset ``name``.

    ``planar_seconds`` is shared by the planar flows in proportion to sqrt(K) (a step costs
    about K layers). Returns ``(flows, test_nll, test_data)``, dicts keyed "planar K=..." and
    "CNF".
    """
    data = sample_toy(name, 2_000 if quick else 20_000, seed=seed)
    val = sample_toy(name, 500 if quick else 2_000, seed=seed + 1)
    test = sample_toy(name, 500 if quick else 5_000, seed=seed + 2)
    common = {"lr": 5e-3, "batch_size": 512, "progress": None}
    flows: dict[str, torch.nn.Module] = {}
    shares = [math.sqrt(k) for k in layers]
    for k, share in zip(layers, shares):
        torch.manual_seed(seed)
        flows[f"planar K={k}"] = planar = cnf.PlanarFlow(2, layers=k)
        run = out / f"planar_{k}" if out is not None else None
        cnf.train(
            planar,
            data,
            val,
            iters=5 if quick else 20_000,
            time_limit=planar_seconds * share / sum(shares),
            out=run,
            **common,
        )
    torch.manual_seed(seed)
    hidden = (16, 16) if quick else (64, 64, 64)
    tolerance = 1e-3 if quick else 1e-5
    flows["CNF"] = flow = cnf.CNF(
        cnf.MLPField(2, hidden=hidden), solver=cnf.Solver(rtol=tolerance, atol=tolerance)
    )
    run = out / "cnf" if out is not None else None
    cnf.train(flow, data, val, iters=3 if quick else 10_000, time_limit=cnf_seconds, out=run, **common)
    test_nll = {key: cnf.evaluate_nll(model, test) for key, model in flows.items()}
    flow.solver = flow.solver.with_(rtol=1e-4, atol=1e-4)  # plots: looser and faster
    return flows, test_nll, test


def plot_comparison(
    flows: dict[str, torch.nn.Module], test_nll: dict[str, float], test: torch.Tensor, **kwargs: Any
) -> Any:
    """The figure: one density panel per flow titled with its test NLL, and the data."""
    models = {f"{key}\ntest NLL {test_nll[key]:.3f}": model for key, model in flows.items()}
    return plots.plot_densities(models, data=test, bounds=plots.default_bounds(data=test), **kwargs)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Fit the four flows, write ``planar_vs_cnf.png`` into ``--out`` and return the test NLLs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/examples/planar_vs_cnf", help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest here)")
    parser.add_argument("--quick", action="store_true", help="a few iterations and small grids (seconds)")
    parser.add_argument("--data", default="moons", choices=TOY_DATASETS)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32], help="planar K values")
    parser.add_argument("--cnf-seconds", type=float, default=50.0, help="training time of the CNF")
    parser.add_argument(
        "--planar-seconds", type=float, default=40.0, help="training time of all planar flows together"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # One torch thread: these small 2-D problems gain nothing from more, and on shared
    # cores torch's threads slow a training step down tenfold (measured).
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, float]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flows, test_nll, test = fit_flows(
        args.data,
        args.layers,
        cnf_seconds=args.cnf_seconds,
        planar_seconds=args.planar_seconds,
        quick=args.quick,
        seed=args.seed,
        out=out,
    )
    title = f"{args.data}: discrete planar flows against a continuous flow"
    plot_comparison(
        flows,
        test_nll,
        test,
        resolution=24 if args.quick else 100,
        title=title,
        path=out / "planar_vs_cnf.png",
    )
    (out / "summary.json").write_text(json.dumps(test_nll, indent=2))
    print("test NLL (nats): " + ", ".join(f"{key} {value:.4f}" for key, value in test_nll.items()))
    print(f"figure in {out / 'planar_vs_cnf.png'}")
    return test_nll


if __name__ == "__main__":
    main()
