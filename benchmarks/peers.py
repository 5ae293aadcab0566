"""cnf side by side with the libraries people would otherwise use, all in one run.

    python -m benchmarks.peers                  # ~15 min on 2 cores
    python -m benchmarks.peers --quick          # seconds; what the tests run

Peers are optional (the `bench` extra: `pip install --no-deps zuko torchdyn flow_matching
normflows`, torchdyn also needs torchcde, torchsde, trampoline, pytorch-lightning,
lightning-utilities, torchmetrics, attrs and pyyaml, each with --no-deps so that pip keeps the installed
torch). A peer that does not import is skipped and the reason is written into the results.

1. Scoring machinery. ONE velocity field (cnf's MLPField, trained briefly on 8gaussians or
   loaded with --checkpoint) is integrated by cnf, zuko's FreeFormJacobianTransform (zuko's
   CNF), torchdyn's NeuralODE + CNF and flow_matching's ODESolver.compute_likelihood, all with
   dopri5 at the same rtol = atol and the exact divergence, scoring the same test points in
   float32, the four taking turns within each round: median seconds, each peer's median
   per-round ratio to cnf, NFE, and mean / max |log p error| against a float64 dopri8 solve
   at 1e-10. Also cnf's PlanarFlow against normflows' Planar on identical weights (base ->
   data with log densities: normflows' tanh Planar has no inverse, so it cannot score data).
2. Training. Each library's own recipe (README or tutorial) for the same wall-clock budget on
   8gaussians and moons; test NLL on the same 10,000 points, scored with the exact divergence.

Writes benchmarks/results/peers.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import RESULTS, interleaved_seconds, median_seconds, write_results
from cnf import CNF, MLPField, PlanarFlow, Solver
from cnf.checkpoint import load_checkpoint
from cnf.data import sample_toy, true_log_prob
from cnf.flow import StandardNormal
from cnf.training import train

TEST_SEED = 2024
PEERS = {
    "zuko": ("zuko", "zuko.transforms"),
    "torchdyn": ("torchdyn.core", "torchdyn.models"),
    "flow_matching": ("flow_matching.solver", "flow_matching.path"),
    "normflows": ("normflows",),
}
REFERENCE = Solver("dopri8", rtol=1e-10, atol=1e-10, max_steps=100_000)
COLUMNS = (
    "section",
    "data",
    "library",
    "recipe",
    "seconds",
    "nfe",
    "err_mean",
    "err_max",
    "test_nll",
    "train_seconds",
    "steps",
    "note",
)


def peer_status() -> dict[str, str | None]:
    """None for each peer that imports, else why it does not."""
    status: dict[str, str | None] = {}
    for peer, modules in PEERS.items():
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                for module in modules:
                    importlib.import_module(module)
            status[peer] = None
        except Exception as error:  # ImportError, or a broken install raising anything else
            status[peer] = f"{type(error).__name__}: {error}"
    return status


class Counted(nn.Module):
    """Counts the evaluations of a velocity field ``field(t, x)``."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.nfe = 0

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.field(t, x)


class TimeAttribute(nn.Module):
    """torchdyn calls ``net(x)`` and sets ``module.t`` on modules that have a ``t``."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.t = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.field(self.t, x)


# --------------------------------------------------------------------------- scorers
# Each takes (field, x, tol) and returns a closure () -> (log p, nfe).

Scorer = Callable[[nn.Module, torch.Tensor, float], Callable[[], tuple[torch.Tensor, int]]]


def score_cnf(field: nn.Module, x: torch.Tensor, tol: float) -> Callable[[], tuple[torch.Tensor, int]]:
    flow = CNF(field, divergence="exact", solver=Solver("dopri5", rtol=tol, atol=tol))

    def run() -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            log_p = flow.log_prob(x)
        return log_p, flow.stats.nfe_forward

    return run


def score_zuko(field: nn.Module, x: torch.Tensor, tol: float) -> Callable[[], tuple[torch.Tensor, int]]:
    from zuko.transforms import FreeFormJacobianTransform

    counted = Counted(field)
    # zuko integrates data (s=0) -> base (s=1): f(s, y) = -u(y, 1 - s) in cnf's time.
    transform = FreeFormJacobianTransform(
        f=lambda s, y: -counted(1 - s, y), t0=0.0, t1=1.0, phi=(), atol=tol, rtol=tol, exact=True
    )
    base = StandardNormal(x.shape[1])

    def run() -> tuple[torch.Tensor, int]:
        counted.nfe = 0
        with torch.no_grad():
            z, ladj = transform.call_and_ladj(x)
        return base.log_prob(z) + ladj, counted.nfe

    return run


def score_torchdyn(field: nn.Module, x: torch.Tensor, tol: float) -> Callable[[], tuple[torch.Tensor, int]]:
    from torchdyn.core import NeuralODE
    from torchdyn.models import CNF as DynCNF
    from torchdyn.models import autograd_trace

    with contextlib.redirect_stdout(io.StringIO()):
        ode = NeuralODE(
            DynCNF(TimeAttribute(field), trace_estimator=autograd_trace),
            solver="dopri5",
            atol=tol,
            rtol=tol,
            sensitivity="autograd",
            return_t_eval=False,
        )
    base = StandardNormal(x.shape[1])
    state = torch.cat([torch.zeros(x.shape[0], 1, dtype=x.dtype), x], 1)
    t_span = torch.tensor([1.0, 0.0], dtype=x.dtype)

    def run() -> tuple[torch.Tensor, int]:
        ode.vf.nfe = 0
        with torch.no_grad():
            end = ode(state, t_span=t_span)[-1]
        # The first column integrates -div u from t=1 to 0, i.e. holds +integral_0^1 div u.
        return base.log_prob(end[:, 1:]) - end[:, 0], int(ode.vf.nfe)

    return run


def score_flow_matching(
    field: nn.Module, x: torch.Tensor, tol: float
) -> Callable[[], tuple[torch.Tensor, int]]:
    from flow_matching.solver import ODESolver

    counted = Counted(field)
    solver = ODESolver(velocity_model=lambda x, t: counted(t, x))
    base = StandardNormal(x.shape[1])

    def run() -> tuple[torch.Tensor, int]:
        counted.nfe = 0
        with torch.no_grad():
            _, log_p = solver.compute_likelihood(
                x_1=x,
                log_p0=base.log_prob,
                step_size=None,
                method="dopri5",
                atol=tol,
                rtol=tol,
                time_grid=torch.tensor([1.0, 0.0], dtype=x.dtype),
                exact_divergence=True,
            )
        return log_p, counted.nfe

    return run


SCORERS: dict[str, Scorer] = {
    "cnf": score_cnf,
    "zuko": score_zuko,
    "torchdyn": score_torchdyn,
    "flow_matching": score_flow_matching,
}


def machinery(
    field: nn.Module, x: torch.Tensor, tol: float, repeats: int, status: dict[str, str | None]
) -> list[dict[str, Any]]:
    """Score ``x`` with one field through every library; errors against a float64 reference."""
    ref_flow = CNF(copy.deepcopy(field).double(), solver=REFERENCE)
    with torch.no_grad():
        reference = ref_flow.log_prob(x.double())
    rows, runs = [], {}
    for library, scorer in SCORERS.items():
        row: dict[str, Any] = {"section": "scoring", "data": "8gaussians", "library": library}
        row["recipe"] = f"dopri5 rtol=atol={tol:g}, exact divergence, float32"
        if library == "cnf" and getattr(field, "has_analytic_divergence", False):
            row["note"] = (
                "forward-mode divergence of MLPField; the peers take autograd VJPs of the same module"
            )
        if library != "cnf" and status.get(library):
            row["note"] = f"skipped: {library} does not import ({status[library]})"
        else:
            runs[library] = scorer(field, x, tol)
        rows.append(row)
    # The libraries take turns within each round, so that drift of the machine hits all alike.
    rounds = interleaved_seconds(runs, repeats=repeats)
    for row in rows:
        library = row["library"]
        if library not in runs:
            continue
        log_p, nfe = runs[library]()
        error = (log_p.double() - reference).abs()
        row.update(
            seconds=statistics.median(rounds[library]),
            nfe=nfe,
            err_mean=error.mean().item(),
            err_max=error.max().item(),
        )
        if library != "cnf":
            ratios = [theirs / ours for theirs, ours in zip(rounds[library], rounds["cnf"])]
            row["note"] = f"{statistics.median(ratios):.2f}x cnf's seconds (median of per-round ratios)"
    return rows


def planar_machinery(
    x_count: int, layers: int, repeats: int, status: dict[str, str | None], seed: int
) -> list[dict[str, Any]]:
    """cnf's PlanarFlow against normflows' Planar on identical weights (base -> data)."""
    torch.manual_seed(seed)
    flow = PlanarFlow(2, layers)
    z = torch.randn(x_count, 2, generator=torch.Generator().manual_seed(seed))
    ref = copy.deepcopy(flow).double()
    with torch.no_grad():
        reference = ref.inverse_and_log_prob(z.double())[1]
    rows = []

    def cnf_run() -> torch.Tensor:
        with torch.no_grad():
            return flow.inverse_and_log_prob(z)[1]

    recipe = f"K={layers}, base -> data with log p, float32"
    seconds = median_seconds(cnf_run, repeats=repeats)
    error = (cnf_run().double() - reference).abs()
    rows.append(
        {
            "section": "planar",
            "data": "base samples",
            "library": "cnf",
            "recipe": recipe,
            "seconds": seconds,
            "nfe": layers,
            "err_mean": error.mean().item(),
            "err_max": error.max().item(),
            "note": "also scores data (bracketed Newton inverse per layer)",
        }
    )
    row: dict[str, Any] = {
        "section": "planar",
        "data": "base samples",
        "library": "normflows",
        "recipe": recipe,
    }
    if status.get("normflows"):
        row["note"] = f"skipped: normflows does not import ({status['normflows']})"
        return [*rows, row]
    import normflows as nf

    layers_nf = [
        nf.flows.Planar(
            (2,),
            u=flow.u[k].detach()[None].clone(),
            w=flow.w[k].detach()[None].clone(),
            b=flow.b[k : k + 1].detach().clone(),
        )  # fmt: skip
        for k in range(layers)
    ]
    model = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(2, trainable=False), flows=layers_nf)
    base = StandardNormal(2)

    def nf_run() -> torch.Tensor:
        with torch.no_grad():
            out, log_det = model.forward_and_log_det(z)
        return base.log_prob(z) - log_det

    seconds = median_seconds(nf_run, repeats=repeats)
    error = (nf_run().double() - reference).abs()
    row.update(
        seconds=seconds,
        nfe=layers,
        err_mean=error.mean().item(),
        err_max=error.max().item(),
        note="cannot score data: normflows' tanh Planar has no inverse",
    )
    return [*rows, row]


# --------------------------------------------------------------------------- training recipes


def _batches(data: torch.Tensor, batch: int) -> torch.Tensor:
    return data[torch.randint(0, data.shape[0], (batch,))]


def _loop(step: Callable[[], None], budget: float) -> tuple[int, float]:
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < budget:
        step()
        steps += 1
    return steps, time.perf_counter() - start


def train_cnf(data, test, budget, tol, objective: str = "likelihood") -> dict[str, Any]:
    flow = CNF(MLPField(2, hidden=(64, 64, 64)), solver=Solver(rtol=tol, atol=tol))
    lr = 5e-3 if objective == "likelihood" else 1e-3
    result = train(
        flow, data, iters=10**9, time_limit=budget, lr=lr, batch_size=512, val_every=10**9,
        objective=objective, progress=False,
    )  # fmt: skip
    flow.eval()
    with torch.no_grad():
        log_p = flow.log_prob(test)
    recipe = f"MLPField 64x3, {objective}, Adam {lr:g}, batch 512, dopri5 {tol:g}"
    return {"recipe": recipe, "log_p": log_p, "steps": result.step, "train_seconds": result.seconds}


def train_zuko(data, test, budget, tol, quick: bool = False) -> dict[str, Any]:
    import zuko

    flow = zuko.flows.CNF(2, hidden_features=(64, 64, 64))  # README: Adam 1e-3, -log_prob
    if quick:  # zuko's default tolerances make even one step slow; --quick only checks the code
        flow.transform.atol = flow.transform.rtol = tol
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)

    def step() -> None:
        loss = -flow().log_prob(_batches(data, 512)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    flow.train()
    steps, seconds = _loop(step, budget)
    flow.eval()
    flow.transform.atol = flow.transform.rtol = tol
    with torch.no_grad():
        log_p = flow().log_prob(test)
    recipe = (
        f"zuko.flows.CNF 64x3 ELU, Adam 1e-3, batch 512, own dopri5 atol=1e-6 rtol=1e-5; scored at {tol:g}"
    )
    return {"recipe": recipe, "log_p": log_p, "steps": steps, "train_seconds": seconds}


def train_torchdyn(data, test, budget, tol) -> dict[str, Any]:
    from torchdyn.core import NeuralODE
    from torchdyn.models import CNF as DynCNF
    from torchdyn.models import autograd_trace, hutch_trace

    # torchdyn's CNF tutorial: autonomous Softplus MLP, Hutchinson, adjoint, AdamW 2e-3.
    net = nn.Sequential(
        nn.Linear(2, 64), nn.Softplus(), nn.Linear(64, 64), nn.Softplus(),
        nn.Linear(64, 64), nn.Softplus(), nn.Linear(64, 2),
    )  # fmt: skip
    noise = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    base = StandardNormal(2)
    with contextlib.redirect_stdout(io.StringIO()):
        model = NeuralODE(
            DynCNF(net, trace_estimator=hutch_trace, noise_dist=noise),
            solver="dopri5", sensitivity="adjoint", atol=1e-4, rtol=1e-4, return_t_eval=False,
        )  # fmt: skip
        scorer = NeuralODE(
            DynCNF(net, trace_estimator=autograd_trace),
            solver="dopri5", sensitivity="autograd", atol=tol, rtol=tol, return_t_eval=False,
        )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-5)
    t_span = torch.linspace(0, 1, 2)

    def log_prob(ode: nn.Module, x: torch.Tensor) -> torch.Tensor:
        end = ode(torch.cat([torch.zeros(x.shape[0], 1), x], 1), t_span=t_span)[-1]
        return base.log_prob(end[:, 1:]) - end[:, 0]

    def step() -> None:
        loss = -log_prob(model, _batches(data, 512)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    steps, seconds = _loop(step, budget)
    with torch.no_grad():
        log_p = log_prob(scorer, test).detach()
    recipe = (
        f"tutorial: Softplus MLP 64x3, Hutchinson, adjoint dopri5 1e-4, AdamW 2e-3; scored exactly at {tol:g}"
    )
    return {"recipe": recipe, "log_p": log_p, "steps": steps, "train_seconds": seconds}


class _SwishMLP(nn.Module):
    """flow_matching's 2-D example network: [x, t] -> 4 Swish layers of width 512 -> velocity."""

    def __init__(self, hidden: int = 512) -> None:
        super().__init__()
        widths = (3, hidden, hidden, hidden, hidden)
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.main = nn.Sequential(*layers, nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        return self.main(torch.cat([x, t], dim=1))


def train_flow_matching(data, test, budget, tol, hidden: int = 512) -> dict[str, Any]:
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler
    from flow_matching.solver import ODESolver

    # flow_matching's 2-D example: CondOT path, Swish MLP 512x4, Adam 1e-3, batch 4096.
    vf = _SwishMLP(hidden)
    path = AffineProbPath(scheduler=CondOTScheduler())
    optimizer = torch.optim.Adam(vf.parameters(), lr=1e-3)

    def step() -> None:
        x_1 = _batches(data, 4096)
        x_0 = torch.randn_like(x_1)
        t = torch.rand(x_1.shape[0])
        sample = path.sample(t=t, x_0=x_0, x_1=x_1)
        loss = (vf(sample.x_t, sample.t) - sample.dx_t).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    steps, seconds = _loop(step, budget)
    solver = ODESolver(velocity_model=vf)
    base = StandardNormal(2)
    with torch.no_grad():
        _, log_p = solver.compute_likelihood(
            x_1=test, log_p0=base.log_prob, step_size=None, method="dopri5", atol=tol, rtol=tol,
            time_grid=torch.tensor([1.0, 0.0]), exact_divergence=True,
        )  # fmt: skip
    recipe = f"2-D example: CondOT path, Swish MLP {hidden}x4, Adam 1e-3, batch 4096; scored at {tol:g}"
    return {"recipe": recipe, "log_p": log_p, "steps": steps, "train_seconds": seconds}


def training(
    datasets: Sequence[str], budget: float, test_n: int, tol: float, status: dict[str, str | None], args: Any
) -> list[dict[str, Any]]:
    from cnf.losses import OBJECTIVES

    recipes: list[tuple[str, Callable[..., dict[str, Any]]]] = [
        ("cnf", lambda d, t: train_cnf(d, t, budget, tol)),
    ]
    if "flow_matching" in OBJECTIVES:
        recipes.append(("cnf (flow matching)", lambda d, t: train_cnf(d, t, budget, tol, "flow_matching")))
    recipes += [
        ("zuko", lambda d, t: train_zuko(d, t, budget, tol, args.quick)),
        ("torchdyn", lambda d, t: train_torchdyn(d, t, budget, tol)),
        ("flow_matching", lambda d, t: train_flow_matching(d, t, budget, tol, args.fm_hidden)),
    ]
    rows = []
    for dataset in datasets:
        data = sample_toy(dataset, args.n_train, seed=args.seed)
        test = sample_toy(dataset, test_n, seed=TEST_SEED)
        try:
            true_nll = -true_log_prob(dataset, test.double()).mean().item()
        except ValueError:
            true_nll = None
        for library, recipe in recipes:
            peer = library.split(" ")[0]
            row: dict[str, Any] = {"section": "training", "data": dataset, "library": library}
            if peer != "cnf" and status.get(peer):
                row["note"] = f"skipped: {peer} does not import ({status[peer]})"
                rows.append(row)
                continue
            torch.manual_seed(args.seed)
            out = recipe(data, test)
            log_p = out.pop("log_p")
            row.update(out)
            row["test_nll"] = -log_p.mean().item()
            row["note"] = f"NLL s.e. {log_p.std().item() / math.sqrt(test_n):.3f}" + (
                f"; true NLL {true_nll:.3f}" if true_nll is not None else ""
            )
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=None, help="a cnf CNF checkpoint whose field is compared")
    parser.add_argument("--field-budget", type=float, default=30.0, help="seconds to train the shared field")
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per library and dataset")
    parser.add_argument("--datasets", nargs="+", default=["8gaussians", "moons"])
    parser.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of every scoring solve")
    parser.add_argument("--test-n", type=int, default=10_000)
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=32, help="planar layers K")
    parser.add_argument("--fm-hidden", type=int, default=512, help="width of flow_matching's example MLP")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (for the tests)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.field_budget, args.budget, args.test_n, args.n_train = 0.0, 0.2, 200, 2000
        args.repeats, args.tol, args.layers, args.fm_hidden, args.datasets = 1, 1e-3, 4, 32, ["8gaussians"]
    status = peer_status()
    for peer, reason in status.items():
        if reason:
            print(f"peer {peer} skipped: {reason}")
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    if args.checkpoint:
        flow, _ = load_checkpoint(args.checkpoint)
        if not isinstance(flow, CNF):
            raise TypeError(f"--checkpoint must hold a CNF, got {type(flow).__name__}")
        field = flow.field
    else:
        flow = CNF(MLPField(2, hidden=(64, 64, 64)) if not args.quick else MLPField(2, hidden=(16, 16)))
        if args.field_budget > 0:
            data = sample_toy("8gaussians", args.n_train, seed=args.seed)
            train(
                flow,
                data,
                iters=10**9,
                time_limit=args.field_budget,
                lr=5e-3,
                val_every=10**9,
                progress=False,
            )
        field = flow.field
    field.eval()
    test = sample_toy("8gaussians", args.test_n, seed=TEST_SEED)
    rows = machinery(field, test, args.tol, args.repeats, status)
    rows += planar_machinery(args.test_n, args.layers, args.repeats, status, args.seed)
    if not args.skip_training:
        rows += training(args.datasets, args.budget, args.test_n, args.tol, status, args)

    scored = {r["library"]: r for r in rows if r["section"] == "scoring" and r.get("seconds")}
    peers = [r for name, r in scored.items() if name != "cnf"]
    summary: dict[str, Any] = {}
    if "cnf" in scored and peers:
        fastest = min(peers, key=lambda r: r["seconds"])
        summary = {
            "fastest_peer": fastest["library"],
            "cnf_speedup_vs_fastest_peer": fastest["seconds"] / scored["cnf"]["seconds"],
            "cnf_err_mean": scored["cnf"]["err_mean"],
            "fastest_peer_err_mean": fastest["err_mean"],
        }
        print(
            f"cnf scores {summary['cnf_speedup_vs_fastest_peer']:.2f}x faster than the fastest peer "
            f"({fastest['library']}); mean |log p error| cnf {summary['cnf_err_mean']:.2e}, "
            f"{fastest['library']} {summary['fastest_peer_err_mean']:.2e}"
        )
    write_results(
        "peers",
        rows,
        COLUMNS,
        {
            "peers": {
                peer: ("installed" if reason is None else f"not importable: {reason}")
                for peer, reason in status.items()
            },
            "tol": args.tol,
            "test_n": args.test_n,
            "budget_seconds": args.budget,
            "summary": summary,
            "total_seconds": time.perf_counter() - start,
        },
        Path(args.out) if args.out else RESULTS,
    )
    return rows


if __name__ == "__main__":
    main()
