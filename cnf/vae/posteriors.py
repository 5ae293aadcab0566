"""Amortised approximate posteriors q(z | x) of a VAE: a diagonal Gaussian pushed through a flow.

The encoder gives, per data point, the mean and log standard deviation of q0(z0 | x) and a context
h(x). A sample is z0 = mean + std * eps (eps ~ N(0, I)) and z = f(z0; h(x)) for an invertible
map f conditioned on h(x), so

    log q(z | x) = log q0(z0 | x) - log |det df/dz0|.

Families (:data:`POSTERIORS`):

* ``gaussian``: f is the identity (mean-field; Kingma & Welling 2014).
* ``planar``: K planar layers whose (u, w, b) come from h(x) (:class:`cnf.ConditionalPlanarFlow`;
  Rezende & Mohamed 2015); log|det| by the matrix determinant lemma.
* ``cnf``: an amortised CNF (FFJORD's VAE, Grathwohl et al. 2019): the conditional
  :class:`cnf.MLPField` (tanh by default) with context h(x); log|det| from the continuity equation, integrated
  along the same forward solve 0 -> 1 that moves z0 to z (:meth:`cnf.CNF.inverse_and_log_prob`).
* ``iaf``: an inverse autoregressive flow (Kingma et al. 2016) from zuko's MAF used in its fast
  direction for sampling (:class:`ZukoIAF`), optional (needs zuko).

Every flow here follows one contract: ``inverse_and_log_prob(z0, context=h)`` returns
``(z, log N(z0; 0, I) - log|det df/dz0|)`` and ``transform(z, context=h)`` returns
``(z0, log|det df^-1/dz|)``, the surface of :class:`cnf.CNF` with a standard-normal base.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cnf.fields.mlp import MLPField
from cnf.flow import CNF
from cnf.planar import ConditionalPlanarFlow
from cnf.solver import Solver, SolveStats

POSTERIORS = ("gaussian", "planar", "cnf", "iaf")
#: The CNF posterior's field starts with its output (the velocity) this many times PyTorch's
#: default initialisation, under which a 64x64 field's velocity has an rms of about 0.55 per
#: coordinate on standard-normal latents (16-D; about 1.7 at 3). On Fashion-MNIST after 3,000
#: steps the IWAE gain over the Gaussian posterior was 0.97 nats at 1 and 1.95 at 3 (16-D latent),
#: 0.93 / 2.13 / 2.52 at 1 / 3 / 10 (64-D); a zero output layer gave 0.29 (16-D). README, "VAE posteriors".
CNF_INIT_SCALE = 3.0
_LOG_2PI = math.log(2 * math.pi)


def scale_output(field: MLPField, scale: float) -> None:
    """Multiply the velocity of ``field`` by ``scale`` (its last layer's weights, bias and time
    shift, and the context's bias of that layer): u -> scale * u, exactly."""
    last = field.layers[-1]
    with torch.no_grad():
        for module in (last.linear, getattr(last, "shift", None)):
            for parameter in () if module is None else module.parameters():
                parameter.mul_(scale)
        if field.context_mode == "concat" and field.context_layers is not None:
            field.context_layers[-1].weight.mul_(scale)


def context_network(context_dim: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """h(x) -> features the CNF posterior's field reads: Linear + tanh per width of ``hidden``
    (the shape of :class:`cnf.ConditionalPlanarFlow`'s context network without its head)."""
    modules: list[nn.Module] = []
    for a, b in zip((context_dim, *hidden[:-1]), hidden):
        modules += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*modules)


def standard_normal_log_prob(eps: torch.Tensor) -> torch.Tensor:
    """log N(eps; 0, I) summed over the last axis."""
    return -0.5 * (eps * eps).sum(-1) - 0.5 * eps.shape[-1] * _LOG_2PI


def diagonal_normal_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(2 log_std))) summed over the last axis (broadcasting)."""
    return standard_normal_log_prob((z - mean) * torch.exp(-log_std)) - log_std.sum(-1)


class ZukoIAF(nn.Module):
    """An inverse autoregressive flow behind cnf's flow contract: zuko's MAF transform T(.; h),
    whose one-pass direction is used for sampling z = T(z0) (Kingma et al. 2016).

    Scoring a given z (``transform``) inverts T sequentially, one pass per latent dimension.
    """

    kind = "iaf"

    def __init__(
        self, dim: int, context_dim: int, transforms: int = 4, hidden: tuple[int, ...] = (64, 64)
    ) -> None:
        super().__init__()
        try:
            import zuko
        except ImportError as error:  # optional dependency
            raise ImportError("posterior 'iaf' needs zuko: pip install --no-deps zuko") from error

        self.dim = dim
        self.context_dim = context_dim
        self.maf = zuko.flows.MAF(dim, context=context_dim, transforms=transforms, hidden_features=hidden)
        self.stats = SolveStats()

    def inverse_and_log_prob(
        self, z0: torch.Tensor, *, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z, ladj = self.maf.transform(context).call_and_ladj(z0)
        return z, standard_normal_log_prob(z0) - ladj

    def transform(self, z: torch.Tensor, *, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.maf.transform(context).inv.call_and_ladj(z)


class Posterior(nn.Module):
    """q(z | x) from the encoder's (mean, log_std, h): a diagonal Gaussian q0 and a flow f(.; h).

    Args:
        latent_dim: d, the size of z.
        context_dim: size of h(x) (the encoder's last hidden layer).
        family: one of :data:`POSTERIORS`.
        layers: planar layers K (``planar``) or autoregressive transforms (``iaf``).
        hidden: hidden widths of the CNF field, the planar context network or the IAF's MADEs.
        solver: the CNF's solver (default dopri5, rtol = atol = 1e-5).
        context_mode: how h(x) enters the CNF's field: ``concat`` (a per-sample bias of every
            layer) or ``film`` (a per-sample scale and shift of every hidden layer).
        context_net: the CNF field reads h(x) through a tanh network of the ``hidden`` widths (an
            ``embedding`` of :class:`cnf.MLPField`), as planar's (u, w, b) come from h(x) through
            one; False: the field's layers read h(x) itself.
        activation: the CNF field's activation (default tanh, as the real-data recipes; on the
            2-D-latent digits example at initial scale 1, mean KL(q || p(z | x)) over four seeds
            and the four drawn images: softplus 0.280, tanh 0.089; Fashion-MNIST IWAE over the
            Gaussian posterior: 1.01 and 1.63 nats).
        init_scale: the CNF field's initial velocity relative to PyTorch's default initialisation
            (:data:`CNF_INIT_SCALE`).
        flow: any flow with the contract in the module docstring, instead of a family's.
    """

    def __init__(
        self,
        latent_dim: int,
        context_dim: int,
        family: str = "gaussian",
        *,
        layers: int = 16,
        hidden: tuple[int, ...] = (64, 64),
        solver: Solver | None = None,
        context_mode: str = "concat",
        context_net: bool = False,
        activation: str = "tanh",
        init_scale: float = CNF_INIT_SCALE,
        flow: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if family not in POSTERIORS and flow is None:
            raise ValueError(f"unknown posterior {family!r}; choose one of {POSTERIORS}")
        self.latent_dim = latent_dim
        self.context_dim = context_dim
        self.family = family if flow is None else "custom"
        self.layers = layers
        self.hidden = tuple(hidden)
        self.context_mode = context_mode
        if not isinstance(context_net, bool):
            raise TypeError(f"context_net must be True or False, got {context_net!r}")
        self.context_net = context_net
        self.activation = activation
        if not (isinstance(init_scale, (int, float)) and not isinstance(init_scale, bool) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        self.init_scale = init_scale
        if flow is None:
            flow = self._build(family, solver)
        self.flow = flow

    def _build(self, family: str, solver: Solver | None) -> nn.Module | None:
        d, c = self.latent_dim, self.context_dim
        if family == "gaussian":
            return None
        if family == "planar":
            return ConditionalPlanarFlow(d, self.layers, c, hidden=self.hidden)
        if family == "cnf":
            embedding = context_network(c, self.hidden) if self.context_net else None
            field = MLPField(
                d, hidden=self.hidden, activation=self.activation, context_dim=c, context_mode=self.context_mode,
                embedding=embedding,
            )  # fmt: skip
            scale_output(field, self.init_scale)
            return CNF(field, solver=solver or Solver())
        return ZukoIAF(d, c, transforms=self.layers, hidden=self.hidden)

    @property
    def stats(self) -> SolveStats:
        """The flow's counts of its last call (NFE of the CNF's solve)."""
        return getattr(self.flow, "stats", None) or SolveStats()

    def sample_and_log_prob(
        self,
        mean: torch.Tensor,
        log_std: torch.Tensor,
        context: torch.Tensor,
        k: int = 1,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` reparameterised samples z of q(z | x) per row and log q(z | x): shapes (k, B, d)
        and (k, B); differentiable in the encoder's outputs and the flow's parameters."""
        eps = torch.randn((k, *mean.shape), dtype=mean.dtype, device=mean.device, generator=generator)
        z0 = mean + torch.exp(log_std) * eps
        log_q0 = standard_normal_log_prob(eps) - log_std.sum(-1)
        if self.flow is None:
            return z0, log_q0
        batch = mean.shape[0]
        flat = z0.reshape(k * batch, self.latent_dim)
        z, log_p = self.flow.inverse_and_log_prob(flat, context=context.repeat(k, 1))
        log_det = standard_normal_log_prob(flat) - log_p  # log|det df/dz0|
        return z.reshape(k, batch, self.latent_dim), log_q0 - log_det.reshape(k, batch)

    def log_prob(
        self, z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """log q(z | x) of given latents z (m, B, d) for the B rows' (mean, log_std, h): shape (m, B).

        Inverts the flow (the CNF solves 1 -> 0, planar layers by root finding)."""
        if self.flow is None:
            return diagonal_normal_log_prob(z, mean, log_std)
        m, batch = z.shape[0], z.shape[1]
        z0, log_det_inverse = self.flow.transform(z.reshape(m * batch, -1), context=context.repeat(m, 1))
        z0 = z0.reshape(m, batch, -1)
        return diagonal_normal_log_prob(z0, mean, log_std) + log_det_inverse.reshape(m, batch)

    def config(self) -> dict[str, Any] | None:
        if self.family == "custom":
            return None
        solver = self.flow.solver.to_dict() if isinstance(self.flow, CNF) else None
        return {
            "family": self.family,
            "layers": self.layers,
            "hidden": list(self.hidden),
            "solver": solver,
            "context_mode": self.context_mode,
            "context_net": self.context_net,
            "activation": self.activation,
        }
