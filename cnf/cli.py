"""The ``cnf`` command: train, evaluate and sample flows from the shell.

cnf train --data moons --model cnf --out runs/moons
cnf evaluate --checkpoint runs/moons/checkpoint.pt --data moons --json

Conditional flows p(x | c) from a table: ``cnf train --data table.npy --context-columns 2 3``
takes columns 2 and 3 as c (standardised; the statistics are buffers of the checkpoint),
``cnf evaluate`` reports the conditional NLL, ``cnf sample --context "0.3,1.2"`` (or
``--context-file contexts.npy`` with one context per row) draws from p(x | c).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnf import __version__, cli_images, distributed, tuning
from cnf.checkpoint import build_flow, convert_trusted_checkpoint, load_checkpoint, read_checkpoint
from cnf.context import ContextStandardization, parse_context, split_context_columns
from cnf.data import load_data, split, true_log_prob
from cnf.data.real import LEVELS, REAL_DATASETS, load_real
from cnf.divergence import DIVERGENCES
from cnf.fields import ACTIVATIONS, CONTEXT_MODES, TIME_EMBEDDINGS, MLPField
from cnf.fields.mlp import LOG_TIME_EPS
from cnf.flow import CNF
from cnf.images import IMAGE_RECIPE
from cnf.losses import OBJECTIVES
from cnf.outputs import atomic_write_text, prepare_folder, strict_json
from cnf.pairings import describe_solvers
from cnf.planar import ConditionalPlanarFlow, PlanarFlow
from cnf.recipes import (
    EVALUATION_SOLVER,
    SMALL_TABLE_FIELD,
    SMALL_TABLE_ROWS,
    TABLE_LIKELIHOOD_FINETUNE,
    TOY_DIM,
    VAE_DATA_RECIPES,
    default_objective,
    exact_evaluation,
    model_recipe,
    recipe,
    vae_settings,
)
from cnf.solver import Solver
from cnf.training import (
    CHECKPOINT_NAME,
    DEFAULT_FINETUNE_LR,
    LOG_NAME,
    SUMMARY_NAME,
    TrainingError,
    TrainingInterrupted,
    TrainSettings,
    _existing_run_files,
    event_shape,
    resolve_threads,
    train,
)
from cnf.transforms import (
    DEFAULT_ALPHA,
    STEPS,
    Transform,
    TransformedFlow,
    bits_per_dim,
    choose_preprocessing,
    leading_dequantize,
)
from cnf.vae.posteriors import POSTERIORS

TEST_SEED = cli_images.TEST_SEED  # test points and scoring draws, apart from the training seed
DEFAULT_TEST_SIZE = 10_000


#: Defaults of a new run's flags that are not training settings (those come from cnf.recipes).
RUN_DEFAULTS: dict[str, Any] = {"data": "moons", "n_train": 50_000, "seed": 0}
MODEL_DEFAULTS: dict[str, Any] = {
    "model": "cnf", "hidden": [64, 64, 64], "activation": "tanh", "time_embedding": "concatsquash", "layers": 32,
}  # fmt: skip
SOLVER_DEFAULTS: dict[str, Any] = {
    "divergence": "exact",
    "noise": "gaussian",
    "method": "dopri5",
    "rtol": 1e-5,
    "atol": 1e-5,
    "adjoint": False,
}
#: Training flags -> TrainSettings fields (defaults from cnf.recipes.recipe).
TRAIN_FLAGS = (
    "iters",
    "time_limit",
    "batch_size",
    "lr",
    "lr_schedule",
    "val_every",
    "objective",
    "kinetic_weight",
    "jacobian_weight",
    "sigma_min",
    "time_exponent",
    "ot_batch_size",
    "likelihood_finetune",
    "finetune_lr",
    "finetune_divergence",
    "ema_decay",
    "seed",
    "patience",
)
DEFAULT_TIME_LIMIT = 90.0


def _words(values: Sequence[Any]) -> str:
    return " ".join(str(v) for v in values)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def explicit(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The flags among ``names`` that the user passed (their argparse default is None)."""
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if given.get("ema_decay") == 0:  # --ema-decay 0: no moving average
        given["ema_decay"] = None
    return given


def build_model(args: argparse.Namespace, dim: int, context_dim: int | None = None) -> torch.nn.Module:
    if args.model in ("multiscale", "unet"):
        raise ValueError(f"--model {args.model} needs integer images (C, H, W); --data {args.data!r} is vectors")
    if args.model == "planar":
        if context_dim is None:
            return PlanarFlow(dim, args.layers)
        return ConditionalPlanarFlow(dim, args.layers, context_dim)
    solver = Solver(method=args.method, rtol=args.rtol, atol=args.atol, adjoint=args.adjoint)
    field = MLPField(
        dim, hidden=tuple(args.hidden), activation=args.activation, time_embedding=args.time_embedding,
        context_dim=context_dim,
    )  # fmt: skip
    return CNF(field, divergence=args.divergence, noise=args.noise, solver=solver)


def context_split(
    sets: Sequence[torch.Tensor], columns: Sequence[int] | None, source: str
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Each table's (x, c) for ``--context-columns`` (c None without them)."""
    if not columns:
        return list(sets), [None] * len(sets)
    if Path(source).suffix.lower() not in (".npy", ".csv"):
        raise ValueError(f"--context-columns needs a .npy/.csv table as --data, got {source!r}")
    pairs = [split_context_columns(s, columns) for s in sets]
    return [x for x, _ in pairs], [c for _, c in pairs]


def context_columns(config: dict[str, Any] | None) -> list[int] | None:
    """The ``--context-columns`` a checkpoint's flow was trained with (inside any preprocessing)."""
    while isinstance(config, dict):
        if config.get("context_columns"):
            return config["context_columns"]
        config = config.get("flow")
    return None


def fit_context_standardization(flow: torch.nn.Module, contexts: torch.Tensor) -> None:
    for module in flow.modules():
        if isinstance(module, ContextStandardization):
            module.fit(contexts.to(module.mean))


def is_file_source(source: str) -> bool:
    return Path(source).suffix.lower() in (".npy", ".csv")


def load_splits(source: str, n_train: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/validation/test sets: fresh seeded samples for a toy name, the fixed split of a real
    dataset (:mod:`cnf.data.real`), a seeded split for a file."""
    if source in REAL_DATASETS:
        data = load_real(source)
        return data.train, data.val, data.test
    if is_file_source(source):
        rows = load_data(source)
        try:
            return split(rows, seed=seed)
        except ValueError as error:
            raise ValueError(
                f"--data {source!r} has {rows.shape[0]} rows, too few to split 80/10/10 into training, "
                f"validation and test rows ({error})"
            ) from None
    train_set = load_data(source, n=n_train, seed=seed)
    val_set = load_data(source, n=2_000, seed=seed + 1)
    test_set = load_data(source, n=DEFAULT_TEST_SIZE, seed=TEST_SEED)
    return train_set, val_set, test_set


def load_eval_data(source: str, n: int, seed: int) -> torch.Tensor:
    """Data to score: a file's rows, a real dataset's test split, or n seeded toy samples."""
    if source in REAL_DATASETS:
        return load_real(source).test
    if is_file_source(source):
        return load_data(source)
    return load_data(source, n=n, seed=seed)


def file_test_split(source: str, choice: str, run: dict[str, Any] | None) -> tuple[int | None, str]:
    """Which rows of the file ``source`` ``cnf evaluate --split choice`` scores: the seed of the
    test split that ``cnf train`` makes of a file (80/10/10), or None for every row; and a phrase
    saying which. ``auto``: the test split when the checkpoint trained on this very file (its other
    rows were trained or validated on), else every row; ``test``: the test split (the run's seed
    on its own file, else 0); ``all``: every row."""
    trained_on = (run or {}).get("data")
    same_file = isinstance(trained_on, str) and is_file_source(trained_on)
    same_file = same_file and Path(trained_on).resolve() == Path(source).resolve()
    if choice == "all" or (choice == "auto" and not same_file):
        return None, f"of {source}"
    seed = (run or {}).get("seed", 0) if same_file else 0
    which = "the file it trained on" if same_file else "the file"
    return seed, f": the test split of {which} (seed {seed}; --split all for every row)"


def scored_phrase(seed: int | None, phrase: str, count: int, total: int, unit: str = "rows") -> str:
    """E.g. "all 300 rows of t.npy" or "30 of 300 rows: the test split of ..." (see file_test_split)."""
    return f"all {total} {unit} {phrase}" if seed is None else f"{count} of {total} {unit}{phrase}"


def timed_nll(
    flow: torch.nn.Module,
    data: torch.Tensor,
    context: torch.Tensor | None = None,
    exact: bool = True,
    seed: int = TEST_SEED,
) -> dict[str, Any]:
    """Test NLL in nats (data units; conditional, mean -log p(x | c), with a context), NFE of the
    scoring solve and seconds, all from one pass; bits per dimension too for discrete data (a
    flow whose preprocessing dequantises). With ``exact`` a CNF scores with the exact divergence
    at the recipes' evaluation tolerance (:func:`cnf.recipes.exact_evaluation`), whatever it
    trained with; else with its own solver. Its random draws (dequantisation noise, Hutchinson
    probes) come from ``seed``, so the same data get the same score."""
    start = time.perf_counter()
    with torch.no_grad(), exact_evaluation(flow) if exact else contextlib.nullcontext():
        data = data.to(distributed.flow_device(flow))
        conditional = {} if context is None else {"context": context.to(data.device)}
        log_prob = flow.log_prob(data, generator=cli_images.scoring_generator(data, seed), **conditional)
    seconds = time.perf_counter() - start
    metrics = {
        "nll": -log_prob.mean().item(),
        "nfe": flow.stats.nfe_forward,
        "seconds": seconds,
        "n": int(data.shape[0]),
    }
    bin_width = getattr(flow, "bin_width", None)
    if bin_width is not None:
        metrics["bits_per_dim"] = bits_per_dim(log_prob.mean(), int(data[0].numel()), bin_width).item()
    return metrics


def table_preprocessing(args: argparse.Namespace, source: str, train_set: torch.Tensor) -> Transform | None:
    """The preprocessing the data need (or that the flags ask for), saying which."""
    levels = args.levels if args.levels is not None else LEVELS.get(source)
    steps = args.preprocess or "auto"
    preprocess, notes = choose_preprocessing(
        train_set, steps, levels=levels, alpha=DEFAULT_ALPHA if args.alpha is None else args.alpha
    )
    for note in notes:
        print(f"preprocessing ({steps}): {note}")
    return preprocess


def describe_model(flow: torch.nn.Module) -> str:
    """The model of a vector run in words, as ``cnf train`` prints it before training."""
    inner = flow.flow if isinstance(flow, TransformedFlow) else flow
    if isinstance(inner, (PlanarFlow, ConditionalPlanarFlow)):
        return f"planar flow, {inner.layers} layers"
    if not isinstance(inner, CNF):
        return type(inner).__name__
    field, solver = inner.field, inner.solver
    widths = "-".join(str(w) for w in getattr(field, "hidden", ()))
    activation = getattr(field, "activation_name", None)
    time_embedding = getattr(field, "time_embedding", None)
    steps = f"step {solver.step_size:g}" if solver.step_size is not None else f"rtol {solver.rtol:g}, atol {solver.atol:g}"
    evaluation = EVALUATION_SOLVER
    return (
        f"CNF, {type(field).__name__} {widths}" + (f" {activation}" if activation else "")
        + (f", time {time_embedding}" if time_embedding else "")
        + f"; solves with {solver.method} ({steps}) and the {inner.divergence} divergence while training; "
        f"test log p with the exact divergence, {evaluation['method']} (rtol {evaluation['rtol']:g}, "
        f"atol {evaluation['atol']:g})"
    )


def known_true_nll(source: str, test_set: torch.Tensor) -> float | None:
    """The true NLL of the test points for a toy dataset with a closed-form density, else None."""
    if is_file_source(source):
        return None
    try:
        return -true_log_prob(source, test_set.double()).mean().item()
    except ValueError:
        return None


def parse_threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'auto', got {text!r}")
    return value


def _resume_path(resume: str) -> Path:
    path = Path(resume)
    return path / CHECKPOINT_NAME if path.is_dir() else path


#: Flags that shape a CNF's velocity field or its ODE solves: a planar flow has neither.
CNF_ONLY_FLAGS = ("hidden", "activation", "time_embedding", "divergence", "noise", "method", "rtol", "atol", "adjoint")
#: Flags of ``--model vae`` only (the VAE group of ``cnf train --help``).
VAE_ONLY_FLAGS = ("posterior", "latent_dim", "flow_hidden", "flow_context", "flow_context_net", "kl_warmup", "iwae_samples")
#: Flags of flows that a VAE would ignore: it trains by the ELBO on binarised images, and its CNF
#: posterior's log-density is exact (no Hutchinson probe).
FLOW_ONLY_FLAGS = (
    "divergence", "noise", "sigma_min", "time_exponent", "ot_batch_size", "likelihood_finetune", "finetune_lr",
    "finetune_divergence", "kinetic_weight", "jacobian_weight", "preprocess", "levels", "alpha", "context_columns",
)  # fmt: skip


def _them(given: dict[str, Any]) -> str:
    return "them" if len(given) > 1 else "it"


def _typed_flags(given: dict[str, Any]) -> str:
    """The flags of ``given`` as the user typed them, comma-separated."""
    return ", ".join(_given_flag(name, value) for name, value in given.items())


def _given_flag(name: str, value: Any) -> str:
    """A flag as the user typed it: ``--hidden 8 8``, ``--rtol 0.001``, ``--no-adjoint``."""
    if isinstance(value, bool):
        return _flag(name) if value else "--no-" + name.replace("_", "-")
    return f"{_flag(name)} {_words(value) if isinstance(value, list) else value}"


def check_model_flags(args: argparse.Namespace, resumed: Path | None = None, model: str | None = None) -> None:
    """Refuse model flags that the run's model (cnf or planar) would silently ignore: the chosen
    ``--model`` of a new run, or ``model``, the kind saved in the checkpoint ``resumed``."""
    model = model or args.model or MODEL_DEFAULTS["model"]
    subject = f"--model {model}" if resumed is None else f"the run in {str(resumed)!r} (a {model} flow)"
    way_out = "use --model cnf" if resumed is None else "start a new run (another --out) instead"
    if model == "planar":
        given = explicit(args, CNF_ONLY_FLAGS)
        if given:
            raise ValueError(
                f"{subject} has no velocity field and no ODE solve, so {_typed_flags(given)} would be ignored; "
                f"drop {_them(given)}, or {way_out}"
            )
    elif model == "cnf" and args.layers is not None:
        raise ValueError(f"--layers {args.layers} sets the depth of a planar flow; {subject} takes --hidden")


def check_vae_flags(args: argparse.Namespace, vae: bool) -> None:
    """Refuse the VAE's flags on a flow's run and the flows' flags on a VAE's run (each would be
    ignored), naming them as typed."""
    names, reason = (
        (FLOW_ONLY_FLAGS, "--model vae trains by the ELBO on binarised images with an exactly scored posterior, so {flags} would be ignored; drop {them}")
        if vae
        else (VAE_ONLY_FLAGS, "{flags} {verb} to --model vae only; drop {them}, or pass --model vae")
    )  # fmt: skip
    given = explicit(args, names)
    if given:
        flags, verb = _typed_flags(given), "apply" if len(given) > 1 else "applies"
        raise ValueError(reason.format(flags=flags, them=_them(given), verb=verb))


def check_posterior_flags(args: argparse.Namespace, posterior: str) -> None:
    """Refuse flags that the VAE's posterior family would ignore: the solver's and the field's
    are the CNF posterior's, ``--layers`` counts planar layers or IAF transforms."""
    own = {
        "flow_context": ("cnf",), "flow_context_net": ("cnf",), "activation": ("cnf",), "method": ("cnf",), "rtol": ("cnf",), "atol": ("cnf",),
        "adjoint": ("cnf",), "layers": ("planar", "iaf"),
    }  # fmt: skip
    for name, value in explicit(args, list(own)).items():
        if posterior not in own[name]:
            families = " or ".join(own[name])
            raise ValueError(
                f"{_given_flag(name, value)} applies to --posterior {families}, got --posterior {posterior}"
            )


def _new_run(args: argparse.Namespace) -> tuple[dict[str, Any], torch.nn.Module, TrainSettings, list, list]:
    """Settings of a new run: recipe for the objective, then the flags given. The last item holds
    the splits' contexts (``--context-columns``; Nones without)."""
    check_model_flags(args)
    run = {**RUN_DEFAULTS, **explicit(args, list(RUN_DEFAULTS))}
    splits = load_splits(run["data"], run["n_train"], run["seed"])
    splits, contexts = context_split(splits, args.context_columns, run["data"])
    dim = splits[0].shape[1]
    data_kind = "tabular" if is_file_source(run["data"]) or run["data"] in REAL_DATASETS else "toy"
    preprocess = table_preprocessing(args, run["data"], splits[0])
    dequantized = leading_dequantize(preprocess) is not None
    # Flags left out: the model recipe of this dimension and kind of data (cnf.recipes).
    for name, value in {
        **MODEL_DEFAULTS, **SOLVER_DEFAULTS,
        **model_recipe(dim, data_kind, dequantized=dequantized, n_train=splits[0].shape[0]),
    }.items():  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.manual_seed(run["seed"])
    model = build_model(args, dim, None if contexts[0] is None else contexts[0].shape[1])
    if contexts[0] is not None:
        fit_context_standardization(model, contexts[0])
        model.context_columns = run["context_columns"] = list(args.context_columns)
    flow = model if preprocess is None else TransformedFlow(model, preprocess)
    # Planar flows have no velocity field to match: they train by maximum likelihood.
    objective = args.objective or ("likelihood" if args.model == "planar" else default_objective(dim, data_kind))
    if args.model == "planar" and objective != "likelihood":
        raise ValueError(f"--model planar trains by maximum likelihood (--objective likelihood), got --objective {objective}")
    time_limit = args.time_limit if args.time_limit is not None else DEFAULT_TIME_LIMIT
    base = recipe(
        objective, dim, data_kind, time_limit=time_limit, n_train=splits[0].shape[0], dequantized=dequantized
    )
    settings = TrainSettings(**{**base, **explicit(args, TRAIN_FLAGS)})
    run["data_kind"] = data_kind
    return run, flow, settings, list(splits), contexts


def _resumed_run(
    args: argparse.Namespace, checkpoint: Path
) -> tuple[dict[str, Any], torch.nn.Module, TrainSettings, list, list[str], list]:
    """The run's own data, model, solver and settings from its checkpoint; flags given change them."""
    payload = read_checkpoint(checkpoint)
    saved_run = payload.get("run") or {}
    run = {**RUN_DEFAULTS, **saved_run, **explicit(args, list(RUN_DEFAULTS))}
    if "data" not in saved_run and args.data is None:
        raise ValueError(f"checkpoint {str(checkpoint)!r} does not record its data; pass --data")
    outer = payload.get("config")
    if outer is None:
        raise ValueError(f"checkpoint {str(checkpoint)!r} has no model config; resume it from Python")
    config = outer
    while config.get("kind") == "transformed" and isinstance(config.get("flow"), dict):
        config = config["flow"]  # the flow inside its preprocessing
    if config.get("kind") in ("cnf", "planar"):
        check_model_flags(args, checkpoint, config["kind"])
    changes = []
    saved_model = {"model": config.get("kind")}
    if config.get("kind") == "cnf":
        saved_model.update(hidden=list((config.get("field") or {}).get("hidden", [])))
        saved_model.update(activation=(config.get("field") or {}).get("activation"))
        saved_model.update(time_embedding=(config.get("field") or {}).get("time_embedding", "concatsquash"))
    else:
        saved_model.update(layers=config.get("layers"))
    for name, value in explicit(args, list(MODEL_DEFAULTS)).items():
        if name in saved_model and value != saved_model[name]:
            raise ValueError(
                f"cannot change {_flag(name)} when resuming: the run in {str(checkpoint)!r} has "
                f"{name}={saved_model[name]!r}, got {value!r}; start a new run (another --out) instead"
            )
    splits = load_splits(run["data"], run["n_train"], run["seed"])
    columns = context_columns(outer)
    splits, contexts = context_split(splits, columns, run["data"])
    saved_shape = event_shape(config.get("dim"))
    if saved_shape is not None and tuple(splits[0].shape[1:]) != saved_shape:
        raise ValueError(
            f"cannot resume {str(checkpoint)!r} on --data {run['data']!r}: the run's model takes points of "
            f"shape {saved_shape}, the data has shape {tuple(splits[0].shape[1:])}"
        )
    flow = build_flow(outer)
    inner = flow.flow if isinstance(flow, TransformedFlow) else flow
    inner.context_columns = columns
    if isinstance(inner, CNF):
        solver_changes = {k: v for k, v in explicit(args, ["method", "rtol", "atol", "adjoint"]).items()}
        for name in ("divergence", "noise"):
            value = getattr(args, name)
            if value is not None and value != getattr(inner, name):
                changes.append(f"{name} {getattr(inner, name)} -> {value}")
                setattr(inner, name, value)
        for name, value in solver_changes.items():
            if value != getattr(inner.solver, name):
                changes.append(f"{name} {getattr(inner.solver, name)} -> {value}")
        inner.solver = inner.solver.with_(**solver_changes)
    saved = TrainSettings.from_dict(payload["settings"])
    given = explicit(args, TRAIN_FLAGS)
    for name, value in given.items():
        if value != getattr(saved, name):
            changes.append(f"{name} {getattr(saved, name)} -> {value}")
    settings = TrainSettings(**{**asdict(saved), **given})
    return run, flow, settings, list(splits), changes, contexts


def cmd_train(args: argparse.Namespace) -> int:
    """``cnf train``: here, on ``--nproc`` local processes (relaunched through torchrun), or as one
    rank of a process group that torchrun started (``torchrun ... -m cnf train``)."""
    several = distributed.launched_with_several_processes()
    if args.nproc > 1 and not several:
        return distributed.launch(args.nproc, ["cnf", *without_option(args.argv, "--nproc")])
    if not several:
        return _train_here(args, distributed.current_cluster())
    cluster = distributed.init(args.device, timeout=args.dist_timeout)
    try:  # ranks other than 0 keep quiet: rank 0 prints and writes for the run
        with contextlib.nullcontext() if cluster.is_main else contextlib.redirect_stdout(io.StringIO()):
            code = _train_here(args, cluster)
    except Exception as error:
        distributed.shutdown(wait_for_peers=False)
        if isinstance(error, (TrainingError, ValueError, TypeError)):  # these name the rank or concern all
            raise
        raise RuntimeError(f"{cluster.describe()}: {type(error).__name__}: {error}") from error
    except BaseException:
        distributed.shutdown(wait_for_peers=False)
        raise
    distributed.shutdown()
    return code


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (the launched ranks must not relaunch)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            kept.append(item)
    return kept


def sharded_nll(
    flow: torch.nn.Module,
    data: torch.Tensor,
    cluster: distributed.Cluster,
    context: torch.Tensor | None = None,
) -> dict[str, Any]:
    """:func:`timed_nll` with each rank scoring its shard (and its rows' contexts), combined over ranks."""
    if not cluster.distributed:
        return timed_nll(flow, data, context)
    metrics = timed_nll(flow, cluster.shard(data), None if context is None else cluster.shard(context))
    total, n, nfe = cluster.sum([metrics["nll"] * metrics["n"], metrics["n"], metrics["nfe"]])
    metrics.update(nll=total / n, n=int(n), nfe=nfe / cluster.world_size)
    bin_width = getattr(flow, "bin_width", None)
    if bin_width is not None:
        metrics["bits_per_dim"] = bits_per_dim(torch.tensor(-total / n), int(data[0].numel()), bin_width).item()
    return metrics


def check_out_folder(out: Path, resume: Path | None, overwrite: bool) -> None:
    """Create ``--out`` and refuse to replace a run in it unless ``--overwrite`` (or ``--resume``
    of that very run); a resumed run written to a new folder clears the old files there."""
    prepare_folder(out, "--out")
    existing = _existing_run_files(out)
    same_folder = resume is not None and resume.parent.resolve() == out.resolve()
    if existing and not same_folder and not overwrite:
        raise ValueError(
            f"--out {str(out)!r} already holds a run ({', '.join(existing)}); pass --resume "
            f"{out / CHECKPOINT_NAME} to continue it, --overwrite to replace it, or choose another --out"
        )
    if existing and not same_folder and resume is not None:
        for name in existing:
            (out / name).unlink()


def _train_here(args: argparse.Namespace, cluster: distributed.Cluster) -> int:
    resume = _resume_path(args.resume) if args.resume is not None else None
    saved = read_checkpoint(resume) if resume is not None else None
    if saved is not None and args.data is None and args.model != "vae":
        saved_data = (saved.get("run") or {}).get("data")
        if cli_images.is_image_source(saved_data):  # an image run continues on its own images
            args.data = saved_data
    vae = args.model == "vae" or (saved is not None and (saved.get("config") or {}).get("kind") == "vae")
    check_vae_flags(args, vae)
    if args.time_embedding is not None and (vae or cli_images.is_image_source(args.data)):
        raise ValueError(
            f"--time-embedding {args.time_embedding} sets the MLP field of vectors; image fields and VAE "
            "posteriors have their own"
        )
    # --model vae takes the binarised images itself (fashion-mnist is also an image dataset name)
    if args.model != "vae" and cli_images.is_image_source(args.data):  # integer images: the image recipe
        if cluster.distributed:
            raise ValueError(
                f"image data trains on one process, got {cluster.world_size} (drop --nproc / torchrun)"
            )
        return cli_images.cmd_train_images(args)
    if vae:
        if cluster.distributed:
            raise ValueError(f"--model vae trains on one process, got {cluster.world_size} (drop --nproc / torchrun)")
        return cmd_train_vae(args, resume)
    if resume is not None:
        run, flow, settings, splits, changes, contexts = _resumed_run(args, resume)
        out = Path(args.out) if args.out is not None else resume.parent
        saved = read_checkpoint(resume)
        step = saved["step"]
        print(
            f"resuming {resume} at step {step} with the run's own model, solver and settings; "
            + ("changed: " + ", ".join(changes) if changes else "nothing changed")
        )
        if settings.time_limit is not None and saved.get("seconds", 0.0) >= settings.time_limit:
            print(
                f"note: the run has used its whole time limit ({settings.time_limit:g} s, counted over the "
                "whole run); pass a larger --time-limit to train further"
            )
        if settings.iters is not None and step >= settings.iters:
            print(f"note: the run has reached its step cap ({settings.iters}); pass a larger --iters to train further")
    else:
        run, flow, settings, splits, contexts = _new_run(args)
        out = Path(args.out) if args.out is not None else Path("runs/default")
        if cluster.distributed and settings.likelihood_finetune and args.likelihood_finetune is None:
            settings = TrainSettings(**{**asdict(settings), "likelihood_finetune": 0.0})
            print("note: the recipe's closing maximum-likelihood phase runs in one process only; training without it")
        print(f"model: {describe_model(flow)}")
    train_set, val_set, test_set = splits
    if cluster.is_main:  # rank 0 owns the run folder
        check_out_folder(out, resume, args.overwrite)
    if cluster.distributed:  # C cores / N local processes, unless --threads says otherwise
        threads = distributed.threads_per_process() if args.threads in (None, "auto") else args.threads
        how = (
            f"{distributed.available_cores()} cores / {cluster.local_world_size} processes"
            if args.threads in (None, "auto")
            else "--threads"
        )
        print(f"{cluster.describe()} on device {distributed.resolve_device(args.device, cluster.local_rank)}: {threads} torch thread(s) ({how})", file=sys.stderr)
    else:
        threads = resolve_threads(args.threads, train_set.shape[1])
        how = "auto" if args.threads in (None, "auto") else "--threads"
    solvers = describe_solvers(args.threads, cluster.world_size) if settings.objective == "ot_flow_matching" else ""
    print(
        f"training {settings.describe()}, {threads} torch thread{'s' if threads > 1 else ''} ({how}){solvers}"
    )
    result = train(
        flow,
        train_set,
        val_set,
        settings=settings,
        out=out,
        resume=resume,
        threads=args.threads,  # None: "auto", which train resolves as above (and one OT solver per core)
        overwrite=True,
        run_info=run,
        context=contexts[0],
        val_context=contexts[1],
        device=args.device,
    )
    metrics = sharded_nll(flow, test_set, cluster, contexts[2])
    # The best validation weights can score far better than the last ones on small tables (wine,
    # 30 s: 19.5 against 36.8 nats), so score best.pt too when it differs (one process: the other
    # ranks have no best.pt path, and the scoring would wait for them).
    best_metrics = None
    if not cluster.distributed and result.best_checkpoint is not None and result.best_step != result.step:
        best_flow, _ = load_checkpoint(result.best_checkpoint, device=distributed.flow_device(flow))
        best_metrics = timed_nll(best_flow, test_set, contexts[2])
    if not cluster.is_main:
        return 0
    summary = {
        "data": run["data"],
        "model": getattr(flow.flow if isinstance(flow, TransformedFlow) else flow, "kind", None),
        "steps": result.step,
        "train_seconds": round(result.seconds, 2),
        "stopped_by": result.stopped_by,
        "test_nll": metrics["nll"],
        "test_log_likelihood": -metrics["nll"],
        "test_nfe": metrics["nfe"],
        "test_n": metrics["n"],
        "checkpoint": str(result.checkpoint),
        "weights": "ema" if settings.ema_decay else "last",
        "best_step": result.best_step,
        "best_val_nll": result.best_val_nll,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "threads": result.threads,
        "settings": asdict(settings),
        "processes": cluster.world_size,
        "device": str(distributed.flow_device(flow)),
    }
    if "bits_per_dim" in metrics:
        summary["test_bits_per_dim"] = metrics["bits_per_dim"]
    if best_metrics is not None:
        summary["best_test_nll"] = best_metrics["nll"]
        if "bits_per_dim" in best_metrics:
            summary["best_test_bits_per_dim"] = best_metrics["bits_per_dim"]
    true_nll = known_true_nll(run["data"], test_set)
    if true_nll is not None:
        summary.update(true_nll=true_nll, excess_nll=metrics["nll"] - true_nll)
    atomic_write_text(out / SUMMARY_NAME, strict_json(summary, indent=2))
    best = f" (best validation at step {result.best_step}: {result.best_checkpoint})" if result.best_step else ""
    print(
        f"trained {summary['model']} on {run['data']}: {result.step} steps in {result.seconds:.1f} s "
        f"(stopped by {result.stopped_by})\n"
        f"test log-likelihood: {-metrics['nll']:.4f} nats/sample (NLL {metrics['nll']:.4f}) "
        f"on {metrics['n']} points, NFE {metrics['nfe']:g}"
        + (f", {metrics['bits_per_dim']:.4f} bits/dim" if "bits_per_dim" in metrics else "")
        + (f"; true NLL {true_nll:.4f}, excess {metrics['nll'] - true_nll:.4f}\n" if true_nll else "\n")
        + f"checkpoint: {result.checkpoint}{best}"
    )
    if best_metrics is not None:
        bits = f", {best_metrics['bits_per_dim']:.4f} bits/dim" if "bits_per_dim" in best_metrics else ""
        print(f"best validation weights: test NLL {best_metrics['nll']:.4f}{bits}")
    if args.plot:
        from cnf.plots import plot_all

        paths = plot_all(flow, out, data=test_set, log=out / LOG_NAME)
        print("plots: " + ", ".join(str(p) for p in paths))
    return 0


VAE_DEFAULTS: dict[str, Any] = {
    "posterior": "gaussian", "latent_dim": 8, "hidden": [256, 256], "flow_hidden": [64, 64], "flow_context": None,
    "flow_context_net": None, "activation": "tanh",
}  # fmt: skip


def check_vae_resume_flags(args: argparse.Namespace, checkpoint: Path, config: dict[str, Any]) -> None:
    """Refuse model and solver flags that would change a resumed VAE (its checkpoint's model is
    rebuilt as saved, so they would be ignored), as a resumed flow refuses them."""
    solver = config.get("solver") or {}
    saved = {
        "posterior": config.get("posterior"), "latent_dim": config.get("latent_dim"), "hidden": config.get("hidden"),
        "flow_hidden": config.get("flow_hidden"), "flow_context": config.get("flow_context"),
        "flow_context_net": config.get("flow_context_net", False), "activation": config.get("flow_activation"), "layers": config.get("layers"),
        **{name: solver.get(name) for name in ("method", "rtol", "atol", "adjoint")},
    }  # fmt: skip
    changed = {
        name: value for name, value in explicit(args, list(saved)).items()
        if (list(value) if isinstance(value, (list, tuple)) else value) != saved[name]
    }  # fmt: skip
    if changed:
        had = ", ".join(f"{name}={saved[name]!r}" for name in changed)
        raise ValueError(
            f"cannot change {_typed_flags(changed)} when resuming: the VAE in {str(checkpoint)!r} has {had}; "
            "start a new run (another --out) instead"
        )


def new_vae(args: argparse.Namespace, run: dict[str, Any], dim: int, tol: float) -> torch.nn.Module:
    """The VAE of a new run: ``run``'s model settings, the solver flags or dopri5 at ``tol``."""
    from cnf.vae import VAE

    torch.manual_seed(run["seed"])
    solver = Solver(method=args.method or "dopri5", rtol=args.rtol or tol, atol=args.atol or tol,
                    adjoint=bool(args.adjoint))  # fmt: skip
    layers = args.layers or (4 if run["posterior"] == "iaf" else 16)
    return VAE(dim, run["latent_dim"], run["posterior"], hidden=tuple(run["hidden"]),
               flow_hidden=tuple(run["flow_hidden"]), layers=layers, solver=solver,
               flow_context=run["flow_context"], flow_context_net=run["flow_context_net"],
               flow_activation=run["activation"])  # fmt: skip


def cmd_train_vae(args: argparse.Namespace, resume: Path | None) -> int:
    """``cnf train --model vae --posterior gaussian|planar|cnf|iaf --data digits|fashion-mnist``:
    the recipe of the ``elbo`` objective, flags given override it; ``--resume`` continues a run."""
    from cnf.data.binarized import BINARIZED_DATASETS, load_binarized
    from cnf.vae.evaluate import evaluate_vae

    given = explicit(args, [*TRAIN_FLAGS, "kl_warmup"])
    if given.get("objective", "elbo") != "elbo":
        raise ValueError(f"--model vae trains by the elbo objective, got --objective {given['objective']!r}")
    # a new run: the benchmark's settings for this data set, then the flags; a resumed run: its own
    data_recipe = VAE_DATA_RECIPES.get(args.data, {}) if resume is None else {}
    if resume is not None:
        payload = read_checkpoint(resume)
        check_posterior_flags(args, payload["config"]["posterior"])
        check_vae_resume_flags(args, resume, payload["config"])
        run = {**(payload.get("run") or {}), **explicit(args, ["data", "seed", "n_train"])}
        vae = build_flow(payload["config"])
        settings = TrainSettings(**{**asdict(TrainSettings.from_dict(payload["settings"])), **given})
        out = Path(args.out) if args.out is not None else resume.parent
        changed = "changed: " + _typed_flags(given) if given else "nothing changed"
        print(f"resuming {resume} at step {payload['step']} with the run's own model, solver and settings; {changed}")
    else:
        run = {"data": args.data, "seed": 0 if args.seed is None else args.seed, "n_train": args.n_train}
        defaults = {**VAE_DEFAULTS, **data_recipe.get("model", {})}
        run.update({k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()})
        out = Path(args.out) if args.out is not None else Path("runs/default")
        check_posterior_flags(args, run["posterior"])
    if run.get("data") not in BINARIZED_DATASETS:
        raise ValueError(
            f"--model vae trains on binarised images: --data must be one of {BINARIZED_DATASETS}, got {run.get('data')!r}"
        )
    data = load_binarized(run["data"], seed=run["seed"], n_train=run.get("n_train"))
    if resume is None:
        vae = new_vae(args, run, data.train.shape[1], data_recipe.get("posterior_tol", 1e-5))
        # the run records how h(x) enters the posterior, as the VAE resolved it (cnf.recipes.vae_flow_context)
        run.update(flow_context=vae.posterior.context_mode, flow_context_net=vae.posterior.context_net)
        time_limit = args.time_limit if args.time_limit is not None else DEFAULT_TIME_LIMIT
        settings = TrainSettings(**{**vae_settings(run["data"], data.train.shape[1], time_limit=time_limit), **given})
    warmup = f", KL warm-up over {settings.kl_warmup} steps" if settings.kl_warmup else ""
    posterior = vae.posterior
    context = ""
    if posterior.family == "cnf":
        way = "by FiLM" if posterior.context_mode == "film" else "as a bias of every layer"
        context = f", h(x) {way}{' through a context network' if posterior.context_net else ''}"
    print(
        f"training a VAE ({posterior.family} posterior{context}, {vae.latent_dim}-D latent, encoder and decoder "
        f"{'-'.join(map(str, vae.hidden))}) on {run['data']}: {settings.describe()}{warmup}"
    )
    result = train(vae, data.train, data.val, settings=settings, out=out, resume=resume, threads=args.threads,
                   overwrite=args.overwrite or resume is not None, run_info=run)  # fmt: skip
    # k = 1000 on all 10,000 Fashion-MNIST test images outlasts the training: score a capped number
    evaluate = f"cnf evaluate --checkpoint {result.checkpoint} --data {run['data']}"
    test = cli_images.first_test_images(data.test, args.test_n, f"{evaluate} --n {data.test.shape[0]}")
    limit = cli_images.scoring_time_limit(args.test_n, result.seconds)
    metrics = evaluate_vae(vae, test, k=args.iwae_samples or 1000, seed=run["seed"], time_limit=limit)
    cli_images.say_if_scored_fewer(metrics["n"], test.shape[0], metrics["seconds"], evaluate)
    summary = {"data": run["data"], "model": "vae", "posterior": vae.posterior.family, "latent_dim": vae.latent_dim,
               "steps": result.step, "train_seconds": round(result.seconds, 2), "stopped_by": result.stopped_by,
               **{f"test_{name}": value for name, value in metrics.items()}, "checkpoint": str(result.checkpoint),
               "settings": asdict(settings)}  # fmt: skip
    atomic_write_text(out / SUMMARY_NAME, strict_json(summary, indent=2))
    print(
        f"trained a VAE ({summary['posterior']} posterior, {vae.latent_dim}-D latent) on {run['data']}: "
        f"{result.step} steps in {result.seconds:.1f} s (stopped by {result.stopped_by})\n"
        f"test ELBO {metrics['elbo']:.3f} +- {metrics['elbo_two_se']:.3f}, importance-weighted log-likelihood "
        f"(k={metrics['k']}) {metrics['iwae']:.3f} +- {metrics['iwae_two_se']:.3f}, KL(q||p(z)) "
        f"{metrics['kl_prior']:.3f} nats/image on {metrics['n']} test images\ncheckpoint: {result.checkpoint}"
    )
    return 0


def evaluate_vae_checkpoint(vae: torch.nn.Module, args: argparse.Namespace) -> int:
    """A VAE's test ELBO, importance-weighted log-likelihood (k = 1000) and KL on the fixed
    binarisation of the named data set's test images."""
    from cnf.data.binarized import load_binarized
    from cnf.vae.evaluate import evaluate_vae

    n = args.n if args.n is not None else DEFAULT_TEST_SIZE
    metrics = evaluate_vae(vae, load_binarized(args.data).test[:n], k=1000)
    if args.json:
        print(strict_json(metrics))
    else:
        print(f"test ELBO: {metrics['elbo']:.4f}  IWAE (k=1000): {metrics['iwae']:.4f}  KL(q||p(z)): "
              f"{metrics['kl_prior']:.4f} nats  n: {metrics['n']}  seconds: {metrics['seconds']:.1f}")  # fmt: skip
    return 0


def check_width(flow: torch.nn.Module, data: torch.Tensor, args: argparse.Namespace, contexts: bool = False) -> None:
    """A clear error when the points of ``--data`` (after its context columns) do not fit the flow."""
    expected = getattr(flow, "dim", None)
    if isinstance(expected, int) and tuple(data.shape[1:]) != (expected,):
        after = " after its context columns" if contexts else ""
        raise ValueError(
            f"--data {args.data!r} has points of shape {tuple(data.shape[1:])}{after}; "
            f"the checkpoint {args.checkpoint!r} takes points of shape ({expected},)"
        )


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.split != "auto" and not is_file_source(args.data):
        raise ValueError(f"--split {args.split} applies to a .npy/.csv file, got --data {args.data!r}")
    flow, payload = load_checkpoint(args.checkpoint, device=args.device)
    if getattr(flow, "kind", None) == "vae":
        return evaluate_vae_checkpoint(flow, args)
    if cli_images.is_image_source(args.data):
        solver = solver_from_file(args.solver_from) if args.solver_from is not None else None
        seed, scored = file_test_split(args.data, args.split, payload.get("run")) if is_file_source(args.data) else (None, None)
        return cli_images.evaluate_images(
            flow, args.data, args.json, solver, n=args.n, test_seed=seed, scored=scored, seed=args.seed
        )
    inner = flow.flow if isinstance(flow, TransformedFlow) else flow
    if args.solver_from is not None and isinstance(inner, CNF):
        inner.solver = solver_from_file(args.solver_from)
    scored = None
    if is_file_source(args.data):
        seed, scored = file_test_split(args.data, args.split, payload.get("run"))
        rows = load_data(args.data)
        data = rows if seed is None else split(rows, seed=seed)[2]
        scored = scored_phrase(seed, scored, data.shape[0], rows.shape[0])
    else:
        data = load_eval_data(args.data, args.n if args.n is not None else DEFAULT_TEST_SIZE, args.seed)
    (data,), (context,) = context_split([data], context_columns(payload.get("config")), args.data)
    check_width(flow, data, args, context is not None)
    # A solver from `cnf tune` is used as given; otherwise the exact, tight evaluation.
    exact = args.solver_from is None
    metrics = timed_nll(flow, data, context, exact=exact, seed=args.seed)
    if context is not None:
        metrics["conditional"] = True
    if scored is not None:
        metrics["scored"] = scored
    if args.json:
        print(strict_json(metrics))
    else:
        if scored is not None:
            print(f"scoring {scored}")
        print(
            f"{'conditional ' if context is not None else ''}test NLL: {metrics['nll']:.4f} nats  "
            f"NFE: {metrics['nfe']}  "
            f"seconds: {metrics['seconds']:.3f}  n: {metrics['n']}"
            + (f"  bits/dim: {metrics['bits_per_dim']:.4f}" if "bits_per_dim" in metrics else "")
        )
    return 0


def solver_from_file(path: str) -> Solver:
    """The recommended evaluation solver from a ``cnf tune`` JSON file (or a bare settings dict)."""
    try:
        settings = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--solver-from file {path!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--solver-from file {path!r} is not JSON: {error}") from None
    except OSError as error:
        raise ValueError(f"--solver-from file {path!r} cannot be read: {error.strerror}") from None

    def expect_object(value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError(
                f"--solver-from file {path!r}: {where} must be a JSON object of solver settings "
                f'(e.g. {{"method": "dopri5", "rtol": 1e-5}}) or the output of `cnf tune`, '
                f"got a {type(value).__name__}: {json.dumps(value)[:80]}"
            )
        return value

    settings = expect_object(settings, "the file")
    recommended = settings.get("recommended")
    if recommended is not None:
        settings = expect_object(expect_object(recommended, "'recommended'").get("evaluation"), "'evaluation'")
    settings = expect_object(settings.get("solver", settings), "'solver'")
    unknown = sorted(set(settings) - set(Solver.__dataclass_fields__))
    if not any(key in Solver.__dataclass_fields__ for key in settings):
        raise ValueError(
            f"--solver-from file {path!r} has no solver settings (got keys {unknown}); "
            f"expected some of {sorted(Solver.__dataclass_fields__)}"
        )
    try:
        return Solver.from_dict(settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--solver-from file {path!r}: {error}") from None


def cmd_score(args: argparse.Namespace) -> int:
    """``cnf score``: log p(x) of every row of ``--data`` and its p-value against the run's held-out
    test rows (the fraction of them with a lower density; small = anomalous), into a CSV."""
    from cnf.anomaly import p_values

    flow, payload = load_checkpoint(args.checkpoint, device=args.device)
    if getattr(flow, "kind", None) == "vae" or cli_images.is_image_flow(flow):
        raise ValueError(f"cnf score takes flows of vectors (tables); {args.checkpoint!r} is a {type(flow).__name__}")
    run = payload.get("run") or {}
    if "data" not in run:
        raise ValueError(f"checkpoint {args.checkpoint!r} does not record its training data, which calibrates the p-values")
    columns = context_columns(payload.get("config"))
    calibration = load_splits(run["data"], run.get("n_train", RUN_DEFAULTS["n_train"]), run.get("seed", 0))[2]
    (data, calibration), contexts = context_split([load_eval_data(args.data, args.n, TEST_SEED), calibration], columns, run["data"])
    check_width(flow, data, args, bool(columns))
    with torch.no_grad(), exact_evaluation(flow):
        device = distributed.flow_device(flow)
        log_p, reference = (  # a seeded dequantisation draw: the same file gets the same scores
            flow.log_prob(
                x, generator=cli_images.scoring_generator(x, TEST_SEED),
                **({} if c is None else {"context": c.to(device)}),
            ).double().cpu().numpy()
            for x, c in zip((data.to(device), calibration.to(device)), contexts)
        )  # fmt: skip
    p = p_values(log_p, reference)
    table = np.column_stack([np.arange(len(log_p)), log_p, p])
    np.savetxt(args.out, table, delimiter=",", header="row,log_p,p_value", comments="", fmt=["%d", "%.6f", "%.6f"])
    print(
        f"wrote {args.out}: log p and p-values of {len(log_p)} rows of {args.data}, against the {len(reference)} "
        f"held-out test rows of {run['data']} (a row's p-value is the fraction of them with a lower density); "
        f"{int((p < args.alpha).sum())} rows below p = {args.alpha:g}"
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    flow, _ = load_checkpoint(args.checkpoint, device=args.device)
    device = distributed.flow_device(flow)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.context is not None and args.context_file is not None:
        raise ValueError("give --context or --context-file, not both")
    context_dim = getattr(flow, "context_dim", None)
    if context_dim is not None and args.context is None and args.context_file is None:
        raise ValueError(
            f"{args.checkpoint!r} is conditional (context_dim={context_dim}): pass --context or --context-file"
        )
    if context_dim is None and (args.context is not None or args.context_file is not None):
        raise ValueError(f"--context and --context-file are for a conditional flow; {args.checkpoint!r} is unconditional")
    context = None
    if args.context is not None:
        context = parse_context(args.context)
    elif args.context_file is not None:
        context = load_data(args.context_file)
    if context is not None:
        context = context.to(device=device, dtype=next(flow.parameters()).dtype)
    with torch.no_grad():
        conditional = {} if context is None else {"context": context}
        samples = flow.sample(args.n, generator=generator, **conditional)
    samples = samples.cpu().numpy()
    if cli_images.is_image_flow(flow):  # integer images, as the data came: on the grid already
        samples = np.rint(samples).astype(np.uint8 if samples.min() >= 0 and samples.max() <= 255 else np.int64)
    np.save(args.out, samples)
    print(f"wrote {args.n} samples of shape {tuple(samples.shape)} to {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if not args.trust:
        raise ValueError(
            "cnf convert-checkpoint unpickles the old file, which can run code; pass --trust to confirm "
            f"that you trust {args.old!r}"
        )
    path = convert_trusted_checkpoint(args.old, args.new)
    read_checkpoint(path)
    print(f"wrote {path}: loadable with weights_only=True, checksummed")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    loaded, _ = load_checkpoint(args.checkpoint)
    flow = loaded.flow if isinstance(loaded, TransformedFlow) else loaded
    if not isinstance(flow, CNF):
        raise TypeError(f"cnf tune needs a CNF checkpoint (solver settings), got a {type(flow).__name__}")
    if flow.context_dim is not None:
        raise ValueError(
            f"cnf tune measures unconditional CNFs; {args.checkpoint!r} is conditional "
            f"(context_dim={flow.context_dim}): tune its solver by hand with cnf evaluate --solver-from"
        )
    n = max(args.n * (1 + args.fresh_blocks), args.n_grad)  # the grid's block, then fresh ones
    data = load_eval_data(args.data, n, args.seed)[:n]
    check_width(loaded, data, args)
    if isinstance(loaded, TransformedFlow):
        # The solver only acts inside the preprocessing, whose log|det| is exact: the CNF's log p
        # errors on the preprocessed points are the errors in data units.
        with torch.no_grad():
            data, _ = loaded.preprocess(data.to(next(loaded.parameters(), data).dtype), generator=torch.Generator().manual_seed(args.seed))
        if not args.json:
            maps = " -> ".join(t.kind for t in getattr(loaded.preprocess, "transforms", [loaded.preprocess]))
            print(f"tuning the CNF inside the preprocessing ({maps}): its log p errors are those in data units")
    result = tuning.tune(
        flow,
        data,
        methods=args.methods,
        tolerances=args.tolerances,
        step_sizes=args.step_sizes,
        mixed=tuning.DEFAULT_MIXED if args.mixed else (),
        budget=args.budget,
        grad_budget=args.grad_budget,
        n_logp=args.n,
        n_grad=args.n_grad,
        repeats=args.repeats,
        gradients=not args.no_gradients,
        rank_by=args.rank_by,
        confidence=args.confidence,
        fresh_blocks=args.fresh_blocks,
        progress=None if args.json else print,
    )
    paths = result.save(args.out)
    if args.json:
        print(json.dumps(result.recommended))
    else:
        print(result.to_markdown())
        print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
        print(
            f"apply: cnf evaluate --checkpoint {args.checkpoint} --data {args.data} --solver-from {paths['json']}"
        )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from cnf.plots import plot_all

    flow, payload = load_checkpoint(args.checkpoint)
    if cli_images.is_image_flow(flow):  # samples, path and interpolation pictures instead
        paths = cli_images.plot_images(flow, args.out, args.data) + training_curves(args)
        print("plots: " + ", ".join(str(p) for p in paths))
        return 0
    if getattr(flow, "kind", None) == "vae":  # reconstructions and prior samples as images
        return plot_vae_checkpoint(flow, args, payload.get("run") or {})
    context_dim = getattr(flow, "context_dim", None)
    contexts = None
    if args.context is not None:
        if context_dim is None:
            raise ValueError(f"--context is for a conditional flow; {args.checkpoint!r} is unconditional")
        contexts = torch.stack([parse_context(text) for text in args.context])
        if contexts.shape[1] != context_dim:
            raise ValueError(
                f"--context needs {context_dim} comma-separated value(s) per context (the flow's context_dim), "
                f"got {args.context[0]!r}"
            )
    if context_dim is not None and args.data is not None:
        raise ValueError("--data is not drawn beside a conditional flow's densities; choose contexts with --context")
    data = None
    if args.data is not None:
        data = load_eval_data(args.data, args.n, TEST_SEED)
    planar = None
    if args.planar is not None:
        planar, _ = load_checkpoint(args.planar)
        if not isinstance(planar, PlanarFlow):
            raise TypeError(f"--planar must be a planar-flow checkpoint, got a {type(planar).__name__}")
    log = Path(args.checkpoint).parent / "train_log.jsonl"
    paths = plot_all(
        flow,
        args.out,
        data=data,
        log=log if log.is_file() else None,
        times=args.times,
        animate=args.animate,
        frames=args.frames,
        resolution=args.resolution,
        planar=planar,
        contexts=contexts,
    )
    print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def plot_vae_checkpoint(vae: torch.nn.Module, args: argparse.Namespace, run: dict[str, Any]) -> int:
    """``cnf plot`` of a VAE: test images of its data (``--data``, else the run's) and their
    reconstructions, prior samples, and the training curves."""
    from cnf.data.binarized import load_binarized
    from cnf.vae.plots import plot_vae

    name = args.data or run.get("data")
    if name is None:
        raise ValueError(f"checkpoint {args.checkpoint!r} does not record its data; pass --data digits|fashion-mnist")
    data = load_binarized(name, seed=run.get("seed", 0))
    if data.test.shape[1] != vae.dim:
        raise ValueError(f"--data {name!r} has {data.test.shape[1]} pixels per image; the VAE takes {vae.dim}")
    paths = plot_vae(vae, data.test, data.shape, args.out) + training_curves(args)
    print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def training_curves(args: argparse.Namespace) -> list[Path]:
    """``training_curves.png`` in ``--out`` from the log beside ``--checkpoint``, when there is one."""
    from cnf.plots import plot_training_curves_if_logged

    path = plot_training_curves_if_logged(Path(args.checkpoint).parent / LOG_NAME, Path(args.out) / "training_curves.png")
    return [] if path is None else [path]


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A float in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps")


class DefaultsShownFormatter(argparse.HelpFormatter):
    """--help that adds each flag's fixed default (not None or a switch's True/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, True, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnf", description="Continuous normalizing flows.")
    parser.add_argument("--version", action="version", version=f"cnf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser(
        "train",
        help="fit a flow and save a checkpoint",
        description="Fit a flow. Flags left out take the recipe of the objective (cnf.recipes) for a new "
        "run, and the run's own settings with --resume.",
    )
    p.add_argument(
        "--data",
        default=None,
        help="toy or real dataset name (digits, wine, ...) or .npy/.csv file (default moons); images: "
        "digits-images, fashion-mnist or a .npy of shape (n, C, H, W)",
    )
    p.add_argument(
        "--model",
        choices=("cnf", "planar", "vae", "multiscale", "unet"),
        default=None,
        help="default cnf (images: unet where its halvings fit, else cnf, the conv field; unet and "
        "multiscale: images only)",
    )
    p.add_argument("--iters", type=positive_int, default=None, help="step cap (default: none with a time limit)")
    p.add_argument(
        "--time-limit", type=positive_float, default=None, help="wall-clock limit in seconds (default 90)"
    )
    p.add_argument("--out", default=None, help="output folder (default runs/default; the run's with --resume)")
    p.add_argument("--resume", default=None, help="checkpoint (or run folder) to continue from")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None, help="learning-rate decay")
    p.add_argument(
        "--ema-decay", type=unit_interval, default=None, help="EMA of the weights, in (0, 1); 0 turns it off"
    )
    p.add_argument("--n-train", type=positive_int, default=None, help="training points drawn of a named dataset")
    p.add_argument("--val-every", type=positive_int, default=None)
    p.add_argument(
        "--patience", type=positive_int, default=None,
        help="stop after N validations without a better validation score, keeping the best weights "
        "(default: none; 5 for --model vae)",
    )  # fmt: skip
    p.add_argument("--seed", type=non_negative_int, default=None)
    p.add_argument("--threads", type=parse_threads, default=None, help="torch threads or 'auto' (default)")
    p.add_argument(
        "--hidden", type=positive_int, nargs="+", default=None,
        help=f"field widths (default {_words(MODEL_DEFAULTS['hidden'])} on 2-D toys, "
        f"{_words(model_recipe(TOY_DIM + 1, 'tabular')['hidden'])} on tables and files with d > {TOY_DIM}, "
        f"{_words(model_recipe(TOY_DIM + 1, 'tabular', dequantized=True)['hidden'])} on dequantised ones, "
        f"{_words(SMALL_TABLE_FIELD['hidden'])} on tables of under {SMALL_TABLE_ROWS:,} training rows; images: "
        f"the recipe's channels; --model vae: encoder and decoder, "
        + ", ".join(f"{_words(r['model']['hidden'])} on {name}" for name, r in VAE_DATA_RECIPES.items()) + ")",
    )  # fmt: skip
    p.add_argument(
        "--activation", default=None, choices=tuple(ACTIVATIONS),
        help=f"the field's activation (default {MODEL_DEFAULTS['activation']} on 2-D toys, "
        f"{model_recipe(TOY_DIM + 1, 'tabular')['activation']} on tables and files with d > {TOY_DIM}, "
        f"{SMALL_TABLE_FIELD['activation']} on tables of under {SMALL_TABLE_ROWS:,} training rows; images: "
        f"softplus); with --model vae the CNF posterior's (default {VAE_DEFAULTS['activation']})",
    )  # fmt: skip
    p.add_argument(
        "--time-embedding", default=None, choices=TIME_EMBEDDINGS,
        help=f"how the field's layers see t (default {MODEL_DEFAULTS['time_embedding']} on 2-D toys, "
        f"{model_recipe(TOY_DIM + 1, 'tabular')['time_embedding']} on tables and files with d > {TOY_DIM}: "
        f"gates on t and log(1 - t + {LOG_TIME_EPS:g}); "
        f"{model_recipe(TOY_DIM + 1, 'tabular', dequantized=True)['time_embedding']} on dequantised ones, "
        f"{SMALL_TABLE_FIELD['time_embedding']} on tables of under {SMALL_TABLE_ROWS:,} training rows)",
    )  # fmt: skip
    p.add_argument(
        "--divergence", default=None,
        help="exact or hutchinson while training (default exact; hutchinson for maximum likelihood on "
        "tables from d = 16 and on images); likelihoods of vectors are reported with the exact one "
        "(images: Hutchinson, an unbiased estimate)",
    )  # fmt: skip
    p.add_argument(
        "--noise", default=None,
        help="Hutchinson probe: gaussian (default on 2-D toys) or rademacher (tables, images)",
    )  # fmt: skip
    p.add_argument(
        "--method", default=None,
        help=f"ODE solver while training (default dopri5; images: {IMAGE_RECIPE.train_solver.method} with step "
        f"{IMAGE_RECIPE.train_solver.step_size:g})",
    )  # fmt: skip
    p.add_argument(
        "--rtol", type=positive_float, default=None,
        help="while training (default 1e-5 on 2-D toys, 1e-3 on tables with d > 2); reported likelihoods "
        f"use {EVALUATION_SOLVER['rtol']:g}",
    )  # fmt: skip
    p.add_argument("--atol", type=positive_float, default=None, help="as --rtol")
    p.add_argument("--adjoint", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--layers", type=positive_int, default=None, help="planar layers K (default 32)")
    p.add_argument(
        "--objective",
        choices=tuple(OBJECTIVES),
        default=None,
        help="likelihood (+ RNODE with the weights below), flow_matching or ot_flow_matching "
        "(simulation-free); default likelihood on 2-D toys and for --model planar, ot_flow_matching "
        "on tables and files with d > 2, flow_matching on images, elbo for --model vae",
    )
    p.add_argument(
        "--kinetic-weight", type=float, default=None, help="RNODE kinetic-energy weight (0.01 in the paper)"
    )
    p.add_argument(
        "--jacobian-weight", type=float, default=None, help="RNODE Jacobian-norm weight (0.01 in the paper)"
    )
    p.add_argument(
        "--likelihood-finetune", type=unit_interval, default=None, metavar="F",
        help="flow matching: train the last fraction F of the run by maximum likelihood, from the EMA "
        f"weights (0: off; the recipe's default on continuous tables of {SMALL_TABLE_ROWS:,} "
        f"training rows or more, with a time limit: {TABLE_LIKELIHOOD_FINETUNE:g})",
    )  # fmt: skip
    p.add_argument(
        "--finetune-lr", type=positive_float, default=None,
        help=f"Adam's learning rate in the maximum-likelihood phase (default {DEFAULT_FINETUNE_LR:g})",
    )  # fmt: skip
    p.add_argument(
        "--finetune-divergence", choices=DIVERGENCES, default=None,
        help="the divergence in the maximum-likelihood phase's training solves (default hutchinson, "
        "Rademacher probes; validation keeps the model's own, the test score is exact)",
    )  # fmt: skip
    p.add_argument("--sigma-min", type=unit_interval, default=None, help="flow-matching path width at t=1")
    p.add_argument(
        "--time-exponent", type=positive_float, default=None, metavar="K",
        help="flow matching: training times t = 1 - (1 - u)^K, u uniform (1: uniform; the real-data "
        "recipe's default is printed before training)",
    )  # fmt: skip
    p.add_argument(
        "--ot-batch-size", type=positive_int, default=None, metavar="M",
        help="OT flow matching: pair base and data points within groups of M rows of each batch "
        "(OT-CFM's minibatch of M; default the whole batch, or the recipe's, printed before training)",
    )  # fmt: skip
    p.add_argument(
        "--preprocess",
        default=None,
        help="auto (the default; detect: integer data -> dequantize, [0, 1] -> logit, off-scale -> standardize), "
        f"none, or a comma-separated subset of {','.join(STEPS)} (new runs only)",
    )
    p.add_argument("--levels", type=positive_int, default=None, help="integer levels of discrete data (dequantize)")
    p.add_argument(
        "--test-n", type=positive_int, default=None, metavar="N",
        help="images and --model vae: score the first N test images at the end (default all, at most "
        f"{cli_images.TRAIN_TEST_IMAGES:,}; `cnf evaluate` scores them all)",
    )  # fmt: skip
    p.add_argument(
        "--alpha", type=float, default=None,
        help=f"logit margin alpha (default {DEFAULT_ALPHA:g} for tables and vectors, "
        f"{IMAGE_RECIPE.alpha:g} for images)",
    )  # fmt: skip
    p.add_argument("--plot", action="store_true", help="draw the flow's plots at the end")
    p.add_argument(
        "--context-columns", type=int, nargs="+", default=None, metavar="I",
        help="columns of the --data table that are the context c of p(x | c) (standardised)",
    )  # fmt: skip
    vae = p.add_argument_group("VAE (--model vae, --data digits|fashion-mnist, binarised; recipe of --objective elbo)")
    vae.add_argument("--posterior", choices=POSTERIORS, default=None, help="q(z|x) family (default gaussian)")
    vae.add_argument("--latent-dim", type=positive_int, default=None, help="default 8 on digits, 16 on fashion-mnist")
    vae.add_argument("--flow-hidden", type=positive_int, nargs="+", default=None, help="posterior flow widths (64 64)")
    vae.add_argument(
        "--flow-context", choices=CONTEXT_MODES, default=None,
        help="how h(x) conditions the CNF posterior's field: concat (a bias) or film (scale and shift); "
        "default film up to a 2-D latent, else concat",
    )  # fmt: skip
    vae.add_argument(
        "--flow-context-net", action=argparse.BooleanOptionalAction, default=None,
        help="the CNF posterior's field reads h(x) through a context network (default: up to a 2-D latent)",
    )  # fmt: skip
    vae.add_argument("--kl-warmup", type=non_negative_int, default=None, help="steps of linear KL warm-up (300 on digits, 1000 on fashion-mnist)")
    vae.add_argument("--iwae-samples", type=positive_int, default=None, help="k of the test importance-weighted bound (1000)")
    add_device_option(p)
    p.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="train on N local processes (torch.distributed, launched by torchrun; each uses cores / N "
        "threads); for several machines run torchrun --nnodes ... -m cnf train instead",
    )
    p.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=distributed.DEFAULT_TIMEOUT,
        help="seconds a rank waits for a silent peer before the run fails (a dead peer fails it at once)",
    )
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("evaluate", help="test NLL, NFE and seconds of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="dataset name or .npy/.csv file")
    p.add_argument(
        "--n", type=positive_int, default=None,
        help=f"toy points drawn (default {DEFAULT_TEST_SIZE:,}); images and VAEs: the first N test images (default all)",
    )  # fmt: skip
    p.add_argument(
        "--seed", type=non_negative_int, default=TEST_SEED,
        help=f"seed of the toy test points and of the scoring draws (dequantisation, Hutchinson); the default {TEST_SEED} repeats the number cnf train printed",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--solver-from", default=None, help="JSON from `cnf tune` with the solver to use")
    p.add_argument(
        "--split", choices=("auto", "test", "all"), default="auto",
        help="rows of a .npy/.csv file to score: auto (the test split of the file the checkpoint "
        "trained on, every row of any other file), test (the seeded test split of `cnf train`), all",
    )  # fmt: skip
    add_device_option(p)
    p.set_defaults(run=cmd_evaluate)

    p = commands.add_parser(
        "sample", help="draw samples from a checkpoint into a .npy file", formatter_class=DefaultsShownFormatter
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--n", type=positive_int, default=1000, help="samples drawn (per context with --context-file)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the base draws")
    p.add_argument("--out", default="samples.npy", help="the .npy file written")
    p.add_argument("--context", default=None, help='one context for a conditional flow, e.g. "0.3,1.2"')
    p.add_argument(
        "--context-file", default=None, help=".npy/.csv of contexts, one per row: samples (n, rows, dim)"
    )
    add_device_option(p)
    p.set_defaults(run=cmd_sample)

    p = commands.add_parser(
        "score", help="log p and anomaly p-values of every row of a file, into a CSV",
        formatter_class=DefaultsShownFormatter,
    )  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="a flow trained on normal data")
    p.add_argument("--data", required=True, help="the rows to score: .npy/.csv file or dataset name")
    p.add_argument("--out", default="scores.csv", help="CSV with the columns row, log_p, p_value")
    p.add_argument("--alpha", type=positive_float, default=0.01, help="p-value below which rows are counted as anomalous")
    p.add_argument("--n", type=positive_int, default=DEFAULT_TEST_SIZE, help="points drawn of a toy dataset")
    add_device_option(p)
    p.set_defaults(run=cmd_score)

    p = commands.add_parser(
        "convert-checkpoint", help="rewrite a trusted cnf 0.1 checkpoint in the safe format (unpickles it)"
    )
    p.add_argument("old", help="the old checkpoint (it is unpickled: only files you trust)")
    p.add_argument("new", help="where to write the converted checkpoint")
    p.add_argument("--trust", action="store_true", help="confirm that you trust OLD")
    p.set_defaults(run=cmd_convert)

    p = commands.add_parser(
        "tune", help="measure solver settings on a trained CNF and recommend one", formatter_class=DefaultsShownFormatter
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="dataset name or .npy/.csv file")
    p.add_argument("--methods", nargs="+", default=list(tuning.DEFAULT_METHODS), help="torchdiffeq methods tried")
    p.add_argument(
        "--tolerances", type=positive_float, nargs="+", default=list(tuning.DEFAULT_TOLERANCES),
        help="rtol and atol values of the adaptive methods",
    )  # fmt: skip
    p.add_argument(
        "--step-sizes",
        type=positive_float,
        nargs="+",
        default=list(tuning.DEFAULT_STEP_SIZES),
        help="for fixed-step methods",
    )
    p.add_argument("--no-mixed", dest="mixed", action="store_false", help="skip the rtol != atol settings")
    p.add_argument(
        "--budget",
        type=positive_float,
        default=tuning.DEFAULT_BUDGET,
        help="log p error budget in nats (evaluation)",
    )
    p.add_argument(
        "--grad-budget",
        type=positive_float,
        default=tuning.DEFAULT_GRAD_BUDGET,
        help="relative gradient error budget (training)",
    )
    p.add_argument("--n", type=positive_int, default=tuning.DEFAULT_N_LOGP, help="points scored per setting")
    p.add_argument(
        "--fresh-blocks",
        type=int,
        default=tuning.DEFAULT_FRESH_BLOCKS,
        help="blocks of --n new points that re-check the recommendation",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=tuning.DEFAULT_CONFIDENCE,
        help="level of the upper bound of the mean log p error that must meet --budget",
    )
    p.add_argument("--n-grad", type=positive_int, default=256, help="points of the gradient measurement")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per setting (median)")
    p.add_argument("--no-gradients", action="store_true", help="skip the training direction")
    p.add_argument("--rank-by", choices=("nfe", "seconds"), default="nfe", help="what cheapest means")
    p.add_argument("--seed", type=non_negative_int, default=TEST_SEED, help="seed of the points drawn")
    p.add_argument("--out", default="tune", help="folder for tune.json, tune.md and tune.png")
    p.add_argument("--json", action="store_true", help="print the recommendations as one JSON object")
    p.set_defaults(run=cmd_tune)

    p = commands.add_parser(
        "plot", help="draw a checkpoint's probability path, trajectories, field, GIF", formatter_class=DefaultsShownFormatter
    )
    p.add_argument("--checkpoint", required=True, help="the run's checkpoint.pt (or best.pt)")
    p.add_argument("--out", default="plots", help="output folder for the PNG/GIF files")
    p.add_argument(
        "--times", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="times of the path panels"
    )
    p.add_argument("--animate", action="store_true", help="also write path.gif")
    p.add_argument("--frames", type=positive_int, default=17, help="frames of the GIF")
    p.add_argument("--data", default=None, help="dataset name or .npy/.csv file drawn beside the densities")
    p.add_argument("--n", type=positive_int, default=2000, help="points drawn of a named dataset")
    p.add_argument("--resolution", type=positive_int, default=80, help="grid points per axis")
    p.add_argument("--planar", default=None, help="planar-flow checkpoint to compare a CNF with")
    p.add_argument(
        "--context", nargs="+", default=None, metavar="C",
        help='contexts of a conditional flow, one panel each, e.g. "--context -0.5 0.5" or "0.3,1.2" '
        "for k = 2 (default: the training contexts' mean and mean +- one standard deviation)",
    )  # fmt: skip
    p.set_defaults(run=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except TrainingInterrupted as error:
        print(f"cnf {args.command}: {error}", file=sys.stderr)
        return 130
    except OSError as error:
        where = f": {error.filename!r}" if error.strerror and error.filename else ""
        print(f"cnf {args.command}: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError, ImportError) as error:
        print(f"cnf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
