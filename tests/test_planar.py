"""Planar flows against brute-force Jacobians, their inverses, and the CNF via forward Euler."""

from __future__ import annotations

import math

import pytest
import torch

import cnf
from cnf.planar import PlanarFlow, PlanarVelocityField, solve_planar_scalar
from cnf.solver import SolveStats

DTYPE = torch.float64


def random_planar(dim: int, layers: int, seed: int = 0, scale: float = 1.0) -> PlanarFlow:
    """A float64 planar flow with random parameters; ``scale`` enlarges the raw u's."""
    torch.manual_seed(seed)
    flow = PlanarFlow(dim, layers).to(DTYPE)
    with torch.no_grad():
        flow.b.normal_(0.0, 0.5)
        flow.u.mul_(scale)
    return flow


def points(n: int, dim: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, dim, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def euler_cnf(flow: PlanarFlow) -> cnf.CNF:
    return cnf.CNF(flow.as_field(), solver=cnf.Solver(method="euler", step_size=1 / flow.layers))


# -- log|det| against the brute-force Jacobian -------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_layer_and_flow_logdet_match_slogdet_of_jacobian(dim: int) -> None:
    layers = 6
    flow = random_planar(dim, layers, seed=dim, scale=4.0)
    w, b, u_hat = (p.detach() for p in flow.layer_parameters())
    # One layer stressed towards singularity: w . u_hat = -0.97.
    u_near = -0.97 * w[2] / (w[2] @ w[2])
    flow.set_layer(2, w[2], b[2], u_near)
    z = points(4, dim)
    path = flow.trajectory(z, [k / layers for k in range(layers + 1)])
    w, b, u_hat = (p.detach() for p in flow.layer_parameters())
    assert torch.allclose(w[2] @ u_hat[2], torch.tensor(-0.97, dtype=DTYPE))

    # Each layer alone: a one-layer flow with the same (w, b, u_hat).
    for k in range(layers):
        single = PlanarFlow(dim, 1).to(DTYPE)
        single.set_layer(0, w[k], b[k], u_hat[k])
        x_prev = path[k]
        out, log_prob = single.inverse_and_log_prob(x_prev)
        torch.testing.assert_close(out, path[k + 1], atol=1e-13, rtol=0)
        logdet = (single.base.log_prob(x_prev) - log_prob).detach()
        for i in range(x_prev.shape[0]):
            jac = torch.autograd.functional.jacobian(lambda v, f=single: f.inverse(v[None])[0], x_prev[i])
            sign, expected = torch.linalg.slogdet(jac)
            assert sign > 0
            torch.testing.assert_close(logdet[i], expected, atol=1e-11, rtol=0)

    # The whole flow, both directions: sampling map z -> x and scoring map x -> z.
    x, log_prob = flow.inverse_and_log_prob(z)
    z_back, delta_logp = flow.transform(x.detach())
    for i in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: flow.inverse(v[None])[0], z[i])
        _, expected = torch.linalg.slogdet(jac)
        logdet = flow.base.log_prob(z[i : i + 1]) - log_prob[i]
        torch.testing.assert_close(logdet.detach()[0], expected, atol=1e-10, rtol=0)
        jac_inv = torch.autograd.functional.jacobian(lambda v: flow.transform(v[None])[0][0], x[i].detach())
        _, expected_inv = torch.linalg.slogdet(jac_inv)
        torch.testing.assert_close(delta_logp.detach()[i], expected_inv, atol=1e-9, rtol=0)


# -- inverses ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("dim", "layers"), [(1, 1), (2, 8), (5, 32)])
def test_inverse_round_trip(dim: int, layers: int) -> None:
    flow = random_planar(dim, layers, seed=layers, scale=5.0)
    z = 3 * points(200, dim)
    with torch.no_grad():
        x = flow.inverse(z)
        z_back, delta_logp = flow.transform(x)
        torch.testing.assert_close(z_back, z, atol=1e-10, rtol=0)
        torch.testing.assert_close(flow.inverse(flow.transform(z)[0]), z, atol=1e-10, rtol=0)
        x_again, log_prob = flow.inverse_and_log_prob(z)
        torch.testing.assert_close(x_again, x, atol=0, rtol=0)
        torch.testing.assert_close(flow.log_prob(x), log_prob, atol=1e-10, rtol=0)
        torch.testing.assert_close(flow.forward(x), log_prob, atol=1e-10, rtol=0)
    assert flow.stats == SolveStats(nfe_forward=layers, steps=layers, solve="scoring")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scalar_solver_converges_where_plain_newton_cycles(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(7)
    # c = -3.3916 with m = 5 sends plain Newton into a two-cycle between -3.39 and 1.49.
    c = torch.cat([torch.tensor([-3.3916]), 8 * torch.randn(20_000, generator=generator)]).to(dtype)
    for m in (-1 + 1e-6, -0.97, -0.3, 0.0, 0.5, 5.0, 30.0, 1e4):
        alpha = solve_planar_scalar(c, torch.tensor(m, dtype=dtype))
        residual = (alpha + m * torch.tanh(alpha) - c).abs() / (1 + c.abs())
        assert residual.max() <= 8 * torch.finfo(dtype).eps * (1 + abs(m)), m


def test_intermediate_times_use_the_first_layers() -> None:
    flow = random_planar(2, 8, seed=3, scale=3.0)
    z = points(30, 2)
    head = PlanarFlow(2, 3).to(DTYPE)
    w, b, u_hat = (p.detach() for p in flow.layer_parameters())
    for k in range(3):
        head.set_layer(k, w[k], b[k], u_hat[k])
    with torch.no_grad():
        x3, log_prob3 = head.inverse_and_log_prob(z)
        torch.testing.assert_close(flow.inverse(z, t=3 / 8), x3, atol=1e-14, rtol=0)
        torch.testing.assert_close(flow.log_prob(x3, t=3 / 8), log_prob3, atol=1e-10, rtol=0)
        torch.testing.assert_close(flow.log_prob(z, t=0.0), flow.base.log_prob(z), atol=0, rtol=0)


# -- gradients ---------------------------------------------------------------------------------
def test_log_prob_gradients_match_finite_differences() -> None:
    flow = random_planar(2, 4, seed=5, scale=4.0)
    x = points(6, 2).requires_grad_(True)
    names = ("w", "b", "u")
    params = tuple(getattr(flow, name).detach().clone().requires_grad_(True) for name in names)

    def log_prob(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(flow, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(log_prob, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)

    class Sampling(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flow = flow

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.flow.inverse_and_log_prob(z)[1]

    sampling = Sampling()

    def sample_log_prob(z: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        state = {f"flow.{name}": value for name, value in zip(names, values, strict=True)}
        return torch.func.functional_call(sampling, state, (z,))

    assert torch.autograd.gradcheck(sample_log_prob, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


# -- the density integrates to one -------------------------------------------------------------
def test_density_integrates_to_one_on_a_grid() -> None:
    flow = random_planar(2, 6, seed=7, scale=6.0)
    grid = torch.linspace(-8, 8, 400, dtype=DTYPE)
    gx, gy = torch.meshgrid(grid, grid, indexing="ij")
    with torch.no_grad():
        density = flow.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().reshape(400, 400)
        # The flow is far from the identity: its density is not the base density.
        base = flow.base.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().reshape(400, 400)
    assert (density - base).abs().max() > 0.05
    mass = torch.trapezoid(torch.trapezoid(density, grid, dim=1), grid)
    assert abs(float(mass) - 1.0) < 1e-3


# -- the Euler link ----------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 4, 16])
def test_euler_steps_of_the_field_are_the_layers(layers: int) -> None:
    flow = random_planar(3, layers, seed=layers, scale=3.0)
    field = flow.as_field()
    assert isinstance(field, PlanarVelocityField) and field.dim == 3
    continuous = euler_cnf(flow)
    z = points(50, 3)
    with torch.no_grad():
        torch.testing.assert_close(continuous.inverse(z), flow.inverse(z), atol=1e-10, rtol=0)
        assert continuous.stats.nfe_forward == layers
        ts = [k / layers for k in range(layers + 1)]
        path = flow.trajectory(z, ts)
        assert path.shape == (layers + 1, 50, 3)
        assert flow.stats.nfe_forward == layers
        torch.testing.assert_close(continuous.trajectory(z, ts), path, atol=1e-10, rtol=0)
        # Off-grid times give the positions after floor(t K) layers.
        torch.testing.assert_close(flow.trajectory(z, [0.999, 0.0])[1], z, atol=0, rtol=0)
        torch.testing.assert_close(flow.trajectory(z, [0.999])[0], path[-2], atol=0, rtol=0)
        # One time per sample picks each sample's layer (the same numbers up to float64 rounding:
        # the per-sample path sums in another order, and on some CPUs the last bit differs).
        t = torch.tensor([0.0, 1.0], dtype=DTYPE).repeat(25)
        per_sample = field(t, z)
        torch.testing.assert_close(per_sample[0::2], field(0.0, z)[0::2], atol=1e-14, rtol=0)
        torch.testing.assert_close(per_sample[1::2], field(1.0, z)[1::2], atol=1e-14, rtol=0)
        if layers > 1:  # the first and last layers do differ
            assert (field(0.0, z) - field(1.0, z)).abs().max() > 1e-3


def _smooth_field(t: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """A fixed smooth time-dependent planar field: (w(t), b(t), u_hat(t))."""
    w = torch.tensor([math.cos(2 * t) + 1.0, math.sin(3 * t)], dtype=DTYPE)
    b = 0.5 * math.sin(2 * math.pi * t)
    u_hat = torch.tensor([1.5 * math.cos(t), t - 1.0], dtype=DTYPE)
    return w, b, u_hat


def test_euler_density_gap_shrinks_like_one_over_k() -> None:
    z = points(2000, 2)
    gaps = {}
    for layers in (2, 4, 8, 16, 32, 64):
        flow = PlanarFlow(2, layers).to(DTYPE)
        for k in range(layers):
            w, b, u_hat = _smooth_field(k / layers)
            flow.set_layer(k, w, b, u_hat / layers)
        with torch.no_grad():
            x, log_prob = flow.inverse_and_log_prob(z)
            x_euler, log_prob_euler = euler_cnf(flow).inverse_and_log_prob(z)
        torch.testing.assert_close(x_euler, x, atol=1e-12, rtol=0)
        # Euler replaces log(1 + s) by s per layer: the gap is s - log(1 + s) >= 0.
        gap = log_prob - log_prob_euler
        assert gap.min() >= -1e-12
        gaps[layers] = float(gap.mean())
    # Measured: 0.213, 0.0932, 0.0424, 0.0200, 0.00971, 0.00478 (K * gap -> ~0.30).
    ks = sorted(gaps)
    for small, large in zip(ks[:-1], ks[1:], strict=True):
        assert 1.8 < gaps[small] / gaps[large] < 2.5, gaps
    assert gaps[64] < gaps[2] / 32, gaps
    assert 0.25 < 64 * gaps[64] < 0.35, gaps


# -- training ----------------------------------------------------------------------------------
def test_planar_flow_trains_on_a_shifted_gaussian() -> None:
    torch.manual_seed(0)
    flow = PlanarFlow(2, 8).to(DTYPE)
    mean = torch.tensor([2.0, -1.0], dtype=DTYPE)
    data = points(512, 2, seed=2) * torch.tensor([0.5, 1.0], dtype=DTYPE) + mean
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    with torch.no_grad():
        before = -flow.log_prob(data).mean().item()
    for _ in range(200):
        optimizer.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = -flow.log_prob(data).mean().item()
    # The target's entropy is log(2 pi e) + log(0.5) = 2.14; the start is near 8 (seed 0).
    assert after < before - 1.5, (before, after)
    assert after < 2.6
    w, _, u_hat = flow.layer_parameters()
    assert ((w * u_hat).sum(-1) > -1).all()


# -- surface and errors ------------------------------------------------------------------------
def test_surface_sample_config_and_stats() -> None:
    flow = random_planar(2, 5, seed=11)
    assert flow.kind == "planar"
    assert flow.config() == {"kind": "planar", "dim": 2, "layers": 5, "activation": "tanh"}
    samples = flow.sample(7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (7, 2) and samples.dtype == DTYPE
    assert flow.stats.nfe_forward == 5 and flow.stats.solve == "sampling"
    x, log_prob = flow.sample_and_log_prob(7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, samples, atol=0, rtol=0)
    torch.testing.assert_close(flow.log_prob(x.detach()), log_prob, atol=1e-10, rtol=0)
    x_sum = log_prob.sum()
    x_sum.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow.parameters())
    dist = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=DTYPE), torch.eye(2, dtype=DTYPE))
    other = PlanarFlow(2, 3, base=dist).to(DTYPE)
    assert other.sample(4).shape == (4, 2)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"dim must be a positive int, got 0"):
        PlanarFlow(0, 3)
    with pytest.raises(ValueError, match=r"layers must be a positive int, got 2\.5"):
        PlanarFlow(2, 2.5)
    with pytest.raises(ValueError, match=r"layers must be a positive int, got True"):
        PlanarFlow(2, True)
    with pytest.raises(ValueError, match=r"unknown activation 'relu'"):
        PlanarFlow(2, 3, activation="relu")
    with pytest.raises(TypeError, match=r"base must have log_prob and sample"):
        PlanarFlow(2, 3, base=object())
    flow = random_planar(2, 3)
    with pytest.raises(ValueError, match=r"x must have 2 columns"):
        flow.log_prob(torch.zeros(4, 3, dtype=DTYPE))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        flow.transform([[0.0, 0.0]])
    with pytest.raises(ValueError, match=r"z must be a batch of shape"):
        flow.inverse(torch.zeros(2, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"x0 must have 2 columns"):
        flow.trajectory(torch.zeros(1, 1, dtype=DTYPE), [0.5])
    with pytest.raises(ValueError, match=r"ts must lie in \[0, 1\]"):
        flow.trajectory(torch.zeros(1, 2, dtype=DTYPE), [0.5, 1.5])
    with pytest.raises(ValueError, match=r"ts must be a non-empty"):
        flow.trajectory(torch.zeros(1, 2, dtype=DTYPE), [])
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\], got -0\.5"):
        flow.log_prob(torch.zeros(1, 2, dtype=DTYPE), t=-0.5)
    with pytest.raises(ValueError, match=r"n must be a positive int, got 0"):
        flow.sample(0)
    with pytest.raises(ValueError, match=r"w \. u_hat must exceed -1"):
        flow.set_layer(0, torch.tensor([1.0, 0.0]), 0.0, torch.tensor([-1.0, 0.0]))
    with pytest.raises(ValueError, match=r"w must be non-zero"):
        flow.set_layer(0, torch.zeros(2), 0.0, torch.ones(2))
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 3\), got 3"):
        flow.set_layer(3, torch.ones(2), 0.0, torch.ones(2))
    with pytest.raises(TypeError, match=r"flow must be a PlanarFlow"):
        PlanarVelocityField(torch.nn.Linear(2, 2))
