"""Images: fit a CNF to scikit-learn's 8x8 digits, score it in bits/dim, draw three pictures.

The integer images (17 grey levels) are dequantised and logit-transformed inside the model
(:func:`cnf.images.image_flow`), so the test score is the bits per dimension of the discrete
digits. The pictures: samples beside real digits, the probability path as images at
t = 0, 0.25, 0.5, 0.75, 1 (the same base draws carried along the flow), and latent
interpolation between two test digits, linear and spherical. Nearest-neighbour distances say
whether the samples are copies of training images.

    python examples/images.py                 # about 3 minutes on one thread
    python examples/images.py --quick         # a few seconds
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import cnf
from cnf import image_plots
from cnf.data.images import load_digits_images
from cnf.images import (
    IMAGE_RECIPE,
    evaluate_bits_per_dim,
    image_flow,
    image_model,
    nearest_neighbour_distances,
    set_solver,
)
from cnf.threads import torch_threads


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train on digits, write the pictures into ``--out`` and return the scores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/examples/images", help="output folder")
    parser.add_argument("--seconds", type=float, default=100.0, help="training time")
    parser.add_argument("--objective", default=IMAGE_RECIPE.objective, help="training objective")
    parser.add_argument("--model", default=None, help="unet (default), cnf (conv field) or multiscale")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on shared cores)")
    parser.add_argument("--quick", action="store_true", help="a few iterations on a tiny model (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits_images(seed=args.seed)
    quick = args.quick
    test = digits.test[:16] if quick else digits.test

    torch.manual_seed(args.seed)
    hidden = (4,) if quick else None  # None: the recipe's channels for the model
    train_solver = cnf.Solver(method="rk4", step_size=0.5) if quick else IMAGE_RECIPE.train_solver
    flow = image_flow(digits.shape, digits.levels, model=args.model, hidden=hidden, solver=train_solver)
    result = cnf.train(
        flow,
        digits.train,
        digits.val,
        settings=cnf.TrainSettings(
            **{
                **IMAGE_RECIPE.train_settings(digits.shape, args.objective, args.seconds),
                "iters": 3 if quick else None,
                "val_every": 10**9,
            }
        ),
        out=out,
        progress=None,
    )
    set_solver(flow, cnf.Solver(rtol=1e-3, atol=1e-3) if quick else IMAGE_RECIPE.eval_solver)
    flow.eval()
    score = evaluate_bits_per_dim(flow, test, generator=torch.Generator().manual_seed(1))

    generator = torch.Generator().manual_seed(args.seed)
    n = 9 if quick else 64
    image_plots.plot_samples_and_data(flow, digits.test, n, generator=generator, path=out / "samples.png")
    image_plots.plot_image_path(flow, 4 if quick else 8, generator=generator, path=out / "path.png")
    # two test digits of different classes
    first = digits.test[0]
    second = digits.test[int((digits.test_labels != digits.test_labels[0]).nonzero()[0, 0])]
    image_plots.plot_interpolation(flow, first, second, 5 if quick else 9, path=out / "interpolation.png")

    with torch.no_grad():
        samples = flow.sample(n, generator=generator)
    sample_nn = nearest_neighbour_distances(samples, digits.train)
    test_nn = nearest_neighbour_distances(test, digits.train)
    summary = {
        "steps": result.step,
        "train_seconds": round(result.seconds, 1),
        "objective": args.objective,
        "model": image_model(flow),
        "test_bits_per_dim": score.mean,
        "test_bits_per_dim_2se": 2 * score.se,
        "test_nfe": score.nfe,
        "sample_nn_distance_median": float(sample_nn.median()),
        "test_nn_distance_median": float(test_nn.median()),
        "samples_equal_to_a_training_image": int((sample_nn == 0).sum()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
