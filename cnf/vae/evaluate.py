"""Test metrics of a VAE, each a mean over the data with two standard errors (in nats).

* ``elbo``: the one-sample ELBO per image;
* ``iwae``: the importance-weighted bound with k samples per image, the usual estimate of the
  test log-likelihood log p(x) (Burda et al. 2016); it is a lower bound in expectation;
* ``kl_prior``: KL(q(z | x) || p(z)), the rate term of the ELBO (one-sample estimates);
* ``gap``: iwae - elbo per image, an estimate of KL(q(z | x) || p(z | x)) that is too small by
  log p(x) - iwae (the posterior's excess over the true posterior; 0 for an exact posterior).

The standard errors are over images (the spread of the per-image values / sqrt(n)); they ignore
the Monte Carlo noise within each image's estimate, which averages out in the same way.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from cnf.vae.model import VAE


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
    vae: VAE, x: torch.Tensor, *, bound: float = 4.0, resolution: int = 100, with_q: bool = True
) -> dict[str, torch.Tensor]:
    """The true posterior p(z | x) of a 2-D-latent VAE on a square grid [-bound, bound]^2.

    For each row of ``x`` (B, D): log p(x, z) at the grid points, normalised by the quadrature
    estimate of log p(x) (a Riemann sum over the grid cells, accurate when the grid holds the
    posterior's mass); and log q(z | x) at the same points (the flow inverted). Returns ``axis``
    (resolution,), ``points`` (resolution^2, 2), ``log_true`` and ``log_q`` (B, resolution^2;
    None when not ``with_q``) and ``log_evidence`` (B,)."""
    if vae.latent_dim != 2:
        raise ValueError(f"grid_posterior needs a 2-D latent space, got latent_dim={vae.latent_dim}")
    anchor = next(vae.parameters())
    axis = torch.linspace(-bound, bound, resolution, dtype=anchor.dtype, device=anchor.device)
    zz = torch.cartesian_prod(axis, axis).flip(-1)  # rows: (z1 = x axis, z2 = y axis), y slowest
    cell = float(axis[1] - axis[0]) ** 2
    with torch.no_grad():
        z = zz.unsqueeze(1).expand(-1, x.shape[0], -1)
        log_joint = vae.joint_log_prob(z, x).T  # (B, G)
        log_evidence = torch.logsumexp(log_joint, dim=1) + math.log(cell)
        log_q = vae.posterior_log_prob(z.contiguous(), x).T if with_q else None
    return {
        "axis": axis,
        "points": zz,
        "log_true": log_joint - log_evidence[:, None],
        "log_q": log_q,
        "log_evidence": log_evidence,
    }


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
    vae: VAE, x: torch.Tensor, log_evidence: torch.Tensor, *, samples: int = 5000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q(z | x) || p(z | x)) per row by Monte Carlo over z ~ q: mean of log q(z | x) -
    log p(x, z) + log p(x), with ``log_evidence`` from :func:`grid_posterior` (2-D latents) or
    any accurate estimate. Returns (kl, two standard errors), each (B,)."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        terms = vae.log_weights(x, samples)
    gap = log_evidence[None, :] - terms["log_w"]  # (samples, B)
    return gap.mean(0), 2 * gap.std(0) / math.sqrt(samples)
