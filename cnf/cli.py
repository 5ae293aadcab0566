"""The ``cnf`` command: train, evaluate and sample flows from the shell.

cnf train --data moons --model cnf --out runs/moons
cnf evaluate --checkpoint runs/moons/checkpoint.pt --data moons --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnf import __version__, tuning
from cnf.checkpoint import load_checkpoint
from cnf.data import load_data, split
from cnf.data.real import LEVELS, REAL_DATASETS, load_real
from cnf.fields import MLPField
from cnf.flow import CNF
from cnf.losses import DEFAULT_SIGMA_MIN, OBJECTIVES
from cnf.planar import PlanarFlow
from cnf.solver import Solver
from cnf.training import TrainSettings, train
from cnf.transforms import STEPS, TransformedFlow, bits_per_dim, choose_preprocessing

TEST_SEED = 2024  # test points are drawn apart from the training seed
DEFAULT_TEST_SIZE = 10_000


def build_model(args: argparse.Namespace, dim: int) -> torch.nn.Module:
    if args.model == "planar":
        return PlanarFlow(dim, args.layers)
    solver = Solver(method=args.method, rtol=args.rtol, atol=args.atol, adjoint=args.adjoint)
    field = MLPField(dim, hidden=tuple(args.hidden), activation=args.activation)
    return CNF(field, divergence=args.divergence, noise=args.noise, solver=solver)


def load_splits(source: str, n_train: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/validation/test sets: fresh seeded samples for a toy name, the fixed split of a real
    dataset (:mod:`cnf.data.real`), a seeded split for a file."""
    if source in REAL_DATASETS:
        data = load_real(source)
        return data.train, data.val, data.test
    if Path(source).suffix.lower() in (".npy", ".csv"):
        return split(load_data(source), seed=seed)
    train_set = load_data(source, n=n_train, seed=seed)
    val_set = load_data(source, n=2_000, seed=seed + 1)
    test_set = load_data(source, n=DEFAULT_TEST_SIZE, seed=TEST_SEED)
    return train_set, val_set, test_set


def load_eval_data(source: str, n: int, seed: int) -> torch.Tensor:
    """Data to score: a file's rows, a real dataset's test split, or n seeded toy samples."""
    if source in REAL_DATASETS:
        return load_real(source).test
    if Path(source).suffix.lower() in (".npy", ".csv"):
        return load_data(source)
    return load_data(source, n=n, seed=seed)


def timed_nll(flow: torch.nn.Module, data: torch.Tensor) -> dict[str, Any]:
    """Test NLL in nats (data units), NFE of the scoring solve and seconds, all from one pass;
    bits per dimension too for discrete data (a flow whose preprocessing dequantises)."""
    start = time.perf_counter()
    with torch.no_grad():
        log_prob = flow.log_prob(data)
    seconds = time.perf_counter() - start
    metrics = {
        "nll": -log_prob.mean().item(),
        "nfe": flow.stats.nfe_forward,
        "seconds": seconds,
        "n": int(data.shape[0]),
    }
    bin_width = getattr(flow, "bin_width", None)
    if bin_width is not None:
        metrics["bits_per_dim"] = bits_per_dim(log_prob.mean(), int(data[0].numel()), bin_width).item()
    return metrics


def preprocessed(args: argparse.Namespace, flow: torch.nn.Module, train_set: torch.Tensor) -> torch.nn.Module:
    """Wrap ``flow`` with the preprocessing the data need (or that the flags ask for), saying which."""
    levels = args.levels if args.levels is not None else LEVELS.get(args.data)
    preprocess, notes = choose_preprocessing(train_set, args.preprocess, levels=levels, alpha=args.alpha)
    for note in notes:
        print(f"preprocessing ({args.preprocess}): {note}")
    return flow if preprocess is None else TransformedFlow(flow, preprocess)


def cmd_train(args: argparse.Namespace) -> int:
    train_set, val_set, test_set = load_splits(args.data, args.n_train, args.seed)
    torch.manual_seed(args.seed)
    flow = preprocessed(args, build_model(args, train_set.shape[1]), train_set)
    settings = TrainSettings(
        iters=args.iters,
        batch_size=args.batch_size,
        lr=args.lr,
        time_limit=args.time_limit,
        seed=args.seed,
        val_every=args.val_every,
        objective=args.objective,
        kinetic_weight=args.kinetic_weight,
        jacobian_weight=args.jacobian_weight,
        sigma_min=args.sigma_min,
        lr_schedule=args.lr_schedule,
    )
    out = Path(args.out)
    result = train(flow, train_set, val_set, settings=settings, out=out, resume=args.resume)
    metrics = timed_nll(flow, test_set)
    summary = {
        "data": args.data,
        "model": args.model,
        "steps": result.step,
        "train_seconds": round(result.seconds, 2),
        "stopped_by": result.stopped_by,
        "test_nll": metrics["nll"],
        "test_log_likelihood": -metrics["nll"],
        "test_nfe": metrics["nfe"],
        "test_n": metrics["n"],
        "checkpoint": str(result.checkpoint),
    }
    if "bits_per_dim" in metrics:
        summary["test_bits_per_dim"] = metrics["bits_per_dim"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"trained {args.model} on {args.data}: {result.step} steps in {result.seconds:.1f} s "
        f"(stopped by {result.stopped_by})\n"
        f"test log-likelihood: {-metrics['nll']:.4f} nats/sample (NLL {metrics['nll']:.4f}) "
        f"on {metrics['n']} points, NFE {metrics['nfe']}"
        + (f", {metrics['bits_per_dim']:.4f} bits/dim" if "bits_per_dim" in metrics else "")
        + "\n"
        f"checkpoint: {result.checkpoint}"
    )
    if args.plot:
        from cnf.plots import plot_all

        paths = plot_all(flow, out, data=test_set, log=out / "train_log.jsonl")
        print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    flow, payload = load_checkpoint(args.checkpoint)
    if args.solver_from is not None and isinstance(flow, CNF):
        flow.solver = solver_from_file(args.solver_from)
    data = load_eval_data(args.data, args.n, args.seed)
    metrics = timed_nll(flow, data)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(
            f"test NLL: {metrics['nll']:.4f} nats  NFE: {metrics['nfe']}  "
            f"seconds: {metrics['seconds']:.3f}  n: {metrics['n']}"
            + (f"  bits/dim: {metrics['bits_per_dim']:.4f}" if "bits_per_dim" in metrics else "")
        )
    return 0


def solver_from_file(path: str) -> Solver:
    """The recommended evaluation solver from a ``cnf tune`` JSON file (or a bare settings dict)."""
    try:
        settings = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--solver-from file {path!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"--solver-from file {path!r} is not JSON: {error}") from error
    settings = settings.get("recommended", {}).get("evaluation", settings)
    return Solver.from_dict(settings.get("solver", settings))


def cmd_sample(args: argparse.Namespace) -> int:
    flow, _ = load_checkpoint(args.checkpoint)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        samples = flow.sample(args.n, generator=generator)
    np.save(args.out, samples.numpy())
    print(f"wrote {args.n} samples to {args.out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    flow, _ = load_checkpoint(args.checkpoint)
    if not isinstance(flow, CNF):
        raise TypeError(f"cnf tune needs a CNF checkpoint (solver settings), got a {type(flow).__name__}")
    n = max(args.n * (1 + args.fresh_blocks), args.n_grad)  # the grid's block, then fresh ones
    data = load_eval_data(args.data, n, args.seed)[:n]
    result = tuning.tune(
        flow,
        data,
        methods=args.methods,
        tolerances=args.tolerances,
        step_sizes=args.step_sizes,
        mixed=tuning.DEFAULT_MIXED if args.mixed else (),
        budget=args.budget,
        grad_budget=args.grad_budget,
        n_logp=args.n,
        n_grad=args.n_grad,
        repeats=args.repeats,
        gradients=not args.no_gradients,
        rank_by=args.rank_by,
        confidence=args.confidence,
        fresh_blocks=args.fresh_blocks,
        progress=None if args.json else print,
    )
    paths = result.save(args.out)
    if args.json:
        print(json.dumps(result.recommended))
    else:
        print(result.to_markdown())
        print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
        print(
            f"apply: cnf evaluate --checkpoint {args.checkpoint} --data {args.data} --solver-from {paths['json']}"
        )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from cnf.plots import plot_all

    flow, _ = load_checkpoint(args.checkpoint)
    data = None
    if args.data is not None:
        data = load_eval_data(args.data, args.n, TEST_SEED)
    planar = None
    if args.planar is not None:
        planar, _ = load_checkpoint(args.planar)
        if not isinstance(planar, PlanarFlow):
            raise TypeError(f"--planar must be a planar-flow checkpoint, got a {type(planar).__name__}")
    log = Path(args.checkpoint).parent / "train_log.jsonl"
    paths = plot_all(
        flow,
        args.out,
        data=data,
        log=log if log.is_file() else None,
        times=args.times,
        animate=args.animate,
        frames=args.frames,
        resolution=args.resolution,
        planar=planar,
    )
    print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnf", description="Continuous normalizing flows.")
    parser.add_argument("--version", action="version", version=f"cnf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="fit a flow by maximum likelihood and save a checkpoint")
    p.add_argument(
        "--data",
        default="moons",
        help="toy or real dataset name (digits, wine, ...) or .npy/.csv file (default moons)",
    )
    p.add_argument("--model", choices=("cnf", "planar"), default="cnf")
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--time-limit", type=positive_float, default=90.0, help="wall-clock limit in seconds")
    p.add_argument("--out", default="runs/default", help="output folder for checkpoint and log")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=positive_float, default=5e-3)
    p.add_argument(
        "--lr-schedule", choices=("constant", "cosine"), default="cosine", help="learning-rate decay"
    )
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64])
    p.add_argument("--activation", default="tanh")
    p.add_argument("--divergence", default="exact")
    p.add_argument("--noise", default="gaussian")
    p.add_argument("--method", default="dopri5")
    p.add_argument("--rtol", type=positive_float, default=1e-5)
    p.add_argument("--atol", type=positive_float, default=1e-5)
    p.add_argument("--adjoint", action="store_true")
    p.add_argument("--layers", type=int, default=32, help="planar layers K")
    p.add_argument(
        "--objective",
        choices=tuple(OBJECTIVES),
        default="likelihood",
        help="likelihood (maximum likelihood, + RNODE with the weights below), flow_matching or "
        "ot_flow_matching (simulation-free)",
    )
    p.add_argument(
        "--kinetic-weight", type=float, default=0.0, help="RNODE kinetic-energy weight (0.01 in the paper)"
    )
    p.add_argument(
        "--jacobian-weight", type=float, default=0.0, help="RNODE Jacobian-norm weight (0.01 in the paper)"
    )
    p.add_argument(
        "--sigma-min", type=float, default=DEFAULT_SIGMA_MIN, help="flow-matching path width at t=1"
    )
    p.add_argument(
        "--preprocess",
        default="auto",
        help="auto (detect: integer data -> dequantize, [0, 1] -> logit, off-scale -> standardize), "
        f"none, or a comma-separated subset of {','.join(STEPS)}",
    )
    p.add_argument("--levels", type=int, default=None, help="integer levels of discrete data (dequantize)")
    p.add_argument("--alpha", type=float, default=0.05, help="logit margin alpha (RealNVP's 0.05)")
    p.add_argument("--plot", action="store_true", help="draw the flow's plots at the end")
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("evaluate", help="test NLL, NFE and seconds of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="dataset name or .npy/.csv file")
    p.add_argument("--n", type=int, default=DEFAULT_TEST_SIZE)
    p.add_argument("--seed", type=int, default=TEST_SEED)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--solver-from", default=None, help="JSON from `cnf tune` with the solver to use")
    p.set_defaults(run=cmd_evaluate)

    p = commands.add_parser("sample", help="draw samples from a checkpoint into a .npy file")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.npy")
    p.set_defaults(run=cmd_sample)

    p = commands.add_parser("tune", help="measure solver settings on a trained CNF and recommend one")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="dataset name or .npy/.csv file")
    p.add_argument("--methods", nargs="+", default=list(tuning.DEFAULT_METHODS))
    p.add_argument("--tolerances", type=positive_float, nargs="+", default=list(tuning.DEFAULT_TOLERANCES))
    p.add_argument(
        "--step-sizes",
        type=positive_float,
        nargs="+",
        default=list(tuning.DEFAULT_STEP_SIZES),
        help="for fixed-step methods",
    )
    p.add_argument("--no-mixed", dest="mixed", action="store_false", help="skip the rtol != atol settings")
    p.add_argument(
        "--budget",
        type=positive_float,
        default=tuning.DEFAULT_BUDGET,
        help="log p error budget in nats (evaluation)",
    )
    p.add_argument(
        "--grad-budget",
        type=positive_float,
        default=tuning.DEFAULT_GRAD_BUDGET,
        help="relative gradient error budget (training)",
    )
    p.add_argument("--n", type=int, default=tuning.DEFAULT_N_LOGP, help="points scored per setting")
    p.add_argument(
        "--fresh-blocks",
        type=int,
        default=tuning.DEFAULT_FRESH_BLOCKS,
        help="blocks of --n new points that re-check the recommendation",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=tuning.DEFAULT_CONFIDENCE,
        help="level of the upper bound of the mean log p error that must meet --budget",
    )
    p.add_argument("--n-grad", type=int, default=256, help="points of the gradient measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    p.add_argument("--no-gradients", action="store_true", help="skip the training direction")
    p.add_argument("--rank-by", choices=("nfe", "seconds"), default="nfe", help="what cheapest means")
    p.add_argument("--seed", type=int, default=TEST_SEED)
    p.add_argument("--out", default="tune", help="folder for tune.json, tune.md and tune.png")
    p.add_argument("--json", action="store_true", help="print the recommendations as one JSON object")
    p.set_defaults(run=cmd_tune)

    p = commands.add_parser("plot", help="draw a checkpoint's probability path, trajectories, field, GIF")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="plots", help="output folder for the PNG/GIF files")
    p.add_argument(
        "--times", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="times of the path panels"
    )
    p.add_argument("--animate", action="store_true", help="also write path.gif")
    p.add_argument("--frames", type=int, default=17, help="frames of the GIF")
    p.add_argument("--data", default=None, help="dataset name or .npy/.csv file drawn beside the densities")
    p.add_argument("--n", type=int, default=2000, help="points drawn of a named dataset")
    p.add_argument("--resolution", type=int, default=80, help="grid points per axis")
    p.add_argument("--planar", default=None, help="planar-flow checkpoint to compare a CNF with")
    p.set_defaults(run=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError) as error:
        print(f"cnf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
