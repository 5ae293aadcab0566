"""Solver-tolerance tuning: which solver settings to use for a trained flow.

:func:`tune` sweeps solver methods and tolerances (step sizes for fixed-step methods) on a
trained :class:`cnf.CNF` and measures, per setting, on the given points:

* the NFE and the median seconds of one scoring solve (``log_prob``, no gradients);
* the absolute error of log p per point against a reference solve (dopri8 at rtol=atol=1e-10
  in float64, on a float64 copy of the flow): its mean, an upper confidence bound of the mean
  (percentile bootstrap over the points), and the median, 99% quantile and max;
* the inverse round-trip error max |inverse(transform(x)) - x|;
* for the training direction, the relative error ||g - g_ref|| / ||g_ref|| of the gradient of
  the mean NLL with respect to the parameters, its seconds (forward + backward) and NFE.

Candidates run in the flow's own dtype (float32 as users run them), the reference in float64.
Two recommendations come out: for evaluation, the cheapest setting (fewest NFE by default,
``rank_by="seconds"`` for wall clock) whose upper confidence bound of the mean |log p error|
stays under ``budget`` nats; for training, the cheapest gradient whose relative error stays
under ``grad_budget``. The per-point error is heavy-tailed (a few points near the edge of the
data carry most of the mean), so a setting judged by its plain mean on one block of points
tends to miss its budget on the next block; the bound, and a check of the recommendation on
fresh blocks of points that took no part in the choice, say how far the choice can be trusted. The JSON written by
:meth:`TuneResult.save` is what ``cnf evaluate --solver-from tune.json`` reads.

References: Hairer, Norsett & Wanner (1993), "Solving Ordinary Differential Equations I"
(tolerances and work-precision diagrams); Efron & Tibshirani (1993), "An Introduction to the
Bootstrap" (percentile intervals); Grathwohl et al. (2019), "FFJORD"; Finlay et al. (2020),
"How to train your neural ODE" (solver cost while training).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnf.data import check_batch
from cnf.flow import CNF, base_log_prob
from cnf.solver import ADAPTIVE_METHODS, FIXED_STEP_METHODS, Solver, SolverError

DEFAULT_METHODS: tuple[str, ...] = ("dopri5", "bosh3", "rk4")
DEFAULT_TOLERANCES: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
# Fixed steps 1/2 ... 1/50: rk4's error falls like h^4, so the grid is denser where one more
# step can bring it under the 1e-3-nat budget.
DEFAULT_STEP_SIZES: tuple[float, ...] = (0.5, 0.25, 0.2, 1 / 6, 0.125, 0.1, 0.05, 0.02)
# A few rtol != atol pairs per adaptive method: (rtol, atol).
DEFAULT_MIXED: tuple[tuple[float, float], ...] = ((1e-3, 1e-5), (1e-4, 1e-6), (1e-5, 1e-3))
REFERENCE = Solver(method="dopri8", rtol=1e-10, atol=1e-10, max_steps=100_000)
BASELINE = Solver(method="dopri5", rtol=1e-5, atol=1e-5)
RANK_BY = ("nfe", "seconds")
DEFAULT_BUDGET = 1e-3
DEFAULT_GRAD_BUDGET = 1e-2
# Points per block: the grid is scored on one block, the recommendation re-checked on fresh
# ones. The bound's width shrinks like 1/sqrt(n); 4x the former 1,000 points halves it
# (benchmarks/results/tune shows mean and bound per setting).
DEFAULT_N_LOGP = 4000
DEFAULT_FRESH_BLOCKS = 3
DEFAULT_CONFIDENCE = 0.95

COLUMNS = (
    "setting",
    "nfe",
    "seconds",
    "logp_err_mean",
    "logp_err_ucb",
    "logp_err_median",
    "logp_err_q99",
    "logp_err_max",
    "roundtrip_err",
    "grad_rel_err",
    "grad_seconds",
    "grad_nfe",
    "status",
)


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def mean_upper_bound(
    errors: torch.Tensor,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = 2000,
    generator: torch.Generator | None = None,
) -> float:
    """One-sided upper confidence bound of the mean of ``errors``: the ``confidence`` quantile
    of the means of ``resamples`` bootstrap resamples (Efron's percentile bootstrap)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    errors = errors.detach().double().reshape(-1).cpu()
    n = errors.numel()
    if n == 0:
        raise ValueError("errors must hold at least one value, got an empty tensor")
    means = []
    step = max(1, 2_000_000 // n)  # resamples per batch: ~16 MB of indices at a time
    for start in range(0, resamples, step):
        count = min(step, resamples - start)
        index = torch.randint(0, n, (count, n), generator=generator)
        means.append(errors[index].mean(dim=1))
    return torch.quantile(torch.cat(means), confidence).item()


def error_summary(
    errors: torch.Tensor, confidence: float, generator: torch.Generator | None = None
) -> dict[str, float]:
    """Mean, its upper confidence bound, median, 99% quantile and max of per-point errors."""
    errors = errors.detach().double().reshape(-1).cpu()
    return {
        "logp_err_mean": errors.mean().item(),
        "logp_err_ucb": mean_upper_bound(errors, confidence, generator=generator),
        "logp_err_median": errors.median().item(),
        "logp_err_q99": torch.quantile(errors, 0.99).item(),
        "logp_err_max": errors.max().item(),
    }


def label(solver: Solver) -> str:
    """A short name of a setting: ``dopri5 rtol=1e-05 atol=1e-05`` or ``rk4 h=0.05``."""
    if solver.is_adaptive:
        return f"{solver.method} rtol={solver.rtol:.0e} atol={solver.atol:.0e}"
    return f"{solver.method} h={solver.fixed_step:g}"


def candidate_solvers(
    methods: Sequence[str] = DEFAULT_METHODS,
    tolerances: Sequence[float] = DEFAULT_TOLERANCES,
    step_sizes: Sequence[float] = DEFAULT_STEP_SIZES,
    mixed: Sequence[tuple[float, float]] = DEFAULT_MIXED,
    *,
    adjoint: bool = False,
    max_steps: int = 500,
) -> list[Solver]:
    """The grid of settings: rtol=atol (and the ``mixed`` pairs) for adaptive methods, step sizes
    for fixed-step ones."""
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a non-empty sequence of method names, got {methods!r}")
    known = ADAPTIVE_METHODS + FIXED_STEP_METHODS
    for method in methods:
        if method not in known:
            raise ValueError(f"unknown method {method!r} in methods; choose from {known}")
    # Loose to tight, so that a method that fails stops there (see tune).
    tolerances = sorted((_check_positive("tolerances", t) for t in tolerances), reverse=True)
    step_sizes = sorted((_check_positive("step_sizes", h) for h in step_sizes), reverse=True)
    pairs = [(_check_positive("mixed rtol", r), _check_positive("mixed atol", a)) for r, a in mixed]
    solvers: list[Solver] = []
    for method in methods:
        if method in ADAPTIVE_METHODS:
            settings = [(t, t) for t in tolerances] + [p for p in pairs if p[0] != p[1]]
            for rtol, atol in settings:
                solvers.append(Solver(method, rtol=rtol, atol=atol, adjoint=adjoint, max_steps=max_steps))
        else:
            for h in step_sizes:
                solvers.append(Solver(method, step_size=h, adjoint=adjoint, max_steps=max_steps))
    return list(dict.fromkeys(solvers))  # keeps order, drops duplicates


def _median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up; and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _log_prob(flow: CNF, x: torch.Tensor, probe: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p1(x), z) from one scoring solve."""
    z, delta = flow.transform(x, probe=probe)
    return base_log_prob(flow.base, z) + delta, z


def _gradient(flow: CNF, x: torch.Tensor, probe: torch.Tensor | None) -> torch.Tensor:
    """Flattened gradient of the mean NLL of ``x`` with respect to the flow's parameters."""
    params = [p for p in flow.parameters() if p.requires_grad]
    loss = -flow.log_prob(x, probe=probe).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


@dataclass
class TuneResult:
    """Rows of measurements, the reference, and the two recommendations of :func:`tune`."""

    rows: list[dict[str, Any]]
    reference: dict[str, Any]
    recommended: dict[str, Any]
    budget: float
    grad_budget: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_nats": self.budget,
            "grad_budget": self.grad_budget,
            "recommended": self.recommended,
            "reference": self.reference,
            **self.meta,
            "rows": self.rows,
        }

    def to_markdown(self) -> str:
        """The machine, the table of all settings, then the recommendations."""
        machine = self.meta.get("machine", {})
        lines = []
        if machine:
            lines += [
                f"Machine: {machine['cpu_count']} CPUs, torch {machine['torch']}, "
                f"{self.meta.get('threads')} thread(s).",
                "",
            ]
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for row in self.rows:
            cells = []
            for column in COLUMNS:
                value = row.get(column)
                if isinstance(value, float):
                    cells.append(f"{value:.3g}")
                else:
                    cells.append("" if value is None else str(value))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for use in ("evaluation", "training"):
            rec = self.recommended.get(use)
            if rec is not None:
                lines.append(f"**{use}**: {rec['setting']} — {rec['note']}")
                lines.append("")
        fresh = (self.recommended.get("evaluation") or {}).get("fresh")
        if fresh:
            lines += [
                "The evaluation recommendation on fresh points (none took part in the choice):",
                "",
                "| block | points | mean | median | 99% | max | within budget |",
                "|---|---|---|---|---|---|---|",
            ]
            for i, block in enumerate(fresh):
                lines.append(
                    f"| {i + 1} | {block['n']} | {block['logp_err_mean']:.3g} | {block['logp_err_median']:.3g} "
                    f"| {block['logp_err_q99']:.3g} | {block['logp_err_max']:.3g} | "
                    f"{'yes' if block['met_budget'] else 'NO'} |"
                )
            lines.append("")
        return "\n".join(lines)

    def figure(self) -> Any:
        """Pareto plot: log p error against seconds (left) and gradient error against seconds
        (right), one line per method; a matplotlib Figure (no global backend is touched)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        ok = [r for r in self.rows if r["status"] == "ok"]
        panels = [("seconds", "logp_err_mean", self.budget, "scoring seconds", "mean |log p error| (nats)")]
        if any(r.get("grad_rel_err") is not None for r in ok):  # absent with gradients=False
            panels.append(
                (
                    "grad_seconds",
                    "grad_rel_err",
                    self.grad_budget,
                    "gradient seconds",
                    "relative gradient error",
                )
            )
        fig = Figure(figsize=(5.5 * len(panels), 4.2))
        FigureCanvasAgg(fig)
        methods = list(dict.fromkeys(r["method"] for r in ok))
        colors = {m: f"C{i}" for i, m in enumerate(methods)}
        for i, (xkey, ykey, limit, xlabel, ylabel) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            for method in methods:
                points = [
                    r for r in ok if r["method"] == method and r[xkey] is not None and r[ykey] is not None
                ]
                line = [r for r in points if not r["mixed"]]  # loose to tight
                ax.plot(
                    [r[xkey] for r in line],
                    [max(r[ykey], 1e-16) for r in line],
                    "o-",
                    color=colors[method],
                    label=method,
                )
                if ykey == "logp_err_mean":  # a bar up to the upper confidence bound of the mean
                    ax.vlines(
                        [r[xkey] for r in line],
                        [max(r[ykey], 1e-16) for r in line],
                        [max(r["logp_err_ucb"], 1e-16) for r in line],
                        color=colors[method],
                        alpha=0.6,
                    )
                extra = [r for r in points if r["mixed"]]
                if extra:
                    ax.plot(
                        [r[xkey] for r in extra],
                        [max(r[ykey], 1e-16) for r in extra],
                        "x",
                        color=colors[method],
                        label=f"{method} rtol≠atol",
                    )
            ax.axhline(limit, color="k", linestyle="--", linewidth=1, label=f"budget {limit:g}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("solver settings: error against cost (lower left is better; bars: upper bound)")
        fig.tight_layout()
        return fig

    def save(self, out: str | Path, name: str = "tune") -> dict[str, Path]:
        """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "plot": out / f"{name}.png"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2))
        paths["markdown"].write_text(self.to_markdown())
        self.figure().savefig(paths["plot"], dpi=120)
        return paths


def _recommend(
    rows: list[dict[str, Any]], error_key: str, cost_key: str, nfe_key: str, limit: float, rank_by: str
) -> dict[str, Any] | None:
    ok = [r for r in rows if r["status"] == "ok" and r[error_key] is not None and math.isfinite(r[error_key])]
    if not ok:
        return None
    within = [r for r in ok if r[error_key] <= limit]
    if within:
        ranks = (nfe_key, cost_key) if rank_by == "nfe" else (cost_key, nfe_key)
        best = min(within, key=lambda r: (r[ranks[0]], r[ranks[1]]))
        met = True
    else:  # nothing meets the budget: the most accurate setting, flagged
        best = min(ok, key=lambda r: r[error_key])
        met = False
    baseline = next((r for r in ok if r["setting"] == label(BASELINE)), None)
    speedup = baseline[cost_key] / best[cost_key] if baseline and best[cost_key] > 0 else None
    nfe_ratio = baseline[nfe_key] / best[nfe_key] if baseline and best[nfe_key] else None
    recommendation = {
        "setting": best["setting"],
        "solver": best["solver"],
        "error_key": error_key,
        "error": best[error_key],
        "budget": limit,
        "seconds": best[cost_key],
        "nfe": best[nfe_key],
        "rank_by": rank_by,
        "met_budget": met,
        "speedup_vs_baseline": speedup,
        "speedup_measured": "from the grid's medians",
        "nfe_ratio_vs_baseline": nfe_ratio,
        "baseline": label(BASELINE),
    }
    recommendation["note"] = _note(recommendation)
    return recommendation


def _note(rec: dict[str, Any]) -> str:
    """One line that says what a recommendation costs and saves."""
    speedup, nfe_ratio = rec["speedup_vs_baseline"], rec["nfe_ratio_vs_baseline"]
    return (
        f"{rec['error_key']}={rec['error']:.2g} (budget {rec['budget']:g}), {rec['seconds']:.3g} s, "
        f"NFE {rec['nfe']}"
        + (
            f", {speedup:.2f}x faster ({rec['speedup_measured']}; {nfe_ratio:.2f}x fewer NFE) "
            f"than {rec['baseline']}"
            if speedup
            else ""
        )
        + ("" if rec["met_budget"] else "; NO setting met the budget: this is the most accurate one")
        + _fresh_note(rec.get("fresh"))
    )


def _fresh_note(fresh: list[dict[str, Any]] | None) -> str:
    if not fresh:
        return ""
    means = ", ".join(f"{block['logp_err_mean']:.2g}" for block in fresh)
    missed = sum(not block["met_budget"] for block in fresh)
    verdict = "within the budget on all" if not missed else f"OVER the budget on {missed} of"
    return f"; mean error on {len(fresh)} fresh blocks of points {means}: {verdict} {len(fresh)}"


def _paired_speedup(
    flow: CNF, run: Callable[[], Any], baseline: Solver, candidate: Solver, pairs: int
) -> float:
    """Median over ``pairs`` of (baseline seconds / candidate seconds), the two timed back to back.

    The grid times every setting at a different moment, so a change in the load of a shared
    machine shows up in its ratios; timing the two alternately (in ABBA order, so neither
    always runs first) moves both alike.
    """
    ratios = []
    for i in range(pairs):
        seconds = {}
        for solver in (baseline, candidate) if i % 2 == 0 else (candidate, baseline):  # ABBA order
            flow.solver = solver
            start = time.perf_counter()
            run()
            seconds[solver is baseline] = time.perf_counter() - start
        ratios.append(seconds[True] / seconds[False])
    return statistics.median(ratios)


def _check_fresh(
    flow: CNF,
    ref_flow: CNF,
    blocks: Sequence[torch.Tensor],
    probe: torch.Tensor | None,
    budget: float,
    confidence: float,
    generator: torch.Generator,
) -> list[dict[str, Any]]:
    """Errors of ``flow``'s current solver on each block of new points, against the reference."""
    results = []
    for block in blocks:
        block_probe = None
        if probe is not None:  # the same kind of probe, drawn anew for these points
            from cnf.divergence import draw_probe

            block_probe = draw_probe(block.double(), flow.noise, generator)
        with torch.no_grad():
            logp, _ = _log_prob(flow, block, None if block_probe is None else block_probe.to(block.dtype))
            ref_logp, _ = _log_prob(ref_flow, block.double(), block_probe)
        summary = error_summary((logp.double() - ref_logp).abs(), confidence, generator)
        results.append(
            {"n": int(block.shape[0]), **summary, "met_budget": summary["logp_err_mean"] <= budget}
        )
    return results


def tune(
    flow: nn.Module,
    data: torch.Tensor,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    tolerances: Sequence[float] = DEFAULT_TOLERANCES,
    step_sizes: Sequence[float] = DEFAULT_STEP_SIZES,
    mixed: Sequence[tuple[float, float]] = DEFAULT_MIXED,
    budget: float = DEFAULT_BUDGET,
    grad_budget: float = DEFAULT_GRAD_BUDGET,
    n_logp: int = DEFAULT_N_LOGP,
    n_grad: int = 256,
    repeats: int = 3,
    reference: Solver = REFERENCE,
    gradients: bool = True,
    max_steps: int = 500,
    seed: int = 0,
    rank_by: str = "nfe",
    confidence: float = DEFAULT_CONFIDENCE,
    fresh_blocks: int = DEFAULT_FRESH_BLOCKS,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Measure every solver setting on ``flow`` and recommend one for evaluation and training.

    Args:
        flow: a trained :class:`cnf.CNF` (its own solver is left unchanged).
        data: points (n, dim); the first ``n_logp`` score every setting, the first ``n_grad``
            give gradients, and up to ``fresh_blocks`` further blocks of ``n_logp`` points
            re-check the evaluation recommendation (pass ``(1 + fresh_blocks) * n_logp``).
        methods, tolerances, step_sizes, mixed: the grid (see :func:`candidate_solvers`);
            ``dopri5`` at rtol=atol=1e-5 is always added as the baseline of the speed-ups.
        budget: largest upper confidence bound of the mean |log p error| (nats) of the
            evaluation recommendation.
        grad_budget: largest relative gradient error of the training recommendation.
        repeats: timed runs per setting (median), after one warm-up.
        reference: the tight solve, run in float64.
        gradients: measure the training direction (off: faster, no training recommendation).
        max_steps: step budget of each candidate solve (a setting that exceeds it is reported
            as failed, not raised, and the tighter settings of its method are skipped).
        seed: seeds the Hutchinson probe, shared by every setting and the reference.
        rank_by: what "cheapest" means: ``nfe`` (default; field evaluations, which set the
            cost and, unlike seconds, do not move with the load of a shared machine; ties
            go to the faster) or ``seconds`` (median wall clock; ties go to fewer NFE).
        confidence: level of that one-sided bound (percentile bootstrap over the points).
        fresh_blocks: how many blocks of new points re-check the evaluation recommendation
            (fewer when ``data`` is short; 0 skips the check).
        progress: called with one line per setting (e.g. ``print``).
    """
    if not isinstance(flow, CNF):
        raise TypeError(f"flow must be a cnf.CNF (solver tuning needs an ODE), got {type(flow).__name__}")
    check_batch(data, flow.dim, "data")
    budget = _check_positive("budget", budget)
    grad_budget = _check_positive("grad_budget", grad_budget)
    n_logp = _check_count("n_logp", n_logp)
    n_grad = _check_count("n_grad", n_grad)
    repeats = _check_count("repeats", repeats)
    if isinstance(fresh_blocks, bool) or not isinstance(fresh_blocks, int) or fresh_blocks < 0:
        raise ValueError(f"fresh_blocks must be a non-negative int, got {fresh_blocks!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, float) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    if not isinstance(reference, Solver):
        raise TypeError(f"reference must be a cnf.Solver, got {reference!r}")
    candidates = candidate_solvers(
        methods, tolerances, step_sizes, mixed, adjoint=flow.solver.adjoint, max_steps=max_steps
    )
    baseline = BASELINE.with_(adjoint=flow.solver.adjoint, max_steps=max_steps)
    if baseline not in candidates:
        candidates.append(baseline)

    dtype = next(flow.parameters()).dtype
    x = data[:n_logp].to(dtype)
    xg = data[:n_grad].to(dtype)
    fresh = [data[start : start + n_logp].to(dtype) for start in range(n_logp, data.shape[0], n_logp)]
    fresh = fresh[:fresh_blocks]
    generator = torch.Generator().manual_seed(seed)
    bootstrap = torch.Generator().manual_seed(seed + 1)
    probe = probe_grad = None
    if flow.divergence == "hutchinson":
        from cnf.divergence import draw_probe

        probe = draw_probe(x.double(), flow.noise, generator)
        probe_grad = probe[:n_grad] if n_grad <= n_logp else draw_probe(xg.double(), flow.noise, generator)

    # The reference: a float64 copy of the flow, tight solve.
    ref_flow = copy.deepcopy(flow).double()
    ref_flow.solver = reference
    start = time.perf_counter()
    with torch.no_grad():
        ref_logp, _ = _log_prob(ref_flow, x.double(), probe)
    ref_nfe = ref_flow.stats.nfe_forward
    ref_grad = _gradient(ref_flow, xg.double(), probe_grad) if gradients else None
    reference_info = {
        "setting": label(reference) + " float64",
        "solver": reference.to_dict(),
        "nfe": ref_nfe,
        "seconds": time.perf_counter() - start,
        "mean_log_prob": ref_logp.mean().item(),
    }
    if progress:
        progress(f"reference {reference_info['setting']}: NFE {ref_nfe}, {reference_info['seconds']:.2f} s")

    original_solver = flow.solver
    was_training = flow.training
    flow.eval()
    p32 = None if probe is None else probe.to(dtype)
    pg32 = None if probe_grad is None else probe_grad.to(dtype)
    rows: list[dict[str, Any]] = []
    failed: dict[str, float] = {}  # method -> the loosest setting that failed
    try:
        for solver in candidates:
            tightness = max(solver.rtol, solver.atol) if solver.is_adaptive else solver.fixed_step
            flow.solver = solver
            row: dict[str, Any] = {
                "setting": label(solver),
                "method": solver.method,
                "rtol": solver.rtol if solver.is_adaptive else None,
                "atol": solver.atol if solver.is_adaptive else None,
                "step_size": None if solver.is_adaptive else solver.fixed_step,
                "mixed": solver.is_adaptive and solver.rtol != solver.atol,
                "solver": solver.to_dict(),
                "nfe": None,
                "seconds": None,
                "logp_err_mean": None,
                "logp_err_ucb": None,
                "logp_err_median": None,
                "logp_err_q99": None,
                "logp_err_max": None,
                "roundtrip_err": None,
                "grad_rel_err": None,
                "grad_seconds": None,
                "grad_nfe": None,
                "status": "ok",
            }
            if tightness <= failed.get(solver.method, 0.0):
                row["status"] = "skipped: a looser setting of this method failed"
                rows.append(row)
                continue
            try:
                with torch.no_grad():
                    seconds, (logp, z) = _median_seconds(lambda: _log_prob(flow, x, p32), repeats)
                    row["nfe"] = flow.stats.nfe_forward
                    row["seconds"] = seconds
                    row.update(error_summary((logp.double() - ref_logp).abs(), confidence, bootstrap))
                    back = flow.inverse(z)
                    row["roundtrip_err"] = (back - x).abs().max().item()
                if gradients:
                    grad_seconds, grad = _median_seconds(
                        lambda: _gradient(flow, xg, pg32), max(1, repeats - 1)
                    )
                    row["grad_seconds"] = grad_seconds
                    row["grad_nfe"] = flow.stats.nfe
                    diff = (grad.double() - ref_grad).norm() / ref_grad.norm().clamp_min(1e-300)
                    row["grad_rel_err"] = diff.item()
            except SolverError as error:
                row["status"] = f"failed: {str(error).split(';')[0]}"
                failed[solver.method] = max(failed.get(solver.method, 0.0), tightness)
            if row["status"] == "ok" and not all(
                math.isfinite(row[k]) for k in ("logp_err_mean", "logp_err_ucb", "roundtrip_err")
            ):
                row["status"] = "failed: non-finite result"
            rows.append(row)
            if progress:
                progress(
                    f"{row['setting']:<32} NFE {row['nfe']}  {row['seconds'] or float('nan'):.4f} s  "
                    f"logp err {row['logp_err_mean'] or float('nan'):.2e} "
                    f"(bound {row['logp_err_ucb'] or float('nan'):.2e})  "
                    f"grad err {row['grad_rel_err'] or float('nan'):.2e}  {row['status']}"
                )
        recommended: dict[str, Any] = {
            "evaluation": _recommend(rows, "logp_err_ucb", "seconds", "nfe", budget, rank_by)
        }
        evaluation = recommended["evaluation"]
        if evaluation is not None and fresh:
            flow.solver = Solver.from_dict(evaluation["solver"])
            evaluation["fresh"] = _check_fresh(flow, ref_flow, fresh, probe, budget, confidence, bootstrap)
            evaluation["fresh_met_budget"] = all(block["met_budget"] for block in evaluation["fresh"])
            evaluation["note"] = _note(evaluation)
        if gradients:
            recommended["training"] = _recommend(
                rows, "grad_rel_err", "grad_seconds", "grad_nfe", grad_budget, rank_by
            )
        # The speed-ups quoted are re-measured with the baseline and the recommendation timed
        # alternately (2 * repeats + 1 pairs), not taken from two rows timed minutes apart.
        runs = {"evaluation": lambda: _log_prob(flow, x, p32), "training": lambda: _gradient(flow, xg, pg32)}
        for use, rec in recommended.items():
            if rec is None or rec["speedup_vs_baseline"] is None or rec["setting"] == rec["baseline"]:
                continue
            candidate = Solver.from_dict(rec["solver"])
            with torch.no_grad() if use == "evaluation" else contextlib.nullcontext():
                rec["speedup_vs_baseline"] = _paired_speedup(
                    flow, runs[use], baseline, candidate, 2 * repeats + 1
                )
            rec["speedup_measured"] = f"median of {2 * repeats + 1} back-to-back pairs"
            rec["note"] = _note(rec)
    finally:
        flow.solver = original_solver
        flow.train(was_training)

    meta = {
        "n_logp": int(x.shape[0]),
        "confidence": confidence,
        "fresh_blocks": len(fresh),
        "n_grad": int(xg.shape[0]),
        "dtype": str(dtype).replace("torch.", ""),
        "divergence": flow.divergence,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()},
    }
    return TuneResult(rows, reference_info, recommended, budget, grad_budget, meta)
