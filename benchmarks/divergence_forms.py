"""Which exact-divergence form is fastest per dimension.

    python -m benchmarks.divergence_forms --checkpoint runs/8g/checkpoint.pt   # ~2 min on 2 cores
    python -m benchmarks.divergence_forms --quick    # seconds; what the tests run

Times one field evaluation with its exact divergence for a 64x3 MLPField, with a graph for
training (then backward, as in a maximum-likelihood step) and without (evaluation), against the
field alone (``field_only``: no divergence, the floor of any exact form), in three forms: the autograd coordinate loop and the batched vector-Jacobian product (what any field
gets; their crossover sets BATCHED_EXACT_FROM_DIM) and MLPField's forward-mode
``velocity_and_divergence`` (what cnf uses for MLPField). The three run in turn within each
round; the speed-up is the median of the per-round ratios (fastest autograd form / forward mode).

Then whole solves (``divergence_solves.{json,md}``): one 2-D field (``--checkpoint``, else a
random 64x3 MLPField) in a CNF as it is (forward mode) and behind ``cnf.fields.AutogradField``,
which hides ``velocity_and_divergence`` (autograd), dopri5 at 1e-5: scoring 10,000 8gaussians points and a
512-point maximum-likelihood step, the two taking turns.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import interleaved_seconds, write_results
from cnf import CNF, Solver
from cnf.checkpoint import load_checkpoint
from cnf.data import sample_toy
from cnf.divergence import exact_divergence_batched, exact_divergence_loop
from cnf.fields import AutogradField, MLPField


def step_of(form, dim: int, batch: int, create_graph: bool) -> Callable[[], None]:
    """Field + exact divergence (+ backward when training); ``form`` is an autograd form, None
    for MLPField's forward mode, or "field_only" for the field without its divergence (the
    floor every exact form builds on)."""
    torch.manual_seed(0)
    field = MLPField(dim)
    x = torch.randn(batch, dim)
    t = torch.tensor(0.5)

    def step() -> None:
        with torch.set_grad_enabled(create_graph):
            if form == "field_only":
                f = field(t, x)
                div = f[:, 0]
            elif form is None:
                f, div = field.velocity_and_divergence(t, x.clone().requires_grad_(create_graph))
            else:
                xr = x.clone().requires_grad_(True)
                with torch.enable_grad():  # autograd needs a graph even to evaluate
                    f = field(t, xr)
                    div = form(f, xr, create_graph)
        if create_graph:
            (div.sum() + f.sum()).backward()

    return step


def solve_rows(field: nn.Module, points: int, batch: int, repeats: int) -> list[dict[str, Any]]:
    """Scoring and one training step, forward mode against autograd, in whole dopri5 solves."""
    solver = Solver("dopri5", rtol=1e-5, atol=1e-5)
    flows = {"forward_mode": CNF(field, solver=solver), "autograd": CNF(AutogradField(field), solver=solver)}
    x = torch.as_tensor(sample_toy("8gaussians", points, seed=1), dtype=torch.float32)

    def scoring(flow: CNF) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                flow.log_prob(x)

        return run

    def training(flow: CNF) -> Callable[[], None]:
        def run() -> None:
            field.zero_grad(set_to_none=True)
            (-flow.log_prob(x[:batch]).mean()).backward()

        return run

    rows = []
    for case, make in ((f"scoring {points} points", scoring), (f"training step, batch {batch}", training)):
        rounds = interleaved_seconds({k: make(flow) for k, flow in flows.items()}, repeats=repeats)
        ratios = [a / f for a, f in zip(rounds["autograd"], rounds["forward_mode"])]
        rows.append(
            {
                "case": case,
                "forward_mode_s": statistics.median(rounds["forward_mode"]),
                "autograd_s": statistics.median(rounds["autograd"]),
                "nfe": flows["forward_mode"].stats.nfe_forward,
                "speedup": statistics.median(ratios),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8, 16, 32])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--checkpoint", default=None, help="a 2-D CNF checkpoint for the whole-solve timings")
    parser.add_argument("--points", type=int, default=10_000, help="points scored in the whole-solve timing")
    parser.add_argument("--solve-repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="tiny run for the tests")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.batch, args.repeats, args.points, args.solve_repeats = [2, 4], 16, 2, 64, 1
    out = Path(args.out) if args.out else None
    rows = []
    for dim in args.dims:
        for mode, create_graph in (("training", True), ("evaluation", False)):
            forms = {
                "field_only": "field_only",
                "loop": exact_divergence_loop,
                "batched": exact_divergence_batched,
                "forward_mode": None,
            }
            steps = {name: step_of(form, dim, args.batch, create_graph) for name, form in forms.items()}
            rounds = interleaved_seconds(steps, repeats=args.repeats, warmup=2)
            times = {name: statistics.median(seconds) for name, seconds in rounds.items()}
            autograd = min(("loop", "batched"), key=times.get)
            ratios = [a / b for a, b in zip(rounds[autograd], rounds["forward_mode"])]
            rows.append(
                {
                    "dim": dim,
                    "mode": mode,
                    **{f"{form}_ms": seconds * 1e3 for form, seconds in times.items()},
                    "fastest_autograd": autograd,
                    "forward_mode_speedup": statistics.median(ratios),
                }
            )
    write_results(
        "divergence_forms",
        rows,
        [
            "dim",
            "mode",
            "field_only_ms",
            "loop_ms",
            "batched_ms",
            "forward_mode_ms",
            "fastest_autograd",
            "forward_mode_speedup",
        ],
        {"batch": args.batch, "repeats": args.repeats},
        out,
    )
    if args.checkpoint:
        field = load_checkpoint(args.checkpoint)[0].field
    else:
        torch.manual_seed(0)
        field = MLPField(2)
    write_results(
        "divergence_solves",
        solve_rows(field, args.points, min(512, args.points), args.solve_repeats),
        ["case", "forward_mode_s", "autograd_s", "nfe", "speedup"],
        {"checkpoint": args.checkpoint, "solver": "dopri5 rtol=atol=1e-5", "repeats": args.solve_repeats},
        out,
    )


if __name__ == "__main__":
    main()
