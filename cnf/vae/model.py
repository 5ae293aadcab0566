"""A variational autoencoder p(x | z) p(z) with an amortised (flow) posterior q(z | x).

Bounds, per data point (Kingma & Welling 2014; Burda, Grosse & Salakhutdinov 2016):

    ELBO(x)   = E_q[log p(x | z) + log p(z) - log q(z | x)]        (one sample per call)
    IWAE_k(x) = E[log (1/k) sum_i p(x, z_i) / q(z_i | x)],  z_i ~ q(z | x) independently,

with ELBO = IWAE_1 <= IWAE_k <= IWAE_{k+1} <= log p(x) in expectation, and IWAE_k -> log p(x).
With a flow posterior log q(z | x) is exact (:mod:`cnf.vae.posteriors`), so both are true bounds.

The prior p(z) is N(0, I); the decoder of binarised images is Bernoulli with logits from an MLP.
The model takes flattened images (batch, D) so the training loop treats it like a flow of
dimension D: ``log_prob(x)`` is the importance-weighted bound with ``score_samples`` samples
(1: the ELBO), a lower bound on log p(x) used for validation and early stopping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnf.data import check_batch
from cnf.fields.mlp import ACTIVATIONS, CONTEXT_MODES
from cnf.recipes import vae_flow_context
from cnf.solver import Solver, SolveStats
from cnf.vae.posteriors import CNF_INIT_SCALE, POSTERIORS, Posterior, standard_normal_log_prob


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    modules: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        modules += [nn.Linear(a, b), nn.ELU()]
    return nn.Sequential(*modules)


class MLPEncoder(nn.Module):
    """x (B, D) -> (mean, log_std, h) of q0(z | x): an ELU MLP whose last hidden layer is the
    context h(x) of the posterior flow (as in Sylvester flows and FFJORD's VAE); std is a
    softplus (plus 1e-4) so it never collapses to zero."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        self.hidden = tuple(_check_positive_int("hidden", h) for h in hidden)
        self.body = _mlp((data_dim, *self.hidden))
        self.mean = nn.Linear(self.hidden[-1], latent_dim)
        self.scale = nn.Linear(self.hidden[-1], latent_dim)
        self.context_dim = self.hidden[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.body(x)
        std = F.softplus(self.scale(h)) + 1e-4
        return self.mean(h), torch.log(std), h


class BernoulliDecoder(nn.Module):
    """p(x | z) = prod_j Bernoulli(x_j; sigmoid(logit_j(z))) with an ELU MLP of z."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        hidden = tuple(_check_positive_int("hidden", h) for h in hidden)
        self.net = nn.Sequential(_mlp((latent_dim, *hidden)), nn.Linear(hidden[-1], data_dim))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) for x (B, D) and z (..., B, d): shape (..., B)."""
        logits = self.logits(z)
        return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z]: the pixel probabilities."""
        return torch.sigmoid(self.logits(z))


class VAE(nn.Module):
    """A VAE whose posterior family is chosen by name (:data:`cnf.vae.POSTERIORS`).

    Args:
        data_dim: D, the size of a flattened image.
        latent_dim: d.
        posterior: ``gaussian``, ``planar``, ``cnf`` or ``iaf``, or a :class:`Posterior`.
        hidden: widths of the encoder's and decoder's hidden layers (mirrored in the decoder).
        flow_hidden: hidden widths of the posterior flow (CNF field, planar context net, MADEs).
        layers: planar layers K (default 16) or IAF transforms.
        solver: the CNF posterior's solver.
        flow_context: how h(x) conditions the CNF posterior's field, ``concat`` or ``film``;
            None: :func:`cnf.recipes.vae_flow_context` for ``latent_dim`` (film up to 2-D).
        flow_context_net: the CNF posterior's field reads h(x) through a context network
            (:func:`cnf.vae.posteriors.context_network`); None: the recipe's, as for
            ``flow_context``. Checkpoints saved before this option rebuild without it.
        flow_activation: the CNF posterior's field activation (default tanh; checkpoints saved
            before this option rebuild with softplus, the activation they were trained with).
        flow_init_scale: the CNF posterior field's initial velocity relative to PyTorch's default
            initialisation (:data:`cnf.vae.posteriors.CNF_INIT_SCALE`; it shapes training only).
        score_samples: k of the importance-weighted bound that ``log_prob`` returns (1: ELBO).
        encoder, decoder: modules replacing the MLPs: encoder(x) -> (mean, log_std, h) with a
            ``context_dim`` attribute; decoder.log_prob(x, z) and decoder.mean(z).
    """

    kind = "vae"
    context_dim = None  # the VAE models p(x); h(x) is internal to the posterior

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        posterior: str | Posterior = "gaussian",
        *,
        hidden: Sequence[int] = (256, 256),
        flow_hidden: Sequence[int] = (64, 64),
        layers: int = 16,
        solver: Solver | None = None,
        flow_context: str | None = None,
        flow_context_net: bool | None = None,
        flow_activation: str = "tanh",
        flow_init_scale: float = CNF_INIT_SCALE,
        score_samples: int = 1,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.dim = _check_positive_int("data_dim", data_dim)
        self.latent_dim = _check_positive_int("latent_dim", latent_dim)
        self.hidden = tuple(hidden)
        self.score_samples = _check_positive_int("score_samples", score_samples)
        recipe = vae_flow_context(self.latent_dim)
        flow_context = recipe["flow_context"] if flow_context is None else flow_context
        flow_context_net = recipe["flow_context_net"] if flow_context_net is None else flow_context_net
        if flow_context not in CONTEXT_MODES:
            raise ValueError(f"unknown flow_context {flow_context!r}; choose one of {CONTEXT_MODES}")
        if flow_activation not in ACTIVATIONS:
            raise ValueError(f"unknown flow_activation {flow_activation!r}; choose one of {tuple(ACTIVATIONS)}")
        self.custom = encoder is not None or decoder is not None
        self.encoder = encoder if encoder is not None else MLPEncoder(data_dim, latent_dim, self.hidden)
        self.decoder = (
            decoder if decoder is not None else BernoulliDecoder(data_dim, latent_dim, self.hidden[::-1])
        )
        if isinstance(posterior, Posterior):
            if posterior.latent_dim != latent_dim:
                raise ValueError(
                    f"posterior has latent_dim={posterior.latent_dim}, the VAE latent_dim={latent_dim}; they must match"
                )
            self.posterior = posterior
        elif isinstance(posterior, str) and posterior in POSTERIORS:
            context_dim = getattr(self.encoder, "context_dim", None)
            if context_dim is None and posterior != "gaussian":
                raise ValueError(f"posterior {posterior!r} needs an encoder with a context_dim attribute")
            self.posterior = Posterior(
                latent_dim,
                context_dim or 1,
                posterior,
                layers=layers,
                hidden=tuple(flow_hidden),
                solver=solver,
                context_mode=flow_context,
                context_net=flow_context_net,
                activation=flow_activation,
                init_scale=flow_init_scale,
            )
        else:
            raise ValueError(
                f"unknown posterior {posterior!r}; choose one of {POSTERIORS} or pass a Posterior"
            )

    @property
    def stats(self) -> SolveStats:
        return self.posterior.stats

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.dim, "x")
        return x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, log_std, h) of q0(z | x) for x (B, D)."""
        return self.encoder(self._check(x))

    def log_weights(
        self, x: torch.Tensor, k: int = 1, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """For k samples z ~ q(z | x) per row: ``z`` (k, B, d) and the terms of the bounds, each
        (k, B): ``log_px_given_z``, ``log_pz``, ``log_qz`` and ``log_w`` = log p(x, z) - log q(z | x)."""
        return self.log_weights_given(x, self.encode(x), k, generator)

    def log_weights_given(
        self,
        x: torch.Tensor,
        encoding: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        k: int = 1,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`log_weights` with q(z | x) built from a given ``encoding`` (mean, log_std, h),
        each with one row per row of ``x``, instead of the encoder's (per-image refinement:
        :func:`cnf.vae.evaluate.refine_encoding`)."""
        k = _check_positive_int("k", k)
        self._check(x)
        mean, log_std, h = encoding
        z, log_qz = self.posterior.sample_and_log_prob(mean, log_std, h, k, generator)
        log_px_given_z = self.decoder.log_prob(x, z)
        log_pz = standard_normal_log_prob(z)
        return {
            "z": z,
            "log_px_given_z": log_px_given_z,
            "log_pz": log_pz,
            "log_qz": log_qz,
            "log_w": log_px_given_z + log_pz - log_qz,
        }

    def elbo(
        self, x: torch.Tensor, *, kl_weight: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One-sample ELBO per row, shape (B,); ``kl_weight`` beta < 1 gives the warm-up objective
        E[log p(x | z)] - beta E[log q(z | x) - log p(z)] (Bowman et al. 2016; Sonderby et al. 2016)."""
        terms = self.log_weights(x, 1, generator)
        rate = terms["log_qz"] - terms["log_pz"]
        return (terms["log_px_given_z"] - kl_weight * rate)[0]

    def iwae_bound(
        self, x: torch.Tensor, k: int, *, chunk: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The importance-weighted bound log (1/k) sum_i w_i per row, shape (B,) (Burda et al. 2016).

        ``chunk`` draws the k samples in groups of at most that many (memory: chunk * B * D)."""
        k = _check_positive_int("k", k)
        chunk = k if chunk is None else _check_positive_int("chunk", chunk)
        parts = []
        for start in range(0, k, chunk):
            parts.append(self.log_weights(x, min(chunk, k - start), generator)["log_w"])
        log_w = torch.cat(parts)
        return torch.logsumexp(log_w, dim=0) - math.log(k)

    def log_prob(self, x: torch.Tensor, **ignored: Any) -> torch.Tensor:
        """A lower bound on log p(x) per row: IWAE with ``score_samples`` samples (1: the ELBO)."""
        return self.iwae_bound(x, self.score_samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.elbo(x)

    def kl_to_prior(self, x: torch.Tensor, k: int = 1) -> torch.Tensor:
        """Monte Carlo KL(q(z | x) || p(z)) per row from k samples (the ELBO's rate term)."""
        terms = self.log_weights(x, k)
        return (terms["log_qz"] - terms["log_pz"]).mean(0)

    def posterior_log_prob(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log q(z | x) of latents z (m, B, d) for rows x (B, D): shape (m, B)."""
        mean, log_std, h = self.encode(x)
        return self.posterior.log_prob(z, mean, log_std, h)

    def joint_log_prob(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log p(x | z) + log p(z) for z (m, B, d) and x (B, D): shape (m, B);
        the true posterior up to its normaliser log p(x)."""
        return self.decoder.log_prob(self._check(x), z) + standard_normal_log_prob(z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixel probabilities E[x | z] for n draws z ~ p(z): shape (n, D)."""
        n = _check_positive_int("n", n)
        anchor = next(self.parameters())
        z = torch.randn(n, self.latent_dim, dtype=anchor.dtype, device=anchor.device, generator=generator)
        return self.decoder.mean(z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z] at one sample z ~ q(z | x) per row: shape (B, D)."""
        return self.decoder.mean(self.log_weights(x, 1)["z"][0])

    def config(self) -> dict[str, Any] | None:
        """What rebuilds this VAE from a checkpoint (None with a custom encoder/decoder/posterior)."""
        posterior = self.posterior.config()
        if self.custom or posterior is None:
            return None
        return {
            "kind": self.kind,
            "dim": self.dim,
            "latent_dim": self.latent_dim,
            "posterior": posterior["family"],
            "hidden": list(self.hidden),
            "flow_hidden": posterior["hidden"],
            "layers": posterior["layers"],
            "solver": posterior["solver"],
            "flow_context": posterior["context_mode"],
            "flow_context_net": posterior["context_net"],
            "flow_activation": posterior["activation"],
            "score_samples": self.score_samples,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VAE:
        solver = Solver.from_dict(config["solver"]) if config.get("solver") else None
        return cls(
            config["dim"],
            config["latent_dim"],
            config["posterior"],
            hidden=tuple(config["hidden"]),
            flow_hidden=tuple(config["flow_hidden"]),
            layers=config["layers"],
            solver=solver,
            flow_context=config.get("flow_context", "concat"),
            flow_context_net=config.get("flow_context_net", False),  # none before the option
            flow_activation=config.get("flow_activation", "softplus"),  # the activation before the option
            score_samples=config.get("score_samples", 1),
        )
