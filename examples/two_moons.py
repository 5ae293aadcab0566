"""Two moons, the tutorial's example: a CNF and a planar flow, their paths and trajectories.

The base Gaussian is carried to the two-moons data by a continuous normalizing flow and by a
planar flow with K layers. The figures show both probability paths, the samples' trajectories,
the CNF's velocity field, and the planar flow's K intermediate distributions next to the CNF's
p_t at t = k/K, with the extra panel t = 1.5/K that answers the tutorial's "what would z_1.5
be?" (Lenain, "Normalizing flows in PyTorch"; Rezende & Mohamed 2015; Grathwohl et al. 2019).

    python examples/two_moons.py                 # about 2 minutes on 2 CPU cores
    python examples/two_moons.py --quick         # a few seconds
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import cnf
from cnf import plots
from cnf.data import sample_toy
from cnf.threads import torch_threads


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit both flows to two moons, write the figures into ``--out`` and return the test NLLs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/examples/two_moons", help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest here)")
    parser.add_argument("--quick", action="store_true", help="a few iterations and small grids (seconds)")
    parser.add_argument("--seconds", type=float, default=45.0, help="training time of the CNF")
    parser.add_argument("--layers", type=int, default=8, help="planar layers K")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # One torch thread: these small 2-D problems gain nothing from more, and on shared
    # cores torch's threads slow a training step down tenfold (measured).
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    quick = args.quick
    n_train = 2_000 if quick else 20_000
    data = sample_toy("moons", n_train, seed=args.seed)
    val = sample_toy("moons", 500 if quick else 2_000, seed=args.seed + 1)
    test = sample_toy("moons", 500 if quick else 5_000, seed=args.seed + 2)

    torch.manual_seed(args.seed)
    hidden = (16, 16) if quick else (64, 64, 64)
    tolerance = 1e-3 if quick else 1e-5
    flow = cnf.CNF(cnf.MLPField(2, hidden=hidden), solver=cnf.Solver(rtol=tolerance, atol=tolerance))
    planar = cnf.PlanarFlow(2, layers=args.layers)
    common = {"lr": 5e-3, "batch_size": 512, "progress": None, "val_every": 100}
    cnf.train(
        flow, data, val, iters=3 if quick else 10_000, time_limit=args.seconds, out=out / "cnf", **common
    )
    cnf.train(planar, data, val, iters=5 if quick else 2_000, time_limit=15.0, out=out / "planar", **common)

    summary = {
        "cnf_test_nll": cnf.evaluate_nll(flow, test),
        "planar_test_nll": cnf.evaluate_nll(planar, test),
        "planar_layers": args.layers,
    }
    flow.solver = flow.solver.with_(rtol=1e-4, atol=1e-4)  # plots: looser and faster
    grid = {"bounds": plots.default_bounds(data=test), "resolution": 24 if quick else 64}
    n = 60 if quick else 400
    # The CNF: path, trajectories, velocity field, GIF, training curves, and the planar flow's
    # layers against the CNF's p_t at t = k/K with the extra panel t = 1.5/K.
    plots.plot_all(
        flow,
        out / "cnf",
        data=test,
        log=out / "cnf" / "train_log.jsonl",
        animate=True,
        frames=5 if quick else 17,
        planar=planar,
        title=f"CNF, test NLL {summary['cnf_test_nll']:.3f}",
        **grid,
    )
    planar_title = f"planar K={args.layers}, test NLL {summary['planar_test_nll']:.3f}"
    plots.plot_probability_path(
        planar, data=test, title=planar_title, path=out / "planar" / "probability_path.png", **grid
    )
    plots.plot_trajectories(planar, n, title=planar_title, path=out / "planar" / "trajectories.png", **grid)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"two moons: CNF test NLL {summary['cnf_test_nll']:.4f}, planar (K={args.layers}) {summary['planar_test_nll']:.4f}"
    )
    print(f"figures in {out / 'cnf'} and {out / 'planar'}")
    return summary


if __name__ == "__main__":
    main()
