"""Image flows at equal training budget: test bits/dim of cnf's image recipes and baselines.

    python -m benchmarks.images --data digits-images --budget 600   # 8x8 digits, 10 minutes in all
    python -m benchmarks.images --data fashion-mnist --device cuda  # 30 minutes in all (default)
    python -m benchmarks.images --quick                             # seconds (looser solvers, 10 samples); the tests

Models, each trained for the same share of ``--budget`` (training seconds; scoring comes on top
and is reported), all dequantised and logit-transformed inside the model so that every score
is the bits/dim of the same discrete test images:

* ``cnf-ml-multiscale``: multi-scale CNF, maximum likelihood, Hutchinson + RK4 (FFJORD / RNODE).
* ``cnf-ml``: one conv CNF on the image, the same objective and solver.
* ``cnf-rnode``: ``cnf-ml`` with RNODE's kinetic and Jacobian penalties (0.01 each).
* ``cnf-fm`` / ``cnf-otfm``: one conv CNF trained by (OT-)flow matching, no solve per step.
* ``gaussian-logit``: a full-covariance Gaussian fitted in logit space (closed form), with the
  logit's alpha chosen on the validation images from :data:`GAUSSIAN_ALPHAS` (the Gaussian's
  bits/dim moves by more than a bit per dimension with alpha on Fashion-MNIST).
* ``realnvp``: zuko's RealNVP coupling flow on the flattened logit images (a discrete flow;
  skipped when zuko is not installed).

CNFs are scored with dopri5 at rtol = atol = 1e-5 and one Hutchinson probe per image.
Writes benchmarks/results/images_<data>[_<tag>].{json,md}: test bits/dim with 2 standard errors,
training seconds and steps, NFE and seconds to score the test set and to sample 100 images,
parameters.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import write_results
from cnf.adapters import make_zuko_flow, zuko_available
from cnf.data.images import IMAGE_DATASETS, ImageSplits, load_images
from cnf.images import IMAGE_RECIPE, evaluate_bits_per_dim, image_flow, set_solver
from cnf.solver import Solver, SolveStats
from cnf.training import TrainSettings, train
from cnf.transforms import Compose, Dequantize, Logit, TransformedFlow
from cnf.transforms.flow import inner_flow

CNF_METHODS = {
    "cnf-ml-multiscale": ("multiscale", "likelihood", {}),
    "cnf-ml": ("cnf", "likelihood", {}),
    "cnf-rnode": ("cnf", "likelihood", {"kinetic_weight": 0.01, "jacobian_weight": 0.01}),
    "cnf-fm": ("cnf", "flow_matching", {}),
    "cnf-fm-unet": ("unet", "flow_matching", {}),
    "cnf-otfm": ("cnf", "ot_flow_matching", {}),
}
METHODS = (*CNF_METHODS, "gaussian-logit", "realnvp")


class Flattened(nn.Module):
    """A flow on flat vectors seen on images (n, C, H, W): ``log_prob`` / ``sample`` reshape."""

    def __init__(self, flow: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.flow, self.dim = flow, shape

    @property
    def stats(self) -> SolveStats:
        return self.flow.stats

    def log_prob(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.flow.log_prob(x.flatten(1))

    def sample(self, n: int, **_: Any) -> torch.Tensor:
        return self.flow.sample(n).reshape(n, *self.dim)


class LogitGaussian(nn.Module):
    """N(mean, cov) on the flattened logit-space images, fitted by maximum likelihood."""

    def __init__(self, y: torch.Tensor, ridge: float = 1e-4) -> None:
        super().__init__()
        flat = y.flatten(1).double()
        mean = flat.mean(0)
        cov = torch.cov(flat.T, correction=0) + ridge * torch.eye(flat.shape[1], dtype=flat.dtype)
        self.dim = tuple(y.shape[1:])
        self.register_buffer("mean", mean.to(y.dtype))
        self.register_buffer("scale_tril", torch.linalg.cholesky(cov).to(y.dtype))
        self.stats = SolveStats()

    def distribution(self) -> torch.distributions.MultivariateNormal:
        return torch.distributions.MultivariateNormal(self.mean, scale_tril=self.scale_tril)

    def log_prob(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.distribution().log_prob(x.flatten(1))

    def sample(self, n: int, **_: Any) -> torch.Tensor:
        return self.distribution().sample((n,)).reshape(n, *self.dim)


def count_parameters(flow: nn.Module) -> int:
    """Trained parameters; for the Gaussian, the free entries of its mean and covariance."""
    inner = inner_flow(flow)
    if isinstance(inner, LogitGaussian):
        d = inner.mean.numel()
        return d + d * (d + 1) // 2
    return sum(p.numel() for p in flow.parameters())


def preprocessing(levels: int, alpha: float = IMAGE_RECIPE.alpha) -> Compose:
    return Compose(Dequantize(levels), Logit(alpha))


#: The logit alphas the Gaussian baseline chooses from on the validation images.
GAUSSIAN_ALPHAS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def logit_gaussian(data: ImageSplits, seed: int = 0) -> TransformedFlow:
    """The Gaussian baseline with the alpha of :data:`GAUSSIAN_ALPHAS` that scores the validation
    images best (fitted on the training images, one dequantisation draw each)."""
    best, best_bpd = None, math.inf
    for alpha in GAUSSIAN_ALPHAS:
        pre = preprocessing(data.levels, alpha)
        with torch.no_grad():
            y, _ = pre(data.train.to(torch.float32), generator=torch.Generator().manual_seed(seed))
        flow = TransformedFlow(LogitGaussian(y), pre)
        bpd = evaluate_bits_per_dim(flow, data.val, generator=torch.Generator().manual_seed(seed + 2)).mean
        if bpd < best_bpd:
            best, best_bpd = flow, bpd
    return best


#: Solvers of --quick: the code paths of the real run at a fraction of the evaluations.
QUICK_TRAIN_SOLVER = Solver(method="rk4", step_size=0.5)
QUICK_EVAL_SOLVER = Solver(rtol=1e-3, atol=1e-3)


def build(method: str, data: ImageSplits, hidden: Sequence[int] | None, quick: bool = False) -> nn.Module:
    shape = data.shape
    if method in CNF_METHODS:
        model, _, _ = CNF_METHODS[method]
        solver = QUICK_TRAIN_SOLVER if quick else IMAGE_RECIPE.train_solver
        return image_flow(shape, data.levels, model=model, hidden=hidden, solver=solver)
    if method == "gaussian-logit":
        return logit_gaussian(data)
    if method == "realnvp":
        width = 16 if quick else 256
        flat = make_zuko_flow("realnvp", math.prod(shape), transforms=4, hidden=(width, width))
        return TransformedFlow(Flattened(flat, shape), preprocessing(data.levels))
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def run_one(
    method: str,
    data: ImageSplits,
    budget: float,
    device: torch.device,
    hidden: Sequence[int] | None,
    seed: int,
    quick: bool = False,
    threads: int = 1,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    flow = build(method, data, hidden, quick).to(device)
    train_set, val_set = data.train.to(device), data.val.to(device)
    result = None
    if method != "gaussian-logit":
        objective, options = "likelihood", {}
        if method in CNF_METHODS:
            _, objective, options = CNF_METHODS[method]
        settings = {**IMAGE_RECIPE.train_settings(data.shape, objective, budget), "val_every": 10**9, **options}
        result = train(flow, train_set, val_set, settings=TrainSettings(**settings), progress=False, threads=threads)
    if method in CNF_METHODS:
        set_solver(flow, QUICK_EVAL_SOLVER if quick else IMAGE_RECIPE.eval_solver)
    flow.eval()
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    score = evaluate_bits_per_dim(flow, data.test.to(device), generator=generator)
    start = time.perf_counter()
    with torch.no_grad():
        flow.sample(10 if quick else 100)
    sample_seconds = time.perf_counter() - start
    sample_nfe = getattr(getattr(flow, "stats", None), "nfe_forward", 0)
    return {
        "method": method,
        "data": data.name,
        "test_bpd": score.mean,
        "test_bpd_2se": 2 * score.se,
        "train_seconds": result.seconds if result else 0.0,
        "steps": result.step if result else 0,
        "score_nfe": score.nfe,
        "score_seconds": score.seconds,
        "sample100_nfe": sample_nfe,
        "sample100_seconds": sample_seconds,
        "params": count_parameters(flow),
        "alpha": next(t.alpha for t in flow.preprocess.leaves() if isinstance(t, Logit)),
        "test_n": score.n,
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=IMAGE_DATASETS, default="digits-images")
    parser.add_argument("--budget", type=float, default=1800.0, help="training seconds in all, shared equally")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--hidden", type=int, nargs="+", default=None,
        help=f"CNF channels (default {IMAGE_RECIPE.hidden}, U-Net {IMAGE_RECIPE.unet_hidden})",
    )  # fmt: skip
    parser.add_argument("--test-n", type=int, default=None, help="score only the first N test images")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads on CPU (1: on the shared 2 cores two threads made a step ~20x slower, measured)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (for the tests)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--tag", default="", help="suffix of the results' file names (runs split by method)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_images(args.data, seed=args.seed)
    if args.quick:
        args.budget, args.hidden, args.test_n = 0.5, [4], 16
        quick_methods = ("cnf-ml-multiscale", "cnf-otfm", "cnf-fm-unet", "gaussian-logit", "realnvp")
        args.methods = [m for m in quick_methods if m in args.methods]
    methods = [m for m in args.methods if m != "realnvp" or zuko_available()]
    notes = [] if len(methods) == len(args.methods) else ["realnvp skipped: zuko is not installed"]
    if args.test_n is not None:
        data = ImageSplits(
            data.train, data.val, data.test[: args.test_n], data.levels,
            data.train_labels, data.val_labels, data.test_labels[: args.test_n], data.name,
        )
    trained = [m for m in methods if m != "gaussian-logit"]
    share = args.budget / max(len(trained), 1)
    hidden = tuple(args.hidden) if args.hidden else None
    rows = [run_one(m, data, share, device, hidden, args.seed, args.quick, args.threads) for m in methods]
    columns = [
        "method", "data", "test_bpd", "test_bpd_2se", "train_seconds", "steps", "score_nfe",
        "score_seconds", "sample100_nfe", "sample100_seconds", "params", "alpha", "test_n",
    ]
    meta = {
        "budget_seconds": args.budget,
        "budget_per_model": share,
        "device": str(device),
        "hidden": args.hidden,
        "recipe": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in vars(IMAGE_RECIPE).items()},
        "train_settings": IMAGE_RECIPE.train_settings(data.shape),
        "notes": notes,
    }
    name = f"images_{args.data}" + (f"_{args.tag}" if args.tag else "")
    write_results(name, rows, columns, meta, Path(args.out) if args.out else None)
    return rows


if __name__ == "__main__":
    main()
