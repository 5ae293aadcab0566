"""Convolutional velocity field and image-shaped CNF states, checked in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import cnf
from cnf.data import check_batch
from cnf.divergence import exact_divergence_batched, exact_divergence_loop, hutchinson_divergence
from cnf.fields import ConvField
from cnf.losses import make_objective

SHAPE = (2, 3, 3)


@pytest.fixture
def field() -> ConvField:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ConvField(SHAPE, hidden=(5, 4), activation="tanh").double()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def jacobian_traces(field: nn.Module, t: float, x: torch.Tensor) -> torch.Tensor:
    """Trace of each sample's (CHW x CHW) Jacobian from autograd.functional.jacobian."""
    d = x[0].numel()
    traces = []
    for sample in x:
        jac = torch.autograd.functional.jacobian(lambda s: field(t, s.unsqueeze(0))[0], sample)
        traces.append(torch.trace(jac.reshape(d, d)))
    return torch.stack(traces)


def test_conv_field_exact_divergence_is_the_jacobian_trace(field: ConvField) -> None:
    x = images(3).requires_grad_(True)
    f = field(0.3, x)
    assert f.shape == x.shape
    expected = jacobian_traces(field, 0.3, x.detach())
    torch.testing.assert_close(exact_divergence_loop(f, x, False), expected)
    torch.testing.assert_close(exact_divergence_batched(f, x, False), expected)


def test_hutchinson_mean_matches_exact_on_images(field: ConvField) -> None:
    x = images(2).requires_grad_(True)
    f = field(0.7, x)
    exact = exact_divergence_loop(f, x, False)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [hutchinson_divergence(f, x, torch.randn(x.shape, generator=gen, dtype=x.dtype), False) for _ in range(4000)]
    )
    se = draws.std(0) / draws.shape[0] ** 0.5
    assert ((draws.mean(0) - exact).abs() < 4 * se).all()


class Flattened(nn.Module):
    """The same field seen on flat vectors (n, C*H*W): the 2-D code path as an independent check."""

    def __init__(self, field: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.field, self.shape = field, shape
        self.dim = int(torch.tensor(shape).prod())

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.field(t, x.reshape(-1, *self.shape)).reshape(x.shape[0], -1)


def test_image_cnf_matches_the_flattened_cnf(field: ConvField) -> None:
    solver = cnf.Solver(rtol=1e-8, atol=1e-8)
    image_flow = cnf.CNF(field, solver=solver).double()
    flat_flow = cnf.CNF(Flattened(field, SHAPE), solver=solver).double()
    x = images(4)
    with torch.no_grad():
        log_p = image_flow.log_prob(x)
        assert log_p.shape == (4,)
        torch.testing.assert_close(log_p, flat_flow.log_prob(x.reshape(4, -1)))
        z, delta = image_flow.transform(x)
        torch.testing.assert_close(image_flow.inverse(z), x, rtol=1e-6, atol=1e-6)
        samples = image_flow.sample(5, generator=torch.Generator().manual_seed(0))
        assert samples.shape == (5, *SHAPE)
        path = image_flow.trajectory(z, [0.0, 0.5, 1.0])
        assert path.shape == (3, 4, *SHAPE)
        torch.testing.assert_close(path[-1], x, rtol=1e-6, atol=1e-6)


def test_standard_normal_on_images() -> None:
    base = cnf.StandardNormal(SHAPE)
    z = images(3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum((1, 2, 3))
    torch.testing.assert_close(base.log_prob(z), expected)
    assert base.sample((4,)).shape == (4, *SHAPE)


def test_image_shape_errors_name_the_shape(field: ConvField) -> None:
    flow = cnf.CNF(field).double()
    with pytest.raises(ValueError, match=r"x must be a non-empty batch of shape \(n, 2, 3, 3\); got shape \(4, 2, 4, 3\)"):
        flow.log_prob(torch.zeros(4, 2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(n, 2, 3, 3\); got shape \(4, 18\)"):
        check_batch(torch.zeros(4, 18), SHAPE)
    with pytest.raises(ValueError, match=r"shape \(n, 2, H, W\) for this field; got shape \(1, 3, 3, 3\)"):
        field(0.0, torch.zeros(1, 3, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\), got \(3, 3\)"):
        ConvField((3, 3))
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int, got 2"):
        ConvField(SHAPE, kernel_size=2)


@pytest.mark.parametrize(
    "objective, options",
    [("likelihood", {}), ("likelihood", {"kinetic_weight": 0.01, "jacobian_weight": 0.01}), ("ot_flow_matching", {})],
)
def test_objectives_train_an_image_flow(field: ConvField, objective: str, options: dict) -> None:
    flow = cnf.CNF(field, divergence="hutchinson", solver=cnf.Solver(method="rk4", step_size=0.25)).double()
    loss = make_objective(objective, **options)(flow, images(6))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in flow.parameters())


def test_conv_cnf_checkpoint_round_trip(field: ConvField, tmp_path: Path) -> None:
    flow = cnf.CNF(field, divergence="hutchinson").double()
    cnf.save_checkpoint(tmp_path / "c.pt", flow)
    restored, _ = cnf.load_checkpoint(tmp_path / "c.pt")
    assert isinstance(restored.field, ConvField) and restored.dim == SHAPE
    x = images(2)
    restored.double()
    torch.testing.assert_close(restored.field(0.4, x), flow.field(0.4, x))
