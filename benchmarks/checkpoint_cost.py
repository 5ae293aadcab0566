"""What one checkpoint costs early and late in a long flow-matching run (seconds and bytes).

    python -m benchmarks.checkpoint_cost      # 20,000 flow-matching steps, ~1-2 min
    python -m benchmarks.checkpoint_cost --quick                      # a smoke test

``cnf.train`` runs the ``flow_matching`` recipe (EMA included) on 8gaussians with a checkpoint
every 100 steps; every ``save_checkpoint`` call of the loop is timed (serialisation, both
SHA-256 checksums, write, fsync, rename). The table compares the first saves (steps 100-500)
with the last ones (the 5 before ``--steps``): the history lives in ``train_log.jsonl``, not in
the checkpoint, so a late save should cost what an early one does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import cnf.training
from benchmarks.common import RESULTS, write_results
from cnf import CNF, MLPField
from cnf.data import sample_toy
from cnf.recipes import recipe


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--quick", action="store_true", help="300 steps")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.every = 300, 25
    saves: list[dict[str, Any]] = []
    original = cnf.training.save_checkpoint

    def timed_save(path: Path, flow: torch.nn.Module, **extra: Any) -> Path:
        start = time.perf_counter()
        result = original(path, flow, **extra)
        if Path(path).name == cnf.training.CHECKPOINT_NAME:
            saves.append({"step": extra["step"], "seconds": time.perf_counter() - start, "bytes": result.stat().st_size})
        return result

    torch.manual_seed(0)
    flow = CNF(MLPField(2, hidden=(64, 64, 64)))
    data = sample_toy("8gaussians", 100_000, seed=0)
    settings = {**recipe("flow_matching"), "iters": args.steps, "checkpoint_every": args.every}
    cnf.training.save_checkpoint = timed_save
    try:
        with tempfile.TemporaryDirectory() as folder:
            cnf.training.train(flow, data, out=folder, progress=False, threads=1, **settings)
            log_bytes = (Path(folder) / cnf.training.LOG_NAME).stat().st_size
    finally:
        cnf.training.save_checkpoint = original
    periodic = [s for s in saves if s["step"] % args.every == 0][:-1]  # the final save repeats the last
    groups = {"first 5 saves": periodic[:5], "last 5 saves": periodic[-5:]}
    rows = [
        {
            "saves": name,
            "steps": f"{group[0]['step']}-{group[-1]['step']}",
            "median_ms": 1e3 * statistics.median(s["seconds"] for s in group),
            "max_ms": 1e3 * max(s["seconds"] for s in group),
            "bytes": group[-1]["bytes"],
        }
        for name, group in groups.items()
    ]
    rows[1]["late_vs_early"] = rows[1]["median_ms"] / rows[0]["median_ms"]
    meta = {"steps": args.steps, "every": args.every, "log_bytes": log_bytes, "saves": saves}
    path = write_results(
        "checkpoint_cost",
        rows,
        ["saves", "steps", "median_ms", "max_ms", "bytes", "late_vs_early"],
        meta,
        Path(args.out) if args.out else RESULTS,
    )
    print(f"wrote {path}; train_log.jsonl reached {log_bytes} bytes")
    return rows


if __name__ == "__main__":
    main()
