"""VAEs on binarised images with four posterior families: FFJORD's VAE table on this machine's data.

    python -m benchmarks.vae --datasets digits --budget 60          # ~6 min on 2 cores
    python -m benchmarks.vae --datasets fashion-mnist --budget 120 --n-train 10000 --n-test 1000 --k 200
    python -m benchmarks.vae --quick                                # seconds; what the tests run

Every posterior (diagonal Gaussian; amortised planar K=16; IAF from zuko, 4 MADE transforms;
amortised CNF, the conditional MLPField 64x64 tanh, dopri5) gets the same encoder and decoder
(ELU MLPs, identical initial weights: the same seed builds them before the posterior), the same
data, the same training budget (``--budget`` wall-clock seconds, or ``--iters`` steps capped by
``--budget``; Adam, cosine decay over the budget, KL warm-up over ``--kl-warmup`` steps, early
stopping on the validation ELBO, the best weights kept) and the same
test images (fixed binarisation, :mod:`cnf.data.binarized`). Reported per test image, mean +- 2
standard errors: ELBO, the importance-weighted log-likelihood IWAE_k (k = ``--k``), KL(q(z|x) ||
p(z)) and the gap IWAE_k - ELBO (an under-estimate of KL(q(z|x) || p(z|x))); ``iwae_vs_gaussian``
is the paired difference to the Gaussian posterior's IWAE_k on the same images.

Writes benchmarks/results/vae.{json,md} (``--name`` to keep several runs apart).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, write_results
from cnf.adapters import zuko_available
from cnf.data.binarized import BINARIZED_DATASETS, load_binarized
from cnf.recipes import VAE_DATA_RECIPES, vae_settings
from cnf.solver import Solver
from cnf.training import train
from cnf.vae import POSTERIORS, VAE
from cnf.vae.evaluate import evaluate_vae, mean_and_two_se
from cnf.vae.posteriors import CNF_INIT_SCALE

#: The flags whose defaults come from cnf train --model vae's recipe for each data set.
RECIPE_FLAGS = ("latent_dim", "hidden", "tol", "lr", "batch_size", "kl_warmup", "val_every", "patience")
RECIPE_HELP = "the data set's cnf train --model vae recipe (cnf.recipes.VAE_DATA_RECIPES)"

COLUMNS = (
    "data", "posterior", "elbo", "elbo_two_se", "iwae", "iwae_two_se", "iwae_vs_gaussian", "vs_two_se",
    "iwae_vs_planar", "vs_planar_two_se", "kl_prior", "gap", "steps", "stopped_by", "train_seconds", "eval_seconds",
)  # fmt: skip


def build(posterior: str, dim: int, args: argparse.Namespace) -> VAE:
    torch.manual_seed(args.seed)  # the encoder and decoder are built first: same weights for all
    layers = args.iaf_transforms if posterior == "iaf" else args.planar_layers
    solver = Solver(rtol=args.tol, atol=args.tol)
    return VAE(dim, args.latent_dim, posterior, hidden=args.hidden, flow_hidden=args.flow_hidden,
               layers=layers, solver=solver, flow_context=args.flow_context,
               flow_context_net=args.flow_context_net, flow_activation=args.flow_activation, flow_init_scale=args.flow_init_scale)  # fmt: skip


def dataset_args(name: str, dim: int, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the flags left unset taken from ``cnf train --model vae``'s recipe for the
    data set, so that the benchmark's defaults and the CLI's are one recipe."""
    data_recipe, settings = VAE_DATA_RECIPES[name], vae_settings(name, dim)
    recipe_values = {
        "latent_dim": data_recipe["model"]["latent_dim"], "hidden": tuple(data_recipe["model"]["hidden"]),
        "tol": data_recipe["posterior_tol"], **{k: settings[k] for k in ("lr", "batch_size", "kl_warmup", "val_every", "patience")},
    }  # fmt: skip
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in recipe_values.items() if getattr(args, k) is None}})


def run_dataset(name: str, args: argparse.Namespace, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Train and score every posterior on one data set; ``settings[name]`` records the recipe used."""
    data = load_binarized(name, seed=args.seed, n_train=args.n_train)
    args = dataset_args(name, data.train.shape[1], args)
    settings[name] = {k: getattr(args, k) for k in RECIPE_FLAGS}
    print(f"{name}: latent {args.latent_dim}, widths {args.hidden}, tol {args.tol}, lr {args.lr}, batch "
          f"{args.batch_size}, KL warm-up {args.kl_warmup}, validation every {args.val_every}, patience {args.patience}")  # fmt: skip
    test = data.test[: args.n_test]
    rows, baseline, planar = [], None, None
    for posterior in args.posteriors:
        if posterior == "iaf" and not zuko_available():
            rows.append({"data": name, "posterior": posterior, "stopped_by": "skipped: zuko does not import"})
            continue
        vae = build(posterior, data.train.shape[1], args)
        result = train(
            vae, data.train, data.val, objective="elbo", iters=args.iters, time_limit=args.budget, lr=args.lr,
            lr_schedule="cosine", batch_size=args.batch_size, kl_warmup=args.kl_warmup, val_every=args.val_every,
            val_size=args.val_size, patience=args.patience, seed=args.seed, progress=False,
        )  # fmt: skip
        metrics = evaluate_vae(vae, test, k=args.k, chunk=args.chunk, seed=args.seed, per_image=True)
        values = metrics.pop("values")
        row = {"data": name, "posterior": posterior, **metrics, "steps": result.step,
               "stopped_by": result.stopped_by, "train_seconds": result.seconds, "eval_seconds": metrics["seconds"]}  # fmt: skip
        if posterior == "gaussian":
            baseline = values["iwae"]
        if baseline is not None:
            row["iwae_vs_gaussian"], row["vs_two_se"] = mean_and_two_se(values["iwae"] - baseline)
        if posterior == "planar":
            planar = values["iwae"]
        elif planar is not None:  # paired on the same test images, as against the Gaussian
            row["iwae_vs_planar"], row["vs_planar_two_se"] = mean_and_two_se(values["iwae"] - planar)
        rows.append(row)
        print({k: row.get(k) for k in COLUMNS}, flush=True)
    return rows


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits"], choices=BINARIZED_DATASETS)
    parser.add_argument("--posteriors", nargs="+", default=["gaussian", "planar", "iaf", "cnf"], choices=POSTERIORS)
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per posterior and data set")
    parser.add_argument("--iters", type=int, default=10**9, help="training steps per posterior (--budget caps)")
    parser.add_argument("--n-train", type=int, default=None, help="training images kept (default all)")
    parser.add_argument("--n-test", type=int, default=None, help="test images scored (default all)")
    parser.add_argument("--k", type=int, default=1000, help="samples of the importance-weighted bound")
    parser.add_argument("--chunk", type=int, default=250, help="IWAE samples drawn per pass")
    parser.add_argument("--latent-dim", type=int, default=None, help=f"default: {RECIPE_HELP}")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help=f"encoder / decoder widths (default: {RECIPE_HELP})")
    parser.add_argument("--flow-hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--planar-layers", type=int, default=16)
    parser.add_argument("--iaf-transforms", type=int, default=4)
    parser.add_argument("--flow-context", default=None, choices=("concat", "film"), help="how h(x) enters the CNF posterior (default: the recipe for the latent size)")
    parser.add_argument("--flow-context-net", action=argparse.BooleanOptionalAction, default=None,
                        help="the CNF posterior's field reads h(x) through a context network (default: the recipe)")
    parser.add_argument("--flow-activation", default="tanh", help="the CNF posterior field's activation")
    parser.add_argument("--flow-init-scale", type=float, default=CNF_INIT_SCALE, help="the CNF posterior field's initial velocity scale")
    parser.add_argument("--tol", type=float, default=None, help=f"rtol = atol of the CNF posterior's solves (default: {RECIPE_HELP})")
    parser.add_argument("--lr", type=float, default=None, help=f"default: {RECIPE_HELP}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default: {RECIPE_HELP}")
    parser.add_argument("--kl-warmup", type=int, default=None, help=f"steps of linear KL warm-up (default: {RECIPE_HELP})")
    parser.add_argument("--val-every", type=int, default=None, help=f"default: {RECIPE_HELP}")
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--patience", type=int, default=None, help=f"validations without improvement (default: {RECIPE_HELP})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few seconds (for the tests)")
    parser.add_argument("--name", default="vae", help="results file name")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = make_parser().parse_args(argv)
    if args.quick:
        args.datasets, args.budget, args.n_train, args.n_test, args.k, args.chunk = ["digits"], 0.5, 200, 20, 5, 5
        args.hidden, args.flow_hidden, args.tol, args.val_every, args.latent_dim = [16], [8], 1e-3, 5, 2
        args.planar_layers, args.iaf_transforms = 2, 1
    args.hidden = tuple(args.hidden) if args.hidden is not None else None
    args.flow_hidden = tuple(args.flow_hidden)
    torch.set_num_threads(args.threads)
    rows, settings = [], {}
    for name in args.datasets:
        rows += run_dataset(name, args, settings)
    meta = {
        "command": "python -m benchmarks.vae " + " ".join(sys.argv[1:] if argv is None else argv),
        "budget_seconds": args.budget,
        "iters": args.iters,
        "k": args.k,
        "settings": settings,
        "threads": args.threads,
        "note": "nats per image; two_se over test images; iwae_vs_gaussian paired on the same images",
    }
    write_results(args.name, rows, COLUMNS, meta, Path(args.out) if args.out else RESULTS)
    return {"rows": rows}


if __name__ == "__main__":
    main()
