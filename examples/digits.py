"""Digits: a CNF on scikit-learn's 8x8 handwritten digits, its samples and its anomaly scores.

Fits a CNF to the training split of ``digits`` (64 dimensions, pixel values 0..16) behind the
preprocessing ``cnf train`` chooses (dequantise, logit, standardise), then

* reports the test NLL in the data's units and in bits/dim (exact divergence, tight tolerance);
* draws a grid of samples beside real test digits, with each sample's nearest training image
  and its distance: samples much closer to the training set than test digits are would be
  memorised, so the median nearest-neighbour distances of samples and of test digits are printed;
* scores rotated (90 degrees) and noisy (Gaussian noise of 4 levels, rounded and clipped) test
  digits against clean ones: a likelihood p-value against the validation digits
  (:func:`cnf.anomaly.p_values`) and the ROC AUC of -log p (:func:`cnf.anomaly.roc_auc`).

    python examples/digits.py                 # about 3 minutes on 2 CPU cores
    python examples/digits.py --quick         # a few seconds

Writes digits_samples.png, digits_anomaly.png and metrics.json into --out.
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
from cnf.anomaly import p_values, roc_auc
from cnf.data.real import load_real
from cnf.recipes import default_objective, exact_evaluation, model_recipe, recipe
from cnf.threads import torch_threads
from cnf.transforms import TransformedFlow, bits_per_dim, choose_preprocessing

SIDE = 8
LEVELS = 17


def rotated(images: np.ndarray) -> np.ndarray:
    """Each 8x8 digit turned by 90 degrees (still a valid image on the same grid)."""
    return np.rot90(images.reshape(-1, SIDE, SIDE), k=1, axes=(1, 2)).reshape(-1, SIDE * SIDE).copy()


def noisy(images: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Gaussian noise of ``scale`` levels, rounded and clipped to 0..16."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(images + rng.normal(scale=scale, size=images.shape)), 0, LEVELS - 1)


def log_density(flow: TransformedFlow, images: np.ndarray, seed: int) -> np.ndarray:
    """log p(x) in pixel units, scored exactly (exact divergence at the evaluation tolerance)."""
    with torch.no_grad(), exact_evaluation(flow):
        x = torch.as_tensor(images, dtype=torch.float32)
        return flow.log_prob(x, generator=torch.Generator().manual_seed(seed)).double().numpy()


def draw_samples(
    path: Path, real: np.ndarray, samples: np.ndarray, nearest: np.ndarray, distance: np.ndarray
) -> None:
    columns = samples.shape[0]
    fig = Figure(figsize=(1.1 * columns, 3.9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, columns)
    rows = (("test digits", real), ("CNF samples", samples), ("nearest training", nearest))
    for r, (title, images) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.imshow(images[c].reshape(SIDE, SIDE), cmap="gray_r", vmin=0, vmax=LEVELS - 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=7)
            if r == 2:
                ax.set_xlabel(f"d={distance[c]:.0f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def draw_anomalies(path: Path, scores: dict[str, np.ndarray], aucs: dict[str, float]) -> None:
    fig = Figure(figsize=(6.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = np.concatenate([s[np.isfinite(s)] for s in scores.values()])
    bins = np.linspace(np.percentile(finite, 1), finite.max(), 40)
    for name, values in scores.items():
        label = name if name == "clean" else f"{name} (ROC AUC {aucs[name]:.3f})"
        ax.hist(np.clip(values, bins[0], None), bins=bins, alpha=0.5, label=label)
    ax.set_xlabel("log p(x) (nats, pixel units)")
    ax.set_ylabel("test digits")
    ax.set_title("Anomaly scores of clean, rotated and noisy digits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=120.0, help="training wall-clock budget")
    parser.add_argument(
        "--objective", default=None, choices=("likelihood", "ot_flow_matching"), help="default: the recipe's"
    )
    parser.add_argument("--noise", type=float, default=4.0, help="noise scale (levels) of the noisy digits")
    parser.add_argument("--alpha", type=float, default=0.05, help="p-value threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/digits")
    parser.add_argument("--quick", action="store_true", help="a few seconds, tiny model (for the tests)")
    args = parser.parse_args(argv)
    with torch_threads(1):
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_real("digits")
    preprocess, notes = choose_preprocessing(data.train, levels=data.levels)
    for note in notes:
        print(f"preprocessing: {note}")
    torch.manual_seed(args.seed)
    # The recipe `cnf train --data digits` uses (cnf.recipes, by dimension), smaller in --quick.
    objective = args.objective or default_objective(data.dim, "tabular")
    model = model_recipe(data.dim, "tabular", dequantized=True)
    hidden = (16, 16) if args.quick else tuple(model["hidden"])
    solver = cnf.Solver(method=model["method"], rtol=model["rtol"], atol=model["atol"])
    field = cnf.MLPField(data.dim, hidden=hidden, activation=model["activation"], time_embedding=model["time_embedding"])
    inner = cnf.CNF(field, divergence=model["divergence"], noise=model["noise"], solver=solver)
    flow = TransformedFlow(inner, preprocess)
    settings = recipe(objective, data.dim, "tabular", time_limit=args.seconds)
    if args.quick:
        settings.update(iters=3, time_limit=None)
    result = cnf.train(flow, data.train, data.val, **settings, progress=None)

    test = data.test.numpy()
    test = data.test.numpy()
    clean = log_density(flow, test, args.seed)
    test_nll = float(-clean.mean())
    bpd = float(bits_per_dim(torch.tensor(clean.mean()), data.dim, flow.bin_width))
    print(
        f"trained {result.step} steps in {result.seconds:.0f} s; test NLL {test_nll:.2f} nats, {bpd:.3f} bits/dim"
    )

    columns = 6 if args.quick else 12
    with torch.no_grad():
        samples = flow.sample(columns, generator=torch.Generator().manual_seed(args.seed)).numpy()
    tree = cKDTree(data.train.numpy())
    sample_distance, index = tree.query(samples)
    test_distance, _ = tree.query(test)
    draw_samples(
        out / "digits_samples.png", test[:columns], samples, data.train.numpy()[index], sample_distance
    )

    calibration = log_density(flow, data.val.numpy(), args.seed + 1)
    scores = {
        "clean": clean,
        "rotated": log_density(flow, rotated(test), args.seed),
        "noisy": log_density(flow, noisy(test, args.noise, args.seed), args.seed),
    }
    metrics: dict[str, Any] = {
        "steps": result.step,
        "train_seconds": result.seconds,
        "test_nll": test_nll,
        "test_bits_per_dim": bpd,
        "median_nn_distance_samples": float(np.median(sample_distance)),
        "median_nn_distance_test": float(np.median(test_distance)),
        "alpha": args.alpha,
        "false_positive_rate": float((p_values(clean, calibration) < args.alpha).mean()),
    }
    aucs = {}
    for name in ("rotated", "noisy"):
        labels = np.concatenate([np.zeros(len(clean), dtype=int), np.ones(len(scores[name]), dtype=int)])
        both = np.concatenate([clean, scores[name]])
        aucs[name] = roc_auc(-np.nan_to_num(both, nan=-np.inf), labels)
        metrics[f"roc_auc_{name}"] = aucs[name]
        metrics[f"true_positive_rate_{name}"] = float(
            (p_values(scores[name], calibration) < args.alpha).mean()
        )
    draw_anomalies(out / "digits_anomaly.png", scores, aucs)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(
        f"nearest training image: median distance {metrics['median_nn_distance_samples']:.1f} for samples, "
        f"{metrics['median_nn_distance_test']:.1f} for test digits\n"
        f"ROC AUC rotated {aucs['rotated']:.3f}, noisy {aucs['noisy']:.3f}; at p < {args.alpha:g}: "
        f"false-positive rate {metrics['false_positive_rate']:.3f}, true-positive rates "
        f"{metrics['true_positive_rate_rotated']:.3f} (rotated), {metrics['true_positive_rate_noisy']:.3f} (noisy)\n"
        f"figures in {out}"
    )
    return metrics


if __name__ == "__main__":
    main()
