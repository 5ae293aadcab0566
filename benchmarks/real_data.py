"""Density estimation on real data: cnf's recipes against classical and discrete-flow baselines.

    python -m benchmarks.real_data --datasets digits --budget 60 --seeds 3   # ~25 min on 2 cores
    python -m benchmarks.real_data --quick                                    # seconds; a smoke test

Every model of a dataset sees the same fixed split (:mod:`cnf.data.real`) and the same
preprocessing, chosen on the training split by :func:`cnf.transforms.choose_preprocessing`
(digits: dequantise 17 levels, logit with alpha = 0.05, standardise; the tables: standardise).
Likelihoods are reported in the units of the data (nats per sample; for digits the pixel
values 0..16, so that bits/dim = NLL / (64 ln 2)); the test set is dequantised with one fixed
noise draw shared by all models.

Models:

* ``gaussian``: full-covariance maximum likelihood;
* ``gmm``: scikit-learn GaussianMixture (full covariances), components chosen on validation;
* ``kde``: scikit-learn KernelDensity (Gaussian kernel), bandwidth chosen on validation;
* ``zuko-maf``, ``zuko-nsf``: zuko's MAF and NSF (5 transforms, 256x2 networks, Adam 1e-3);
* ``zuko-cnf``: zuko's CNF (256x2 ELU; trained with its Hutchinson estimator, scored exactly);
* ``cnf-default``: what ``cnf train`` uses with no flags (:mod:`cnf.recipes` for this dimension);
* ``cnf-*``: cnf's recipes (:data:`CNF_RECIPES`; maximum likelihood, RNODE, OT flow matching).

Every torch model trains for the same wall-clock ``--budget`` (validation and scoring not
counted), with Adam and a cosine learning-rate decay over the budget, validation before the
first step, at ``--evals`` evenly spaced times and after every ``max(100, step // 4)`` steps, and
early stopping: the weights with the best validation NLL are the ones tested (flow matching
validates its EMA weights, :class:`cnf.ema.ExponentialMovingAverage` as in ``cnf train``). CNFs
are scored with the exact divergence at rtol = atol = 1e-5 whatever they trained with. Per
model: the test NLL averaged over ``--seeds`` seeds with +-2 standard errors over seeds (and the per-point standard error),
bits/dim for digits, parameters, training seconds, best step, seconds and NFE to score the
test set, seconds to sample ``--n-sample`` (10,000 by default; timed once, on seed 0: zuko's NSF
inverts its autoregressive transforms one dimension at a time, ~3 minutes for 10,000 digits).

Writes benchmarks/results/real_data.{json,md,png} (the plot: test NLL on up to 2,000 test points
against training seconds per dataset, seed 0, baselines as horizontal lines).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import RESULTS, write_results
from cnf import CNF, MLPField, Solver
from cnf.adapters import MISSING_ZUKO, ZukoFlow, zuko_available
from cnf.data.real import REAL_DATASETS, load_real
from cnf.ema import ExponentialMovingAverage
from cnf.recipes import EVALUATION_SOLVER, default_objective, model_recipe, recipe
from cnf.training import TrainSettings
from cnf.transforms import DEFAULT_ALPHA, Dequantize, TransformedFlow, bits_per_dim, choose_preprocessing

EVAL_TOL = EVALUATION_SOLVER["rtol"]
VAL_TOL = 1e-4  # model selection needs ranking, not the last digit
TEST_NOISE_SEED = 12345  # one dequantisation draw of the test set, shared by all models
PLOT_POINTS = 2000
GMM_COMPONENTS = (1, 2, 4, 8, 16, 32)
KDE_BANDWIDTHS = tuple(float(b) for b in np.logspace(-1.3, 0.3, 12))

#: cnf's recipes: field, divergence and solver for training, and the training settings.
CNF_RECIPES: dict[str, dict[str, Any]] = {
    "cnf-ml": {
        "objective": "likelihood",
        "hidden": (256, 256),
        "divergence": "hutchinson",
        "solver": {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3},
        "lr": 1e-3,
        "batch_size": 256,
    },
    "cnf-rnode": {
        "objective": "likelihood",
        "hidden": (256, 256),
        "divergence": "hutchinson",
        "solver": {"method": "rk4", "step_size": 0.25},
        "kinetic_weight": 0.01,
        "jacobian_weight": 0.01,
        "lr": 1e-3,
        "batch_size": 256,
    },
    "cnf-otfm": {
        "objective": "ot_flow_matching",
        "hidden": (256, 256, 256),
        "lr": 1e-3,
        "batch_size": 256,
        "ema_decay": 0.999,
    },
}
#: Variants measured to choose the recipes (README, "Recipes by dimension"); not run by default.
RECIPE_VARIANTS: dict[str, dict[str, Any]] = {
    "cnf-ml-exact": {**CNF_RECIPES["cnf-ml"], "divergence": "exact"},
    "cnf-ml-rk4": {**CNF_RECIPES["cnf-ml"], "solver": {"method": "rk4", "step_size": 0.25}},
    "cnf-ml-lr5e-3": {**CNF_RECIPES["cnf-ml"], "lr": 5e-3},
    "cnf-ml-64x3": {**CNF_RECIPES["cnf-ml"], "hidden": (64, 64, 64)},
    "cnf-fm": {**CNF_RECIPES["cnf-otfm"], "objective": "flow_matching"},
    "cnf-fm-lr3e-3": {**CNF_RECIPES["cnf-otfm"], "objective": "flow_matching", "lr": 3e-3},
    "cnf-fm-1024": {**CNF_RECIPES["cnf-otfm"], "objective": "flow_matching", "batch_size": 1024},
    "cnf-otfm-lr3e-3": {**CNF_RECIPES["cnf-otfm"], "lr": 3e-3},  # today's cnf-default on tables
    # the training-time exponent k (t = 1 - (1 - u)^k) at lr 3e-3; k = 1 is cnf-otfm-lr3e-3
    "cnf-otfm-t05": {**CNF_RECIPES["cnf-otfm"], "lr": 3e-3, "time_exponent": 0.5},
    "cnf-otfm-t2": {**CNF_RECIPES["cnf-otfm"], "lr": 3e-3, "time_exponent": 2.0},
    "cnf-otfm-t3": {**CNF_RECIPES["cnf-otfm"], "lr": 3e-3, "time_exponent": 3.0},
    "cnf-otfm-lr5e-3": {**CNF_RECIPES["cnf-otfm"], "lr": 5e-3},
    "cnf-otfm-lr1e-2": {**CNF_RECIPES["cnf-otfm"], "lr": 1e-2},
    "cnf-otfm-512x3": {**CNF_RECIPES["cnf-otfm"], "hidden": (512, 512, 512)},
    "cnf-otfm-no-ema": {**CNF_RECIPES["cnf-otfm"], "ema_decay": None},
}
#: Variants of cnf-default (what `cnf train` uses for the dataset), with these settings changed.
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "cnf-default": {},
    # the table field before 2026-12-07 (tanh, 256x3, gates on t), and with SiLU only
    "cnf-default-tanh3": {"activation": "tanh", "hidden": (256, 256, 256), "time_embedding": "concatsquash"},
    "cnf-default-silu3": {"activation": "silu", "hidden": (256, 256, 256), "time_embedding": "concatsquash"},
    # the default without its closing maximum-likelihood phase (the recipe before 2026-12-07's second change)
    "cnf-default-fm-only": {"likelihood_finetune": 0.0},
    # training times t ~ Beta(1, 1/3) instead of Beta(1, 1/2): measured on galaxies at 10 minutes, not adopted
    "cnf-default-t3": {"time_exponent": 3.0},
    # wider fields (NSF on galaxies has 546k parameters, the default field 206k)
    "cnf-default-384x4": {"hidden": (384, 384, 384, 384)},
    "cnf-default-512x4": {"hidden": (512, 512, 512, 512)},
    # OT pairs the whole batch of 256 (the recipe before 2026-12-08 on large continuous tables)
    "cnf-default-ot256": {"ot_batch_size": None},
}
BASELINES = ("gaussian", "gmm", "kde")
#: Seconds of training between two validations by default (``--evals`` = budget / this, >= 8): with
#: 8 validations in 600 s zuko's MAF, which overfits digits within ~10 s, was first validated after
#: 75 s and scored 5.03 bits/dim, against 2.33 with a validation every 7.5 s (60 s budget).
EVAL_SECONDS = 7.5
#: A validation also follows every ``max(MIN_VAL_STEPS, step // 4)`` steps (dense early, then
#: geometric): zuko's MAF runs ~45 steps/s on digits and overfits after ~300-500 steps, so a time
#: grid alone (first validation at 7.5 s, step ~330) chose its weights past the optimum.
MIN_VAL_STEPS = 100
ZUKO_MODELS = ("zuko-maf", "zuko-nsf", "zuko-cnf")
# cnf-default is the OT flow-matching recipe on real data, so cnf-otfm is a variant here.
DEFAULT_MODELS = (*BASELINES, *ZUKO_MODELS, "cnf-default", "cnf-ml", "cnf-rnode")
COLUMNS = (
    "data",
    "model",
    "test_nll",
    "pm_2se",
    "point_se",
    "bits_per_dim",
    "params",
    "train_seconds",
    "best_step",
    "steps",
    "likelihood_steps",
    "score_seconds",
    "score_nfe",
    "sample_seconds",
)


# -- classical baselines (numpy / scikit-learn, on the preprocessed data) ------------------------
def fit_baseline(
    name: str, y_train: np.ndarray, y_val: np.ndarray, seed: int, quick: bool
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[int], np.ndarray], int, str]:
    """(log q, sampler, parameters, choice) of a classical model fitted on preprocessed data."""
    dim = y_train.shape[1]
    if name == "gaussian":
        from scipy.stats import multivariate_normal

        mean, cov = y_train.mean(0), np.cov(y_train, rowvar=False, bias=True)
        model = multivariate_normal(mean, cov)
        rng = np.random.default_rng(seed)
        return (
            model.logpdf,
            lambda n: rng.multivariate_normal(mean, cov, size=n),
            dim + dim * (dim + 1) // 2,
            "",
        )
    if name == "gmm":
        from sklearn.mixture import GaussianMixture

        best = None
        for k in GMM_COMPONENTS[:2] if quick else GMM_COMPONENTS:
            if k * dim > y_train.shape[0]:
                break
            gmm = GaussianMixture(k, covariance_type="full", random_state=seed, reg_covar=1e-4).fit(y_train)
            val = gmm.score(y_val)
            if best is None or val > best[0]:
                best = (val, k, gmm)
        _, k, gmm = best
        params = k * (dim + dim * (dim + 1) // 2) + k - 1
        return gmm.score_samples, lambda n: gmm.sample(n)[0], params, f"{k} components"
    if name == "kde":
        from sklearn.neighbors import KernelDensity

        val = y_val[:2000]
        best = None
        for bandwidth in KDE_BANDWIDTHS[::4] if quick else KDE_BANDWIDTHS:
            kde = KernelDensity(bandwidth=bandwidth).fit(y_train)
            score = kde.score_samples(val).mean()
            if best is None or score > best[0]:
                best = (score, bandwidth, kde)
        _, bandwidth, kde = best
        return (
            kde.score_samples,
            lambda n: kde.sample(n, random_state=seed),
            y_train.size,
            f"bandwidth {bandwidth:.3g}",
        )
    raise ValueError(f"unknown baseline {name!r}")


def run_baseline(name: str, ctx: dict[str, Any], seed: int) -> dict[str, Any]:
    preprocess = ctx["preprocess"]
    with torch.no_grad():
        y_train = preprocess(ctx["train"], generator=torch.Generator().manual_seed(seed))[0]
        y_val = preprocess(ctx["val"], generator=torch.Generator().manual_seed(seed + 1))[0]
    start = time.perf_counter()
    log_q, sampler, params, choice = fit_baseline(
        name, y_train.double().numpy(), y_val.double().numpy(), seed, ctx["quick"]
    )
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    test_log_p = torch.from_numpy(log_q(ctx["y_test"].double().numpy())) + ctx["logdet_test"].double()
    score_seconds = time.perf_counter() - start
    sample_seconds = None
    if seed == 0:  # sampling is timed once per model (seed 0)
        start = time.perf_counter()
        sampler(ctx["n_sample"])
        sample_seconds = time.perf_counter() - start
    return {
        "log_p": test_log_p,
        "params": params,
        "train_seconds": train_seconds,
        "score_seconds": score_seconds,
        "score_nfe": None,
        "sample_seconds": sample_seconds,
        "choice": choice,
        "curve": [],
    }


# -- flows ---------------------------------------------------------------------------------------
def build_flow(
    name: str,
    dim: int,
    quick: bool,
    dequantized: bool = False,
    n_train: int | None = None,
    budget: float | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The inner flow (on preprocessed data) and its training options."""
    small = (16, 16) if quick else None
    if name.startswith("zuko-"):
        import zuko

        hidden = small or (256, 256)
        transforms = 2 if quick else 5
        if name == "zuko-maf":
            flow = zuko.flows.MAF(dim, transforms=transforms, hidden_features=hidden)
            return ZukoFlow(flow, dim, "maf", (transforms, transforms * dim)), {"lr": 1e-3, "batch_size": 256}
        if name == "zuko-nsf":
            flow = zuko.flows.NSF(dim, transforms=transforms, hidden_features=hidden)
            return ZukoFlow(flow, dim, "nsf", (transforms, transforms * dim)), {"lr": 1e-3, "batch_size": 256}
        flow = zuko.flows.CNF(dim, hidden_features=hidden, exact=False)
        if quick:
            flow.transform.atol = flow.transform.rtol = 1e-3
        return ZukoFlow(flow, dim, "cnf", (0, 0)), {"lr": 1e-3, "batch_size": 256}
    if name in DEFAULT_VARIANTS:
        recipe = {**default_recipe(dim, dequantized, n_train, budget), **DEFAULT_VARIANTS[name]}
    else:
        recipe = {**CNF_RECIPES, **RECIPE_VARIANTS}[name]
    solver = Solver(**recipe.get("solver", {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3}))
    field = MLPField(
        dim,
        hidden=small or tuple(recipe["hidden"]),
        activation=recipe.get("activation", "tanh"),
        time_embedding=recipe.get("time_embedding", "concatsquash"),
    )
    flow = CNF(
        field,
        divergence=recipe.get("divergence", "exact"),
        noise=recipe.get("noise", "rademacher"),
        solver=solver,
    )
    options = {
        k: recipe[k]
        for k in (
            "lr", "batch_size", "objective", "kinetic_weight", "jacobian_weight", "time_exponent",
            "likelihood_finetune", "finetune_lr", "ot_batch_size",
        )
        if k in recipe
    }  # fmt: skip
    options["ema_decay"] = recipe.get("ema_decay")
    return flow, options


def default_recipe(
    dim: int, dequantized: bool = False, n_train: int | None = None, budget: float | None = None
) -> dict[str, Any]:
    """What ``cnf train --data NAME --time-limit BUDGET`` uses with no other flag: cnf.recipes
    for this dimension, number of training rows and time limit."""
    model = model_recipe(dim, "tabular", dequantized=dequantized, n_train=n_train)
    objective = default_objective(dim, "tabular")
    settings = recipe(objective, dim, "tabular", dequantized=dequantized, n_train=n_train, time_limit=budget)
    solver = {k: model[k] for k in ("method", "rtol", "atol")}
    options = {
        k: settings[k]
        for k in (
            "lr", "batch_size", "kinetic_weight", "jacobian_weight", "time_exponent", "likelihood_finetune",
            "ot_batch_size",
        )  # fmt: skip
        if k in settings
    }
    return {
        "objective": objective,
        "hidden": tuple(model["hidden"]),
        "activation": model["activation"],
        "time_embedding": model["time_embedding"],
        "divergence": model["divergence"],
        "noise": model["noise"],
        "solver": solver,
        "ema_decay": settings.get("ema_decay"),
        **options,
    }


class Scoring:
    """Switch a flow to exact, tight scoring inside a ``with`` block (training settings restored)."""

    def __init__(self, flow: nn.Module, tol: float) -> None:
        self.inner, self.tol = flow.flow, tol

    def __enter__(self) -> None:
        self.inner.eval()
        if isinstance(self.inner, CNF):
            self.saved = (self.inner.divergence, self.inner.solver)
            self.inner.divergence, self.inner.solver = "exact", Solver(rtol=self.tol, atol=self.tol)
        elif isinstance(self.inner, ZukoFlow) and self.inner.name == "cnf":
            transform = self.inner.flow.transform
            self.saved = (transform.exact, transform.atol, transform.rtol)
            transform.exact, transform.atol, transform.rtol = True, self.tol, self.tol

    def __exit__(self, *exc: object) -> None:
        self.inner.train()
        if isinstance(self.inner, CNF):
            self.inner.divergence, self.inner.solver = self.saved
        elif isinstance(self.inner, ZukoFlow) and self.inner.name == "cnf":
            transform = self.inner.flow.transform
            transform.exact, transform.atol, transform.rtol = self.saved


def mean_nll(flow: nn.Module, x: torch.Tensor, seed: int, tol: float) -> float:
    with Scoring(flow, tol), torch.no_grad():
        log_p = flow.log_prob(x, generator=torch.Generator().manual_seed(seed))
    value = -log_p.mean().item()
    return value if math.isfinite(value) else math.inf


def run_flow(name: str, ctx: dict[str, Any], seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    inner, options = build_flow(
        name, ctx["dim"], ctx["quick"], ctx["dequantized"], ctx["train"].shape[0], ctx["budget"]
    )
    model = TransformedFlow(inner, copy.deepcopy(ctx["preprocess"]))
    ema_decay = options.pop("ema_decay", None)
    settings = TrainSettings(
        iters=10**9, time_limit=ctx["budget"], lr_schedule="cosine", seed=seed, **options
    )
    loss_fn = settings.loss_function()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    ema = ExponentialMovingAverage(model, ema_decay) if ema_decay else None  # cnf train's EMA
    train, budget, evals = ctx["train"], ctx["budget"], ctx["evals"]
    checkpoints = [budget * (i + 1) / evals for i in range(evals)]
    plot_test = ctx["test"][:PLOT_POINTS]
    best_val, best_state, best_step, curve = math.inf, None, 0, []
    steps, seconds, diverged = 0, 0.0, False
    next_val_step = MIN_VAL_STEPS

    def validate(best_val: float, best_step: int, best_state: Any) -> tuple[float, int, Any]:
        with ema.applied(model) if ema is not None else contextlib.nullcontext():
            val = mean_nll(model, ctx["val"], seed + 1, VAL_TOL)
            test = mean_nll(model, plot_test, TEST_NOISE_SEED, VAL_TOL)
        curve.append({"seconds": round(seconds, 2), "step": steps, "val_nll": val, "test_nll": test})
        if val < best_val:
            weights = ema.shadow if ema is not None else model.state_dict()
            return val, steps, copy.deepcopy(weights)
        return best_val, best_step, best_state

    best_val, best_step, best_state = validate(best_val, best_step, best_state)  # the start (step 0)
    model.train()
    finetuning, switch_step = False, None
    while checkpoints:
        if not finetuning and settings.finetuning(steps, seconds):  # cnf.train's likelihood phase
            best_val, best_step, best_state = validate(best_val, best_step, best_state)  # flow matching's result
            model.train()
            if ema is not None:
                model.load_state_dict(ema.shadow)
                ema = None
            optimizer = torch.optim.Adam(model.parameters(), lr=settings.finetune_lr)
            loss_fn, finetuning, switch_step = settings.finetune_loss_function(), True, steps
        start = time.perf_counter()
        batch = train[torch.randint(0, train.shape[0], (min(settings.batch_size, train.shape[0]),))]
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            diverged = True
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate(steps, seconds)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            steps += 1
        seconds += time.perf_counter() - start
        timed = seconds >= checkpoints[0]
        if diverged or timed or steps >= next_val_step:
            if timed:
                checkpoints.pop(0)
            next_val_step = steps + max(MIN_VAL_STEPS, steps // 4)
            best_val, best_step, best_state = validate(best_val, best_step, best_state)
            if diverged:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    elif ema is not None:
        model.load_state_dict(ema.shadow)
    with Scoring(model, EVAL_TOL), torch.no_grad():
        start = time.perf_counter()
        log_p = model.log_prob(ctx["test"], generator=torch.Generator().manual_seed(TEST_NOISE_SEED))
        score_seconds = time.perf_counter() - start
        score_nfe = model.stats.nfe_forward or None
        sample_seconds = None
        if seed == 0:  # sampling is timed once per model (seed 0)
            start = time.perf_counter()
            model.sample(ctx["n_sample"])
            sample_seconds = time.perf_counter() - start
    return {
        "log_p": log_p.double(),
        "params": sum(p.numel() for p in inner.parameters()),
        "train_seconds": seconds,
        "steps": steps,
        "best_step": best_step,
        "likelihood_steps": None if switch_step is None else steps - switch_step,
        "score_seconds": score_seconds,
        "score_nfe": score_nfe,
        "sample_seconds": sample_seconds,
        "choice": "diverged; best weights before" if diverged else "",
        "curve": curve,
    }


# -- the run -------------------------------------------------------------------------------------
def dataset_context(name: str, args: argparse.Namespace) -> dict[str, Any]:
    data = load_real(name, path=args.galaxy_path)
    train, val, test = data.train, data.val, data.test
    if args.quick:
        train, val, test = train[:300], val[:100], test[:100]
    preprocess, notes = choose_preprocessing(train, args.preprocess, levels=data.levels, alpha=args.alpha)
    if preprocess is None:
        raise ValueError(f"{name}: no preprocessing chosen; the benchmark expects at least a standardisation")
    with torch.no_grad():
        y_test, logdet_test = preprocess(test, generator=torch.Generator().manual_seed(TEST_NOISE_SEED))
    return {
        "name": name,
        "train": train,
        "val": val,
        "test": test,
        "y_test": y_test,
        "logdet_test": logdet_test,
        "dim": data.dim,
        "preprocess": preprocess,
        "dequantized": isinstance(next(preprocess.leaves()), Dequantize),
        "notes": notes,
        "levels": data.levels,
        "licence": data.licence,
        "budget": args.budget,
        "evals": args.evals,
        "quick": args.quick,
        "n_sample": args.n_sample,
    }


def summarise(name: str, model: str, runs: list[dict[str, Any]], ctx: dict[str, Any]) -> dict[str, Any]:
    nlls = np.array([-r["log_p"].mean().item() for r in runs])
    points = [r["log_p"].std().item() / math.sqrt(r["log_p"].shape[0]) for r in runs]
    seeds = len(runs)
    spread = 2 * nlls.std(ddof=1) / math.sqrt(seeds) if seeds > 1 else None
    row: dict[str, Any] = {
        "data": name,
        "model": model,
        "test_nll": float(nlls.mean()),
        "pm_2se": None if spread is None else float(spread),
        "point_se": float(np.mean(points)),
        "seeds": seeds,
        "seed_nlls": nlls.tolist(),
        "bits_per_dim": None,
        "choice": "; ".join(sorted({r["choice"] for r in runs if r["choice"]})),
    }
    if ctx["levels"] is not None:
        width = next(ctx["preprocess"].leaves()).bin_width
        row["bits_per_dim"] = float(
            np.mean([bits_per_dim(r["log_p"].mean(), ctx["dim"], width).item() for r in runs])
        )
    for key in (
        "params",
        "train_seconds",
        "steps",
        "likelihood_steps",
        "best_step",
        "score_seconds",
        "score_nfe",
        "sample_seconds",
    ):
        values = [r.get(key) for r in runs if r.get(key) is not None]
        row[key] = float(np.mean(values)) if values else None
    row["curve"] = runs[0]["curve"]
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(r["data"] for r in rows))
    fig = Figure(figsize=(4.6 * len(datasets), 3.9))
    FigureCanvasAgg(fig)
    for i, dataset in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), i + 1)
        mine = [r for r in rows if r["data"] == dataset]
        finite = [r["test_nll"] for r in mine if math.isfinite(r["test_nll"])]
        for j, r in enumerate(mine):
            color = f"C{j % 10}"
            if r["curve"]:
                xs = [c["seconds"] for c in r["curve"]]
                ys = [c["test_nll"] for c in r["curve"]]
                ax.plot(xs, ys, "o-", color=color, markersize=3, label=r["model"])
            elif math.isfinite(r["test_nll"]):
                ax.axhline(r["test_nll"], color=color, linestyle="--", label=r["model"])
        if finite:
            low, high = min(finite), max(finite)
            ax.set_ylim(low - 0.1 * (high - low + 1), high + 0.3 * (high - low + 1))
        ax.set_xlabel("training seconds")
        ax.set_ylabel("test NLL (nats, data units)")
        ax.set_title(dataset)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=list(REAL_DATASETS), choices=REAL_DATASETS)
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        help=f"of {tuple(dict.fromkeys((*DEFAULT_MODELS, *DEFAULT_VARIANTS, *CNF_RECIPES, *RECIPE_VARIANTS)))}",
    )
    parser.add_argument(
        "--budget", type=float, default=60.0, help="training seconds per torch model and seed"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1"
    )
    parser.add_argument(
        "--evals",
        type=int,
        default=None,
        help=f"validations (early stopping) per run; default one per {EVAL_SECONDS:g} s of budget, at least 8",
    )
    parser.add_argument("--n-sample", type=int, default=10_000, help="samples drawn for the timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--galaxy-path", default=None, help="pzflow wheel or galaxy-data.pkl (see cnf.data.real)"
    )
    parser.add_argument("--preprocess", default="auto", help="steps for choose_preprocessing (default auto)")
    parser.add_argument(
        "--alpha", type=float, default=DEFAULT_ALPHA, help=f"logit margin where a logit is chosen (default {DEFAULT_ALPHA})"
    )
    parser.add_argument("--name", default="real_data", help="results file name")
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (for the tests)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    known = tuple(dict.fromkeys((*DEFAULT_MODELS, *DEFAULT_VARIANTS, *CNF_RECIPES, *RECIPE_VARIANTS)))
    unknown = [m for m in args.models if m not in known]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {known}")
    if args.evals is None:  # MAF overfits digits within seconds: validate often at any budget
        args.evals = max(8, round(args.budget / EVAL_SECONDS))
    if args.quick:
        args.budget, args.seeds, args.evals, args.n_sample = 0.2, 1, 1, 100
        args.datasets = ["digits"] if args.datasets == list(REAL_DATASETS) else args.datasets
    torch.set_num_threads(args.threads)
    notes: list[str] = []
    models = list(args.models)
    if not zuko_available() and any(m.startswith("zuko") for m in models):
        models = [m for m in models if not m.startswith("zuko")]
        notes.append(f"zuko models skipped: {MISSING_ZUKO}")
    rows, meta_datasets = [], {}
    start = time.perf_counter()
    for dataset in args.datasets:
        try:
            ctx = dataset_context(dataset, args)
        except (FileNotFoundError, ImportError) as error:
            notes.append(f"{dataset} skipped: {error}")
            print(notes[-1])
            continue
        meta_datasets[dataset] = {
            "dim": ctx["dim"],
            "train": int(ctx["train"].shape[0]),
            "val": int(ctx["val"].shape[0]),
            "test": int(ctx["test"].shape[0]),
            "preprocessing": ctx["notes"],
            "licence": ctx["licence"],
            "cnf_default": default_recipe(ctx["dim"], ctx["dequantized"], int(ctx["train"].shape[0]), args.budget),
        }
        for model in models:
            runs = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                run = run_baseline if model in BASELINES else run_flow
                runs.append(run(model, ctx, seed))
            rows.append(summarise(dataset, model, runs, ctx))
            r = rows[-1]
            print(
                f"{dataset} {model}: test NLL {r['test_nll']:.3f} (bits/dim {r['bits_per_dim']}) {r['choice']}"
            )
    out = Path(args.out) if args.out else RESULTS
    write_results(
        args.name,
        rows,
        COLUMNS,
        {
            "budget_seconds": args.budget,
            "seeds": args.seeds,
            "first_seed": args.first_seed,
            "evals": args.evals,
            "eval_solver": {"method": "dopri5", "rtol": EVAL_TOL, "atol": EVAL_TOL, "divergence": "exact"},
            "recipes": {k: v for k, v in {**CNF_RECIPES, **RECIPE_VARIANTS}.items() if k in models},
            "datasets": meta_datasets,
            "notes": notes,
            "total_seconds": time.perf_counter() - start,
        },
        out,
    )
    if rows:
        plot(rows, out / f"{args.name}.png")
    return rows


if __name__ == "__main__":
    main()
