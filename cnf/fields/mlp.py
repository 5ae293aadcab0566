"""Velocity-field networks u(x, t) with time conditioning.

Any ``nn.Module`` whose ``forward(t, x)`` returns a tensor shaped like ``x`` can drive a
:class:`cnf.CNF`; :class:`MLPField` is the default, with FFJORD's concat-squash layers
(Grathwohl et al. 2019): ``Linear(x) * sigmoid(Linear(t)) + Linear_nobias(t)``.

When one time is shared by the batch (always, inside an ODE solve) each layer is an affine
map of x whose weight and bias depend on t only; :meth:`MLPField.velocity_and_divergence`
uses that to compute the exact divergence in the same pass, without autograd: in closed form
for one or two hidden layers, else by carrying the d Jacobian columns through the layers
(forward mode).

Conditional fields u(x, t, c) (``context_dim=k``): the context enters every layer. With
``context_mode="concat"`` it is an extra per-sample bias W_c e(c) of each layer's
pre-activation (concatenating c to the layer input), with ``"film"`` a per-sample scale and
shift of each hidden layer's pre-activation (FiLM, Perez et al. 2018); e is an optional user
``embedding`` module (identity by default), trained jointly. Neither changes how x enters,
so the forward-mode divergence keeps its structure (FiLM scales the Jacobian columns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from cnf.context import ContextStandardization


class _SigmoidTanh(torch.autograd.Function):
    """tanh(x) = 2 sigmoid(2x) - 1 with torch.tanh's own backward kernel, grad (1 - y^2) from
    the saved output, which autograd differentiates again (double backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = sigmoid_tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)  # grad (1 - y^2), fused and differentiable


def sigmoid_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh through the logistic function, 2 sigmoid(2x) - 1, without autograd (one allocation)."""
    return torch.mul(x, 2).sigmoid_().mul_(2).sub_(1)


class Tanh(nn.Tanh):
    """``nn.Tanh`` computed as 2 sigmoid(2x) - 1: on CPUs torch's tanh is ~3x slower than its
    sigmoid (1.43 against 0.42 ms for 5,000 x 64 float32 on one thread, AVX-512), and tanh is
    the default activation of every field. Absolute error below 1.8e-7 in float32 (4e-16 in
    float64), the same backward as ``torch.tanh`` (also twice differentiable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _SigmoidTanh.apply(x)
        return sigmoid_tanh(x)


class _Logistic(nn.Module):
    """sigmoid, in place on a fresh pre-activation when no gradient is recorded (the hidden
    activation of :func:`logistic_form`'s rewritten tanh network)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return torch.sigmoid(x)
        return x.sigmoid_()


def logistic_form(
    affines: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The affine maps of the same function as the tanh MLP ``affines``, written on
    s_l = sigmoid(2 z_l) instead of h_l = tanh(z_l) = 2 s_l - 1.

    A hidden layer computes 2 z_l, so that one sigmoid gives s_l; the next layer reads
    W h + b = 2 W s + (b - W 1). The network then costs one elementwise pass per hidden layer
    (sigmoid) and one for the slope s (1 - s), against four for tanh as 2 sigmoid(2z) - 1 and
    one for 1 - h^2; it is the same function of x, so its Jacobian and divergence are the
    tanh network's exactly (up to rounding), with sigma' = s (1 - s) and the weights above.
    """
    last = len(affines) - 1
    rewritten = []
    for i, (weight, bias) in enumerate(affines):
        if i > 0:  # the input is h = 2 s - 1
            weight, bias = 2 * weight, bias - weight.sum(1)
        if i < last:  # a hidden layer computes 2 z for sigmoid(2 z)
            weight, bias = 2 * weight, 2 * bias
        rewritten.append((weight, bias))
    return rewritten


LOGISTIC = _Logistic()


ACTIVATIONS = {"tanh": Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "silu": nn.SiLU, "relu": nn.ReLU}
TIME_EMBEDDINGS = ("concatsquash", "concat", "concatsquash_log")

#: ``concatsquash_log`` gates and shifts each layer by (t, log(1 - t + LOG_TIME_EPS)): the flow-matching
#: field changes steeply as t -> 1, where the paths reach the data's thin structure, and a gate
#: linear in t cannot follow it (README, "The field's time features"). Not tuned.
LOG_TIME_EPS = 0.01
CONTEXT_MODES = ("concat", "film")


class ConcatSquashLinear(nn.Module):
    """FFJORD's time-gated linear layer: ``W x * sigmoid(a t + c) + b t``."""

    def __init__(self, in_features: int, out_features: int, time_features: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(time_features, out_features)
        self.shift = nn.Linear(time_features, out_features, bias=False)

    def affine(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of x -> layer(t, x) at one time ``t`` of shape (1, time_features)."""
        gate = torch.sigmoid(self.gate(t)).reshape(-1)
        shift = self.shift(t).reshape(-1)
        return self.linear.weight * gate[:, None], torch.addcmul(shift, self.linear.bias, gate)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == 1:  # one time for the batch: a single fused x W^T + b
            return nn.functional.linear(x, *self.affine(t))
        return self.linear(x) * torch.sigmoid(self.gate(t)) + self.shift(t)


class ConcatLinear(nn.Module):
    """Linear layer on the input with time appended: ``W [x, t] + b``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features + 1, out_features)

    def affine(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of x -> layer(t, x) at one time ``t`` of shape (1, 1)."""
        weight = self.linear.weight
        return weight[:, :-1], self.linear.bias + weight[:, -1] * t.reshape(())

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == 1:
            return nn.functional.linear(x, *self.affine(t))
        return self.linear(torch.cat([x, t.expand(x.shape[0], 1)], dim=1))


def activation_derivative(activation: nn.Module, pre: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """sigma'(pre) given pre and out = sigma(pre), for the built-in activations (their default
    settings); None for anything else, which then takes the autograd divergence."""
    kind = type(activation)
    if kind is _Logistic or kind is nn.Sigmoid:
        return torch.addcmul(out, out, out, value=-1)
    if kind is nn.Tanh or kind is Tanh:
        return torch.addcmul(torch.ones((), dtype=out.dtype, device=out.device), out, out, value=-1)
    if kind is nn.Softplus and activation.beta == 1:
        return torch.sigmoid(pre)
    if kind is nn.ELU and activation.alpha == 1:
        return torch.where(pre > 0, torch.ones_like(out), out + 1)
    if kind is nn.SiLU:
        sig = torch.sigmoid(pre)
        return sig * (1 + pre * (1 - sig))
    if kind is nn.ReLU:
        return (pre > 0).to(out.dtype)
    return None


def time_column(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Time as a column that broadcasts against ``x``: shape (1, 1) for one time shared by the
    batch (so time gates are computed once, not per sample), else (batch, 1).

    Accepts a scalar, shape (batch,) or (batch, 1)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0 or t.numel() == 1:
        return t.reshape(1, 1)
    if t.numel() != x.shape[0]:
        raise ValueError(
            f"t must be a scalar or hold one time per sample ({x.shape[0]}), got shape {tuple(t.shape)}"
        )
    return t.reshape(x.shape[0], 1)


# Bytes of one chunk's working set in velocity_and_divergence: the (chunk, d, width) Jacobian
# columns plus the per-sample hidden tensors of every layer (pre-activation, output, slope), so
# a chunk stays in cache between the matrix products and the elementwise passes, and the
# allocator reuses its blocks instead of mapping fresh pages on every call. Measured per
# evaluation on one thread (README "Speed at equal error"): with a 4,096-row rule (4,096 / d
# samples) d = 2 / 16 / 64 with 64-wide layers took 4.71 / 13.73 / 10.98 ms against 4.21 /
# 13.05 / 9.31 ms at the best chunk, which this budget lands near; with 256-wide layers the cost is
# flat within 3% over 128-512 samples at d = 7, lowest at 128 samples at d = 30 and 64 at d = 64.
DIVERGENCE_CHUNK_BYTES = 3 << 20


def divergence_chunk_samples(dim: int, widths: Sequence[int], itemsize: int) -> int:
    """Samples per chunk of :func:`forward_mode_divergence` by default: a working set of about
    :data:`DIVERGENCE_CHUNK_BYTES` (``(d + 3 * layers) * width * itemsize`` bytes per sample)."""
    per_sample = (dim + 3 * len(widths)) * max(widths, default=1) * itemsize
    return max(1, DIVERGENCE_CHUNK_BYTES // per_sample)


# One compiled forward_mode_chunk per field architecture (not per instance: copies of a field,
# e.g. the float64 reference of cnf.tune, share it, and the field itself stays deep-copyable).
# torch.compile specialises it on dtype and device by itself.
_COMPILED_KERNELS: dict[tuple, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests trace with "eager" (no codegen)


Terms = Sequence[tuple[torch.Tensor | None, torch.Tensor | None]]


#: The folds of :func:`forward_mode_chunk` hold d * width * width numbers; above this many
#: (e.g. d = 64 with 256-wide layers: 16 MiB per evaluation) the first and last hidden layers
#: are carried like the others instead, so that a call does not allocate large blocks.
MAX_FOLD_NUMEL = 1 << 20


def trace_constants(affines: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """The x-independent matrices of :func:`forward_mode_chunk`'s trace, computed once per
    evaluation: ``(diag(W_1 W_2),)`` for one hidden layer, ``(W_2 * (W_1 W_3)^T,)`` for two,
    and for more the folds ``(W_1 (x) W_2, W_L (x) W_{L-1})`` flattened for one matrix product
    each, or ``()`` when they would exceed :data:`MAX_FOLD_NUMEL` numbers."""
    weights = [weight for weight, _ in affines]
    if len(weights) == 2:
        return ((weights[0] * weights[1].t()).sum(1),)
    if len(weights) == 3:
        return (weights[1] * (weights[0] @ weights[2]).t(),)
    if len(weights) < 2:
        return ()
    dim = weights[0].shape[1]
    first, second, before, last = weights[0], weights[1], weights[-2], weights[-1]
    if dim * max(first.shape[0] * second.shape[0], before.shape[0] * before.shape[1]) > MAX_FOLD_NUMEL:
        return ()
    # head[k, j * width + m] = W_1[k, j] W_2[m, k];  tail[j * width' + m, k] = W_L[j, k] W_{L-1}[k, m]
    head = (first.t().unsqueeze(2) * second.t().unsqueeze(0)).transpose(0, 1).reshape(first.shape[0], -1)
    tail = (last.unsqueeze(2) * before.unsqueeze(0)).permute(0, 2, 1).reshape(-1, before.shape[0])
    return head, tail


def forward_mode_chunk(
    h: torch.Tensor,
    affines: Sequence[tuple[torch.Tensor, torch.Tensor]],
    activations: Sequence[nn.Module],
    terms: Terms,
    buffers: Sequence[torch.Tensor] | None = None,
    constants: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, div u)`` of the MLP ``x -> W_L s(... s(W_1 x + b_1) ...) + b_L`` on one chunk ``h``.

    ``affines`` holds each layer's (weight, bias) at the current time, ``terms`` each layer's
    context (scale, shift) of its pre-activation (see MLPField.context_terms), each (1 or rows,
    width) or None; a scale multiplies the slopes D_l = diag(s'(z_l)) like sigma'.

    The divergence is tr(W_L D_{L-1} W_{L-1} ... D_1 W_1), computed per sample as follows.
    One hidden layer: ``D_1 . diag(W_1 W_2)``, a product with one vector. Two: by the cyclic
    trace, ``sum_km D_2[k] P[k, m] D_1[m]`` with the constant ``P = W_2 * (W_1 W_3)^T``, which
    costs one width x width product per sample whatever d is. More: forward mode, the Jacobian
    columns J e_j carried as a (rows, d, width) block; the columns after the second hidden layer
    come from D_1 in one product with the constant W_1 (x) W_2, and the last hidden layer is
    folded into the trace with W_L (x) W_{L-1}, so that the first and last blocks are never
    written (unless these constants exceed :data:`MAX_FOLD_NUMEL` numbers). ``constants`` are
    :func:`trace_constants` (computed here when not given). With ``buffers`` (two flat blocks of
    at least rows * d * width, no autograd) the middle products are written into them in
    place; without, every product is out of place (autograd, torch.compile).
    """
    rows, dim = h.shape
    slopes = []
    for (weight, bias), activation, (scale, shift) in zip(affines[:-1], activations, terms):
        pre = _modulate(torch.addmm(bias, h, weight.t()), scale, shift)
        h = activation(pre)
        slope = activation_derivative(activation, pre, h)
        if slope is None:
            raise ValueError(
                f"no analytic derivative for activation {activation!r}; use cnf.exact_divergence"
            )
        slopes.append(slope if scale is None else slope * scale)
    last, bias = affines[-1]
    velocity = _modulate(torch.addmm(bias, h, last.t()), *terms[-1])
    if not slopes:  # no hidden layer: u is affine in x
        return velocity, torch.diagonal(last).sum().expand(rows)
    if constants is None:
        constants = trace_constants(affines)
    if len(slopes) == 1:  # div = sum_k D_1[k] sum_j W_2[j, k] W_1[k, j]
        return velocity, slopes[0] @ constants[0]
    if len(slopes) == 2:  # div = sum_km D_2[k] W_2[k, m] D_1[m] (W_1 W_3)[m, k]
        return velocity, ((slopes[0] @ constants[0].t()) * slopes[1]).sum(1)
    fold = len(constants) == 2
    columns = None  # columns[n, j] = d h[n] / d x_j, shape (rows, d, width)
    for i, slope in enumerate(slopes[:-1] if fold else slopes):
        weight = affines[i][0]
        width = weight.shape[0]
        if fold and i == 0:
            continue  # enters through the fold with W_2
        target = None if buffers is None else buffers[i % 2][: rows * dim * width].view(rows, dim, width)
        if fold and i == 1:  # columns[n, j, m] = sum_k D_1[n, k] W_1[k, j] W_2[m, k]
            out = None if target is None else target.view(rows, dim * width)
            product = torch.mm(slopes[0], constants[0], out=out)
        elif columns is None:  # diag(D_1) W_1 as an outer product
            columns = torch.mul(slope.unsqueeze(1), weight.t().unsqueeze(0), out=target)
            continue
        else:
            out = None if target is None else target.view(rows * dim, width)
            product = torch.mm(columns.reshape(rows * dim, -1), weight.t(), out=out)
        product = product.view(rows, dim, width)
        columns = product * slope.unsqueeze(1) if target is None else product.mul_(slope.unsqueeze(1))
    if not fold:  # div u = sum_j sum_k W_L[j, k] columns[n, j, k]: one matrix-vector product
        return velocity, columns.reshape(rows, -1) @ last.reshape(-1)
    # div u = sum_k D_{L-1}[n, k] sum_jm columns[n, j, m] W_L[j, k] W_{L-1}[k, m]
    return velocity, ((columns.reshape(rows, -1) @ constants[1]) * slopes[-1]).sum(1)


def forward_mode_divergence(
    affines: Sequence[tuple[torch.Tensor, torch.Tensor]],
    activations: Sequence[nn.Module],
    x: torch.Tensor,
    terms: Terms | None = None,
    chunk_rows: int | None = None,
    kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, div u)`` of an MLP (see :func:`forward_mode_chunk`) over the batch ``x``, exact.

    The batch is cut into chunks of ``chunk_rows // d`` samples (None: of
    :func:`divergence_chunk_samples`). Without autograd (scoring) the
    column blocks are two buffers reused across layers and chunks, so a call allocates little
    more than its outputs; with autograd (training) every product is out of place so that
    backward works. ``kernel`` (a compiled :func:`forward_mode_chunk`) takes every chunk at
    the full chunk size, the last one zero-padded, so its shapes never change.
    """
    batch, dim = x.shape
    if terms is None:
        terms = [(None, None)] * len(affines)
    widths = [weight.shape[0] for weight, _ in affines[:-1]]
    if chunk_rows is None:
        chunk = divergence_chunk_samples(dim, widths, x.element_size())
    else:
        chunk = max(1, chunk_rows // dim)
    if kernel is None:
        chunk = min(batch, chunk)
    buffers: list[torch.Tensor] | None = None
    if kernel is None and not torch.is_grad_enabled() and widths:
        size = chunk * dim * max(widths)  # two ping-pong blocks, enough for every hidden width
        buffers = [x.new_empty(size), x.new_empty(size)]
    constants = trace_constants(affines)  # once per evaluation, shared by the chunks
    velocities, divergences = [], []
    for start in range(0, batch, chunk):
        h = x[start : start + chunk]
        rows = h.shape[0]
        pad = chunk - rows if kernel is not None else 0
        part = [tuple(_rows(term, start, rows, batch, pad) for term in pair) for pair in terms]
        if kernel is None:
            velocity, divergence = forward_mode_chunk(h, affines, activations, part, buffers, constants)
        else:
            velocity, divergence = kernel(_rows(h, 0, rows, rows, pad), affines, activations, part, None, constants)
            velocity, divergence = velocity[:rows], divergence[:rows]
        velocities.append(velocity)
        divergences.append(divergence)
    if len(velocities) == 1:
        return velocities[0], divergences[0]
    return torch.cat(velocities), torch.cat(divergences)


def _rows(term: torch.Tensor | None, start: int, rows: int, batch: int, pad: int) -> torch.Tensor | None:
    """Rows start..start+rows of a per-sample term (batch rows; one row broadcasts and is kept),
    zero-padded by ``pad`` rows."""
    if term is None or (term.shape[0] == 1 and batch != 1):
        return term
    term = term[start : start + rows]
    return torch.cat([term, term.new_zeros(pad, *term.shape[1:])]) if pad else term


class MLPField(nn.Module):
    """A time-conditioned MLP velocity field ``u(x, t)`` on R^dim.

    Args:
        dim: data dimension.
        hidden: widths of the hidden layers.
        activation: name (``tanh``, ``softplus``, ``elu``, ``silu``, ``relu``) or an nn.Module.
        time_embedding: ``concatsquash`` (FFJORD default), ``concat``, or ``concatsquash_log``
            (concat-squash layers on the time features (t, log(1 - t + 0.01)); :data:`LOG_TIME_EPS`).
        context_dim: k for a conditional field u(x, t, c) with c of shape (batch, k) or (1, k);
            None (default) for an unconditional one.
        context_mode: ``concat`` (per-sample bias in every layer) or ``film`` (per-sample
            scale and shift of every hidden layer).
        embedding: optional nn.Module applied to c first ((batch, k) -> (batch, e)).
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str | nn.Module = "tanh",
        time_embedding: str = "concatsquash",
        *,
        context_dim: int | None = None,
        context_mode: str = "concat",
        embedding: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        hidden = tuple(hidden)
        if not all(isinstance(h, int) and h > 0 for h in hidden):
            raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}")
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"unknown time_embedding {time_embedding!r}; choose one of {TIME_EMBEDDINGS}")
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError(f"unknown activation {activation!r}; choose one of {tuple(ACTIVATIONS)}")
            make_activation = ACTIVATIONS[activation]
        else:
            make_activation = lambda: activation  # noqa: E731
        widths = (dim, *hidden, dim)
        self.dim = dim
        self.hidden = hidden
        self.time_embedding = time_embedding
        self.activation_name = activation if isinstance(activation, str) else type(activation).__name__
        if time_embedding == "concat":
            self.layers = nn.ModuleList(ConcatLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        else:
            features = 2 if time_embedding == "concatsquash_log" else 1
            self.layers = nn.ModuleList(ConcatSquashLinear(a, b, features) for a, b in zip(widths[:-1], widths[1:]))
        self.activations = nn.ModuleList(make_activation() for _ in hidden)
        # Rows of Jacobian columns per chunk in velocity_and_divergence (a speed knob only;
        # None: sized by divergence_chunk_samples).
        self.divergence_chunk_rows: int | None = None
        # Score a tanh field as the same network on sigmoids (logistic_form; a speed knob only).
        self.logistic_tanh = True
        self._init_context(context_dim, context_mode, embedding, widths[1:])

    def _init_context(
        self, context_dim: int | None, mode: str, embedding: nn.Module | None, widths: Sequence[int]
    ) -> None:
        self.context_dim = context_dim
        self.context_mode = mode
        self.embedding = embedding
        self.context_layers = None
        self.context_standardization = None
        if context_dim is None:
            if embedding is not None:
                raise ValueError(f"embedding={embedding!r} needs context_dim=k, got context_dim=None")
            return
        if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 1:
            raise ValueError(f"context_dim must be a positive int or None, got {context_dim!r}")
        if mode not in CONTEXT_MODES:
            raise ValueError(f"unknown context_mode {mode!r}; choose one of {CONTEXT_MODES}")
        self.context_standardization = ContextStandardization(context_dim)
        features = context_dim
        if embedding is not None:
            if not isinstance(embedding, nn.Module):
                raise TypeError(f"embedding must be an nn.Module, got {type(embedding).__name__}")
            with torch.no_grad():
                probe = next(embedding.parameters(), torch.zeros(())).new_zeros(1, context_dim)
                out = embedding(probe)
            if out.ndim != 2 or out.shape[0] != 1:
                raise ValueError(
                    f"embedding must map (batch, {context_dim}) to (batch, e), got shape {tuple(out.shape)}"
                )
            features = out.shape[1]
        if mode == "concat":  # a bias W_c e(c) for every layer's pre-activation
            self.context_layers = nn.ModuleList(nn.Linear(features, w, bias=False) for w in widths)
        else:  # FiLM: (scale - 1, shift) of every hidden layer, the identity at zero weights
            self.context_layers = nn.ModuleList(nn.Linear(features, 2 * w) for w in widths[:-1])
            for layer in self.context_layers:
                nn.init.zeros_(layer.bias)

    def prepare_context(self, context: torch.Tensor | None, batch: int) -> PreparedContext | None:
        """The per-layer terms of ``context`` for a batch of ``batch`` points, computed once: a
        solve hands them to every evaluation instead of recomputing them (c does not change
        during a solve). Gradients still reach c and the embedding through them."""
        return None if context is None else PreparedContext(self.context_terms(context, batch), batch)

    def context_terms(
        self, context: torch.Tensor | PreparedContext | None, batch: int
    ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per layer ``(scale, shift)`` from the context, each (1 or batch, width) or None.

        A layer's pre-activation z becomes ``z * scale + shift``; both None without a context."""
        if isinstance(context, PreparedContext):
            if context.batch not in (1, batch):
                raise ValueError(f"a context prepared for {context.batch} points was given {batch} points")
            return context.terms
        count = len(self.layers)
        if self.context_dim is None:
            if context is not None:
                raise ValueError(
                    f"context of shape {tuple(context.shape)} given to an unconditional MLPField "
                    "(build it with context_dim=k)"
                )
            return [(None, None)] * count
        if context is None:
            raise ValueError(f"this MLPField is conditional (context_dim={self.context_dim}); pass context=")
        if context.ndim == 1:
            context = context.unsqueeze(0)
        if context.ndim != 2 or context.shape[1] != self.context_dim or context.shape[0] not in (1, batch):
            raise ValueError(
                f"context must have shape ({self.context_dim},), (1, {self.context_dim}) or "
                f"({batch}, {self.context_dim}); got shape {tuple(context.shape)}"
            )
        features = self.context_standardization(context)
        if self.embedding is not None:
            features = self.embedding(features)
        if self.context_mode == "concat":
            return [(None, layer(features)) for layer in self.context_layers]
        terms = []
        for layer in self.context_layers:
            scale, shift = layer(features).chunk(2, dim=-1)
            terms.append((scale + 1, shift))
        return [*terms, (None, None)]

    def forward(
        self, t: torch.Tensor | float, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        tt = self.time_features(time_column(t, x))
        terms = self.context_terms(context, x.shape[0])
        h = x
        for i, layer in enumerate(self.layers):
            h = _modulate(layer(tt, h), *terms[i])
            if i < len(self.activations):
                h = self.activations[i](h)
        return h

    def time_features(self, tt: torch.Tensor) -> torch.Tensor:
        """The columns each layer's time gate and shift read: t, or (t, log(1 - t + eps)) with t
        clipped at 1 (the flow's time runs over [0, 1]; past 1 + eps the log would be NaN)."""
        if self.time_embedding != "concatsquash_log":
            return tt
        return torch.cat([tt, torch.log1p(LOG_TIME_EPS - tt.clamp(max=1.0))], dim=1)

    @property
    def has_analytic_divergence(self) -> bool:
        """True when every activation's derivative is known (all the named ones)."""
        probe = torch.zeros(1)
        return all(activation_derivative(a, probe, probe) is not None for a in self.activations)

    def velocity_and_divergence(
        self,
        t: torch.Tensor | float,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        compiled: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u(x, t), div u(x, t))`` from one pass, the divergence exact.

        With layer l's affine map (W_l, b_l) at time t and D_l = diag sigma'(z_l), the
        divergence is tr(W_L D_{L-1} W_{L-1} ... D_1 W_1): for one or two hidden layers a
        closed form costing one product per sample whatever d is, for more the Jacobian
        columns carried in forward mode (:func:`forward_mode_chunk`). At most the matrix
        products of d autograd VJPs, no graph, and when training the gradient is a plain
        backward instead of a double backward. ``t`` must be one time
        shared by the batch. See :func:`forward_mode_divergence` for how the work is laid out.
        A context adds a per-sample shift (c does not change d/dx) and, with FiLM, a
        per-sample scale that multiplies the columns like sigma'.
        An unconditional tanh field is scored as the same network on sigmoids
        (:func:`logistic_form`, two elementwise passes per hidden layer instead of five; off
        with ``field.logistic_tanh = False``).

        ``compiled=True`` runs each chunk through ``torch.compile`` when no gradient is
        recorded (scoring; training stays eager): the first call compiles (seconds to tens of
        seconds), later calls reuse it for every batch size since chunks have one fixed size.
        """
        tt = time_column(t, x)
        if tt.shape[0] != 1:
            raise ValueError(
                f"velocity_and_divergence needs one time shared by the batch, got t of shape {tuple(torch.as_tensor(t).shape)}"
            )
        tt = self.time_features(tt)
        terms = self.context_terms(context, x.shape[0])
        kernel = None
        if compiled and not torch.is_grad_enabled():
            key = (self.dim, self.hidden, self.time_embedding, tuple(map(repr, self.activations)))
            kernel = _COMPILED_KERNELS.get(key)
            if kernel is None:
                kernel = _COMPILED_KERNELS[key] = torch.compile(
                    forward_mode_chunk, dynamic=False, backend=COMPILE_BACKEND
                )
        affines = [layer.affine(tt) for layer in self.layers]
        activations = list(self.activations)
        if self.logistic_tanh and activations and all(type(a) in (Tanh, nn.Tanh) for a in activations) and not any(
            scale is not None or shift is not None for scale, shift in terms
        ):  # the same network on sigmoids: fewer elementwise passes (see logistic_form)
            affines, activations = logistic_form(affines), [LOGISTIC] * len(activations)
        return forward_mode_divergence(affines, activations, x, terms, self.divergence_chunk_rows, kernel)

    def config(self) -> dict | None:
        """Keyword arguments that rebuild this field (for checkpoints); None with a user
        embedding module (restore into a flow built by hand)."""
        if self.embedding is not None:
            return None
        config = {
            "dim": self.dim,
            "hidden": list(self.hidden),
            "activation": self.activation_name,
            "time_embedding": self.time_embedding,
        }
        if self.context_dim is not None:
            config.update(context_dim=self.context_dim, context_mode=self.context_mode)
        return config


class PreparedContext:
    """An MLPField's per-layer context terms for one solve (see :meth:`MLPField.prepare_context`)."""

    def __init__(self, terms: list[tuple[torch.Tensor | None, torch.Tensor | None]], batch: int) -> None:
        self.terms = terms
        self.batch = batch


def _modulate(pre: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """``pre * scale + shift`` with either factor absent (one fused pass when both are there)."""
    if scale is not None and shift is not None:
        return torch.addcmul(shift, pre, scale)
    if scale is not None:
        return pre * scale
    if shift is not None:
        return pre + shift
    return pre


class AutogradField(nn.Module):
    """A field seen without its ``velocity_and_divergence``: a CNF around it takes the exact
    divergence from autograd VJPs instead (to compare the two; same values)."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.dim = field.dim
        self.context_dim = getattr(field, "context_dim", None)

    def forward(self, t: torch.Tensor | float, x: torch.Tensor, **context: torch.Tensor) -> torch.Tensor:
        return self.field(t, x, **context)


class LinearField(nn.Module):
    """``u(x, t) = A x``: the analytic test case (x(1) = expm(A) x(0))."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.as_tensor(matrix).clone())
        self.dim = self.matrix.shape[0]

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.T
