"""Test metrics of a VAE, each a mean over the data with two standard errors (in nats).

* ``elbo``: the one-sample ELBO per image;
* ``iwae``: the importance-weighted bound with k samples per image, the usual estimate of the
  test log-likelihood log p(x) (Burda et al. 2016); it is a lower bound in expectation;
* ``kl_prior``: KL(q(z | x) || p(z)), the rate term of the ELBO (one-sample estimates);
* ``gap``: iwae - elbo per image, an estimate of KL(q(z | x) || p(z | x)) that is too small by
  log p(x) - iwae (the posterior's excess over the true posterior; 0 for an exact posterior).

For a 2-D latent space the true posterior is computed on a grid (:func:`grid_posterior`), and
:func:`inference_gaps` splits KL(q(z | x) || p(z | x)) into the family's approximation gap and the
encoder's amortisation gap (Cremer, Li & Duvenaud 2018).

The standard errors are over images (the spread of the per-image values / sqrt(n)); they ignore
the Monte Carlo noise within each image's estimate, which averages out in the same way.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from cnf.vae.model import VAE, _check_positive_int


def mean_and_two_se(values: torch.Tensor) -> tuple[float, float]:
    """(mean, 2 standard errors of the mean) of a 1-D tensor."""
    values = values.double()
    n = values.numel()
    spread = float(values.std()) if n > 1 else math.nan
    return float(values.mean()), 2 * spread / math.sqrt(n)


def evaluate_vae(
    vae: VAE,
    data: torch.Tensor,
    *,
    k: int = 1000,
    batch_size: int = 100,
    chunk: int = 100,
    seed: int = 0,
    per_image: bool = False,
    time_limit: float | None = None,
) -> dict[str, Any]:
    """ELBO, IWAE_k, KL(q || prior) and their gap on binary ``data`` (n, D), each as mean and
    ``two_se``, plus ``k``, ``n`` and the evaluation ``seconds``; without gradients, seeded.
    ``per_image=True`` adds the per-image tensors under ``"values"`` (for paired comparisons).
    With ``time_limit`` (seconds) no batch starts after that time: ``n`` says how many of the
    first images were scored."""
    start = time.perf_counter()
    elbo, iwae, kl = [], [], []
    was_training = vae.training
    vae.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for rows in torch.split(data, batch_size):
            terms = vae.log_weights(rows, 1)
            elbo.append(terms["log_w"][0])
            kl.append((terms["log_qz"] - terms["log_pz"])[0])
            iwae.append(vae.iwae_bound(rows, k, chunk=chunk))
            if time_limit is not None and time.perf_counter() - start >= time_limit:
                break
    vae.train(was_training)
    values = {"elbo": torch.cat(elbo), "iwae": torch.cat(iwae), "kl_prior": torch.cat(kl)}
    values["gap"] = values["iwae"] - values["elbo"]
    metrics: dict[str, Any] = {"k": k, "n": int(values["elbo"].shape[0])}
    for name, value in values.items():
        metrics[name], metrics[f"{name}_two_se"] = mean_and_two_se(value)
    metrics["seconds"] = time.perf_counter() - start
    if per_image:
        metrics["values"] = values
    return metrics


def grid_posterior(
    vae: VAE,
    x: torch.Tensor,
    *,
    bound: float = 4.0,
    resolution: int = 100,
    with_q: bool = True,
    window: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The true posterior p(z | x) of a 2-D-latent VAE on a square grid per image: [-bound, bound]^2
    for every row, or the squares of ``window`` = (centres (B, 2), half-widths (B,)), e.g.
    :func:`posterior_window`'s.

    For each row of ``x`` (B, D): log p(x, z) at its grid points, normalised by the quadrature
    estimate of log p(x) (a Riemann sum over the grid cells, accurate when the grid holds the
    posterior's mass and resolves it); and log q(z | x) at the same points (the flow inverted).
    Returns ``axis`` (B, resolution, 2: the z1 and z2 coordinates of each image's grid lines),
    ``points`` (B, resolution^2, 2), ``log_true`` and ``log_q`` (B, resolution^2; ``log_q`` None
    when not ``with_q``) and ``log_evidence`` (B,)."""
    if vae.latent_dim != 2:
        raise ValueError(f"grid_posterior needs a 2-D latent space, got latent_dim={vae.latent_dim}")
    anchor = next(vae.parameters())
    batch = x.shape[0]
    if window is None:
        window = (anchor.new_zeros(batch, 2), anchor.new_full((batch,), float(bound)))
    centre, half = window
    unit = torch.linspace(-1, 1, resolution, dtype=anchor.dtype, device=anchor.device)
    axis = centre[:, None, :] + half[:, None, None] * unit[None, :, None]  # (B, R, 2)
    z1 = axis[:, None, :, 0].expand(-1, resolution, -1)  # z1 fastest, z2 slowest
    z2 = axis[:, :, None, 1].expand(-1, -1, resolution)
    points = torch.stack([z1, z2], dim=-1).reshape(batch, resolution * resolution, 2)
    log_cell = 2 * torch.log(2 * half / (resolution - 1))
    with torch.no_grad():
        z = points.transpose(0, 1)  # (G, B, 2)
        log_joint = vae.joint_log_prob(z, x).T  # (B, G)
        log_evidence = torch.logsumexp(log_joint, dim=1) + log_cell
        log_q = vae.posterior_log_prob(z.contiguous(), x).T if with_q else None
    return {
        "axis": axis,
        "points": points,
        "log_true": log_joint - log_evidence[:, None],
        "log_q": log_q,
        "log_evidence": log_evidence,
    }


def posterior_window(
    vae: VAE, x: torch.Tensor, *, samples: int = 2000, resolution: int = 200, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A square per row of ``x`` that holds both q(z | x) and the true posterior of a 2-D-latent
    VAE, for :func:`grid_posterior`'s ``window``: (centres (B, 2), half-widths (B,)).

    It spans ``samples`` draws of q and the grid cells of a coarse ``resolution`` grid (over a
    square holding every draw and [-4, 4]^2) where the true posterior's density is within e^-12 of
    its peak, with a margin of a tenth and one coarse cell. A fixed [-4, 4]^2 grid misses posteriors
    that sit further out or are narrower than its cells (Fashion-MNIST's, with a 2-D latent)."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        z = vae.log_weights(x, samples)["z"]  # (S, B, 2)
    reach = max(4.0, float(z.abs().max()) + 1.0)
    coarse = grid_posterior(vae, x, bound=reach, resolution=resolution, with_q=False)
    held = coarse["log_true"] >= coarse["log_true"].max(dim=1, keepdim=True).values - 12.0  # (B, G)
    far = torch.finfo(z.dtype).max
    p_low = torch.where(held[..., None], coarse["points"], far).amin(dim=1)
    p_high = torch.where(held[..., None], coarse["points"], -far).amax(dim=1)
    low, high = torch.minimum(z.amin(dim=0), p_low), torch.maximum(z.amax(dim=0), p_high)
    half = 0.55 * (high - low).amax(dim=1) + 2 * reach / (resolution - 1)
    return (low + high) / 2, half


def grid_log_evidence(
    vae: VAE, x: torch.Tensor, *, bound: float = 4.0, resolution: int = 100, chunk: int = 16
) -> torch.Tensor:
    """log p(x) per row of ``x`` (B, D) of a 2-D-latent VAE by the quadrature of
    :func:`grid_posterior` (without its log q), ``chunk`` rows at a time: for many images."""
    return torch.cat(
        [grid_posterior(vae, rows, bound=bound, resolution=resolution, with_q=False)["log_evidence"]
         for rows in x.split(chunk)]
    )  # fmt: skip


def kl_to_true_posterior(
    vae: VAE,
    x: torch.Tensor,
    log_evidence: torch.Tensor,
    *,
    samples: int = 5000,
    seed: int = 0,
    encoding: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q(z | x) || p(z | x)) per row by Monte Carlo over z ~ q: mean of log q(z | x) -
    log p(x, z) + log p(x), with ``log_evidence`` from :func:`grid_posterior` (2-D latents) or
    any accurate estimate; q from the encoder, or from a given ``encoding`` (mean, log_std, h),
    e.g. :func:`refine_encoding`'s. Returns (kl, two standard errors), each (B,)."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        encoding = vae.encode(x) if encoding is None else encoding
        terms = vae.log_weights_given(x, encoding, samples)
    gap = log_evidence[None, :] - terms["log_w"]  # (samples, B)
    return gap.mean(0), 2 * gap.std(0) / math.sqrt(samples)


def refine_encoding(
    vae: VAE, x: torch.Tensor, *, steps: int = 300, samples: int = 32, lr: float = 0.02, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image variational parameters: each row's (mean, log_std, h) starts at the encoder's and
    is moved by Adam (``steps``, cosine-annealed from ``lr``, ``samples`` reparameterised draws) to
    maximise that image's own ELBO, with the decoder and the posterior's flow fixed. The refined
    q(z | x) is the family's best fit to one image without amortisation (the "local" posterior of
    Cremer, Li & Duvenaud 2018, "Inference suboptimality in variational autoencoders")."""
    _check_positive_int("steps", steps)
    _check_positive_int("samples", samples)
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        encoding = [part.detach().clone().requires_grad_(True) for part in vae.encode(x)]
    optimizer = torch.optim.Adam(encoding, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    for _ in range(steps):
        loss = -vae.log_weights_given(x, tuple(encoding), samples, generator)["log_w"].mean(0).sum()
        grads = torch.autograd.grad(loss, encoding, allow_unused=True)
        for part, grad in zip(encoding, grads):
            part.grad = grad  # None for h of a Gaussian posterior: Adam skips it
        optimizer.step()
        schedule.step()
    vae.train(was_training)
    mean, log_std, h = (part.detach() for part in encoding)
    return mean, log_std, h


def inference_gaps(
    vae: VAE,
    x: torch.Tensor,
    log_evidence: torch.Tensor,
    *,
    samples: int = 1000,
    steps: int = 300,
    lr: float = 0.02,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """KL(q(z | x) || p(z | x)) per row of ``x`` split as Cremer et al. (2018) do: ``kl`` of the
    encoder's q = ``approximation`` (the KL of :func:`refine_encoding`'s per-image q, the family's
    own shortfall) + ``amortisation`` (what the shared encoder loses on top of it), the refinement
    run with ``steps`` and ``lr``. Monte Carlo over ``samples`` draws; ``log_evidence`` as for
    :func:`kl_to_true_posterior`. Each value is (B,)."""
    kl, _ = kl_to_true_posterior(vae, x, log_evidence, samples=samples, seed=seed)
    refined = refine_encoding(vae, x, steps=steps, lr=lr, seed=seed)
    approximation, _ = kl_to_true_posterior(vae, x, log_evidence, samples=samples, seed=seed, encoding=refined)
    return {"kl": kl, "approximation": approximation, "amortisation": kl - approximation}
