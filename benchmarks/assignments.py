"""OT flow matching: assignments solved inside each step against solved ahead in threads.

    python -m benchmarks.assignments                       # ~6 min
    python -m benchmarks.assignments --quick               # a smoke test

For each dataset, the model, preprocessing and recipe that ``cnf train --data NAME --objective
ot_flow_matching`` builds train for the same fixed number of steps in two settings, alternating
over rounds: ``--threads 1`` (one torch thread, each step's assignment solved in the training
thread, as before cnf.pairings) and the default ``auto`` (one torch thread below d = 256, the
assignments of the next steps solved ahead in one thread per core). Same draws in both (each step
draws from its own seeds), so the same arithmetic. Each cell is also run beside a process that
spins one core ("busy"), since the solver threads share the cores with any neighbour.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, write_results
from cnf.cli import _new_run, build_parser
from cnf.pairings import assignment_threads
from cnf.recipes import available_cores
from cnf.training import train

SPIN = "while True: pass"
DATASETS = ("8gaussians", "galaxies", "digits")


def steps_per_second(name: str, steps: int, threads: int | str) -> float:
    """OT flow-matching steps per second of the CLI's model and recipe on ``name``."""
    args = build_parser().parse_args(["train", "--data", name, "--objective", "ot_flow_matching"])
    _, flow, settings, (train_set, _, _), _ = _new_run(args)
    start = time.perf_counter()
    train(flow, train_set, settings=settings, iters=steps, val_every=10**9, progress=False, threads=threads)
    return steps / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=list(DATASETS))
    parser.add_argument("--steps", type=int, default=300, help="timed steps per cell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-busy", action="store_true", help="skip the cells beside a spinning process")
    parser.add_argument("--quick", action="store_true", help="a few steps on 8gaussians, one round, quiet only")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--name", default="assignments", help="results file name")
    args = parser.parse_args(argv)
    if args.quick:
        args.data, args.steps, args.rounds, args.no_busy = ["8gaussians"], 4, 1, True
    settings = {"in the step": 1, "ahead": "auto"}
    loads = ["quiet"] if args.no_busy else ["quiet", "busy"]
    for name in args.data:  # warm-up: first calls, data loading
        steps_per_second(name, 2, "auto")
    speeds: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name in args.data:
            for load in loads:
                neighbour = subprocess.Popen([sys.executable, "-c", SPIN]) if load == "busy" else None
                try:
                    for label, threads in settings.items():
                        speed = steps_per_second(name, args.steps, threads)
                        speeds.setdefault((name, load, label), []).append(speed)
                        print(f"{name} {load} {label}: {speed:.1f} steps/s", flush=True)
                finally:
                    if neighbour is not None:
                        neighbour.kill()
                        neighbour.wait()
    rows = []
    for name in args.data:
        for load in loads:
            before = speeds[(name, load, "in the step")]
            after = speeds[(name, load, "ahead")]
            rows.append({
                "data": name,
                "load": load,
                "steps": args.steps,
                "rounds": args.rounds,
                "in_step_steps_per_s": statistics.median(before),
                "ahead_steps_per_s": statistics.median(after),
                "speedup": statistics.median(a / b for a, b in zip(after, before)),
                "speedup_min": min(a / b for a, b in zip(after, before)),
                "speedup_max": max(a / b for a, b in zip(after, before)),
            })  # fmt: skip
    columns = ["data", "load", "steps", "rounds", "in_step_steps_per_s", "ahead_steps_per_s", "speedup", "speedup_min", "speedup_max"]
    meta = {"cores": available_cores(), "solver_threads_auto": assignment_threads("auto"), "neighbour": f'python -c "{SPIN}"'}
    path = write_results(args.name, rows, columns, meta, Path(args.out) if args.out else RESULTS)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
