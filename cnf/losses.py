"""Training objectives. Each takes a flow and a batch and returns a scalar loss to minimise.

- ``likelihood``: negative log-likelihood in nats per sample (maximum likelihood), optionally
  with the RNODE penalties ``kinetic_weight`` and ``jacobian_weight`` (Finlay et al. 2020; see
  :mod:`cnf.regularizers`).
- ``flow_matching``: conditional flow matching on the linear (optimal-transport) path with a
  small ``sigma_min`` (Lipman et al. 2023), base and data samples drawn independently.
- ``ot_flow_matching``: the same loss with base and data samples paired per batch by an exact
  optimal assignment on squared distances (OT-CFM, Tong et al. 2023); ``ot_batch_size`` m pairs
  within consecutive groups of m rows of the batch instead (OT-CFM's minibatch of m, for a
  cheaper assignment inside a larger gradient batch).

Every loss takes ``context=`` for a conditional flow p(x | c): c of shape (k,) or (batch, k),
the batch's contexts. OT pairing then happens only within groups of equal context
(:func:`ot_pairing_within_contexts`), so that x0 given c stays the base distribution.

Flow matching needs no ODE solve: one evaluation of the velocity field per sample at a random
time. The likelihood of a model trained by it is still computed exactly by the continuity
equation (:meth:`cnf.CNF.log_prob`).

Options are keyword-only; :func:`make_objective` binds them and checks they fit the objective.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from cnf.context import check_context, context_dim_of
from cnf.divergence import DIVERGENCES
from cnf.flow import base_sample
from cnf.regularizers import check_weight, rnode_penalty
from cnf.solver import SolveStats

Loss = Callable[[nn.Module, torch.Tensor], torch.Tensor]
#: ``pairing(x0, x1, context) -> x0 reordered``: who pairs base and data points in OT flow matching.
Pairing = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

#: Default sigma_min of the flow-matching path: the model's p1 is the data blurred by
#: N(0, sigma_min^2 I), negligible at this size for the toy data.
DEFAULT_SIGMA_MIN = 1e-4

#: Default exponent k of the training-time draw t = 1 - (1 - u)^k, u ~ U(0, 1): k = 1 is uniform.
DEFAULT_TIME_EXPONENT = 1.0


def nll_loss(
    flow: nn.Module,
    batch: torch.Tensor,
    *,
    kinetic_weight: float = 0.0,
    jacobian_weight: float = 0.0,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean negative log-likelihood -E[log p1(x)] of the batch in nats, plus RNODE penalties.

    With both weights 0 this is plain maximum likelihood (one ``log_prob`` solve). Otherwise the
    kinetic energy and Jacobian Frobenius norm are integrated along the same solve as extra
    states (:meth:`cnf.CNF.regularized_log_prob`) and added with RNODE's scaling
    (:func:`cnf.regularizers.rnode_penalty`).
    """
    conditional = {} if context is None else {"context": context}
    if not kinetic_weight and not jacobian_weight:
        return -flow.log_prob(batch, **conditional).mean()
    if not callable(getattr(flow, "regularized_log_prob", None)):
        raise TypeError(
            f"kinetic_weight/jacobian_weight need a CNF (a flow with regularized_log_prob), "
            f"got {type(flow).__name__}"
        )
    log_prob, kinetic, jacobian = flow.regularized_log_prob(batch, **conditional)
    penalty = rnode_penalty(kinetic, jacobian, batch[0].numel(), kinetic_weight, jacobian_weight)
    return -log_prob.mean() + penalty


def nll_loss_with_divergence(
    flow: nn.Module, batch: torch.Tensor, *, divergence: str, context: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`nll_loss` with the CNF inside ``flow`` (also inside a :class:`cnf.TransformedFlow`)
    using ``divergence`` for this call: ``hutchinson`` draws a Rademacher probe, ``exact`` computes
    the trace. The solve's dynamics keep the choice, so gradients (adjoint ones too) match it; the
    flow's own setting comes back afterwards. Used by the maximum-likelihood phase after flow
    matching, where the Hutchinson estimate gives an unbiased gradient at a fraction of the cost."""
    from cnf.transforms.flow import inner_flow

    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    inner = inner_flow(flow)
    if not hasattr(inner, "divergence"):  # not a CNF (a planar flow has no divergence to choose)
        return nll_loss(flow, batch, context=context)
    saved = inner.divergence, inner.noise
    inner.divergence = divergence
    inner.noise = "rademacher" if divergence == "hutchinson" else inner.noise
    try:
        return nll_loss(flow, batch, context=context)
    finally:
        inner.divergence, inner.noise = saved


def conditional_path(
    x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point and target velocity of the linear conditional path (Lipman et al. 2023, eq. 20-23).

    x_t = (1 - (1 - sigma_min) t) x0 + t x1 and u_t = x1 - (1 - sigma_min) x0, with x0 from the
    base at t=0 and x1 from the data at t=1; ``t`` has shape (batch,).
    """
    tt = t.reshape(-1, *[1] * (x0.ndim - 1))  # broadcasts over (batch, d) or images (batch, C, H, W)
    xt = (1 - (1 - sigma_min) * tt) * x0 + tt * x1
    ut = x1 - (1 - sigma_min) * x0
    return xt, ut


def ot_pairing(x0: torch.Tensor, x1: torch.Tensor, ot_batch_size: int | None = None) -> torch.Tensor:
    """Indices ``perm`` such that pairing x0[perm[i]] with x1[i] minimises sum ||x0 - x1||^2.

    Exact assignment on squared Euclidean distances (``scipy.optimize.linear_sum_assignment``),
    the minibatch OT coupling of OT-CFM (Tong et al. 2023). Both batches have n rows.
    ``ot_batch_size`` m: the minimum within each group of m consecutive rows (:func:`assignment`).
    """
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    return torch.from_numpy(assignment(squared_distances(x0, x1), ot_batch_size)).to(x0.device)


def squared_distances(x0: torch.Tensor, x1: torch.Tensor) -> np.ndarray:
    """The cost matrix ||x1[i] - x0[j]||^2 (rows: x1), in float64 on the CPU."""
    return torch.cdist(x1.detach().flatten(1).double(), x0.detach().flatten(1).double()).pow(2).cpu().numpy()


def assignment(cost: np.ndarray, ot_batch_size: int | None = None) -> np.ndarray:
    """``perm`` with ``perm[i]`` the column assigned to row i at minimal total cost. SciPy's solver
    releases the GIL, so several run in parallel threads (:mod:`cnf.pairings`).

    ``ot_batch_size`` m: rows and columns are cut into consecutive groups of m (the last one
    smaller when m does not divide n) and each diagonal block is solved alone, rows of a group
    paired with columns of the same group: the OT coupling of minibatches of m, at a cost of
    O(n m^2) instead of O(n^3). Batches are random draws, so the groups are random subsets."""
    n = cost.shape[0]
    m = check_ot_batch_size(ot_batch_size) or max(n, 1)  # None: one group (an empty cost gives no rows)
    perm = np.empty(n, dtype=np.int64)
    for start in range(0, n, m):
        block = slice(start, min(start + m, n))
        rows, cols = linear_sum_assignment(cost[block, block])
        perm[start + rows] = start + cols
    return perm


def check_ot_batch_size(ot_batch_size: int | None) -> int | None:
    """``ot_batch_size``: a positive int (rows per OT group) or None (the whole batch)."""
    if ot_batch_size is None:
        return None
    if isinstance(ot_batch_size, bool) or not isinstance(ot_batch_size, int) or ot_batch_size < 1:
        raise ValueError(f"ot_batch_size must be a positive int or None (the whole batch), got {ot_batch_size!r}")
    return ot_batch_size


def context_groups(context: torch.Tensor | None, n: int) -> list[torch.Tensor] | None:
    """The row indices of each group of two or more equal contexts, which OT pairs within; None
    when the whole batch is one group (no context, or one shared (1, k) context)."""
    if context is None or context.shape[0] == 1:
        return None
    _, groups = torch.unique(context.detach(), dim=0, return_inverse=True)
    if int(groups.max()) + 1 == n:  # all contexts distinct: singletons, nothing to pair
        return []
    rows = [(groups == g).nonzero().flatten() for g in range(int(groups.max()) + 1)]
    return [r for r in rows if r.numel() > 1]


def ot_pairing_within_contexts(
    x0: torch.Tensor, x1: torch.Tensor, context: torch.Tensor | None, ot_batch_size: int | None = None
) -> torch.Tensor:
    """:func:`ot_pairing` restricted to rows of equal context: ``perm`` permutes x0 only inside
    each group of identical context rows, so x0 stays independent of c.

    Pairing across contexts would make x0 depend on c (x0 near the data of its own context) and
    bias the learnt p(x | c). Discrete labels form groups; continuous contexts, all distinct,
    form singletons, which is the independent coupling. ``context`` (n, k), or (1, k) / None for
    one context shared by the batch (one group). ``ot_batch_size``: see :func:`assignment`,
    applied within each group."""
    groups = context_groups(context, x1.shape[0])
    if groups is None:
        return ot_pairing(x0, x1, ot_batch_size)
    perm = torch.arange(x1.shape[0], device=x0.device)
    for rows in groups:
        perm[rows] = rows[ot_pairing(x0[rows], x1[rows], ot_batch_size)]
    return perm


def _check_sigma_min(sigma_min: float) -> float:
    if isinstance(sigma_min, bool) or not isinstance(sigma_min, (int, float)):
        raise TypeError(f"sigma_min must be a float in [0, 1), got {sigma_min!r}")
    if not (math.isfinite(sigma_min) and 0 <= sigma_min < 1):
        raise ValueError(f"sigma_min must be a float in [0, 1), got {sigma_min!r}")
    return float(sigma_min)


def _check_time_exponent(time_exponent: float) -> float:
    if isinstance(time_exponent, bool) or not isinstance(time_exponent, (int, float)):
        raise TypeError(f"time_exponent must be a positive float, got {time_exponent!r}")
    if not (math.isfinite(time_exponent) and time_exponent > 0):
        raise ValueError(f"time_exponent must be a positive float, got {time_exponent!r}")
    return float(time_exponent)


def training_times(
    n: int, time_exponent: float, *, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """n flow-matching times t = 1 - (1 - u)^k with u ~ U(0, 1): t ~ Beta(1, 1/k).

    k = 1 is the uniform draw of Lipman et al. (2023); k > 1 puts more of the training near the
    data (t = 1), where the field must resolve the finest structure (k = 2: density 1 / (2 sqrt(1 - t))).
    Any k has the same minimiser, the marginal velocity at every t; k only moves the field's
    capacity along the path."""
    u = torch.rand(n, dtype=dtype, device=device, generator=generator)
    return u if time_exponent == 1.0 else 1 - (1 - u) ** time_exponent


def matching_draws(
    flow: nn.Module, batch: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The CNF, its data points x1 and base draws x0 of one flow-matching step, in the order the
    loss draws them (the dequantisation noise of a preprocessed flow, then x0): with a generator
    in the same state, :mod:`cnf.pairings` draws a future step's x1 and x0 exactly as its loss will."""
    preprocess = getattr(flow, "preprocess", None)
    if preprocess is not None:  # a cnf.transforms.TransformedFlow: match in the preprocessed space
        batch, _ = preprocess(batch, generator=generator)
        flow = flow.flow
    if not isinstance(getattr(flow, "field", None), nn.Module) or not hasattr(flow, "base"):
        raise TypeError(
            f"flow matching needs a CNF (a flow with a velocity field), got {type(flow).__name__}"
        )
    return flow, batch, base_sample(flow.base, batch.shape[0], generator).to(batch)


def flow_matching_loss(
    flow: nn.Module,
    batch: torch.Tensor,
    *,
    sigma_min: float = DEFAULT_SIGMA_MIN,
    time_exponent: float = DEFAULT_TIME_EXPONENT,
    coupling: str = "independent",
    generator: torch.Generator | None = None,
    context: torch.Tensor | None = None,
    pairing: Pairing | None = None,
    ot_batch_size: int | None = None,
) -> torch.Tensor:
    """Conditional flow-matching loss E ||u_theta(x_t, t) - u_t||^2 (Lipman et al. 2023).

    x1 is the batch, x0 ~ base, t ~ U(0, 1) per sample (``time_exponent`` k: t ~ Beta(1, 1/k),
    :func:`training_times`); ``coupling="ot"`` pairs x0 with x1 by
    :func:`ot_pairing` (Tong et al. 2023), within groups of equal ``context`` for a conditional
    flow. Squared error summed over coordinates, averaged over the batch. The field is called
    with a per-sample time tensor of shape (batch,) (and the context). ``pairing(x0, x1, context)``
    replaces the OT pairing, returning the paired x0 (several processes pass
    :func:`cnf.distributed.global_ot_pairing`: one assignment on the global batch).
    ``ot_batch_size`` m pairs within groups of m consecutive rows (:func:`assignment`); a
    ``pairing`` given with it must pair the same way (cnf.train builds it so).
    """
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}; choose one of {COUPLINGS}")
    if check_ot_batch_size(ot_batch_size) is not None and coupling != "ot":
        raise ValueError(f"ot_batch_size={ot_batch_size!r} applies only to coupling='ot', got coupling={coupling!r}")
    sigma_min = _check_sigma_min(sigma_min)
    time_exponent = _check_time_exponent(time_exponent)
    flow, batch, x0 = matching_draws(flow, batch, generator)
    field, n = flow.field, batch.shape[0]
    context = check_context(context, context_dim_of(flow), n, batch)
    if coupling == "ot":
        if pairing is None:
            x0 = x0[ot_pairing_within_contexts(x0, batch, context, ot_batch_size)]
        else:
            x0 = pairing(x0, batch, context)
    t = training_times(n, time_exponent, dtype=batch.dtype, device=batch.device, generator=generator)
    xt, ut = conditional_path(x0, batch, t, sigma_min)
    flow.stats = SolveStats(nfe_forward=1, solve="flow_matching")
    velocity = field(t, xt) if context is None else field(t, xt, context=context)
    return (velocity - ut).pow(2).flatten(1).sum(dim=1).mean()


COUPLINGS = ("independent", "ot")


def ot_flow_matching_loss(
    flow: nn.Module,
    batch: torch.Tensor,
    *,
    sigma_min: float = DEFAULT_SIGMA_MIN,
    time_exponent: float = DEFAULT_TIME_EXPONENT,
    generator: torch.Generator | None = None,
    context: torch.Tensor | None = None,
    pairing: Pairing | None = None,
    ot_batch_size: int | None = None,
) -> torch.Tensor:
    """Flow matching with the minibatch optimal-transport coupling (OT-CFM, Tong et al. 2023);
    ``ot_batch_size`` m solves it within groups of m rows of the batch (:func:`assignment`)."""
    return flow_matching_loss(
        flow,
        batch,
        sigma_min=sigma_min,
        time_exponent=time_exponent,
        coupling="ot",
        generator=generator,
        context=context,
        pairing=pairing,
        ot_batch_size=ot_batch_size,
    )


def elbo_loss(
    model: nn.Module, batch: torch.Tensor, *, kl_weight: float = 1.0, context: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative ELBO per sample of a VAE (:class:`cnf.vae.VAE`) on a dynamically binarised batch.

    ``batch`` holds pixel intensities in [0, 1]; each call draws x ~ Bernoulli(batch) (binary
    pixels stay as they are). ``kl_weight`` is the warm-up weight beta of the KL term
    (:func:`kl_warmup_weight`)."""
    if context is not None:
        raise ValueError(f"the elbo objective takes no context, got shape {tuple(context.shape)}")
    if not callable(getattr(model, "elbo", None)):
        raise TypeError(f"objective 'elbo' needs a model with elbo(x) (a cnf.vae.VAE), got {type(model).__name__}")
    low, high = float(batch.min()), float(batch.max())
    if low < 0 or high > 1:
        raise ValueError(f"elbo batches must hold pixel intensities in [0, 1], got values in [{low}, {high}]")
    return -model.elbo(torch.bernoulli(batch), kl_weight=kl_weight).mean()


def kl_warmup_weight(step: int, warmup: int) -> float:
    """beta at 0-based ``step``: rising linearly as (step + 1) / warmup to 1 over ``warmup`` steps
    (the deterministic warm-up of Sonderby et al. 2016, used by Sylvester flows and FFJORD's VAE);
    1 throughout for warmup = 0."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    "likelihood": nll_loss,
    "flow_matching": flow_matching_loss,
    "ot_flow_matching": ot_flow_matching_loss,
    "elbo": elbo_loss,
}

#: The options each objective takes (names of :class:`cnf.TrainSettings` fields).
OBJECTIVE_OPTIONS: dict[str, tuple[str, ...]] = {
    "likelihood": ("kinetic_weight", "jacobian_weight"),
    "flow_matching": ("sigma_min", "time_exponent"),
    "ot_flow_matching": ("sigma_min", "time_exponent", "ot_batch_size"),
    "elbo": ("kl_warmup",),
}


def make_objective(
    objective: str,
    *,
    kinetic_weight: float = 0.0,
    jacobian_weight: float = 0.0,
    sigma_min: float = DEFAULT_SIGMA_MIN,
    time_exponent: float = DEFAULT_TIME_EXPONENT,
    ot_batch_size: int | None = None,
) -> Loss:
    """``loss(flow, batch)`` for ``objective`` with its options bound and checked.

    Regulariser weights only apply to ``likelihood`` (flow matching has no solve to integrate
    them along): a non-zero weight with another objective is a ValueError, as is a
    ``time_exponent`` other than 1 outside flow matching and an ``ot_batch_size`` outside
    ``ot_flow_matching``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {tuple(OBJECTIVES)}")
    kinetic_weight = check_weight("kinetic_weight", kinetic_weight)
    jacobian_weight = check_weight("jacobian_weight", jacobian_weight)
    sigma_min = _check_sigma_min(sigma_min)
    time_exponent = _check_time_exponent(time_exponent)
    if check_ot_batch_size(ot_batch_size) is not None and objective != "ot_flow_matching":
        raise ValueError(
            f"ot_batch_size={ot_batch_size!r} applies only to objective='ot_flow_matching' (the size "
            f"of its OT groups), got objective={objective!r}"
        )
    if time_exponent != DEFAULT_TIME_EXPONENT and objective not in ("flow_matching", "ot_flow_matching"):
        raise ValueError(
            f"time_exponent={time_exponent!r} applies only to flow matching (the draw of its training "
            f"times), got objective={objective!r}"
        )
    if objective == "likelihood":
        return functools.partial(nll_loss, kinetic_weight=kinetic_weight, jacobian_weight=jacobian_weight)
    if kinetic_weight or jacobian_weight:
        raise ValueError(
            f"kinetic_weight={kinetic_weight!r} and jacobian_weight={jacobian_weight!r} apply only to "
            f"objective='likelihood' (RNODE); objective={objective!r} integrates no ODE"
        )
    if objective == "elbo":
        return elbo_loss
    return functools.partial(
        OBJECTIVES[objective], sigma_min=sigma_min, time_exponent=time_exponent, ot_batch_size=ot_batch_size
    )
