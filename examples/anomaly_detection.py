"""Anomaly detection with a flow: a likelihood p-value for every new point.

A normalizing flow fitted to normal data gives its density p(x); a new point x gets the
p-value "fraction of held-out normal points whose density is lower than p(x)" (seed lecture
12: "one can associate a likelihood p-value to a given event"). Small p-values flag anomalies.
The example plants anomalies away from the normal data, reports the ROC AUC of the p-value
(computed from rank statistics, the Mann-Whitney U), the false- and true-positive rates at
p < 0.05, and draws the p-value map with the 0.05 and 0.01 contours.

    python examples/anomaly_detection.py                  # about 1.5 minutes on 2 CPU cores
    python examples/anomaly_detection.py --model planar   # the discrete baseline
    python examples/anomaly_detection.py --quick          # a few seconds
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.spatial import cKDTree

import cnf
from cnf import plots
from cnf.anomaly import p_values, roc_auc
from cnf.data import TOY_DATASETS, sample_toy
from cnf.threads import torch_threads


def plant_anomalies(
    normal: np.ndarray, n: int, bounds: Sequence[float], min_distance: float, seed: int
) -> np.ndarray:
    """``n`` points uniform in ``bounds`` and at least ``min_distance`` from every normal point."""
    rng = np.random.default_rng(seed)
    tree = cKDTree(normal)
    found: list[np.ndarray] = []
    while sum(len(f) for f in found) < n:
        candidates = rng.uniform(bounds[::2], bounds[1::2], size=(4 * n, 2))
        distance, _ = tree.query(candidates)
        found.append(candidates[distance >= min_distance])
    return np.concatenate(found)[:n]


def log_density(flow: torch.nn.Module, points: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        dtype = next(flow.parameters()).dtype
        return flow.log_prob(torch.as_tensor(points, dtype=dtype)).double().numpy()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit a flow to normal data, score planted anomalies, write the score map; return metrics."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/examples/anomaly_detection", help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest here)")
    parser.add_argument("--quick", action="store_true", help="a few iterations and small grids (seconds)")
    parser.add_argument("--data", default="moons", choices=TOY_DATASETS, help="the normal data")
    parser.add_argument("--model", default="cnf", choices=("cnf", "planar"))
    parser.add_argument("--seconds", type=float, default=60.0, help="training time")
    parser.add_argument("--anomalies", type=int, default=200, help="number of planted anomalies")
    parser.add_argument(
        "--min-distance",
        type=float,
        default=0.3,
        help="planted anomalies lie this far from every normal point",
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="flag points with p-value < alpha")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # One torch thread: these small 2-D problems gain nothing from more, and on shared
    # cores torch's threads slow a training step down tenfold (measured).
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if not 0 < args.alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {args.alpha!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick

    train = sample_toy(args.data, 2_000 if quick else 20_000, seed=args.seed)
    val = sample_toy(args.data, 500 if quick else 2_000, seed=args.seed + 1)
    calibration = sample_toy(args.data, 500 if quick else 2_000, seed=args.seed + 2)
    normal_test = sample_toy(args.data, 300 if quick else 1_000, seed=args.seed + 3)
    torch.manual_seed(args.seed)
    if args.model == "planar":
        flow: torch.nn.Module = cnf.PlanarFlow(2, layers=32)
    else:
        tolerance = 1e-3 if quick else 1e-5
        field = cnf.MLPField(2, hidden=(16, 16) if quick else (64, 64, 64))
        flow = cnf.CNF(field, solver=cnf.Solver(rtol=tolerance, atol=tolerance))
    iters = (3 if args.model == "cnf" else 5) if quick else 10_000
    cnf.train(
        flow,
        train,
        val,
        iters=iters,
        lr=5e-3,
        batch_size=512,
        time_limit=args.seconds,
        progress=None,
        out=out / "flow",
    )
    if isinstance(flow, cnf.CNF):
        flow.solver = flow.solver.with_(rtol=1e-4, atol=1e-4)  # scoring and plots: looser, faster

    bounds = plots.default_bounds(data=train)
    anomalies = plant_anomalies(
        train.numpy(), args.anomalies, bounds, min_distance=args.min_distance, seed=args.seed + 4
    )
    points = np.concatenate([normal_test.numpy(), anomalies])
    labels = np.concatenate([np.zeros(len(normal_test), dtype=int), np.ones(len(anomalies), dtype=int)])
    reference = log_density(flow, calibration.numpy())
    scores = log_density(flow, points)
    p = p_values(scores, reference)
    flagged = p < args.alpha
    metrics = {
        "model": args.model,
        "data": args.data,
        "roc_auc_p_value": roc_auc(1.0 - p, labels),
        "roc_auc_log_density": roc_auc(-scores, labels),
        "alpha": args.alpha,
        "false_positive_rate": float(flagged[labels == 0].mean()),
        "true_positive_rate": float(flagged[labels == 1].mean()),
        "n_normal": int((labels == 0).sum()),
        "n_anomalies": int(labels.sum()),
    }

    xs, ys, density = plots.density_grid(flow, 1.0, bounds=bounds, resolution=30 if quick else 120)
    p_map = p_values(np.log(np.maximum(density, 1e-300)), reference).reshape(density.shape)
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_map, ax_roc = fig.subplots(1, 2, width_ratios=(1.5, 1))
    image = ax_map.imshow(
        p_map, origin="lower", extent=bounds, cmap="viridis", vmin=0, vmax=1, aspect="equal"
    )
    ax_map.contour(xs, ys, p_map, levels=[0.01, args.alpha], colors=["white", "orange"], linewidths=1)
    normal = labels == 0
    ax_map.scatter(*points[normal].T, s=3, color="white", alpha=0.6, label="normal (test)")
    ax_map.scatter(
        *points[~normal & flagged].T, s=14, marker="x", color="red", label=f"anomaly, p < {args.alpha:g}"
    )
    ax_map.scatter(*points[~normal & ~flagged].T, s=14, marker="x", color="cyan", label="anomaly, missed")
    ax_map.legend(loc="lower left", fontsize=7, framealpha=0.8)
    ax_map.set_title(
        f"p-value map of the {args.model.upper()} fitted to {args.data} (contours 0.01, {args.alpha:g})"
    )
    fig.colorbar(image, ax=ax_map, label="p-value", shrink=0.85)
    order = np.argsort(-(1.0 - p), kind="stable")
    tpr = np.concatenate([[0.0], np.cumsum(labels[order]) / labels.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(1 - labels[order]) / (1 - labels).sum()])
    ax_roc.plot(fpr, tpr, color="tab:red", label=f"p-value, AUC {metrics['roc_auc_p_value']:.3f}")
    ax_roc.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=0.8)
    ax_roc.set_xlabel("false-positive rate")
    ax_roc.set_ylabel("true-positive rate")
    ax_roc.set_title("ROC on planted anomalies")
    ax_roc.legend(loc="lower right", fontsize=8)
    ax_roc.grid(alpha=0.3)
    fig.savefig(out / "score_map.png", dpi=100)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(
        f"ROC AUC {metrics['roc_auc_p_value']:.4f} (p-value), {metrics['roc_auc_log_density']:.4f} (log density); "
        f"at p < {args.alpha:g}: false-positive rate {metrics['false_positive_rate']:.3f}, "
        f"true-positive rate {metrics['true_positive_rate']:.3f}"
    )
    print(f"figure in {out / 'score_map.png'}")
    return metrics


if __name__ == "__main__":
    main()
