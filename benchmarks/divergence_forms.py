"""Which exact-divergence form is fastest per dimension (sets BATCHED_EXACT_FROM_DIM).

    python benchmarks/divergence_forms.py            # d = 2, 8, 16, 32; writes results/divergence_forms.*

Times one divergence evaluation with a graph for training (create_graph=True, then backward),
as in a maximum-likelihood step, for the coordinate loop and the batched vector-Jacobian form.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from benchmarks.common import median_seconds, write_results
from cnf.divergence import exact_divergence_batched, exact_divergence_loop
from cnf.fields import MLPField


def time_form(form, dim: int, batch: int, create_graph: bool, repeats: int) -> float:
    torch.manual_seed(0)
    field = MLPField(dim)
    x = torch.randn(batch, dim)
    t = torch.tensor(0.5)

    def step() -> None:
        xr = x.clone().requires_grad_(True)
        f = field(t, xr)
        div = form(f, xr, create_graph)
        if create_graph:
            div.sum().backward()

    return median_seconds(step, repeats=repeats)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8, 16, 32])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny run for the tests")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.batch, args.repeats = [2, 4], 16, 2
    rows = []
    for dim in args.dims:
        for mode, create_graph in (("training", True), ("evaluation", False)):
            loop = time_form(exact_divergence_loop, dim, args.batch, create_graph, args.repeats)
            batched = time_form(exact_divergence_batched, dim, args.batch, create_graph, args.repeats)
            rows.append(
                {
                    "dim": dim,
                    "mode": mode,
                    "loop_ms": loop * 1e3,
                    "batched_ms": batched * 1e3,
                    "fastest": "loop" if loop <= batched else "batched",
                }
            )
    from pathlib import Path

    write_results(
        "divergence_forms",
        rows,
        ["dim", "mode", "loop_ms", "batched_ms", "fastest"],
        {"batch": args.batch, "repeats": args.repeats},
        Path(args.out) if args.out else None,
    )


if __name__ == "__main__":
    main()
