"""Solver settings and the one place that calls torchdiffeq.

A :class:`Solver` holds everything that decides how an ODE is integrated; :func:`solve` runs
one solve with those settings, counts function evaluations, enforces the step budget and turns
torchdiffeq's bare ``AssertionError`` (step budget, step-size underflow) into a
:class:`SolverError` that says which solve failed, where, and what to try.

Reference: Chen et al. (2018), "Neural Ordinary Differential Equations" (torchdiffeq).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.odeint import SOLVERS

ADAPTIVE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")
# "First same as last": the last stage of a step is evaluated at the step's solution y1 itself,
# so the dynamics see y1 exactly when the last step ends on the end time (see solve()).
FSAL_METHODS = ("dopri5", "bosh3")
FIXED_STEP_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
METHODS = tuple(sorted(SOLVERS))


class SolverError(RuntimeError):
    """An ODE solve that could not finish: step budget exhausted or step size underflow."""


class SolveInterrupted(RuntimeError):
    """A solve stopped from outside, between two field evaluations (a time limit or a signal)."""


#: The check of :func:`stop_check`, asked before every field evaluation (None: no check).
_STOP_CHECK: contextvars.ContextVar[Callable[[], str | None] | None] = contextvars.ContextVar(
    "cnf_stop_check", default=None
)


@contextlib.contextmanager
def stop_check(check: Callable[[], str | None]) -> Iterator[None]:
    """Within the block, every solve calls ``check()`` before each field evaluation and raises
    :class:`SolveInterrupted` with its message when it returns one (e.g. "time limit reached").

    This bounds a solve that would otherwise run on (a stiff field near its step budget) by a
    deadline or a signal; the training loop uses it for ``time_limit`` and Ctrl-C / SIGTERM.
    """
    token = _STOP_CHECK.set(check)
    try:
        yield
    finally:
        _STOP_CHECK.reset(token)


def _check_tolerance(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Solver:
    """How to integrate the flow's ODE.

    Args:
        method: any torchdiffeq method (``dopri5``, ``bosh3``, ``rk4``, ``euler``, ...).
        rtol, atol: tolerances of adaptive methods.
        step_size: step of fixed-step methods (``euler``, ``rk4``, ...); default 0.05.
        adjoint: compute parameter gradients by the adjoint method (O(1) memory).
        adjoint_rtol, adjoint_atol: tolerances of the backward adjoint solve
            (default: the forward ones).
        max_steps: step budget of one solve; exceeding it raises :class:`SolverError`.
        compile: run a field's own forward-mode divergence (MLPField) through
            ``torch.compile`` while scoring without gradients. The first solve pays the
            compilation (seconds to tens of seconds); it is off by default (README, "Speed at
            equal error", has the measured start-up cost and gain).
    """

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    step_size: float | None = None
    adjoint: bool = False
    adjoint_rtol: float | None = None
    adjoint_atol: float | None = None
    max_steps: int = 10_000
    compile: bool = False

    def __post_init__(self) -> None:
        if self.method not in SOLVERS:
            raise ValueError(f"unknown solver method {self.method!r}; choose one of {METHODS}")
        _check_tolerance("rtol", self.rtol)
        _check_tolerance("atol", self.atol)
        if self.adjoint_rtol is not None:
            _check_tolerance("adjoint_rtol", self.adjoint_rtol)
        if self.adjoint_atol is not None:
            _check_tolerance("adjoint_atol", self.adjoint_atol)
        if self.step_size is not None:
            _check_tolerance("step_size", self.step_size)
            if self.is_adaptive:
                raise ValueError(
                    f"step_size={self.step_size!r} only applies to fixed-step methods; "
                    f"method {self.method!r} is adaptive (set rtol/atol instead)"
                )
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {self.max_steps!r}")
        if not isinstance(self.adjoint, bool):
            raise TypeError(f"adjoint must be a bool, got {self.adjoint!r}")
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile must be a bool, got {self.compile!r}")

    @property
    def is_adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    @property
    def fixed_step(self) -> float:
        """The step of a fixed-step method."""
        return 0.05 if self.step_size is None else self.step_size

    def with_(self, **changes: Any) -> Solver:
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> Solver:
        known = {k: v for k, v in settings.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class SolveStats:
    """Counts of the last solve of a flow.

    ``nfe_forward``: evaluations of the velocity field in the forward solve;
    ``nfe_backward``: evaluations in the adjoint backward solve (0 with direct backprop, whose
    backward pass replays the recorded graph instead of calling the field);
    ``steps``: accepted steps of the forward solve.
    """

    nfe_forward: int = 0
    nfe_backward: int = 0
    steps: int = 0
    solve: str = ""

    @property
    def nfe(self) -> int:
        return self.nfe_forward + self.nfe_backward

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "nfe": self.nfe}


_ADVICE = (
    "try a looser tolerance (larger rtol/atol), a larger max_steps, regularisation of the "
    "field (kinetic energy / Jacobian norm), or a smaller learning rate"
)


class CountedDynamics(nn.Module):
    """Wraps dynamics ``f(t, state)`` to count evaluations and accepted steps for one solve.

    It is an ``nn.Module`` so that the adjoint method finds the field's parameters.
    """

    def __init__(self, dynamics: nn.Module, stats: SolveStats) -> None:
        super().__init__()
        self.dynamics = dynamics
        self.stats = stats
        self.backward_phase = False
        self.last_t: torch.Tensor | float = float("nan")
        self.end_time: float | None = None  # set by solve() to keep the last state evaluated
        self.last_state: Any = None

    def forward(self, t: torch.Tensor, state: Any) -> Any:
        check = _STOP_CHECK.get()
        if check is not None and (reason := check()):
            raise SolveInterrupted(
                f"{self.stats.solve} solve stopped ({reason}) at t={float(self.last_t):.6g} after "
                f"{self.stats.steps} accepted steps and {self.stats.nfe_forward} evaluations"
            )
        if self.backward_phase:
            self.stats.nfe_backward += 1
        else:
            self.stats.nfe_forward += 1
            self.last_t = t.detach()
            if self.end_time is not None:
                self.last_state = state
        return self.dynamics(t, state)

    def final_state(self) -> Any:
        """The state of the last evaluation if it was at the end time, else None.

        For a first-same-as-last method that is the solution of the final step (its last stage
        is evaluated there and nothing is evaluated after it); torchdiffeq nudges that stage's
        time one ulp of the state's dtype inside the step, hence the small window."""
        if self.end_time is None or self.last_state is None:
            return None
        if abs(float(self.last_t) - self.end_time) > 1e-5 * max(1.0, abs(self.end_time)):
            return None
        return self.last_state

    def callback_step(self, t0: torch.Tensor, y0: Any, dt: torch.Tensor) -> None:
        if not self.backward_phase:
            self.last_t = t0.detach()


class CountedAdaptiveDynamics(CountedDynamics):
    """Also counts accepted steps, and enforces the step budget of the adjoint backward solve
    (torchdiffeq's own check there would surface as a bare AssertionError inside backward())."""

    def __init__(self, dynamics: nn.Module, stats: SolveStats, solver: Solver) -> None:
        super().__init__(dynamics, stats)
        self.solver = solver
        self.backward_steps = 0

    def callback_accept_step(self, t0: torch.Tensor, y0: Any, dt: torch.Tensor) -> None:
        if not self.backward_phase:
            self.stats.steps += 1

    def callback_step_adjoint(self, t0: torch.Tensor, y0: Any, dt: torch.Tensor) -> None:
        self.backward_steps += 1
        if self.backward_steps >= self.solver.max_steps:
            raise SolverError(
                f"adjoint backward pass of the {self.stats.solve} solve exceeded its step budget "
                f"max_steps={self.solver.max_steps} at t={float(t0):.6g} after "
                f"{self.stats.nfe_backward} evaluations; {_ADVICE}"
            )


def _check_dtype_matches(dynamics: nn.Module, state0: Any, name: str) -> None:
    """Refuse a state whose dtype differs from the field's parameters, naming both."""
    x = state0[0] if isinstance(state0, (tuple, list)) else state0
    param = next(dynamics.parameters(), None)
    if param is not None and isinstance(x, torch.Tensor) and x.dtype != param.dtype:
        raise TypeError(
            f"x has dtype {x.dtype} but the flow's parameters are {param.dtype} ({name} solve); "
            f"convert the data with x.to({param.dtype}) or the flow with flow.to({x.dtype})"
        )


def _with_last(result: Any, last: Any) -> Any:
    """``result`` (a tensor or tuple of tensors with time first) with its last time replaced."""
    if isinstance(result, torch.Tensor):
        return torch.cat([result[:-1], last.unsqueeze(0)])
    return tuple(torch.cat([r[:-1], s.unsqueeze(0)]) for r, s in zip(result, last, strict=True))


def solve(
    dynamics: nn.Module,
    state0: Any,
    times: torch.Tensor,
    solver: Solver,
    stats: SolveStats,
    *,
    name: str,
    norm: Callable[[Any], torch.Tensor] | None = None,
    arguments: tuple[torch.Tensor | None, ...] = (),
) -> Any:
    """Integrate ``d state/dt = dynamics(t, state)`` over ``times``; the one torchdiffeq call.

    ``name`` (e.g. "scoring", "sampling") appears in error messages. ``norm`` is passed to
    adaptive solvers to choose which states take part in step-size control. ``arguments`` are
    tensors the dynamics read besides the state (a context): the adjoint method returns their
    gradients too, next to those of the dynamics' parameters.
    """
    _check_dtype_matches(dynamics, state0, name)
    if solver.is_adaptive:
        counted: CountedDynamics = CountedAdaptiveDynamics(dynamics, stats, solver)
    else:
        counted = CountedDynamics(dynamics, stats)
    stats.solve = name
    options: dict[str, Any] = {}
    if solver.is_adaptive:
        options["max_num_steps"] = solver.max_steps
        # Land the last step exactly on the end time instead of stepping past it and
        # interpolating back: at dopri5 1e-5 this cuts the mean log p error ~30x at equal NFE.
        options["step_t"] = times[-1:]
        if solver.method in FSAL_METHODS and not solver.adjoint:
            # torchdiffeq returns even that end point through the step's interpolating
            # polynomial, whose coefficients cancel terms ~30x the state: in float32 that
            # leaves a floor of ~2.5e-6 nats on log p (README, "The float32 floor"). The last
            # stage of the final step is evaluated at its solution y1, so take y1 from there.
            counted.end_time = float(times[-1])
        if norm is not None:
            options["norm"] = norm
    else:
        span = float((times[-1] - times[0]).abs())
        needed = math.ceil(span / solver.fixed_step - 1e-9)
        if needed > solver.max_steps:
            raise SolverError(
                f"{name} solve with method={solver.method!r} and step_size={solver.fixed_step} "
                f"needs {needed} steps, over the step budget max_steps={solver.max_steps}; "
                "use a larger step_size or raise max_steps"
            )
        options["step_size"] = solver.fixed_step
        stats.steps = needed
    kwargs: dict[str, Any] = dict(rtol=solver.rtol, atol=solver.atol, method=solver.method, options=options)
    try:
        if solver.adjoint:
            adjoint_options = dict(options)
            if solver.is_adaptive:
                # The default adjoint norm already ignores the parameter-gradient states.
                adjoint_options.pop("norm", None)
                adjoint_options.pop("step_t", None)
            extra = tuple(a for a in arguments if a is not None and a.requires_grad)
            if extra:
                kwargs["adjoint_params"] = (*counted.parameters(), *extra)
            result = odeint_adjoint(
                counted,
                state0,
                times,
                adjoint_rtol=solver.adjoint_rtol or solver.rtol,
                adjoint_atol=solver.adjoint_atol or solver.atol,
                adjoint_options=adjoint_options,
                **kwargs,
            )
        else:
            result = odeint(counted, state0, times, **kwargs)
            final = counted.final_state()
            if final is not None:
                result = _with_last(result, final)
    except AssertionError as error:
        message = str(error)
        if "max_num_steps" in message:
            problem = f"exceeded its step budget max_steps={solver.max_steps}"
        elif "underflow" in message:
            problem = "hit a step-size underflow (the field is too stiff for this solver)"
        else:
            raise
        raise SolverError(
            f"{name} solve with method={solver.method!r}, rtol={solver.rtol:g}, atol={solver.atol:g} "
            f"{problem} at t={float(counted.last_t):.6g} after {stats.steps} accepted steps and "
            f"{stats.nfe_forward} evaluations; {_ADVICE}"
        ) from error
    counted.backward_phase = True
    return result
