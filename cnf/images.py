"""Flows on integer images: dequantisation + logit as part of the model, scores in bits/dim.

:func:`image_flow` wraps a convolutional flow on images of shape (C, H, W) — a
:class:`cnf.multiscale.MultiScaleCNF` or a single :class:`cnf.CNF` with a
:class:`cnf.fields.ConvField` — in a :class:`cnf.transforms.TransformedFlow` whose
preprocessing is uniform dequantisation to [0, 1) followed by the logit transform. Its
``log_prob`` is then the density of the dequantised pixels in the data's units, so that

    bits/dim = -(log p(x + u) ) / (D ln 2) >= -log2 P(x) / D   (D = C H W)

for integer pixels x, with every change of variables counted (Theis et al. 2016).

:data:`IMAGE_RECIPE` holds the defaults for images: flow matching on one CNF with a U-Net field
(measured best on CPU budgets; the conv field where the U-Net's halvings do not fit), or FFJORD / RNODE's MNIST recipe for the multi-scale CNF (maximum
likelihood with Hutchinson's estimator and fixed-step RK4 for training); dopri5 at 1e-5 to
evaluate; the training settings (learning rate, batch) come from
:func:`cnf.recipes.recipe` with ``data_kind="image"``. The CLI, the example and the benchmark
read both.

References: Grathwohl et al. (2019), "FFJORD"; Finlay et al. (2020), "How to train your
neural ODE" (RNODE); Dinh et al. (2017), "Real NVP" (logit preprocessing); Lipman et al.
(2023), "Flow matching for generative modeling" (U-Net fields).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnf.data.images import check_images
from cnf.fields.conv import ConvField
from cnf.fields.unet import UNetField
from cnf.flow import CNF
from cnf.multiscale import MultiScaleCNF
from cnf.recipes import recipe
from cnf.solver import Solver
from cnf.transforms import Compose, Dequantize, Logit, TransformedFlow
from cnf.transforms.flow import inner_flow

IMAGE_MODELS = ("multiscale", "cnf", "unet")


@dataclass(frozen=True)
class ImageRecipe:
    """Default settings for image flows (see the module docstring).

    The default model is one CNF whose field is a U-Net (:class:`cnf.fields.UNetField`,
    16-32-32 channels at full, half and quarter size) wherever its two halvings fit (H and W
    divisible by 4), else the concat-squash conv field (32-32-32). With flow matching on one
    thread it scored 1.755 +- 0.037 test bits/dim on digits in 600 s (conv field: 1.962) and
    on Fashion-MNIST drew recognisable garments after 30 minutes where the conv field's samples
    were blotches; 32-64-64 made a third as many steps and validated worse (README, "Images").

    The default objective is flow matching on one conv CNF: on digits with 60 s per model on the
    shared 2-core machine it reached 2.43 +- 0.04 test bits/dim (2,181 steps), OT flow matching
    2.62 (1,420 steps), maximum likelihood with Hutchinson + RK4 4.64 (multi-scale, 44 steps)
    and 4.73 (one CNF, 56 steps): a likelihood step costs ~40 field evaluations and a double
    backward, a flow-matching step one evaluation (benchmarks/images.py, README). The
    likelihood settings (Hutchinson, RK4 to train, dopri5 1e-5 to evaluate) are those of
    ``model="multiscale"``, which flow matching cannot train (no single velocity field).

    The logit's ``alpha`` is 1e-4: a Gaussian fitted in logit space scores (test bits/dim)
    Fashion-MNIST 5.53 / 4.82 / 4.26 / 4.20 / 4.22 / 4.23 and the 8x8 digits 2.46 / 2.28 /
    2.28 / 2.32 / 2.33 / 2.33 at alpha 0.05 (RealNVP's) / 1e-2 / 1e-3 / 1e-4 / 1e-5 / 1e-6
    (FFJORD's), and the flow-matching CNF after 150 s on Fashion-MNIST 6.29 at 0.05 against
    4.48 at 1e-6 (README, "Images").
    """

    model: str = "unet"
    hidden: tuple[int, ...] = (32, 32, 32)
    unet_hidden: tuple[int, ...] = (16, 32, 32)
    scales: int = 2
    objective: str = "flow_matching"
    divergence: str = "hutchinson"
    noise: str = "rademacher"
    train_solver: Solver = Solver(method="rk4", step_size=0.25)
    eval_solver: Solver = Solver(method="dopri5", rtol=1e-5, atol=1e-5)
    alpha: float = 1e-4

    def model_for(self, shape: Sequence[int]) -> str:
        """The default model for images of ``shape`` (C, H, W): the U-Net where its halvings fit."""
        factor = 2 ** (len(self.unet_hidden) - 1)
        fits = len(shape) == 3 and shape[1] % factor == 0 and shape[2] % factor == 0
        return self.model if self.model != "unet" or fits else "cnf"

    def train_settings(
        self, shape: Sequence[int], objective: str | None = None, time_limit: float | None = None
    ) -> dict[str, Any]:
        """The :class:`cnf.TrainSettings` fields for images of ``shape`` (from :mod:`cnf.recipes`)."""
        return recipe(objective or self.objective, math.prod(shape), "image", time_limit=time_limit)


IMAGE_RECIPE = ImageRecipe()


def image_flow(
    shape: Sequence[int],
    levels: int,
    *,
    model: str | None = None,
    hidden: Sequence[int] | None = None,
    scales: int = IMAGE_RECIPE.scales,
    divergence: str = IMAGE_RECIPE.divergence,
    noise: str = IMAGE_RECIPE.noise,
    solver: Solver | None = None,
    alpha: float = IMAGE_RECIPE.alpha,
    activation: str = "softplus",
) -> TransformedFlow:
    """A CNF on integer images of ``shape`` (C, H, W) with ``levels`` grey levels, dequantised and
    logit-transformed inside the model (its ``log_prob`` takes the integer images as floats).

    ``model``: ``"unet"`` (one CNF, U-Net field, :class:`cnf.fields.UNetField`), ``"cnf"`` (one
    CNF, concat-squash conv field) or ``"multiscale"``; by default the recipe's
    (:meth:`ImageRecipe.model_for`); ``hidden`` defaults to the recipe's channels for the model."""
    shape = tuple(shape)
    model = IMAGE_RECIPE.model_for(shape) if model is None else model
    if model not in IMAGE_MODELS:
        raise ValueError(f"unknown image model {model!r}; choose one of {IMAGE_MODELS}")
    solver = IMAGE_RECIPE.train_solver if solver is None else solver
    if hidden is None:
        hidden = IMAGE_RECIPE.unet_hidden if model == "unet" else IMAGE_RECIPE.hidden
    if model == "multiscale":
        inner: nn.Module = MultiScaleCNF(
            shape, scales, hidden=hidden, activation=activation, divergence=divergence, noise=noise, solver=solver
        )
    else:
        field: nn.Module
        if model == "unet":
            field = UNetField(shape, hidden=hidden)
        else:
            field = ConvField(shape, hidden=hidden, activation=activation)
        inner = CNF(field, divergence=divergence, noise=noise, solver=solver)
    return TransformedFlow(inner, Compose(Dequantize(levels), Logit(alpha)))


def image_model(flow: nn.Module) -> str:
    """Which of :data:`IMAGE_MODELS` an :func:`image_flow` is (``unet``, ``cnf`` or ``multiscale``)."""
    inner = flow.config()["flow"]
    return "unet" if (inner.get("field") or {}).get("kind") == "unet" else inner["kind"]


def set_solver(flow: nn.Module, solver: Solver) -> None:
    """Give a (possibly wrapped) CNF or multi-scale CNF new solver settings."""
    inner = inner_flow(flow)
    if not hasattr(inner, "solver"):
        raise TypeError(f"{type(inner).__name__} has no solver settings")
    inner.solver = solver


def as_float_images(images: torch.Tensor, like: nn.Module | None = None) -> torch.Tensor:
    """Integer images as floats of the flow's dtype (values unchanged), after :func:`check_images`
    (against the flow's dequantisation levels when it has them)."""
    check_images(images, dequantization_levels(like) if like is not None else None)
    dtype = torch.get_default_dtype()
    if like is not None:
        param = next(like.parameters(), None)
        dtype = param.dtype if param is not None else dtype
    return torch.as_tensor(images).to(dtype)


def dequantization_levels(flow: nn.Module) -> int | None:
    """The ``levels`` of a flow whose preprocessing starts with :class:`Dequantize` (else None)."""
    preprocess = getattr(flow, "preprocess", None)
    if preprocess is None:
        return None
    first = next(preprocess.leaves())
    return first.levels if isinstance(first, Dequantize) else None


@dataclass(frozen=True)
class BitsPerDim:
    """Mean bits/dim over a set of images, its standard error, and the cost of scoring them."""

    mean: float
    se: float
    nfe: int
    seconds: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"bits_per_dim": self.mean, "bits_per_dim_se": self.se, "nfe": self.nfe,
                "seconds": self.seconds, "n": self.n}


def evaluate_bits_per_dim(
    flow: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    time_limit: float | None = None,
) -> BitsPerDim:
    """Bits per dimension of integer ``images`` under a flow with :class:`Dequantize` preprocessing.

    One dequantisation draw (and one Hutchinson probe) per image: each image's value is an
    unbiased estimate of its bound, so the standard error across images covers that noise too.
    NFE is the largest scoring NFE over the batches. With ``time_limit`` (seconds) no batch starts
    after that time: the first ``n`` images of the result are scored.
    """
    if not callable(getattr(flow, "bits_per_dim", None)):
        raise TypeError(f"flow must dequantise its input (a TransformedFlow), got {type(flow).__name__}")
    x = as_float_images(images, flow)
    values, nfe = [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for chunk in torch.split(x, batch_size):
            values.append(flow.bits_per_dim(chunk, generator=generator))
            nfe = max(nfe, getattr(getattr(flow, "stats", None), "nfe_forward", 0))
            if time_limit is not None and time.perf_counter() - start >= time_limit:
                break
    seconds = time.perf_counter() - start
    bpd = torch.cat(values).double()
    se = float(bpd.std() / math.sqrt(bpd.numel())) if bpd.numel() > 1 else float("nan")
    return BitsPerDim(float(bpd.mean()), se, nfe, seconds, int(bpd.numel()))


def latent_interpolation(
    flow: nn.Module, first: torch.Tensor, second: torch.Tensor, steps: int = 8, *, spherical: bool = False
) -> torch.Tensor:
    """Images along a path between two images through the base: (steps, C, H, W) floats.

    Both images are mapped to the base (z = transform(x)), the path is linear
    ``(1 - s) z0 + s z1`` or spherical (slerp, which keeps the norm typical of a Gaussian base
    where the straight line passes near its low-norm centre; Shoemake 1985, White 2016), and
    each point is mapped back with ``inverse``. The end points reproduce the two images'
    dequantised values, quantised again.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    x = as_float_images(torch.stack([torch.as_tensor(first), torch.as_tensor(second)]), flow)
    with torch.no_grad():
        z, _ = flow.transform(x)
        return flow.inverse(interpolate(z[0], z[1], steps, spherical=spherical))


def interpolate(z0: torch.Tensor, z1: torch.Tensor, steps: int, *, spherical: bool = False) -> torch.Tensor:
    """``steps`` points from z0 to z1 (any equal shapes), stacked: linear or spherical (slerp,
    along the great circle with the norm interpolated linearly)."""
    s = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device).reshape(-1, *[1] * z0.ndim)
    if not spherical:
        return (1 - s) * z0 + s * z1
    n0, n1 = z0.norm(), z1.norm()
    cos = (z0 * z1).sum() / (n0 * n1)
    omega = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    u0, u1 = z0 / n0, z1 / n1
    direction = (torch.sin((1 - s) * omega) * u0 + torch.sin(s * omega) * u1) / torch.sin(omega)
    return direction * ((1 - s) * n0 + s * n1)


def image_trajectory(flow: nn.Module, z: torch.Tensor, ts: Sequence[float]) -> torch.Tensor:
    """The images along the flow from base draws ``z`` at the times ``ts``, in the data's units:
    (len(ts), n, C, H, W), without gradients. A TransformedFlow around a CNF or a MultiScaleCNF
    maps the path back through its preprocessing (quantised pixels)."""
    with torch.no_grad():
        return flow.trajectory(z, ts)


def nearest_neighbour_distances(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Euclidean distance (in grey levels) from each image to its nearest image in ``reference``.

    Samples whose distances to the training set are like those of held-out test images are not
    copies of training images; a copy has distance 0.
    """
    a = torch.as_tensor(images).flatten(1).double()
    b = torch.as_tensor(reference).flatten(1).double()
    return torch.cat([torch.cdist(chunk, b).min(dim=1).values for chunk in torch.split(a, 1000)])
