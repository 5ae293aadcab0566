"""Speed at equal error: cnf against flow_matching, torchdyn and zuko, every method of each.

    python -m benchmarks.work_precision --checkpoint runs/8g/checkpoint.pt --dims 2 --threads 1
    python -m benchmarks.work_precision --dims 16 --threads 1      # one segment per call ...
    python -m benchmarks.work_precision --quick                     # seconds; what the tests run

Comparing libraries at one nominal tolerance rewards a looser error control; this compares them
at equal error (a work-precision diagram, Hairer, Norsett & Wanner 1993, sec. II.10). One
velocity field (cnf's MLPField: a trained 2-D model from ``--checkpoint``, else one trained for
``--train-seconds`` on 8gaussians; random 64-64-64 fields for d > 2) scores ``--n`` points in
float32 with the exact divergence through each library with each of its methods, tolerances
(adaptive) or step counts (fixed step) from loose to tight. Error: mean over the points of
|log p - reference|, the reference a float64 dopri8 solve at rtol = atol = 1e-10 (on the first
``--n-error`` points where that solve would be too slow). Each setting runs once to get its
error and NFE; then for each library and error level (1e-2 ... 1e-5) the cheapest setting that
reaches it is timed again, all libraries' picks taking turns within each of ``--rounds`` rounds,
and the median decides the time to reach that level and cnf's ratio to the fastest peer.

Also per evaluation (one call of field + divergence at batch n, medians of interleaved rounds):
the matrix products alone (the floor under any exact form: the field's, plus d rows per
sample through the hidden-to-hidden products), the field alone, cnf's forward mode (chunked by bytes,
as one block, in chunks of 4,096 / d samples, and before the logistic form and the byte-sized
chunks), autograd vector-Jacobian products (torchdyn's form) and flow_matching's loop.

Each call measures the (dimension, threads) segments it is given and writes one partial file
per segment (``work_precision_d{d}_t{threads}.json``); every call then rebuilds the summary
``work_precision.{json,md,png}`` from all partials present in ``--out``, so the segments can be
run one at a time, never beside another benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import signal
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import peers
from benchmarks.common import RESULTS, interleaved_seconds, machine, markdown_table
from benchmarks.peers import TEST_SEED, Counted, TimeAttribute, peer_status
from cnf import CNF, MLPField, Solver
from cnf.checkpoint import load_checkpoint
from cnf.data import sample_toy
from cnf.divergence import exact_divergence_batched, exact_divergence_loop
from cnf.fields.mlp import activation_derivative, forward_mode_divergence
from cnf.flow import StandardNormal
from cnf.training import train

NAME = "work_precision"
LEVELS = (1e-2, 1e-3, 1e-4, 1e-5)
REFERENCE = Solver("dopri8", rtol=1e-10, atol=1e-10, max_steps=100_000)
TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
STEPS = (2, 4, 8, 16, 32, 64)
# torchdiffeq's methods (cnf and flow_matching); its Adams methods are left out (multistep,
# implicit_adams solves a nonlinear system per step: not a scoring method).
TORCHDIFFEQ = {
    "adaptive": ("dopri5", "bosh3", "dopri8", "fehlberg2", "adaptive_heun"),
    "fixed": ("rk4", "heun3", "midpoint", "euler"),
}
METHODS = {
    "cnf": TORCHDIFFEQ,
    "flow_matching": TORCHDIFFEQ,
    # torchdyn's ieuler (implicit) and alf (leapfrog, needs a second-order state) do not apply.
    "torchdyn": {"adaptive": ("dopri5", "tsit5"), "fixed": ("rk4", "midpoint", "euler")},
    "zuko": {"adaptive": ("dopri45",), "fixed": ()},  # zuko.utils.odeint: Dormand-Prince only
}
# A method stops tightening once a setting is this accurate (past the last level) or costly.
STOP_ERROR = 2e-6
MAX_NFE = 600
MAX_SECONDS = 15.0
# ... and a single solve is abandoned after this long (zuko's autograd divergence at d = 64 and a
# tight tolerance ran for tens of minutes; the row is reported as timed out).
MAX_SOLVE_SECONDS = 60.0
COLUMNS = ("dim", "threads", "level", "library", "setting", "nfe", "error", "seconds", "ratio_to_cnf")
EVAL_COLUMNS = ("dim", "threads", "form", "ms", "x_floor", "page_faults")

Run = Callable[[], tuple[torch.Tensor, int]]


# --------------------------------------------------------------------------- scorers


def score_cnf(field: nn.Module, x: torch.Tensor, method: str, setting: float, compile: bool = False) -> Run:
    if method in TORCHDIFFEQ["adaptive"]:
        solver = Solver(method, rtol=setting, atol=setting, max_steps=MAX_NFE, compile=compile)
    else:
        solver = Solver(method, step_size=1 / setting, max_steps=MAX_NFE, compile=compile)
    flow = CNF(field, solver=solver)

    def run() -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            log_p = flow.log_prob(x)
        return log_p, flow.stats.nfe_forward

    return run


def score_flow_matching(field: nn.Module, x: torch.Tensor, method: str, setting: float) -> Run:
    from flow_matching.solver import ODESolver

    counted = Counted(field)
    solver = ODESolver(velocity_model=lambda x, t: counted(t, x))
    base = StandardNormal(x.shape[1])
    adaptive = method in TORCHDIFFEQ["adaptive"]
    tol = setting if adaptive else 1e-5  # unused by fixed-step methods

    def run() -> tuple[torch.Tensor, int]:
        counted.nfe = 0
        with torch.no_grad():
            _, log_p = solver.compute_likelihood(
                x_1=x,
                log_p0=base.log_prob,
                step_size=None if adaptive else 1 / setting,
                method=method,
                atol=tol,
                rtol=tol,
                time_grid=torch.tensor([1.0, 0.0], dtype=x.dtype),
                exact_divergence=True,
            )
        return log_p, counted.nfe

    return run


def score_torchdyn(field: nn.Module, x: torch.Tensor, method: str, setting: float) -> Run:
    from torchdyn.core import NeuralODE
    from torchdyn.models import CNF as DynCNF
    from torchdyn.models import autograd_trace
    from torchdyn.numerics.odeint import odeint

    adaptive = method in METHODS["torchdyn"]["adaptive"]
    # Fixed-step methods take torchdyn's default tolerances (else it warns that they are unused).
    atol, rtol = (setting, setting) if adaptive else odeint.__defaults__[:2]
    with contextlib.redirect_stdout(io.StringIO()):
        ode = NeuralODE(
            DynCNF(TimeAttribute(field), trace_estimator=autograd_trace),
            solver=method,
            atol=atol,
            rtol=rtol,
            sensitivity="autograd",
            return_t_eval=False,
        )
    base = StandardNormal(x.shape[1])
    state = torch.cat([torch.zeros(x.shape[0], 1, dtype=x.dtype), x], 1)
    steps = 1 if adaptive else int(setting)
    t_span = torch.linspace(1.0, 0.0, steps + 1, dtype=x.dtype)

    def run() -> tuple[torch.Tensor, int]:
        ode.vf.nfe = 0
        with torch.no_grad():
            end = ode(state, t_span=t_span)[-1]
        # The first column integrates -div u from t=1 to 0: it holds +integral_0^1 div u.
        return base.log_prob(end[:, 1:]) - end[:, 0], int(ode.vf.nfe)

    return run


def score_zuko(field: nn.Module, x: torch.Tensor, method: str, setting: float) -> Run:
    """zuko's FreeFormJacobianTransform at rtol = atol = ``setting`` (its one method), as in peers."""
    return peers.score_zuko(field, x, setting)


SCORERS = {
    "cnf": score_cnf,
    "flow_matching": score_flow_matching,
    "torchdyn": score_torchdyn,
    "zuko": score_zuko,
}


def label(method: str, setting: float, adaptive: bool) -> str:
    return f"{method} tol={setting:.0e}" if adaptive else f"{method} {int(setting)} steps"


# --------------------------------------------------------------------------- per evaluation


def previous_forward_mode(
    field: MLPField, t: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLPField.velocity_and_divergence as it was before the chunked form (commit 86f0c8b), kept
    here to time the two side by side: columns as one (d, batch, width) block, every product
    out of place, the trace as an elementwise product and a sum."""
    tt = t.reshape(1, 1)
    h, columns = x, None
    for layer, activation in zip(field.layers[:-1], field.activations):
        weight, bias = layer.affine(tt)
        pre = nn.functional.linear(h, weight, bias)
        h = activation(pre)
        slope = activation_derivative(activation, pre, h)
        if columns is None:
            columns = slope.unsqueeze(0) * weight.t().contiguous().unsqueeze(1)
        else:
            dim, batch, width = columns.shape
            columns = (columns.reshape(dim * batch, width) @ weight.t()).reshape(dim, batch, -1) * slope
    weight, bias = field.layers[-1].affine(tt)
    return nn.functional.linear(h, weight, bias), (columns * weight.unsqueeze(1)).sum(dim=(0, 2))


def minor_faults_per_call(fn: Callable[[], Any], calls: int = 3) -> float | None:
    """Minor page faults per call of ``fn`` (memory the allocator mapped afresh), Unix only."""
    try:
        import resource
    except ImportError:
        return None
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def evaluation_forms(field: MLPField, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """One call of field + divergence at one time in each form, and the floors under them."""
    t = torch.tensor(0.5, dtype=x.dtype)
    tt = t.reshape(1, 1)
    n, dim = x.shape
    weights = [layer.affine(tt)[0].detach() for layer in field.layers]
    inputs = [torch.randn(n, w.shape[1]) for w in weights]
    # The divergence carries d rows per sample through every hidden-to-hidden product.
    tall = [torch.randn(n * dim, w.shape[1]) for w in weights[1:-1]]

    def matrix_products() -> None:
        for a, w in zip(inputs, weights):
            a @ w.t()
        for a, w in zip(tall, weights[1:-1]):
            a @ w.t()

    def forward_mode(chunk_rows: int) -> Callable[[], Any]:
        def run() -> Any:
            field.divergence_chunk_rows = chunk_rows
            try:
                with torch.no_grad():
                    return field.velocity_and_divergence(t, x)
            finally:
                field.divergence_chunk_rows = MLPField(1).divergence_chunk_rows

        return run

    def autograd(form: Callable[..., torch.Tensor], create_graph: bool) -> Callable[[], Any]:
        def run() -> Any:
            xr = x.detach().requires_grad_(True)
            with torch.enable_grad():
                return form(field(t, xr), xr, create_graph)

        return run

    def field_alone() -> Any:
        with torch.no_grad():
            return field(t, x)

    def previous() -> Any:
        with torch.no_grad():
            return previous_forward_mode(field, t, x)

    def tanh_rows_chunks() -> Any:  # the forward mode before logistic_form and the byte-sized chunks
        with torch.no_grad():
            affines = [layer.affine(tt) for layer in field.layers]
            return forward_mode_divergence(affines, list(field.activations), x, None, 4096)

    return {
        "matrix products (floor)": matrix_products,
        "field alone": field_alone,
        "cnf forward mode": forward_mode(MLPField(1).divergence_chunk_rows),
        "cnf forward mode, one block": forward_mode(10**12),
        "cnf forward mode, 4,096 / d samples a chunk": forward_mode(4096),
        "cnf forward mode before (tanh, 4,096 / d samples a chunk)": tanh_rows_chunks,
        "cnf forward mode before (86f0c8b)": previous,
        "autograd VJPs (torchdyn)": autograd(
            exact_divergence_batched if dim >= 16 else exact_divergence_loop, False
        ),
        "autograd loop with graph (flow_matching)": autograd(exact_divergence_loop, True),
    }


def per_evaluation(field: MLPField, x: torch.Tensor, rounds: int) -> list[dict[str, Any]]:
    forms = evaluation_forms(field, x)
    times = interleaved_seconds(forms, repeats=max(5, rounds))
    floor = statistics.median(times["matrix products (floor)"])
    return [
        {
            "form": form,
            "ms": 1e3 * statistics.median(t),
            "x_floor": statistics.median(t) / floor,
            "page_faults": minor_faults_per_call(forms[form]),
        }
        for form, t in times.items()
    ]


# --------------------------------------------------------------------------- one segment


def two_dim_field(checkpoint: str | None, train_seconds: float, quick: bool) -> MLPField:
    if checkpoint:
        flow, _ = load_checkpoint(checkpoint)
        if not isinstance(flow, CNF) or not isinstance(flow.field, MLPField):
            raise TypeError(f"--checkpoint must hold a CNF with an MLPField, got {type(flow).__name__}")
        return flow.field.float().eval()
    torch.manual_seed(0)
    flow = CNF(MLPField(2, hidden=(16, 16) if quick else (64, 64, 64)))
    data = sample_toy("8gaussians", 20_000, seed=0)
    train(flow, data, iters=10**9, time_limit=train_seconds, lr=5e-3, val_every=10**9, progress=False)
    return flow.field.eval()


def points(dim: int, n: int) -> torch.Tensor:
    if dim == 2:
        return sample_toy("8gaussians", n, seed=TEST_SEED)
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(TEST_SEED))


class SolveTimeout(Exception):
    """A solve of the sweep ran past its time cap."""


@contextlib.contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise :class:`SolveTimeout` in the block after ``seconds`` of wall-clock time (SIGALRM:
    main thread, POSIX); without SIGALRM the block runs uncapped."""
    if not hasattr(signal, "setitimer"):  # pragma: no cover - Windows
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise SolveTimeout(f"stopped after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sweep(
    field: nn.Module,
    x: torch.Tensor,
    n_error: int,
    reference: torch.Tensor,
    libraries: Sequence[str],
    quick: bool,
) -> list[dict[str, Any]]:
    """Every library x method x setting once, loose to tight: error, NFE, seconds (one run)."""
    rows = []
    tolerances = (1e-2, 1e-4) if quick else TOLERANCES
    steps_grid = STEPS[:2] if quick else STEPS
    for library in libraries:
        for kind in ("adaptive", "fixed"):
            for method in METHODS[library][kind][: 1 if quick else None]:
                for setting in tolerances if kind == "adaptive" else steps_grid:
                    row: dict[str, Any] = {
                        "library": library,
                        "method": method,
                        "adaptive": kind == "adaptive",
                        "value": setting,
                        "setting": label(method, setting, kind == "adaptive"),
                    }
                    try:
                        run = SCORERS[library](field, x, method, setting)
                        start = time.perf_counter()
                        with time_cap(MAX_SOLVE_SECONDS):
                            log_p, nfe = run()
                        row["seconds_once"] = time.perf_counter() - start
                    except Exception as error:  # a solver that fails is reported, not fatal
                        row["status"] = f"failed: {type(error).__name__}: {str(error)[:120]}"
                        rows.append(row)
                        break
                    error_mean = (log_p[:n_error].double() - reference).abs().mean().item()
                    row.update(nfe=nfe, error=error_mean if math.isfinite(error_mean) else None, status="ok")
                    rows.append(row)
                    if row["error"] is not None and row["error"] < STOP_ERROR or nfe > MAX_NFE:
                        break
                    if row["seconds_once"] > MAX_SECONDS:  # keeps a segment to a few minutes
                        break
    return rows


def pareto(rows: Sequence[dict[str, Any]], key: str = "seconds_once") -> list[dict[str, Any]]:
    """The settings no other of the same rows beats in both error and ``key``."""
    ok = sorted((r for r in rows if r.get("error") is not None), key=lambda r: (r[key], r["error"]))
    front, best = [], math.inf
    for row in ok:
        if row["error"] < best:
            front.append(row)
            best = row["error"]
    return front


def segment(
    dim: int, threads: int, field: nn.Module, n: int, n_error: int, rounds: int, quick: bool, compile: bool
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    status = peer_status()
    libraries = ["cnf", *(p for p in ("flow_matching", "torchdyn", "zuko") if not status.get(p))]
    x = points(dim, n)
    # First, while the process is fresh: how much memory a call maps anew depends on what the
    # allocator has kept from earlier, larger allocations (the float64 reference keeps plenty).
    per_eval = per_evaluation(field, x, rounds) if isinstance(field, MLPField) else []
    start = time.perf_counter()
    ref_flow = CNF(copy.deepcopy(field).double(), solver=REFERENCE)
    with torch.no_grad():
        reference = ref_flow.log_prob(x[:n_error].double())
    reference_seconds = time.perf_counter() - start
    for library in libraries:  # warm up each library once
        SCORERS[library](field, x[:64], METHODS[library]["adaptive"][0], 1e-2)()
    rows = sweep(field, x, n_error, reference, libraries, quick)
    # Per library and level: the cheapest setting (first pass) that reaches the level.
    picks: dict[str, dict[str, Any]] = {}
    levels: list[dict[str, Any]] = []
    for level in LEVELS:
        for library in libraries:
            reached = [r for r in rows if r["library"] == library and r.get("error") is not None]
            reached = [r for r in reached if r["error"] <= level]
            entry = {"level": level, "library": library}
            if reached:
                # One library pays about the same per evaluation whatever the method, so the
                # fewest evaluations is the cheapest (single timings break ties).
                best = min(reached, key=lambda r: (r["nfe"], r["seconds_once"]))
                key = f"{library}: {best['setting']}"
                picks[key] = best
                entry.update(setting=best["setting"], nfe=best["nfe"], error=best["error"], key=key)
            levels.append(entry)
    runs = {key: SCORERS[r["library"]](field, x, r["method"], r["value"]) for key, r in picks.items()}
    compile_seconds = None
    if compile:  # cnf with Solver(compile=True) at each of cnf's picks: same steps, so same NFE
        for entry in [e for e in levels if e["library"] == "cnf" and "key" in e]:
            key = f"cnf compiled: {entry['setting']}"
            compiled = {**entry, "library": "cnf compiled", "key": key}
            levels.insert(levels.index(entry) + 1, compiled)
            if key not in runs:
                pick = picks[entry["key"]]
                runs[key] = score_cnf(field, x, pick["method"], pick["value"], compile=True)
                if compile_seconds is None:  # the first compiled solve compiles
                    start = time.perf_counter()
                    runs[key]()
                    compile_seconds = time.perf_counter() - start
    if isinstance(field, MLPField):  # cnf's form before the logistic form and byte-sized chunks
        before = copy.deepcopy(field)
        before.divergence_chunk_rows, before.logistic_tanh = 4096, False
        for entry in [e for e in levels if e["library"] == "cnf" and "key" in e]:
            key = f"cnf before: {entry['setting']}"
            levels.insert(levels.index(entry) + 1, {**entry, "library": "cnf before", "key": key})
            if key not in runs:
                pick = picks[entry["key"]]
                runs[key] = score_cnf(before, x, pick["method"], pick["value"])
    for run in runs.values():  # warm-up
        run()
    timed = interleaved_seconds(runs, repeats=rounds, warmup=0) if runs else {}
    for entry in levels:
        if "key" in entry:
            entry["seconds"] = statistics.median(timed[entry.pop("key")])
    for level in LEVELS:
        at = [e for e in levels if e["level"] == level and e.get("seconds")]
        ours = next((e for e in at if e["library"] == "cnf"), None)
        peers_at = [e for e in at if not e["library"].startswith("cnf")]
        for e in at:
            e["ratio_to_cnf"] = e["seconds"] / ours["seconds"] if ours else None
        if peers_at:
            fastest = min(peers_at, key=lambda e: e["seconds"])
            for e in at:
                if e["library"].startswith("cnf"):
                    e["fastest_peer"] = fastest["library"]
                    e["speedup_vs_fastest_peer"] = fastest["seconds"] / e["seconds"]
    return {
        "dim": dim,
        "threads": threads,
        "n": n,
        "n_error": n_error,
        "reference_seconds": reference_seconds,
        "peers": {p: status.get(p) or "ok" for p in ("flow_matching", "torchdyn", "zuko")},
        "sweep": rows,
        "levels": levels,
        "per_evaluation": per_eval,
        "rounds": rounds,
        "compile_seconds": compile_seconds,
    }


# --------------------------------------------------------------------------- summary


def summarise(out: Path) -> dict[str, Any]:
    """Rebuild work_precision.{json,md,png} from every segment file in ``out``."""
    segments = [json.loads(p.read_text()) for p in sorted(out.glob(f"{NAME}_d*_t*.json"))]
    segments.sort(key=lambda s: (s["threads"], s["dim"]))
    rows, eval_rows, headline = [], [], []
    for seg in segments:
        for e in seg["levels"]:
            rows.append({"dim": seg["dim"], "threads": seg["threads"], **e})
            if e["library"].startswith("cnf"):
                headline.append(
                    {
                        "dim": seg["dim"],
                        "threads": seg["threads"],
                        "level": e["level"],
                        "library": e["library"],
                        "cnf": e.get("setting"),
                        "cnf_seconds": e.get("seconds"),
                        "fastest_peer": e.get("fastest_peer"),
                        "speedup": e.get("speedup_vs_fastest_peer"),
                    }
                )
        eval_rows += [{"dim": seg["dim"], "threads": seg["threads"], **r} for r in seg["per_evaluation"]]
    startup = [
        f"d={seg['dim']} threads={seg['threads']}: {seg['compile_seconds']:.1f} s"
        for seg in segments
        if seg.get("compile_seconds")
    ]
    payload = {"machine": machine(), "segments": segments, "headline": headline, "rows": rows}
    (out / f"{NAME}.json").write_text(json.dumps(payload, indent=2))
    text = [
        f"Machine: {payload['machine']['cpu_count']} CPUs (shared with other jobs), torch "
        f"{payload['machine']['torch']}; float32, exact divergence, error = mean |log p error| "
        "against float64 dopri8 at 1e-10.",
        "",
        "cnf's speed-up over the fastest peer at equal error (fastest peer's seconds / cnf's):",
        "",
        markdown_table(
            headline, ("dim", "threads", "level", "library", "cnf", "cnf_seconds", "fastest_peer", "speedup")
        ),
        "Start-up cost of Solver(compile=True), the first compiled solve: "
        + (", ".join(startup) if startup else "not measured (--no-compile)"),
        "",
        "Every library's cheapest setting per level:",
        "",
        markdown_table(rows, COLUMNS),
        "Cost of one evaluation (field + exact divergence) at the benchmark's batch, ms:",
        "",
        markdown_table(eval_rows, EVAL_COLUMNS),
    ]
    (out / f"{NAME}.md").write_text("\n".join(text))
    if segments:
        figure(segments).savefig(out / f"{NAME}.png", dpi=110)
    return payload


def figure(segments: Sequence[dict[str, Any]]) -> Any:
    """Error against seconds per dimension (threads = the fewest measured), Pareto front per library."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    threads = min(s["threads"] for s in segments)
    shown = [s for s in segments if s["threads"] == threads]
    fig = Figure(figsize=(4.6 * len(shown), 4.0))
    FigureCanvasAgg(fig)
    for i, seg in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), i + 1)
        for j, library in enumerate(SCORERS):
            front = pareto([r for r in seg["sweep"] if r["library"] == library])
            if front:
                ax.plot(
                    [r["seconds_once"] for r in front],
                    [max(r["error"], 1e-12) for r in front],
                    "o-",
                    color=f"C{j}",
                    label=library,
                )
        for level in LEVELS:
            ax.axhline(level, color="0.8", linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="seconds (one solve)", ylabel="mean |log p error| (nats)")
        ax.set_title(f"d = {seg['dim']}, batch {seg['n']}, {threads} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Pareto front per library (lower left is better)", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a cnf CNF checkpoint of a 2-D MLPField")
    parser.add_argument("--train-seconds", type=float, default=60.0, help="else train one this long")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n", type=int, default=5000, help="points scored per solve")
    parser.add_argument("--n-error", type=int, default=None, help="points with a reference (default n)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds of the picks")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip Solver(compile=True)"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.threads, args.n, args.rounds, args.train_seconds = [2, 3], [1], 64, 1, 0.5
        args.compile = False  # tens of seconds of compilation; tests/test_fields.py traces it
    args.out.mkdir(parents=True, exist_ok=True)
    for dim in args.dims:
        if dim == 2:
            field = two_dim_field(args.checkpoint, args.train_seconds, args.quick)
        else:
            torch.manual_seed(dim)
            field = MLPField(dim, hidden=(8, 8) if args.quick else (64, 64, 64)).eval()
        n_error = min(args.n, args.n_error or args.n)
        for threads in args.threads:
            result = segment(dim, threads, field, args.n, n_error, args.rounds, args.quick, args.compile)
            (args.out / f"{NAME}_d{dim}_t{threads}.json").write_text(json.dumps(result, indent=2))
            for e in result["levels"]:
                if e["library"] == "cnf" and e.get("speedup_vs_fastest_peer"):
                    print(
                        f"d={dim} threads={threads} level {e['level']:.0e}: cnf {e['setting']} "
                        f"{e['speedup_vs_fastest_peer']:.2f}x the fastest peer ({e['fastest_peer']})"
                    )
    return summarise(args.out)


if __name__ == "__main__":
    main()
