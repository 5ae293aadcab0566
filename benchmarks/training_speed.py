"""Test NLL against wall-clock time for four ways of training the same CNF, and their NFE.

    python -m benchmarks.training_speed                  # 60 s per objective and dataset, ~20 min
    python -m benchmarks.training_speed --quick          # seconds; a smoke test

Objectives (all through ``cnf.train``, same network, same initial weights, same test points):

* ``likelihood``: maximum likelihood, one augmented solve per step (FFJORD);
* ``likelihood + RNODE``: the same with kinetic and Jacobian penalties, weights 0.01 each
  (Finlay et al. 2020);
* ``flow_matching``: conditional flow matching on the linear path (Lipman et al. 2023);
* ``ot_flow_matching``: with the minibatch OT coupling (Tong et al. 2023).

Every model's test NLL is computed exactly by the continuity equation at rtol = atol = 1e-5 at
several points of its training budget (evaluation time is not counted). At the end: the NFE
to sample (base -> data) and to score the test points at the same tolerance, and the floor: the
NFE to sample from a constant field (straight paths). Then the KL table
of ``examples/variational_inference.py`` (planar K = 2, 8, 32 and a CNF on U1..U4).

Writes benchmarks/results/training_speed.{json,md,png} (the plot: test NLL against training
seconds per objective, one panel per dataset, the true NLL dashed where known).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, markdown_table, write_results
from cnf import CNF, MLPField, Solver
from cnf.data import sample_toy, true_log_prob
from cnf.recipes import RNODE_WEIGHTS, recipe
from cnf.training import evaluate_nll, train

EVAL_SOLVER = Solver(rtol=1e-5, atol=1e-5)

#: name -> TrainSettings fields: the package's recipes (cnf.recipes), which `cnf train
#: --objective X` uses too. Maximum likelihood: lr 5e-3, batch 512; flow matching steps are ~50x
#: cheaper, so batch 256 (which keeps the exact OT assignment at ~10 ms) and an EMA of the weights.
OBJECTIVES: dict[str, dict[str, Any]] = {
    "likelihood": recipe("likelihood"),
    "likelihood + RNODE": {**recipe("likelihood"), **RNODE_WEIGHTS},
    "flow_matching": recipe("flow_matching"),
    "ot_flow_matching": recipe("ot_flow_matching"),
}
EVAL_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


class ConstantField(torch.nn.Module):
    """u(x, t) = c: perfectly straight paths, the cheapest field any solver can meet."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, 0.5)


def nfe_floor(n: int = 1_000) -> int:
    """NFE of EVAL_SOLVER to sample from a constant field: no trained model can sample cheaper.

    dopri5 still spends its initial-step selection and a few steps growing at most 10x each, so
    a target of 'a third of the likelihood model's NFE' is out of reach when that NFE is below
    three times this floor.
    """
    flow = CNF(ConstantField(), dim=2, solver=EVAL_SOLVER)
    with torch.no_grad():
        flow.sample(n, generator=torch.Generator().manual_seed(0))
    return flow.stats.nfe_forward


def load_example() -> Any:
    """examples/variational_inference.py as a module (examples/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "variational_inference.py"
    spec = importlib.util.spec_from_file_location("variational_inference_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_one(
    name: str, dataset: str, budget: float, test: torch.Tensor, seed: int, fractions: Sequence[float]
) -> dict[str, Any]:
    """Train one objective for ``budget`` seconds; test NLL at each fraction of the budget."""
    torch.manual_seed(seed)
    flow = CNF(MLPField(2, hidden=(64, 64, 64)), solver=EVAL_SOLVER)
    data = sample_toy(dataset, 100_000, seed=seed)
    # Cosine decay over the whole budget for every objective, although it is trained in
    # resumed segments to read off the curve (lr_horizon keeps one schedule across them).
    settings = {
        **OBJECTIVES[name],
        "iters": None,  # no step cap: each segment ends at its time limit
        "checkpoint_every": 10**9,
        "lr_horizon": budget,
    }
    curve = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        for fraction in fractions:
            result = train(
                flow,
                data,
                time_limit=budget * fraction,
                out=folder,
                resume=checkpoint,
                progress=False,
                threads=torch.get_num_threads(),
                overwrite=True,
                seed=seed,
                **settings,
            )
            checkpoint = result.checkpoint
            nll = evaluate_nll(flow, test)
            curve.append({"seconds": round(result.seconds, 2), "steps": result.step, "test_nll": nll})
            print(f"  {dataset:12} {name:20} {result.seconds:7.1f} s {result.step:6d} steps  NLL {nll:.4f}")
    with torch.no_grad():
        start = time.perf_counter()
        flow.sample(test.shape[0], generator=torch.Generator().manual_seed(seed))
        sample_seconds = time.perf_counter() - start
        nfe_sample = flow.stats.nfe_forward
        flow.log_prob(test)
        nfe_score = flow.stats.nfe_forward
    return {
        "data": dataset,
        "objective": name,
        "test_nll": curve[-1]["test_nll"],
        "steps": curve[-1]["steps"],
        "train_seconds": curve[-1]["seconds"],
        "nfe_sample": nfe_sample,
        "nfe_score": nfe_score,
        "sample_seconds": sample_seconds,
        "curve": curve,
    }


def plot(rows: list[dict[str, Any]], true_nll: dict[str, float | None], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    datasets = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for row in (r for r in rows if r["data"] == dataset):
            seconds = [p["seconds"] for p in row["curve"]]
            ax.plot(seconds, [p["test_nll"] for p in row["curve"]], marker="o", label=row["objective"])
        if true_nll.get(dataset) is not None:
            ax.axhline(true_nll[dataset], color="k", linestyle="--", linewidth=1, label="true NLL")
        ax.set_xscale("log")
        ticks = [round(p["seconds"], 1) for p in rows[0]["curve"]]  # the evaluation checkpoints
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(dataset)
        ax.set_xlabel("training seconds")
        ax.set_ylabel("test NLL (nats)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--budget", type=float, default=60.0, help="training seconds per objective and dataset"
    )
    parser.add_argument("--datasets", nargs="+", default=["8gaussians", "moons", "checkerboard"])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--test-n", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2-D problems are fastest on 1)"
    )
    parser.add_argument("--no-variational", action="store_true", help="skip the variational KL table")
    parser.add_argument("--quick", action="store_true", help="a few seconds per part (a smoke test)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    fractions = EVAL_FRACTIONS
    if args.quick:
        args.budget, args.test_n, args.datasets, fractions = 1.0, 300, ["8gaussians"], (0.5, 1.0)
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else RESULTS
    rows, true_nll = [], {}
    for dataset in args.datasets:
        test = sample_toy(dataset, args.test_n, seed=2024)
        try:
            true_nll[dataset] = -true_log_prob(dataset, test.double()).mean().item()
        except ValueError:
            true_nll[dataset] = None
        dataset_rows = [
            run_one(name, dataset, args.budget, test, args.seed, fractions) for name in args.objectives
        ]
        reference = next((r for r in dataset_rows if r["objective"] == "likelihood"), None)
        for row in dataset_rows:
            row["true_nll"] = true_nll[dataset]
            row["nll_gap"] = None if true_nll[dataset] is None else row["test_nll"] - true_nll[dataset]
            row["nfe_sample_vs_likelihood"] = (
                row["nfe_sample"] / reference["nfe_sample"] if reference and reference["nfe_sample"] else None
            )
        rows += dataset_rows
    columns = [
        "data",
        "objective",
        "test_nll",
        "true_nll",
        "nll_gap",
        "steps",
        "train_seconds",
        "nfe_sample",
        "nfe_score",
        "nfe_sample_vs_likelihood",
        "sample_seconds",
    ]
    floor = nfe_floor()
    meta: dict[str, Any] = {
        "nfe_floor_constant_field": floor,
        "budget_seconds": args.budget,
        "test_n": args.test_n,
        "threads": args.threads,
        "eval_solver": EVAL_SOLVER.to_dict(),
        "objectives": OBJECTIVES,
    }
    variational_rows = []
    if not args.no_variational:
        example = load_example()
        vi_args = ["--out", str(out / "variational_inference"), "--threads", str(args.threads)]
        variational_rows = example.main(vi_args + (["--quick"] if args.quick else []))
        meta["variational"] = variational_rows
    path = write_results("training_speed", rows, columns, meta, out)
    with path.open("a") as handle:
        handle.write(
            f"\nNFE floor: sampling from a constant field (perfectly straight paths) at the same "
            f"tolerance takes {floor} NFE.\n"
        )
        if variational_rows:
            vi_columns = ["energy", "model", "kl", "kl_estimate", "ess", "steps", "train_seconds"]
            handle.write("\nVariational inference (reverse KL, examples/variational_inference.py):\n\n")
            handle.write(markdown_table(variational_rows, vi_columns))
    figure = plot(rows, true_nll, out / "training_speed.png")
    print(f"wrote {path} and {figure}")
    return rows


if __name__ == "__main__":
    main()
