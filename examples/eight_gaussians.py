"""Eight Gaussians: a CNF splits one Gaussian into eight modes (a multimodal target).

The 8gaussians density is known in closed form, so the fitted density is drawn next to the
true one, and the test NLL can be compared with the data's entropy (the best achievable NLL).
Figures: the probability path, trajectories (the base splits into eight streams), the velocity
field, model versus true density, the training curves and a GIF of the path (FFJORD's
benchmark, Grathwohl et al. 2019).

    python examples/eight_gaussians.py           # about 2 minutes on 2 CPU cores
    python examples/eight_gaussians.py --quick   # a few seconds
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
from cnf.data import eight_gaussians_log_prob, sample_toy
from cnf.threads import torch_threads


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit a CNF to 8gaussians, write the figures into ``--out`` and return the NLLs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/examples/eight_gaussians", help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest here)")
    parser.add_argument("--quick", action="store_true", help="a few iterations and small grids (seconds)")
    parser.add_argument("--seconds", type=float, default=75.0, help="training time of the CNF")
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
    data = sample_toy("8gaussians", 2_000 if quick else 20_000, seed=args.seed)
    val = sample_toy("8gaussians", 500 if quick else 2_000, seed=args.seed + 1)
    test = sample_toy("8gaussians", 500 if quick else 5_000, seed=args.seed + 2)
    torch.manual_seed(args.seed)
    hidden = (16, 16) if quick else (64, 64, 64)
    tolerance = 1e-3 if quick else 1e-5
    flow = cnf.CNF(cnf.MLPField(2, hidden=hidden), solver=cnf.Solver(rtol=tolerance, atol=tolerance))
    cnf.train(
        flow,
        data,
        val,
        iters=3 if quick else 10_000,
        lr=5e-3,
        batch_size=512,
        time_limit=args.seconds,
        progress=None,
        out=out / "cnf",
    )
    with torch.no_grad():
        entropy = -eight_gaussians_log_prob(test.double()).mean().item()
    summary = {"cnf_test_nll": cnf.evaluate_nll(flow, test), "true_test_nll": entropy}

    flow.solver = flow.solver.with_(rtol=1e-4, atol=1e-4)  # plots: looser and faster
    grid = {"bounds": plots.default_bounds(data=test), "resolution": 24 if quick else 100}
    n = 60 if quick else 500
    plots.plot_probability_path(flow, data=test, path=out / "probability_path.png", **grid)
    plots.plot_trajectories(flow, n, path=out / "trajectories.png", **grid)
    plots.plot_velocity_field(flow, (0.0, 0.5, 1.0), path=out / "velocity_field.png", **grid)
    models = {
        f"CNF, test NLL {summary['cnf_test_nll']:.3f}": flow,
        f"true density, NLL {entropy:.3f}": eight_gaussians_log_prob,
    }
    plots.plot_densities(models, data=test, path=out / "model_vs_true.png", **grid)
    plots.plot_training_curves(out / "cnf" / "train_log.jsonl", path=out / "training_curves.png")
    plots.animate_path(
        flow,
        out / "probability_path.gif",
        frames=3 if quick else 20,
        n=n,
        data=test,
        bounds=grid["bounds"],
        resolution=20 if quick else 60,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"8gaussians: CNF test NLL {summary['cnf_test_nll']:.4f} (true density: {entropy:.4f})")
    print(f"figures in {out}")
    return summary


if __name__ == "__main__":
    main()
