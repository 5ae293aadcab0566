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
) -> dict[str, Any]:
    """ELBO, IWAE_k, KL(q || prior) and their gap on binary ``data`` (n, D), each as mean and
    ``two_se``, plus ``k``, ``n`` and the evaluation ``seconds``; without gradients, seeded.
    ``per_image=True`` adds the per-image tensors under ``"values"`` (for paired comparisons)."""
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
    vae.train(was_training)
    values = {"elbo": torch.cat(elbo), "iwae": torch.cat(iwae), "kl_prior": torch.cat(kl)}
    values["gap"] = values["iwae"] - values["elbo"]
    metrics: dict[str, Any] = {"k": k, "n": int(data.shape[0])}
    for name, value in values.items():
        metrics[name], metrics[f"{name}_two_se"] = mean_and_two_se(value)
    metrics["seconds"] = time.perf_counter() - start
    if per_image:
        metrics["values"] = values
    return metrics
