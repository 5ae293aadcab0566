"""VAEs with flow posteriors on binarised 8x8 digits, with a 2-D latent space to look at.

For each posterior family (diagonal Gaussian, amortised planar, IAF if zuko imports, amortised
CNF) a VAE with a 2-D latent space is trained on the dynamically binarised digits (scikit-learn's
copy of the UCI digits, CC BY 4.0) for the same number of steps (capped in seconds). Then:

* ``reconstructions.png``: test images and their reconstructions E[x | z], z ~ q(z | x);
* ``samples.png``: E[x | z] for z drawn from the prior, per family;
* ``posteriors.png``: for a few test images, each family's q(z | x) beside its model's true
  posterior p(z | x), which is known up to its normaliser in 2-D (p(x | z) p(z) on a grid, the
  normaliser log p(x) by quadrature), with KL(q || p) by Monte Carlo over z ~ q; ``summary.json``
  also has each family's mean KL over ``--kl-images`` test images (default all 180), a steadier
  ranking than the few drawn, split into the family's approximation gap (the KL left when each
  image's q is refined on its own) and the encoder's amortisation gap (Cremer et al. 2018).

    python examples/vae.py           # about 7 minutes on one core
    python examples/vae.py --quick   # a few seconds
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cnf import Solver
from cnf.data.binarized import load_binarized
from cnf.threads import torch_threads
from cnf.training import train
from cnf.vae import VAE
from cnf.vae.evaluate import (
    evaluate_vae,
    grid_log_evidence,
    grid_posterior,
    inference_gaps,
    kl_to_true_posterior,
    mean_and_two_se,
)
from cnf.vae.plots import plot_image_rows, plot_posteriors


def families() -> list[str]:
    try:
        import zuko  # noqa: F401
    except ImportError:
        return ["gaussian", "planar", "cnf"]
    return ["gaussian", "planar", "iaf", "cnf"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train one 2-D-latent VAE per posterior family, draw the figures into ``--out`` and return
    the test bounds and the KL(q || p) of each family on the chosen test images."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/examples/vae", help="output folder")
    parser.add_argument("--iters", type=int, default=2000, help="training steps of each VAE")
    parser.add_argument("--seconds", type=float, default=300.0, help="training time cap of each VAE")
    parser.add_argument("--images", type=int, default=4, help="test images whose posteriors are drawn")
    parser.add_argument("--kl-images", type=int, default=None, help="test images of the mean KL (default all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models and grids (seconds)")
    args = parser.parse_args(argv)
    if args.kl_images is not None and args.kl_images < 1:
        parser.error(f"--kl-images must be a positive number of test images, got {args.kl_images}")
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    data = load_binarized("digits", seed=args.seed, n_train=300 if quick else None)
    shown = data.test[: args.images]
    resolution, samples = (24, 200) if quick else (120, 5000)
    reconstructions: dict[str, torch.Tensor] = {"test images": shown}
    prior_samples: dict[str, torch.Tensor] = {}
    panels, kls, summary = {}, {}, {"iters": args.iters, "seconds_cap": args.seconds, "families": {}}
    for family in families():
        torch.manual_seed(args.seed)
        vae = VAE(64, 2, family, hidden=(32,) if quick else (128, 128), flow_hidden=(8,) if quick else (64, 64),
                  layers=(2 if family == "iaf" else 4) if quick else (4 if family == "iaf" else 16),
                  solver=Solver(rtol=1e-4, atol=1e-4))  # fmt: skip
        result = train(
            vae, data.train, data.val, objective="elbo", iters=args.iters, time_limit=0.5 if quick else args.seconds,
            lr=1e-3, lr_schedule="cosine", batch_size=100, kl_warmup=20 if quick else 500,
            val_every=10 if quick else 100, patience=None if quick else 10, seed=args.seed, progress=False,
            lr_horizon=math.inf,  # the schedule follows the steps alone (the cap only stops), so runs repeat exactly
        )  # fmt: skip
        vae.eval()
        metrics = evaluate_vae(vae, data.test, k=10 if quick else 1000, seed=args.seed)
        with torch.no_grad():
            torch.manual_seed(args.seed)
            reconstructions[family] = vae.reconstruct(shown)
            prior_samples[family] = vae.sample(8)
        panels[family] = grid_posterior(vae, shown, bound=4.0, resolution=resolution)
        kls[family], two_se = kl_to_true_posterior(vae, shown, panels[family]["log_evidence"], samples=samples)
        scored = data.test[: args.kl_images or (8 if quick else None)]
        log_evidence = grid_log_evidence(vae, scored, bound=4.0, resolution=resolution)
        gaps = inference_gaps(vae, scored, log_evidence, samples=samples // 5, steps=20 if quick else 300)
        kl_test, kl_test_two_se = mean_and_two_se(gaps["kl"])
        axis = panels[family]["axis"]
        cell = (axis[:, 1, 0] - axis[:, 0, 0]) * (axis[:, 1, 1] - axis[:, 0, 1])
        q_mass = panels[family]["log_q"].exp().sum(1) * cell  # ~1 when the grid holds q's mass
        summary["families"][family] = {
            "steps": result.step,
            "train_seconds": result.seconds,
            "test_elbo": metrics["elbo"],
            "test_iwae": metrics["iwae"],
            "iwae_k": metrics["k"],
            "kl_q_to_true_posterior": kls[family].tolist(),
            "kl_two_se": two_se.tolist(),
            "mean_kl": float(kls[family].mean()),
            "kl_images": scored.shape[0],
            "mean_kl_test": kl_test,
            "mean_kl_test_two_se": kl_test_two_se,
            "approximation_gap": mean_and_two_se(gaps["approximation"]),
            "amortisation_gap": mean_and_two_se(gaps["amortisation"]),
            "q_mass_on_grid": q_mass.tolist(),
        }
        print(family, {k: v for k, v in summary["families"][family].items() if k != "kl_two_se"}, flush=True)
    plot_image_rows(reconstructions, data.shape, out / "reconstructions.png", "test images and reconstructions")
    plot_image_rows(prior_samples, data.shape, out / "samples.png", "E[x | z], z ~ p(z)")
    plot_posteriors(panels, kls, out / "posteriors.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
