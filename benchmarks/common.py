"""Shared helpers of the benchmark scripts: timing, machine record, JSON + markdown output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(
    fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall-clock seconds of each ``fns[name]()`` per round, the functions run in turn within
    each round (A B C A B C ...), so that ratios taken round by round survive machine drift."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    columns: Sequence[str],
    meta: dict[str, Any],
    out: Path | None = None,
) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` into ``out`` (default benchmarks/results)."""
    out = out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **meta, "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    table = markdown_table(rows, columns)
    header = f"Machine: {payload['machine']['cpu_count']} CPUs, torch {payload['machine']['torch']}.\n\n"
    (out / f"{name}.md").write_text(header + table)
    print(table)
    return out / f"{name}.md"
