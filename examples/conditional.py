"""Conditional flows p(x | c): one CNF, a density per context.

1. A mixture whose weights, widths and means move with a scalar c (cnf.data.conditional): a
   conditional CNF trained by flow matching, drawn as a row of p(x | c) for several c above
   the true densities, with the conditional test NLL against the truth.
2. Class-conditional digits (scikit-learn's 8x8 digits, BSD licence, bundled with
   scikit-learn): c is the one-hot class, a fifth of the rows also seen with a null context,
   samples drawn one row per class with classifier-free guidance (cnf.guidance).

    python examples/conditional.py           # about 3 minutes on 2 CPU cores
    python examples/conditional.py --quick   # a few seconds
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

import cnf
from cnf import plots
from cnf.data.conditional import conditional_log_prob, sample_conditional
from cnf.guidance import GuidedField, with_null_contexts
from cnf.threads import torch_threads


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit the two conditional flows, write the figures into ``--out`` and return the NLLs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/examples/conditional", help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="a few iterations and small grids (seconds)")
    parser.add_argument("--seconds", type=float, default=60.0, help="training time of each flow")
    parser.add_argument("--no-digits", dest="digits", action="store_false", help="skip the digits")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight w")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = mixture(args, out)
        if args.digits:
            summary.update(digits(args, out))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def mixture(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    quick = args.quick
    x, c = sample_conditional("mixture", 2_000 if quick else 50_000, seed=args.seed)
    test_x, test_c = sample_conditional("mixture", 300 if quick else 5_000, seed=args.seed + 1)
    torch.manual_seed(args.seed)
    field = cnf.MLPField(2, hidden=(16, 16) if quick else (64, 64, 64), context_dim=1)
    tolerance = 1e-3 if quick else 1e-5
    flow = cnf.CNF(field, solver=cnf.Solver(rtol=tolerance, atol=tolerance))
    cnf.train(
        flow, x, context=c, objective="flow_matching", iters=20 if quick else 10**9, lr=1e-3,
        lr_schedule="cosine", time_limit=args.seconds, batch_size=512, progress=None,
    )  # fmt: skip
    truth = conditional_log_prob("mixture", test_x.double(), test_c.double())
    contexts = [[-0.9], [-0.3], [0.3], [0.9]]
    fig = plots.plot_conditional_densities(
        flow,
        contexts,
        true_log_prob=lambda x, c: conditional_log_prob("mixture", x, c),
        bounds=(-3.5, 3.5, -2.5, 2.5),
        resolution=24 if quick else 100,
        path=out / "conditional_densities.png",
    )
    return {
        "mixture_test_nll": cnf.evaluate_nll(flow, test_x, context=test_c),
        "mixture_true_nll": -truth.mean().item(),
        "grid_masses": fig.masses,
    }


def digits(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Class-conditional 8x8 digits: pixels 0..16 dequantised and scaled to about [-1, 1]."""
    from sklearn.datasets import load_digits

    quick = args.quick
    images, labels = load_digits(return_X_y=True)
    rng = np.random.default_rng(args.seed)
    x = torch.as_tensor((images + rng.uniform(size=images.shape)) / 8.5 - 1.0, dtype=torch.float32)
    c = torch.nn.functional.one_hot(torch.as_tensor(labels), 10).float()
    x, c = with_null_contexts(x, c, rate=0.2, generator=torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)
    field = cnf.MLPField(64, hidden=(64,) if quick else (256, 256, 256), activation="silu", context_dim=10)
    flow = cnf.CNF(field, solver=cnf.Solver(method="rk4", step_size=0.25 if quick else 0.05))
    cnf.train(
        flow, x, context=c, objective="flow_matching", iters=20 if quick else 10**9, lr=1e-3,
        lr_schedule="cosine", time_limit=args.seconds, batch_size=256, progress=None,
    )  # fmt: skip
    per_class = 2 if quick else 8
    guided = cnf.CNF(GuidedField(field, weight=args.guidance), solver=flow.solver)
    with torch.no_grad():
        samples = guided.sample(per_class, context=torch.eye(10))  # (per_class, 10, 64)
    grid = samples.clamp(-1, 1).permute(1, 0, 2).reshape(10, per_class, 8, 8).numpy()
    fig = Figure(figsize=(per_class * 0.6, 10 * 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(10, per_class, squeeze=False)
    for row in range(10):
        for col in range(per_class):
            axes[row, col].imshow(grid[row, col], cmap="gray_r", vmin=-1, vmax=1)
            axes[row, col].set_axis_off()
    fig.savefig(out / "digits_by_class.png", dpi=100)
    return {"digits_samples_shape": list(samples.shape)}


if __name__ == "__main__":
    main()
