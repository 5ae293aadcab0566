"""Multi-scale CNF: squeeze, factor-out and log p bookkeeping against a brute-force Jacobian."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cnf
from cnf.multiscale import MultiScaleCNF, scale_shapes, squeeze, unsqueeze

SHAPE = (1, 4, 4)
TIGHT = cnf.Solver(rtol=1e-9, atol=1e-9)


def make_flow(scales: int = 2, seed: int = 0, divergence: str = "exact") -> MultiScaleCNF:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        flow = MultiScaleCNF(SHAPE, scales=scales, hidden=(4,), activation="tanh", divergence=divergence, solver=TIGHT)
    return flow.double()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_squeeze_is_a_permutation_and_unsqueeze_inverts_it() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    y = squeeze(x)
    assert y.shape == (2, 12, 2, 3)
    assert torch.equal(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    assert torch.equal(unsqueeze(y), x)
    # one 2x2 patch of channel 0 becomes four channels at the same place
    assert y[0, 0:4, 0, 0].tolist() == [x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 1, 0], x[0, 0, 1, 1]]


def test_identity_blocks_give_the_base_density() -> None:
    flow = make_flow(scales=3)
    flow.solver = cnf.Solver(method="rk4", step_size=0.5)  # exact whatever the solver: u = 0
    with torch.no_grad():
        for p in flow.parameters():
            p.zero_()  # every velocity field is then 0: each block is the identity
        x = images(5)
        expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum((1, 2, 3))
        torch.testing.assert_close(flow.log_prob(x), expected)
        z, delta = flow.transform(x)
        assert torch.equal(delta, torch.zeros(5, dtype=torch.float64))
        torch.testing.assert_close(flow.inverse(z), x)


@pytest.mark.parametrize("scales", [1, 3])
def test_log_prob_equals_base_plus_log_det_of_the_whole_map(scales: int) -> None:
    """log p(x) = log N(z(x)) + log|det dz/dx|, the Jacobian of the composite map by autograd."""
    flow = make_flow(scales)
    flow.solver = cnf.Solver(rtol=1e-7, atol=1e-7)
    x = images(2)
    with torch.no_grad():
        log_p = flow.log_prob(x)
        z = flow.transform(x)[0]
    d = x[0].numel()
    # the samples do not interact, so one batched Jacobian holds each sample's block
    jac = torch.autograd.functional.jacobian(lambda s: flow.transform(s)[0], x, vectorize=True)
    jac = jac.reshape(2, d, 2, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    expected = flow.base.log_prob(z) + torch.linalg.slogdet(jac).logabsdet
    torch.testing.assert_close(log_p, expected, rtol=1e-5, atol=1e-5)


def test_round_trip_image_base_image_and_sampling() -> None:
    flow = make_flow(scales=2)
    x = images(3)
    with torch.no_grad():
        z, _ = flow.transform(x)
        assert z.shape == x.shape
        torch.testing.assert_close(flow.inverse(z), x, rtol=1e-6, atol=1e-6)
        samples = flow.sample(4, generator=torch.Generator().manual_seed(0))
        assert samples.shape == (4, *SHAPE)
        path = flow.trajectory(z, [0.0, 0.5, 1.0])
        assert path.shape == (3, 3, *SHAPE)
        torch.testing.assert_close(path[-1], x, rtol=1e-6, atol=1e-6)
        # at t = 0 no block has run: the packed latent laid out as an image (a permutation of z)
        assert torch.equal(path[0].flatten(1).sort(1).values, z.flatten(1).sort(1).values)


def test_hutchinson_multiscale_trains_and_counts_evaluations() -> None:
    flow = make_flow(scales=2, divergence="hutchinson")
    flow.solver = cnf.Solver(method="rk4", step_size=0.5)
    loss = -flow.log_prob(images(4)).mean()
    loss.backward()
    assert all(p.grad is not None for p in flow.parameters())
    assert flow.stats.nfe_forward == 2 * 2 * 4  # two blocks, two rk4 steps of four evaluations


def test_shape_errors_name_the_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(1, 7, 8\) cannot be squeezed 1 times"):
        MultiScaleCNF((1, 7, 8), scales=2)
    with pytest.raises(ValueError, match=r"even H and W; got shape \(2, 1, 5, 4\)"):
        squeeze(torch.zeros(2, 1, 5, 4))
    flow = make_flow()
    with pytest.raises(ValueError, match=r"shape \(n, 1, 4, 4\); got shape \(3, 3, 4, 4\)"):
        flow.log_prob(torch.zeros(3, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\), got \(16,\)"):
        MultiScaleCNF((16,))
    assert scale_shapes((1, 28, 28), 3) == [(1, 28, 28), (2, 14, 14), (4, 7, 7)]


def test_multiscale_checkpoint_round_trip(tmp_path: Path) -> None:
    flow = make_flow(scales=2)
    cnf.save_checkpoint(tmp_path / "m.pt", flow)
    restored, _ = cnf.load_checkpoint(tmp_path / "m.pt")
    assert isinstance(restored, MultiScaleCNF) and restored.config() == flow.config()
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(restored.double().log_prob(x), flow.log_prob(x))
