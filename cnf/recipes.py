"""Recipes: the default training settings per objective, dimension and kind of data, in one place.

``cnf train --objective X`` with no other flag, :func:`cnf.train` (via ``settings=recipe(...)``)
and ``benchmarks/training_speed.py`` all read them from here, so the defaults a user gets are the
ones the README's benchmark numbers were measured with.

* ``likelihood`` (maximum likelihood, FFJORD): Adam at 5e-3, batch 512, cosine decay to lr/20
  over the run, validation every 100 steps (one step costs one adaptive solve).
* ``flow_matching`` / ``ot_flow_matching`` (Lipman et al. 2023; Tong et al. 2023): a step is one
  field evaluation (~50x cheaper), so batch 256 (which keeps the exact OT assignment near 10 ms),
  the same lr and schedule, validation every 1,000 steps, and an exponential moving average of
  the weights (decay 0.999, with the usual warm-up min(decay, (1 + n) / (10 + n))) that is
  what gets validated, checkpointed and returned.
* RNODE (Finlay et al. 2020) is ``likelihood`` plus :data:`RNODE_WEIGHTS`.
* ``elbo`` (a :class:`cnf.vae.VAE`): Adam at 1e-3, batch 100, cosine, KL warm-up over 500 steps,
  early stopping after 10 validations (every 100 steps) without a better validation ELBO.

A time-limited run has no iteration cap (``iters=None``): the cosine schedule then runs over the
time budget and the run ends when the time is up, never earlier. Without a time limit the cap
``iters`` applies.

:func:`recipe` is a function of ``(objective, dim, data_kind)``: the per-objective table below,
then :func:`_by_dimension` for adjustments by dimension and data kind (the place to extend).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cnf.losses import OBJECTIVES

DATA_KINDS = ("toy", "tabular", "image")

#: RNODE's regulariser weights (Finlay et al. 2020 used 0.01 for both).
RNODE_WEIGHTS: dict[str, float] = {"kinetic_weight": 0.01, "jacobian_weight": 0.01}

_FLOW_MATCHING = {
    "lr": 5e-3,
    "batch_size": 256,
    "lr_schedule": "cosine",
    "iters": 20_000,
    "val_every": 1_000,
    "ema_decay": 0.999,
}

#: TrainSettings fields per objective (measured on 2-D toy data: benchmarks/training_speed.py).
BY_OBJECTIVE: dict[str, dict[str, Any]] = {
    "likelihood": {
        "lr": 5e-3,
        "batch_size": 512,
        "lr_schedule": "cosine",
        "iters": 3_000,
        "val_every": 100,
        "ema_decay": None,
    },
    "flow_matching": _FLOW_MATCHING,
    "ot_flow_matching": _FLOW_MATCHING,
    # VAEs (cnf.vae): the Sylvester-flow / FFJORD-VAE recipe scaled down: Adam 1e-3, batch 100,
    # linear KL warm-up, early stopping on the validation ELBO
    "elbo": {
        "lr": 1e-3,
        "batch_size": 100,
        "lr_schedule": "cosine",
        "iters": 20_000,
        "val_every": 100,
        "ema_decay": None,
        "kl_warmup": 500,
        "patience": 10,
    },
}

#: ``cnf train --model vae`` on each binarised data set: the settings of the README's
#: ``benchmarks.vae`` command for it, over the ``elbo`` recipe: the ``model`` (latent size,
#: encoder/decoder widths), the training ``settings`` (KL warm-up, validation cadence, patience)
#: and the CNF posterior's rtol = atol.
VAE_DATA_RECIPES: dict[str, dict[str, Any]] = {
    "digits": {
        "model": {"latent_dim": 8, "hidden": [128, 128]},
        "settings": {"kl_warmup": 300, "patience": 5},
        "posterior_tol": 1e-4,
    },
    "fashion-mnist": {
        "model": {"latent_dim": 16, "hidden": [256, 256]},
        "settings": {"kl_warmup": 1000, "val_every": 250, "patience": 5},
        "posterior_tol": 1e-4,
    },
}


#: Latent sizes up to this one read h(x) into the CNF posterior's field by FiLM through a context
#: network (:func:`vae_flow_context`). On the 2-D-latent digits example (examples/vae.py, seeds 0-3,
#: mean KL(q || p(z | x)) over 180 test images) h as a bias of every layer gave 0.177, FiLM 0.153 and
#: 0.104 on seeds 2 and 3 (bias: 0.209, 0.227), FiLM through the network 0.108 over the four seeds;
#: on Fashion-MNIST (16-D latent, 600 steps) the same change cost 2.2 nats of IWAE and on the digits
#: (8-D, 1,500 steps) it gained nothing (0.04 +- 0.07 nats over the Gaussian against 0.09 +- 0.06;
#: README, "VAE posteriors"), so larger latents keep the bias.
LOW_LATENT_DIM = 2


def vae_flow_context(latent_dim: int) -> dict[str, Any]:
    """How h(x) conditions a VAE's CNF posterior for ``latent_dim``: ``flow_context`` (concat or
    film) and ``flow_context_net`` (through :func:`cnf.vae.posteriors.context_network` or not)."""
    if latent_dim <= LOW_LATENT_DIM:
        return {"flow_context": "film", "flow_context_net": True}
    return {"flow_context": "concat", "flow_context_net": False}


def _check(objective: str, dim: int, data_kind: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {tuple(OBJECTIVES)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if data_kind not in DATA_KINDS:
        raise ValueError(f"unknown data_kind {data_kind!r}; choose one of {DATA_KINDS}")


#: Above this dimension (and for any non-toy data) the real-data recipes below apply; the 2-D
#: toys keep the settings measured on them.
TOY_DIM = 2

#: Training settings on real data (d > 2), from benchmarks/real_data.py (README, "Recipes by
#: dimension", which says what was and was not measured): batch 256 for every objective; flow
#: matching at lr 3e-3, which beat 1e-3 on galaxies (-6.97 against -6.70 nats, 10 minutes) and breast
#: cancer (-39.40 against -38.69, 30 s, 3 seeds) and tied on wine and on digits at 10 minutes
#: (1.989 against 1.987 bits/dim, 3 seeds); maximum likelihood at 1e-3 (3e-3 not measured there).
_REAL_DATA_SETTINGS: dict[str, dict[str, Any]] = {
    "likelihood": {"lr": 1e-3, "batch_size": 256, "val_every": 50},
    "flow_matching": {"lr": 3e-3, "batch_size": 256, "val_every": 500},
    "ot_flow_matching": {"lr": 3e-3, "batch_size": 256, "val_every": 500},
}

#: Tables with fewer training rows than this (under 4 batches per epoch: wine, breast cancer) validate
#: flow matching every SMALL_TABLE_VAL_EVERY steps instead of 500: at lr 3e-3 breast cancer overfits
#: after ~500 steps (the benchmark's best step), and `cnf train --data breast_cancer --time-limit 30`
#: validating every 500 steps kept step 500 (-38.22 nats against the benchmark's -39.40).
SMALL_TABLE_ROWS = 1_000
SMALL_TABLE_VAL_EVERY = 100

#: Tables with at least this many training rows validate flow matching every LARGE_TABLE_VAL_EVERY
#: steps: on galaxies (80,000 rows, d = 7) an OT-FM step takes ~0.011 s and a validation on 2,000
#: points ~2.5 s, so validating every 500 steps spent ~28% of `cnf train --time-limit 600` (~170
#: of 600 s; its best validation was the last), every 2,000 steps ~8%.
LARGE_TABLE_ROWS = 20_000
LARGE_TABLE_VAL_EVERY = 2_000

#: OT flow matching on continuous tables of at least LARGE_TABLE_ROWS training rows pairs within
#: groups of this many rows of each batch of 256 (TrainSettings.ot_batch_size): the assignment then
#: costs about a sixteenth of the whole batch's (4.7 ms of a ~15 ms galaxy step with one thread). On
#: galaxies, `cnf train --data galaxies --time-limit 600 --threads 1`: -8.91 nats (41,579 steps)
#: against -8.74 (32,108) pairing the whole batch (README, "OT within groups").
LARGE_TABLE_OT_BATCH = 64

#: Flow matching on continuous tables (real data that is not dequantised) draws its training times
#: as t = 1 - (1 - u)^k with this k (t ~ Beta(1, 1/k); cnf.losses.training_times): more training
#: near the data, whose thin structure the field must resolve there (README, "The training-time
#: exponent"). Dequantised data (digits) keep uniform times: there it measured worse.
CONTINUOUS_TABLE_TIME_EXPONENT = 2.0

#: Flow matching on continuous tables of at least SMALL_TABLE_ROWS training rows, with a time limit,
#: spends this fraction of the budget at its end on maximum likelihood (TrainSettings.likelihood_finetune),
#: from the EMA weights at lr DEFAULT_FINETUNE_LR (3e-4; cnf.training). Measured on galaxies (README,
#: "Maximum-likelihood fine-tuning"). Dequantised tables (digits) go without: they overfit long before
#: the phase, which took digits' validation NLL from 96.3 to 99.4 nats at 10 minutes.
TABLE_LIKELIHOOD_FINETUNE = 0.1

#: The solver every reported likelihood is computed with: the exact divergence at a tight
#: tolerance, whatever the training used (Hutchinson, fixed-step RK4, looser tolerances).
EVALUATION_SOLVER: dict[str, Any] = {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}


#: Integer images (cnf.images.image_flow; measured by benchmarks/images.py): Adam at 1e-3 and batch
#: 128 for every objective, validation every 100 steps, an EMA of the weights at 0.999 (Fashion-MNIST,
#: flow matching, 30 minutes, one thread: 3.660 and 3.602 test bits/dim in two runs with it, 3.675
#: without; README, "Images").
IMAGE_SETTINGS: dict[str, Any] = {"lr": 1e-3, "batch_size": 128, "lr_schedule": "cosine", "val_every": 100, "ema_decay": 0.999}

#: Images of more than this many pixels validate on fewer images, less often (LARGE_IMAGE_VALIDATION):
#: validating with the training solver costs ~16 evaluations per image. Measured on one thread with
#: the flow-matching recipe: digits (64 pixels) a step 0.020 s, all 180 validation images 0.26 s
#: (13 steps' worth, 12 % every 100 steps); Fashion-MNIST (784) a step 0.23 s, 2,000 validation images
#: ~75 s (330 steps' worth: 77 % of the time at every 100 steps), 500 images 19 s (8 % every 1,000).
LARGE_IMAGE_PIXELS = 256
LARGE_IMAGE_VALIDATION: dict[str, Any] = {"val_every": 1000, "val_size": 500}


#: The field's activation on real data with d > 2. Measured with `cnf train --data NAME --time-limit 120
#: --threads 1` (OT flow matching, two runs side by side; README, "The field's activation"): on
#: galaxies SiLU scored -5.79 and -5.79 nats (seeds 0, 1) against tanh's -5.34 and -5.43, softplus
#: -5.39, ELU -4.73; on digits 2.034 bits/dim against tanh's 2.070.
TABLE_ACTIVATION = "silu"

#: The field's widths and time features on continuous tables with d > 2. Measured with the SiLU
#: field, `cnf train --data galaxies --time-limit 120 --threads 1`: 256x3 -5.79 nats, 256x4 -6.25,
#: 256x5 -6.32 (fewer steps), 256x3 with (t, log(1 - t + 0.01)) gates -6.20, 256x4 with them -6.64
#: (README, "The field's time features and depth").
TABLE_HIDDEN = (256, 256, 256, 256)
TABLE_TIME_EMBEDDING = "concatsquash_log"
#: Dequantised tables (digits) keep 256x3 and gates on t: the uniform noise fills the space
#: between levels, so there is no thin structure near t = 1 to resolve (as for the time exponent),
#: and on digits at 2 minutes 256x4 with log gates scored 2.037 bits/dim (best weights; 2.068 the
#: last) against 2.031 and 2.036 for 256x3 (2.034 and 2.037 the last).
DEQUANTIZED_TABLE_HIDDEN = (256, 256, 256)
DEQUANTIZED_TABLE_TIME_EMBEDDING = "concatsquash"
#: Small tables (under SMALL_TABLE_ROWS training rows) keep the earlier tanh 256x3 field gated on t:
#: on wine (142 rows; benchmarks/real_data.py, 30 s, 3 seeds) it scored 19.01 +- 0.40 nats against
#: 19.36 +- 0.27 with SiLU and 19.61 +- 0.40 with the 256x4 SiLU log-gated field; breast cancer
#: (455 rows) tied (-39.24 against -39.34).
SMALL_TABLE_FIELD: dict[str, Any] = {"hidden": [256, 256, 256], "activation": "tanh", "time_embedding": "concatsquash"}


def _by_dimension(objective: str, dim: int, data_kind: str) -> dict[str, Any]:
    """Adjustments of the per-objective recipe by dimension and data kind (images, real data)."""
    if data_kind == "image" and objective != "elbo":
        return {**IMAGE_SETTINGS, **(LARGE_IMAGE_VALIDATION if dim > LARGE_IMAGE_PIXELS else {})}
    if data_kind == "toy" or dim <= TOY_DIM:
        return {}
    return dict(_REAL_DATA_SETTINGS.get(objective, {}))


def default_objective(dim: int, data_kind: str = "toy") -> str:
    """The objective ``cnf train`` uses when none is given.

    Maximum likelihood on the 2-D toys (benchmarks/training_speed.py); OT flow matching on real
    data with d > 2, where a likelihood step costs a solve with ~25 NFE of a 64-D field and
    flow matching makes ~10x more steps in the same time (benchmarks/real_data.py).
    """
    _check("likelihood", dim, data_kind)
    return "likelihood" if data_kind == "toy" or dim <= TOY_DIM else "ot_flow_matching"


def model_recipe(
    dim: int, data_kind: str = "toy", *, dequantized: bool = False, n_train: int | None = None
) -> dict[str, Any]:
    """The CNF's field and training-solver settings by dimension (``cnf train`` flag names).

    Empty on the 2-D toys (the CLI's 64x64x64 tanh field, exact divergence, dopri5 at 1e-5 stand).
    Real data with d > 2: a :data:`TABLE_HIDDEN` field with :data:`TABLE_ACTIVATION` and
    :data:`TABLE_TIME_EMBEDDING` (``dequantized`` data: :data:`DEQUANTIZED_TABLE_HIDDEN` and
    :data:`DEQUANTIZED_TABLE_TIME_EMBEDDING`; fewer than :data:`SMALL_TABLE_ROWS` training rows
    ``n_train``: :data:`SMALL_TABLE_FIELD`); for maximum likelihood a Rademacher Hutchinson
    probe from d = 16 on (the exact divergence costs d vector-Jacobian products per step; see
    benchmarks/scaling.py) and dopri5 at 1e-3 for training, since the likelihood is computed
    again at :data:`EVALUATION_SOLVER` for every reported number.
    """
    _check("likelihood", dim, data_kind)
    if data_kind == "toy" or dim <= TOY_DIM:
        return {}
    if dequantized:
        field = {"hidden": list(DEQUANTIZED_TABLE_HIDDEN), "time_embedding": DEQUANTIZED_TABLE_TIME_EMBEDDING}
    elif n_train is not None and n_train < SMALL_TABLE_ROWS:
        field = dict(SMALL_TABLE_FIELD)
    else:
        field = {"hidden": list(TABLE_HIDDEN), "time_embedding": TABLE_TIME_EMBEDDING}
    field = {"activation": TABLE_ACTIVATION, **field}
    return {
        **field,
        "divergence": "hutchinson" if dim >= 16 else "exact",
        "noise": "rademacher",
        "method": "dopri5",
        "rtol": 1e-3,
        "atol": 1e-3,
    }


@contextmanager
def exact_evaluation(flow: Any) -> Iterator[None]:
    """Inside the block, a CNF (also inside a :class:`cnf.TransformedFlow`) scores with the exact
    divergence and :data:`EVALUATION_SOLVER`; its own settings come back afterwards."""
    from cnf.flow import CNF
    from cnf.transforms.flow import inner_flow

    inner = inner_flow(flow)
    if not isinstance(inner, CNF):
        yield
        return
    saved = inner.divergence, inner.solver
    inner.divergence = "exact"
    inner.solver = inner.solver.with_(**EVALUATION_SOLVER, step_size=None)
    try:
        yield
    finally:
        inner.divergence, inner.solver = saved


def recipe(
    objective: str = "likelihood",
    dim: int = 2,
    data_kind: str = "toy",
    *,
    time_limit: float | None = None,
    n_train: int | None = None,
    dequantized: bool = False,
) -> dict[str, Any]:
    """The :class:`cnf.TrainSettings` fields recommended for this case (a new dict each call).

    With ``time_limit`` (seconds) the result has ``time_limit`` set and ``iters=None``: the run
    uses its whole budget. ``n_train`` (training rows, when known) makes flow matching on small
    tables validate more often (:data:`SMALL_TABLE_ROWS`), on large ones less often
    (:data:`LARGE_TABLE_ROWS`). Flow matching on tables that are not
    ``dequantized`` (integer levels spread by noise, as digits) draws more training times near the
    data (:data:`CONTINUOUS_TABLE_TIME_EXPONENT`), on large ones OT pairs within groups of
    :data:`LARGE_TABLE_OT_BATCH` rows, and there, on tables of at least
    :data:`SMALL_TABLE_ROWS` rows with a ``time_limit``, ends with a maximum-likelihood phase
    (:data:`TABLE_LIKELIHOOD_FINETUNE`). Use it as
    ``cnf.train(flow, data, **recipe("ot_flow_matching"))`` or ``TrainSettings(**recipe(...))``.
    """
    _check(objective, dim, data_kind)
    settings = {"objective": objective, **BY_OBJECTIVE[objective], **_by_dimension(objective, dim, data_kind)}
    table_rows = n_train if data_kind == "tabular" and dim > TOY_DIM else None
    flow_matching = objective in ("flow_matching", "ot_flow_matching")
    if flow_matching and table_rows is not None and table_rows < SMALL_TABLE_ROWS:
        settings["val_every"] = min(settings["val_every"], SMALL_TABLE_VAL_EVERY)
    if flow_matching and table_rows is not None and table_rows >= LARGE_TABLE_ROWS:
        settings["val_every"] = max(settings["val_every"], LARGE_TABLE_VAL_EVERY)
    if flow_matching and data_kind == "tabular" and dim > TOY_DIM and not dequantized:
        settings["time_exponent"] = CONTINUOUS_TABLE_TIME_EXPONENT
        if objective == "ot_flow_matching" and table_rows is not None and table_rows >= LARGE_TABLE_ROWS:
            settings["ot_batch_size"] = LARGE_TABLE_OT_BATCH
    large_table = table_rows is not None and table_rows >= SMALL_TABLE_ROWS and not dequantized
    if flow_matching and large_table and time_limit is not None:  # by steps, a tenth of a run as solves
        settings["likelihood_finetune"] = TABLE_LIKELIHOOD_FINETUNE  # would cost hours: time limits only
    if time_limit is not None:
        settings["time_limit"] = time_limit
        settings["iters"] = None
    return settings


def vae_settings(data: str | None, dim: int, *, time_limit: float | None = None) -> dict[str, Any]:
    """The :class:`cnf.TrainSettings` fields of ``cnf train --model vae`` on the binarised data set
    ``data`` of ``dim`` pixels: the ``elbo`` recipe with the data set's :data:`VAE_DATA_RECIPES`
    settings over it (``benchmarks.vae`` takes the same)."""
    return {**recipe("elbo", dim, "image", time_limit=time_limit), **VAE_DATA_RECIPES.get(data, {}).get("settings", {})}


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def default_threads(dim: int, cores: int | None = None) -> int:
    """torch threads for training a flow on ``dim``-dimensional data.

    Below d = 256 one thread: the matrices are too small for intra-op parallelism to pay, and on a
    shared machine an OpenMP team waits for its slowest thread, so a busy neighbour on one core
    stalls every step (measured in the README: 148 steps in 30 s quiet, 62 with one busy process
    at the default thread count, ~128 on one thread). From d = 256 on, half the available cores
    (at most 8), which leaves room for a neighbour.
    """
    cores = available_cores() if cores is None else cores
    if dim < 256:
        return 1
    return max(1, min(8, cores // 2))
