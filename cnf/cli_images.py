"""The ``cnf`` command on integer images: ``cnf train`` / ``cnf evaluate`` with image data.

    cnf train --data digits-images --out runs/digits       # scikit-learn's 8x8 digits
    cnf train --data fashion-mnist --out runs/fashion      # needs apt-get install dataset-fashion-mnist
    cnf train --data my_images.npy --out runs/mine         # integer array of shape (n, C, H, W)
    cnf evaluate --checkpoint runs/digits/checkpoint.pt --data digits-images --json
    cnf plot --checkpoint runs/digits/checkpoint.pt --data digits-images --out plots

Image data take the image recipe (:data:`cnf.images.IMAGE_RECIPE`, training settings from
:func:`cnf.recipes.recipe` with ``data_kind="image"``) for every option not given; the summary and ``--json`` carry ``bits_per_dim``. Split: the named datasets' fixed
splits (:mod:`cnf.data.images`); a file is split 80 / 10 / 10 % with a fixed seed, and
``cnf evaluate --data FILE`` scores the whole file.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnf.checkpoint import load_checkpoint
from cnf.data.images import IMAGE_DATASETS, ImageSplits, check_images, load_images, split_images
from cnf.images import (
    IMAGE_MODELS,
    IMAGE_RECIPE,
    dequantization_levels,
    evaluate_bits_per_dim,
    image_flow,
    image_model,
    set_solver,
)
from cnf.pairings import describe_solvers
from cnf.solver import Solver
from cnf.training import TrainSettings, train

#: Training seconds of ``cnf train`` on images when no --time-limit is given (as for vectors).
DEFAULT_TIME_LIMIT = 90.0
#: Seed of the random draws when scoring (dequantisation noise, Hutchinson probes; toy test points
#: in cnf.cli): cnf evaluate with the default --seed repeats the number cnf train printed.
TEST_SEED = 2024
#: Test images ``cnf train`` scores at the end unless --test-n says otherwise: scoring all 10,000 of
#: Fashion-MNIST with dopri5 at 1e-5 takes ~35 minutes on one CPU thread with the conv field (~0.2 s
#: an image at 110 evaluations); with the U-Net field 1,000 took ~65 minutes (1,136 evaluations).
#: `cnf evaluate` scores them all.
TRAIN_TEST_IMAGES = 1000
#: Without --test-n, cnf train stops scoring test images after as long as it trained, and at least
#: this many seconds: the U-Net needed ~65 minutes for 1,000 Fashion-MNIST images at dopri5 1e-5
#: on one thread, after a 90 s default run.
MIN_SCORE_SECONDS = 60.0
#: Test images per scoring solve (cnf train and cnf evaluate alike, so their seeded draws agree).
SCORE_BATCH = 50

def first_test_images(test: torch.Tensor, test_n: int | None, evaluate_command: str) -> torch.Tensor:
    """The test images ``cnf train`` scores at the end: the first ``test_n`` (default
    :data:`TRAIN_TEST_IMAGES`), saying so, with the command that scores them all, when that is fewer."""
    test_n = test_n or TRAIN_TEST_IMAGES
    if test.shape[0] > test_n:
        print(f"scoring the first {test_n:,} of {test.shape[0]:,} test images (--test-n; `{evaluate_command}` scores them all)")
    return test[:test_n]


def scoring_time_limit(test_n: int | None, train_seconds: float) -> float | None:
    """How long ``cnf train`` scores test images at the end: without ``--test-n``, as long as it
    trained and at least :data:`MIN_SCORE_SECONDS`; with it, until the N images are scored."""
    return None if test_n else max(MIN_SCORE_SECONDS, train_seconds)


def say_if_scored_fewer(scored: int, wanted: int, seconds: float, evaluate_command: str) -> None:
    """Tell the user when :func:`scoring_time_limit` stopped the scoring before ``wanted`` images."""
    if scored < wanted:
        print(
            f"scored the first {scored:,} test images in {seconds:.0f} s: without --test-n scoring stops after "
            f"as long as the training took (at least {MIN_SCORE_SECONDS:.0f} s); `{evaluate_command} --n {scored}` "
            "scores the same images, --test-n N scores N"
        )


def _given(args: argparse.Namespace, name: str) -> Any:
    """The option's value if the user set it (the train flags default to None), else None."""
    return getattr(args, name, None)


def is_image_source(source: str | None) -> bool:
    """A named image dataset, or a .npy file holding a 4-D array (n, C, H, W)."""
    if source is None:
        return False
    if source in IMAGE_DATASETS:
        return True
    path = Path(source)
    if path.suffix.lower() != ".npy" or not path.is_file():
        return False
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).ndim == 4
    except (ValueError, EOFError, OSError):  # unreadable: the table loader reports it
        return False


def load_image_source(source: str, seed: int = 0) -> ImageSplits:
    """Train / validation / test images of a named dataset or a .npy file."""
    if source in IMAGE_DATASETS:
        return load_images(source)
    array = np.load(source, allow_pickle=False)
    levels = check_images(array, name=f"images in {source!r}")
    return split_images(torch.from_numpy(array.astype(np.int64)), levels, name=str(source), seed=seed)


def build_image_model(args: argparse.Namespace, splits: ImageSplits) -> nn.Module:
    model = _given(args, "model") or IMAGE_RECIPE.model_for(splits.shape)
    if model not in IMAGE_MODELS:
        raise ValueError(f"--model {model!r} does not apply to images; choose one of {', '.join(IMAGE_MODELS)}")
    method = _given(args, "method")
    solver = IMAGE_RECIPE.train_solver
    if method is not None:
        tolerances = {k: v for k, v in (("rtol", args.rtol), ("atol", args.atol)) if v is not None}
        solver = Solver(method=method, adjoint=bool(args.adjoint), **tolerances)
    return image_flow(
        splits.shape,
        splits.levels,
        model=model,
        hidden=_given(args, "hidden"),
        divergence=_given(args, "divergence") or IMAGE_RECIPE.divergence,
        noise=_given(args, "noise") or IMAGE_RECIPE.noise,
        activation=_given(args, "activation") or "softplus",
        solver=solver,
        alpha=IMAGE_RECIPE.alpha if _given(args, "alpha") is None else args.alpha,
    )


def cmd_train_images(args: argparse.Namespace) -> int:
    """``cnf train`` on images: the image recipe, then test bits/dim with the evaluation solver."""
    splits = load_image_source(args.data)
    threads = getattr(args, "threads", None)
    # One thread unless asked: on shared cores a team of threads waits for its slowest member
    # (a digits training step took 2.3 s on one thread and ~50 s on two while 5 jobs ran).
    torch.set_num_threads(1 if threads in (None, "auto") else int(threads))
    torch.manual_seed(args.seed or 0)
    from cnf.cli import TRAIN_FLAGS, _resume_path, check_out_folder, explicit  # cnf.cli imports this module

    resume = _resume_path(args.resume) if args.resume is not None else None
    payload = None
    if resume is not None:  # the run's own model and settings; the flags given change the settings
        flow, payload = load_checkpoint(resume)
    else:
        flow = build_image_model(args, splits)
    model = image_model(flow)
    if payload is not None:
        base = asdict(TrainSettings.from_dict(payload["settings"]))
    else:  # flow matching needs one velocity field: a multi-scale CNF trains by likelihood by default
        objective = args.objective or ("likelihood" if model == "multiscale" else IMAGE_RECIPE.objective)
        time_limit = args.time_limit if args.time_limit is not None else DEFAULT_TIME_LIMIT
        base = IMAGE_RECIPE.train_settings(splits.shape, objective, time_limit)
    settings = TrainSettings(**{**base, **explicit(args, TRAIN_FLAGS)})
    out = Path(args.out) if args.out else resume.parent if resume is not None else Path("runs/default")
    check_out_folder(out, resume, args.overwrite)  # the same protection as the vector runs
    if resume is not None:
        print(f"resuming {resume} on {args.data}")
    print(describe_image_run(flow, splits, settings, torch.get_num_threads(), threads))
    # threads None / "auto": train keeps the one thread set above (and one OT solver per core)
    run = {"data": args.data, "seed": 0}  # cnf evaluate scores this file's test split
    result = train(
        flow, splits.train, splits.val, settings=settings, out=out, resume=resume, overwrite=True, threads=threads, run_info=run
    )
    set_solver(flow, IMAGE_RECIPE.eval_solver)
    evaluate = f"cnf evaluate --checkpoint {result.checkpoint} --data {args.data}"
    test = first_test_images(splits.test, _given(args, "test_n"), evaluate)
    score = evaluate_bits_per_dim(
        flow, test, batch_size=SCORE_BATCH, generator=scoring_generator(test, TEST_SEED),
        time_limit=scoring_time_limit(_given(args, "test_n"), result.seconds),
    )  # fmt: skip
    say_if_scored_fewer(score.n, test.shape[0], score.seconds, evaluate)
    summary = {
        "data": args.data,
        "model": model,
        "objective": settings.objective,
        "steps": result.step,
        "train_seconds": round(result.seconds, 2),
        "stopped_by": result.stopped_by,
        "test_bits_per_dim": score.mean,
        "test_bits_per_dim_se": score.se,
        "test_nfe": score.nfe,
        "test_n": score.n,
        "checkpoint": str(result.checkpoint),
        "threads": result.threads,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"trained {summary['model']} on {args.data} {splits.shape} images: {result.step} steps in "
        f"{result.seconds:.1f} s (stopped by {result.stopped_by})\n"
        f"test bits/dim: {score.mean:.4f} +- {2 * score.se:.4f} (2 SE) on {score.n} images, NFE {score.nfe}\n"
        f"checkpoint: {result.checkpoint}"
    )
    return 0


def describe_image_run(
    flow: nn.Module, splits: ImageSplits, settings: TrainSettings, threads: int, requested: int | str | None
) -> str:
    """What ``cnf train`` chose for images, in one line (as the vector runs say theirs)."""
    config = flow.config()
    inner = config["flow"]
    field = inner.get("field") or {}
    steps = " -> ".join(
        f"logit (alpha {t['alpha']:g})" if t.get("kind") == "logit" else str(t.get("kind"))
        for t in config.get("preprocess", {}).get("transforms", [])
    )
    hidden = "-".join(str(h) for h in field.get("hidden", inner.get("hidden", [])))
    model = {"unet": "U-Net CNF", "cnf": "conv CNF"}.get(image_model(flow), f"{inner['kind']} CNF")
    val_size = min(settings.val_size, splits.val.shape[0])
    return (
        f"images {tuple(splits.shape)}, {splits.levels} levels, {splits.train.shape[0]:,} training: "
        f"{steps} -> {model} {hidden}; training {settings.describe()}, "
        f"validation every {settings.val_every:,} steps on {val_size:,} images, "
        f"{threads} torch thread{'s' if threads > 1 else ''}"
        + (describe_solvers(requested) if settings.objective == "ot_flow_matching" else "")
        + (f", time limit {settings.time_limit:g} s" if settings.time_limit else "")
    )


def scoring_generator(data: torch.Tensor, seed: int) -> torch.Generator:
    """A generator on ``data``'s device for the random draws of one scoring pass."""
    return torch.Generator(device=data.device).manual_seed(seed)


def evaluate_images(
    flow: nn.Module,
    source: str,
    as_json: bool,
    solver: Solver | None = None,
    n: int | None = None,
    test_seed: int | None = None,
    scored: str | None = None,
    seed: int = TEST_SEED,
) -> int:
    """``cnf evaluate`` of an image flow: bits/dim (and NLL in nats per image) of the test images
    (the first ``n`` of them when given). A file's images: all of them, or with ``test_seed`` its
    test split as ``cnf train`` makes it; ``scored`` says which (printed)."""
    if dequantization_levels(flow) is None:
        raise ValueError(f"--data {source!r} holds images but the checkpoint's flow does not dequantise them")
    if source in IMAGE_DATASETS:
        images = load_images(source).test
    elif test_seed is not None:
        images = load_image_source(source, seed=test_seed).test
    else:
        images = torch.from_numpy(np.load(source, allow_pickle=False).astype(np.int64))
    if scored is not None:
        from cnf.cli import scored_phrase  # cnf.cli imports this module

        total = np.load(source, mmap_mode="r", allow_pickle=False).shape[0]
        scored = scored_phrase(test_seed, scored, images.shape[0], total, unit="images")
    images = images[:n] if n is not None else images
    set_solver(flow, solver or IMAGE_RECIPE.eval_solver)
    score = evaluate_bits_per_dim(flow, images, batch_size=SCORE_BATCH, generator=scoring_generator(images, seed))
    dims = images[0].numel()
    metrics = {"nll": score.mean * dims * float(np.log(2)), **score.as_dict()}
    if scored is not None:
        metrics["scored"] = scored
    if as_json:
        print(json.dumps(metrics))
    else:
        if scored is not None:
            print(f"scoring {scored}")
        print(
            f"test bits/dim: {score.mean:.4f} +- {2 * score.se:.4f} (2 SE)  NFE: {score.nfe}  "
            f"seconds: {score.seconds:.3f}  n: {score.n}"
        )
    return 0


def is_image_flow(flow: nn.Module) -> bool:
    """A flow that dequantises (C, H, W) images."""
    dim = getattr(flow, "dim", None)
    return dequantization_levels(flow) is not None and isinstance(dim, tuple) and len(dim) == 3


def plot_images(flow: nn.Module, out: str, source: str | None) -> list[Path]:
    """``cnf plot`` of an image flow: samples (beside test images), the path at t = 0 .. 1 and,
    with image ``--data``, the interpolation between its first two test images; the paths written."""
    from cnf import image_plots

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    set_solver(flow, Solver(rtol=1e-4, atol=1e-4))  # pictures: looser and faster
    generator = torch.Generator().manual_seed(0)
    real = None
    if source is not None:
        if not is_image_source(source):
            raise ValueError(f"--data {source!r} is not image data for this image flow")
        real = load_images(source).test if source in IMAGE_DATASETS else torch.from_numpy(
            np.load(source, allow_pickle=False).astype(np.int64)
        )
    paths = [folder / "samples.png", folder / "path.png"]
    image_plots.plot_samples_and_data(flow, real, 64, generator=generator, path=paths[0])
    if real is not None:
        paths.append(folder / "interpolation.png")
        image_plots.plot_interpolation(flow, real[0], real[1], path=paths[-1])
    image_plots.plot_image_path(flow, 8, generator=generator, path=paths[1])
    return paths
