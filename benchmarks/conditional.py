"""Conditional flows p(x | c): cnf against zuko's conditional NSF, MAF and CNF.

    python -m benchmarks.conditional --tasks rotated8gaussians    # ~6 min on 2 cores
    python -m benchmarks.conditional --tasks mixture two_moons --no-sampling
    python -m benchmarks.conditional --quick                      # seconds; what the tests run

Targets (:mod:`cnf.data.conditional`): ``rotated8gaussians`` and ``mixture`` with exact
p(x | c), and the two-moons simulation-based-inference task (Greenberg et al. 2019) whose
posterior p(theta | x) is exact up to a Monte Carlo normaliser. Every model is trained on the
same 50,000 pairs for the same wall-clock budget (``--budget`` seconds, 60 by default, one
torch thread each) and scored on the same test pairs: excess conditional NLL =
mean(log p_true - log q) +- 2 standard errors of the paired differences. cnf recipes: maximum
likelihood (MLPField 64x3 with FiLM context, Adam 5e-3, cosine) and flow matching (Adam 3e-3,
cosine); FiLM and lr 3e-3 won a 20 s sweep on rotated8gaussians (excess 0.245 against 0.39
for the per-layer bias at 3e-3 and 0.44 at 1e-3). zuko's own defaults (Adam 1e-3, batch 512;
its CNF with its own tolerances while training).

Sampling: seconds to draw 1,000 points for each of 100 contexts (c of shape (100, k), one
batched solve, 100,000 points; on the first task) against 100,000 points of an unconditional MLPField of the same
size trained by the same recipe on the marginal of x, the two timed in turn (interleaved
rounds), with their NFE; zuko's flows on the same 100 contexts for reference.

Writes benchmarks/results/conditional.{json,md} (``--name`` to keep several runs apart).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, interleaved_seconds, markdown_table, write_results
from cnf import CNF, MLPField, Solver
from cnf.adapters import zuko_available
from cnf.data.conditional import (
    CONDITIONAL_DATASETS,
    conditional_log_prob,
    sample_conditional,
    two_moons_log_posterior,
)
from cnf.training import train

TEST_SEED = 2024
COLUMNS = (
    "task",
    "model",
    "recipe",
    "excess_nll",
    "two_se",
    "test_nll",
    "true_nll",
    "steps",
    "train_seconds",
)
SAMPLING_COLUMNS = ("task", "model", "what", "seconds", "nfe", "ratio")
MODELS = ("cnf-ml", "cnf-fm", "zuko-nsf", "zuko-maf", "zuko-cnf")

LogProb = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sampler = Callable[[int, torch.Tensor], torch.Tensor]


def true_log_prob(task: str, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    if task == "two_moons":
        return two_moons_log_posterior(x.double(), c.double())[0]
    return conditional_log_prob(task, x.double(), c.double())


def cnf_flow(context_dim: int | None, args: argparse.Namespace) -> CNF:
    field = MLPField(2, hidden=args.hidden, context_dim=context_dim, context_mode=args.context_mode)
    return CNF(field, solver=Solver(rtol=args.tol, atol=args.tol))


def train_cnf(
    objective: str, x: torch.Tensor, c: torch.Tensor | None, args: argparse.Namespace
) -> tuple[CNF, dict[str, Any]]:
    torch.manual_seed(args.seed)
    flow = cnf_flow(None if c is None else c.shape[1], args)
    lr = 5e-3 if objective == "likelihood" else 3e-3
    result = train(
        flow, x, context=c, iters=10**9, time_limit=args.budget, lr=lr, lr_schedule="cosine",
        batch_size=512, val_every=10**9, objective=objective, progress=False,
    )  # fmt: skip
    flow.eval()
    mode = f", {args.context_mode} context" if c is not None else ""
    recipe = f"MLPField {'x'.join(map(str, args.hidden))}{mode}, {objective}, Adam {lr:g} cosine, batch 512"
    return flow, {"recipe": recipe, "steps": result.step, "train_seconds": result.seconds}


def train_zuko(kind: str, x: torch.Tensor, c: torch.Tensor, args: argparse.Namespace) -> tuple[Any, dict]:
    import zuko

    torch.manual_seed(args.seed)
    k = c.shape[1]
    if kind == "zuko-nsf":
        flow = zuko.flows.NSF(2, k)
    elif kind == "zuko-maf":
        flow = zuko.flows.MAF(2, k)
    else:
        flow = zuko.flows.CNF(2, k, hidden_features=(64, 64, 64))
        if args.quick:  # zuko's default tolerances make even one step slow; --quick checks the code
            flow.transform.atol = flow.transform.rtol = args.tol
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    start, steps = time.perf_counter(), 0
    flow.train()
    while time.perf_counter() - start < args.budget:
        rows = torch.randint(0, x.shape[0], (512,))
        loss = -flow(c[rows]).log_prob(x[rows]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    seconds = time.perf_counter() - start
    flow.eval()
    if kind == "zuko-cnf":
        flow.transform.atol = flow.transform.rtol = args.tol
    recipe = {"zuko-nsf": "NSF defaults", "zuko-maf": "MAF defaults", "zuko-cnf": "CNF 64x3"}[kind]
    return flow, {"recipe": f"{recipe}, Adam 1e-3, batch 512", "steps": steps, "train_seconds": seconds}


def scorer(kind: str, model: Any) -> tuple[LogProb, Sampler]:
    if kind.startswith("cnf"):
        return (lambda x, c: model.log_prob(x, context=c)), (lambda n, c: model.sample(n, context=c))
    return (lambda x, c: model(c).log_prob(x)), (lambda n, c: model(c).sample((n,)))


def batched_log_prob(log_prob: LogProb, x: torch.Tensor, c: torch.Tensor, chunk: int = 5000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([log_prob(xs, cs) for xs, cs in zip(x.split(chunk), c.split(chunk))]).double()


def run_task(task: str, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    x, c = sample_conditional(task, args.n_train, seed=args.seed)
    test_x, test_c = sample_conditional(task, args.test_n, seed=TEST_SEED)
    truth = true_log_prob(task, test_x, test_c)
    rows, models = [], {}
    for kind in args.models:
        if kind.startswith("zuko") and not zuko_available():
            rows.append({"task": task, "model": kind, "recipe": "skipped: zuko does not import"})
            continue
        if kind.startswith("cnf"):
            model, info = train_cnf("likelihood" if kind == "cnf-ml" else "flow_matching", x, c, args)
        else:
            model, info = train_zuko(kind, x, c, args)
        log_prob, sampler = scorer(kind, model)
        models[kind] = (model, sampler)
        diff = truth - batched_log_prob(log_prob, test_x, test_c)
        rows.append(
            {
                "task": task,
                "model": kind,
                **info,
                "excess_nll": diff.mean().item(),
                "two_se": 2 * diff.std().item() / math.sqrt(diff.numel()),
                "test_nll": -(truth - diff).mean().item(),
                "true_nll": -truth.mean().item(),
            }
        )
        print(rows[-1], flush=True)
    timing = sampling_rows(task, models, x, args) if args.sampling and task == args.tasks[0] else []
    return rows, timing


def sampling_rows(task: str, models: dict[str, Any], x: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """Seconds to sample per_context points for each of n_contexts contexts, in one call."""
    contexts = sample_conditional(task, args.n_contexts, seed=TEST_SEED + 1)[1]
    total = args.n_contexts * args.per_context
    fns: dict[str, Callable[[], Any]] = {}
    for kind, (_, sampler) in models.items():
        fns[kind] = lambda sampler=sampler: sampler(args.per_context, contexts)
    cnf_kinds = [k for k in models if k.startswith("cnf")]
    if cnf_kinds:  # the unconditional reference: same field size, same recipe as the best cnf
        best = "cnf-fm" if "cnf-fm" in cnf_kinds else cnf_kinds[0]
        objective = "flow_matching" if best == "cnf-fm" else "likelihood"
        reference, _ = train_cnf(objective, x, None, args)
        fns["unconditional"] = lambda: reference.sample(total)
    with torch.no_grad():
        rounds = interleaved_seconds(fns, repeats=args.repeats)
        nfe = {}
        for kind in cnf_kinds:
            models[kind][1](args.per_context, contexts)
            nfe[kind] = models[kind][0].stats.nfe_forward
        if cnf_kinds:
            reference.sample(total)
            nfe["unconditional"] = reference.stats.nfe_forward
    rows = []
    for kind, seconds in rounds.items():
        row: dict[str, Any] = {"task": task, "model": kind, "seconds": statistics.median(seconds)}
        row["nfe"] = nfe.get(kind)
        if kind == "unconditional":
            row["what"] = f"{total} points, no context ({best} recipe on the marginal)"
        else:
            row["what"] = f"{args.per_context} points x {args.n_contexts} contexts, one call"
            if "unconditional" in rounds:
                ratios = [a / b for a, b in zip(seconds, rounds["unconditional"])]
                row["ratio"] = statistics.median(ratios)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks", nargs="+", default=list(CONDITIONAL_DATASETS), choices=CONDITIONAL_DATASETS
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per model and task")
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--test-n", type=int, default=5_000)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64])
    parser.add_argument("--context-mode", default="film", choices=("concat", "film"), help="cnf's MLPField")
    parser.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of cnf's solves and scoring")
    parser.add_argument("--n-contexts", type=int, default=100)
    parser.add_argument("--per-context", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-sampling", dest="sampling", action="store_false")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on shared cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few seconds per task (for the tests)")
    parser.add_argument("--name", default="conditional", help="results file name")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget, args.n_train, args.test_n, args.tol, args.threads = 0.2, 2000, 200, 1e-3, 1
        args.n_contexts, args.per_context, args.repeats, args.hidden = 5, 50, 1, [16, 16]
    args.hidden = tuple(args.hidden)
    torch.set_num_threads(args.threads)
    rows, timing = [], []
    for task in args.tasks:
        task_rows, task_timing = run_task(task, args)
        rows += task_rows
        timing += task_timing
    meta = {
        "command": "python -m benchmarks.conditional " + " ".join(sys.argv[1:] if argv is None else argv),
        "budget": args.budget,
        "n_train": args.n_train,
        "test_n": args.test_n,
        "threads": args.threads,
        "sampling": timing,
        "note": "two_moons: truth is the posterior with a Monte Carlo normaliser (20,000 draws)",
    }
    out = Path(args.out) if args.out else RESULTS
    path = write_results(args.name, rows, COLUMNS, meta, out)
    if timing:
        table = markdown_table(timing, SAMPLING_COLUMNS)
        with path.open("a") as handle:
            handle.write("\nSampling:\n\n" + table)
        print(table)
    return {"rows": rows, "sampling": timing}


if __name__ == "__main__":
    main()
