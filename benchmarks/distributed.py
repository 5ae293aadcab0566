"""Training throughput and test NLL: one process with 2 threads against 2 processes with 1 thread.

    python -m benchmarks.distributed      # ~4 min on a 2-core machine
    python -m benchmarks.distributed --quick                       # seconds; a smoke test

For maximum likelihood and OT flow matching (and flow matching with the independent coupling, to
separate the serial OT assignment from the rest of the step), the same CNF (same initial weights) is trained on the
same toy data for the same number of samples seen (steps x global batch) by

* ``1x2``: one process, 2 torch threads, batch B;
* ``2x1``: two processes (torchrun through :func:`cnf.distributed.launch`, gloo), 1 thread each,
  batch B / 2 each (the same global batch B); gradients averaged by DDP, OT pairing on the
  gathered global batch;
* ``2x1 per-rank``: the same two processes with batch B each (global batch 2B) for half the
  steps, which is what ``cnf train --nproc 2`` does with no flags (``batch_size`` is per rank).

Throughput is samples per second over the training loop (from the run's log, first step excluded:
no start-up, no validation). Test NLL is scored afterwards in this process on the same test points
for every model; the difference to the 1x2 model of the same round has a paired standard error.
Configurations are interleaved round by round (1x2, 2x1, 1x2, 2x1, ...) so that the ratio of each
round survives the drift of a shared machine. A second table times the exact OT assignment
(scipy's linear_sum_assignment) at the per-rank and the global batch sizes, and a third the
speed-up ceiling: one step on the global batch with all cores over one step on a rank's share
with its threads, in one process, no communication.

Writes benchmarks/results/distributed.{json,md}. ``--device cuda`` runs the processes on GPUs
(``--nproc`` of them, NCCL); not measured here (no GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, markdown_table, write_results
from cnf import CNF, MLPField, Solver, distributed
from cnf.checkpoint import load_checkpoint
from cnf.cli import positive_int
from cnf.data import load_data
from cnf.losses import ot_pairing
from cnf.training import train

ROOT = Path(__file__).resolve().parents[1]
DATA = "8gaussians"
TEST_SEED = 2024
#: objective -> (global batch, learning rate)
OBJECTIVES: dict[str, dict[str, Any]] = {
    "likelihood": {"batch": 256, "lr": 5e-3},
    "ot_flow_matching": {"batch": 512, "lr": 5e-3},
    "flow_matching": {"batch": 512, "lr": 5e-3},  # the same without the serial assignment
}


CEILING_COLUMNS = ["objective", "global_batch", "one_process_ms", "one_rank_share_ms", "ceiling"]


def build_flow(hidden: Sequence[int]) -> CNF:
    torch.manual_seed(0)
    return CNF(MLPField(2, hidden=tuple(hidden)), solver=Solver(rtol=1e-5, atol=1e-5))


def worker(args: argparse.Namespace) -> None:
    """One training process (of 1, or of N under torchrun): every objective in turn."""
    cluster = distributed.init(args.device) if distributed.launched_with_several_processes() else None
    cluster = cluster or distributed.current_cluster()
    torch.set_num_threads(args.threads)
    data = load_data(DATA, n=args.n_train, seed=0)
    for objective in args.objectives:
        spec = OBJECTIVES[objective]
        steps = args.ml_steps if objective == "likelihood" else args.fm_steps
        batch = spec["batch"] // cluster.world_size  # the same global batch as one process
        if args.per_rank:  # cnf train --nproc N's default: the one-process batch on every rank
            batch, steps = spec["batch"], steps // cluster.world_size
        result = train(
            build_flow(args.hidden),
            data,
            iters=steps,
            batch_size=batch,
            lr=spec["lr"],
            objective=objective,
            seed=args.seed,
            checkpoint_every=10**9,
            out=Path(args.out) / objective,
            progress=False,
            device=args.device,
        )
        if cluster.is_main:
            log = result.history
            span = log[-1]["seconds"] - log[0]["seconds"]
            summary = {
                "objective": objective,
                "processes": cluster.world_size,
                "threads": torch.get_num_threads(),
                "steps": result.step,
                "samples": result.step * batch * cluster.world_size,
                "samples_per_s": (result.step - 1) * batch * cluster.world_size / span,
                "train_seconds": result.seconds,
            }
            (Path(args.out) / objective / "summary.json").write_text(json.dumps(summary))
    if cluster.distributed:
        distributed.shutdown()


def worker_argv(args: argparse.Namespace, out: Path, threads: int, seed: int, per_rank: bool) -> list[str]:
    return ["--per-rank"] * per_rank + [
        "--worker", "--out", str(out), "--threads", str(threads), "--seed", str(seed),
        "--objectives", *args.objectives, "--ml-steps", str(args.ml_steps), "--fm-steps", str(args.fm_steps),
        "--n-train", str(args.n_train), "--hidden", *map(str, args.hidden), "--device", args.device,
    ] + (["--ml-batch", str(args.ml_batch)] if args.ml_batch is not None else [])  # fmt: skip


def run_config(
    args: argparse.Namespace, processes: int, threads: int, out: Path, seed: int, per_rank: bool = False
) -> None:
    argv = worker_argv(args, out, threads, seed, per_rank)
    env_path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"] = env_path  # the launched ranks import benchmarks/ and cnf/ from here
    if processes == 1:
        subprocess.run([sys.executable, "-m", "benchmarks.distributed", *argv], check=True, cwd=ROOT)
    else:
        distributed.launch(processes, ["benchmarks.distributed", *argv])


def score(checkpoint: Path, test: torch.Tensor) -> torch.Tensor:
    flow, _ = load_checkpoint(checkpoint)
    flow.solver = Solver(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        return -flow.log_prob(test)


def assignment_costs(sizes: Sequence[int], world: int, repeats: int) -> list[dict[str, Any]]:
    """Seconds of the exact OT assignment for a per-rank batch b and the global batch world * b."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for b in sizes:
        row: dict[str, Any] = {"per_rank_batch": b, "global_batch": world * b}
        for key, n in (("local_ms", b), ("global_ms", world * b)):
            x0, x1 = torch.randn(n, 2, generator=generator), torch.randn(n, 2, generator=generator)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                ot_pairing(x0, x1)
                times.append(time.perf_counter() - start)
            row[key] = 1e3 * sorted(times)[len(times) // 2]
        row["global_over_local"] = row["global_ms"] / row["local_ms"]
        rows.append(row)
    return rows


def step_seconds(objective: str, batch: int, threads: int, hidden: Sequence[int], repeats: int) -> float:
    """Median seconds of one training step (loss, backward, Adam) in this process, no collective."""
    from cnf.losses import flow_matching_loss

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    flow = build_flow(hidden)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3, foreach=True)
    data = load_data(DATA, n=max(batch, 1_000), seed=0)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        x = data[torch.randint(0, data.shape[0], (batch,))]
        loss = -flow.log_prob(x).mean() if objective == "likelihood" else flow_matching_loss(flow, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    torch.set_num_threads(previous)
    return sorted(times[1:])[repeats // 2]


def speedup_ceilings(
    batches: Sequence[int], nproc: int, cores: int, hidden: Sequence[int], quick: bool
) -> list[dict[str, Any]]:
    """The most ``nproc`` processes can gain on a global batch B with no communication at all:
    t(one process, all cores, B) / t(one process, cores / nproc threads, B / nproc). Below ~1.6 the
    target cannot be met by any implementation; the 2x1 rows above add the collectives."""
    rows = []
    for objective in ("likelihood", "flow_matching"):
        for batch in batches:
            repeats = 1 if quick else (5 if objective == "likelihood" else 41)
            whole = step_seconds(objective, batch, cores, hidden, repeats)
            part = step_seconds(objective, batch // nproc, max(1, cores // nproc), hidden, repeats)
            rows.append(
                {"objective": objective, "global_batch": batch, "one_process_ms": 1e3 * whole,
                 "one_rank_share_ms": 1e3 * part, "ceiling": whole / part}
            )  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of a tiny model (smoke test)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (1x2, 2x1)")
    parser.add_argument(
        "--objectives", nargs="+", default=None, choices=list(OBJECTIVES), help="default: all (--quick: ML, OT-FM)"
    )
    parser.add_argument("--ml-steps", type=int, default=80)
    parser.add_argument(
        "--ml-batch", type=positive_int, default=None, help="global batch of maximum likelihood (default 256)"
    )
    parser.add_argument("--fm-steps", type=int, default=400)
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--n-test", type=int, default=5_000)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64])
    parser.add_argument("--nproc", type=int, default=2, help="processes of the multi-process configuration")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for --nproc GPUs")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--name", default="distributed", help="results file name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--per-rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ml_batch is not None:  # the workers are started with the same flag
        OBJECTIVES["likelihood"] = {**OBJECTIVES["likelihood"], "batch": args.ml_batch}
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.rounds, args.ml_steps, args.fm_steps, args.n_train, args.n_test = 1, 4, 6, 2_000, 500
        args.hidden = [16, 16]
    if args.objectives is None:
        args.objectives = ["likelihood", "ot_flow_matching"] if args.quick else list(OBJECTIVES)
    cores = distributed.available_cores()
    # (processes, threads, per-rank batch): one process, then N sharing its global batch, then N
    # with its batch each (cnf train --nproc N's default) for the same number of samples
    threads = max(1, cores // args.nproc)
    configs = [(1, cores, False), (args.nproc, threads, False), (args.nproc, threads, True)]
    test = load_data(DATA, n=args.n_test, seed=TEST_SEED)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            reference: dict[str, torch.Tensor] = {}
            for processes, threads, per_rank in configs:
                name = f"{processes}x{threads}" + (" per-rank" if per_rank else "")
                out = Path(tmp) / f"r{round_}_{name.replace(' ', '_')}"
                run_config(args, processes, threads, out, seed=args.seed + round_, per_rank=per_rank)
                for objective in args.objectives:
                    summary = json.loads((out / objective / "summary.json").read_text())
                    nll = score(out / objective / "checkpoint.pt", test)
                    row = {"round": round_, "config": name, **summary}
                    row["test_nll"] = nll.mean().item()
                    row["test_nll_se"] = nll.std().item() / math.sqrt(nll.numel())
                    if processes == 1:
                        reference[objective] = nll
                        base = None
                    else:
                        diff = nll - reference[objective]
                        row["nll_minus_1proc"] = diff.mean().item()
                        row["diff_se"] = diff.std().item() / math.sqrt(diff.numel())
                        row["within_2se"] = abs(row["nll_minus_1proc"]) <= 2 * row["diff_se"]
                        # unpaired: each test NLL with its own standard error over test points
                        base_se = reference[objective].std().item() / math.sqrt(nll.numel())
                        row["within_2se_unpaired"] = abs(row["nll_minus_1proc"]) <= 2 * math.hypot(
                            row["test_nll_se"], base_se
                        )
                        base = next(
                            r
                            for r in rows
                            if r["round"] == round_ and r["objective"] == objective and r["processes"] == 1
                        )
                        row["speedup"] = row["samples_per_s"] / base["samples_per_s"]
                    rows.append(row)
    sizes = (64, 128) if args.quick else (128, 256, 512, 1024)
    costs = assignment_costs(sizes, args.nproc, repeats=3 if args.quick else 7)
    sizes = (64,) if args.quick else tuple(sorted({256, 1024, 4096, OBJECTIVES["likelihood"]["batch"]}))
    ceilings = speedup_ceilings(sizes, args.nproc, cores, args.hidden, args.quick)
    columns = [
        "round", "objective", "config", "steps", "samples", "samples_per_s", "speedup",
        "test_nll", "test_nll_se", "nll_minus_1proc", "diff_se", "within_2se", "within_2se_unpaired",
    ]  # fmt: skip
    speedups: dict[str, list[float]] = {}  # "objective config" -> one speed-up per round
    for row in rows:
        if "speedup" in row:
            speedups.setdefault(f"{row['objective']} {row['config']}", []).append(row["speedup"])
    meta = {
        "data": DATA,
        "objectives": {k: OBJECTIVES[k] for k in args.objectives},
        "hidden": args.hidden,
        "ml_steps": args.ml_steps,
        "fm_steps": args.fm_steps,
        "device": args.device,
        "quick": args.quick,
        "speedups": speedups,
        "assignment": costs,
        "ceilings": ceilings,
        "note": "shared 2-core machine: other jobs may have run beside these (rounds interleaved)",
    }
    out = Path(args.out) if args.out else RESULTS
    path = write_results(args.name, rows, columns, meta, out)
    with path.open("a") as handle:
        handle.write("\nExact OT assignment (scipy linear_sum_assignment, 2-D points), median ms:\n\n")
        handle.write(
            markdown_table(costs, ["per_rank_batch", "global_batch", "local_ms", "global_ms", "global_over_local"])
        )
        handle.write(
            "\nThe most the processes can gain with no communication: one step on the global batch with"
            " all cores, over one step on a rank's share with its threads (median ms, loss + backward + Adam):\n\n"
        )
        handle.write(markdown_table(ceilings, CEILING_COLUMNS))
    print(markdown_table(costs, ["per_rank_batch", "global_batch", "local_ms", "global_ms", "global_over_local"]))
    print(markdown_table(ceilings, CEILING_COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
