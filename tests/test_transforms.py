"""Preprocessing transforms and the wrapped flow: log|det| against autograd, round trips,
densities integrating to 1 and bits/dim against a hand computation (float64, fixed seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid
from torch import nn

import cnf
from cnf.losses import flow_matching_loss
from cnf.transforms import (
    Compose,
    Dequantize,
    Logit,
    Standardize,
    TransformedFlow,
    Whiten,
    bits_per_dim,
    build_transform,
)

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit_data(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, dtype=F64, generator=gen(seed)) * 0.9 + 0.05


def autograd_logdet(transform: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """log|det| of each sample's Jacobian from torch.autograd.functional.jacobian."""
    out = []
    for row in x:

        def f(flat: torch.Tensor, row: torch.Tensor = row) -> torch.Tensor:
            y, _ = transform(flat.reshape(1, *row.shape), generator=gen(seed))
            return y.flatten()

        jac = torch.autograd.functional.jacobian(f, row.flatten())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def fitted_standardize(shape: tuple[int, ...], pooled: tuple[int, ...] = ()) -> Standardize:
    data = torch.randn((200, *shape), dtype=F64, generator=gen(1)) * 3 + 2
    return Standardize.fit(data, pooled)


def fitted_whiten(shape: tuple[int, ...]) -> Whiten:
    size = int(np.prod(shape))
    mixing = torch.randn(size, size, dtype=F64, generator=gen(2))
    data = (torch.randn(300, size, dtype=F64, generator=gen(3)) @ mixing.T + 1.0).reshape(300, *shape)
    return Whiten.fit(data)


def integer_data(n: int, dim: int, levels: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, levels, (n, dim), generator=gen(seed)).to(F64)


TRANSFORMS = {
    "standardize": (lambda: fitted_standardize((3,)), (5, 3)),
    "standardize_image_per_channel": (lambda: fitted_standardize((2, 3, 3), (2, 3)), (3, 2, 3, 3)),
    "logit": (lambda: Logit(0.05), (5, 3)),
    "logit_alpha0_image": (lambda: Logit(0.0), (3, 2, 2, 2)),
    "compose": (lambda: Compose(Logit(1e-3), fitted_standardize((4,))), (5, 4)),
    "whiten": (lambda: fitted_whiten((3,)), (5, 3)),
    "whiten_image": (lambda: fitted_whiten((2, 2, 2)), (3, 2, 2, 2)),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_log_abs_det_matches_autograd_jacobian(name: str) -> None:
    make, shape = TRANSFORMS[name]
    transform = make()
    x = unit_data(shape)
    _, logdet = transform(x)
    assert logdet.shape == (shape[0],)
    torch.testing.assert_close(logdet, autograd_logdet(transform, x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_inverse_undoes_forward(name: str) -> None:
    make, shape = TRANSFORMS[name]
    transform = make()
    x = unit_data(shape, seed=3)
    y, _ = transform(x)
    assert y.shape == x.shape
    torch.testing.assert_close(transform.inverse(y), x, atol=1e-12, rtol=1e-12)


def test_dequantize_log_abs_det_round_trip_and_range() -> None:
    transform = Dequantize(levels=5, low=-1.0, step=0.5)
    x = -1.0 + 0.5 * integer_data(6, 3, levels=5).reshape(6, 3)
    y, logdet = transform(x, generator=gen(2))
    assert bool(((y >= 0) & (y < 1)).all())
    torch.testing.assert_close(logdet, torch.full((6,), -3 * math.log(2.5), dtype=F64))
    torch.testing.assert_close(logdet, autograd_logdet(transform, x), atol=1e-12, rtol=0)
    assert torch.equal(transform.inverse(y), x)  # quantising returns the very grid values
    images = integer_data(4, 12, levels=5).reshape(4, 3, 2, 2)
    y, logdet = transform(-1.0 + 0.5 * images)
    assert y.shape == images.shape and torch.allclose(logdet, torch.tensor(-12 * math.log(2.5), dtype=F64))


def test_standardize_uses_training_statistics_per_channel() -> None:
    data = torch.randn(50, 2, 4, 4, dtype=F64, generator=gen(0)) * torch.tensor(
        [1.0, 5.0], dtype=F64
    ).reshape(1, 2, 1, 1)
    transform = Standardize.fit(data, pooled_dims=(2, 3))
    assert transform.mean.shape == (2, 1, 1)
    channel = data[:, 1].flatten()
    torch.testing.assert_close(transform.mean[1, 0, 0], channel.mean())
    torch.testing.assert_close(transform.scale[1, 0, 0], channel.std(correction=0))
    y, _ = transform(data)
    torch.testing.assert_close(y[:, 1].std(correction=0), torch.tensor(1.0, dtype=F64))


def test_whiten_gives_identity_covariance_on_training_data() -> None:
    mixing = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [0.3, -0.2, 3.0]], dtype=F64)
    data = torch.randn(500, 3, dtype=F64, generator=gen(0)) @ mixing.T + 4.0
    whiten = Whiten.fit(data)
    y, logdet = whiten(data)
    torch.testing.assert_close(y.mean(0), torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cov(y.T, correction=0), torch.eye(3, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(whiten.matrix, whiten.matrix.T)  # ZCA: symmetric
    # log|det W| = -1/2 log det Cov: a Gaussian in whitened space is the data's Gaussian fit.
    cov = torch.cov(data.T, correction=0)
    torch.testing.assert_close(logdet[0], -0.5 * torch.logdet(cov))
    copy = build_transform(whiten.config())
    torch.testing.assert_close(copy(data)[0], y)
    with pytest.raises(ValueError, match=r"does not fit Whiten statistics of samples shaped \(3,\)"):
        whiten(torch.zeros(2, 4, dtype=F64))


def test_whiten_columns_on_very_different_scales_float32() -> None:
    # Correlated columns with standard deviations 1e-3 ... 1e3 (as in breast cancer): the
    # covariance's eigenvalues span 1e13, so a floor relative to the largest would flatten every
    # small-scale direction; the correlation matrix is whitened instead (ZCA-cor).
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.3, 0.0], [0.5, 0.5, 0.7]], dtype=F64)
    data64 = (torch.randn(2000, 3, dtype=F64, generator=gen(1)) @ mixing.T) * torch.tensor(
        [1e-3, 1.0, 1e3], dtype=F64
    )
    data = data64.float()
    whiten = Whiten.fit(data)
    y, logdet = whiten(data)
    torch.testing.assert_close(
        torch.cov(y.double().T, correction=0), torch.eye(3, dtype=F64), atol=1e-4, rtol=0
    )
    # Still a valid change of variables: log|det| of the applied matrix, = -1/2 log det Cov.
    torch.testing.assert_close(
        logdet[0].double(), -0.5 * torch.logdet(torch.cov(data64.T, correction=0)), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(whiten.inverse(y), data, atol=1e-6, rtol=1e-4)


def test_constant_column_gets_scale_one_and_a_warning() -> None:
    data = torch.randn(30, 3, dtype=F64, generator=gen(0))
    data[:, 1] = 7.0
    with pytest.warns(UserWarning, match=r"constant in the training data \(index \[1\]\)"):
        transform = Standardize.fit(data)
    assert transform.scale[1] == 1.0
    y, logdet = transform(data)
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(logdet).all())
    assert torch.equal(y[:, 1], torch.zeros(30, dtype=F64))


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"x must lie in the open interval"):
        Logit(0.05)(torch.tensor([[1.2, 0.5]], dtype=F64))
    with pytest.raises(ValueError, match=r"x must take the values .* got 0.5"):
        Dequantize(levels=4)(torch.tensor([[0.5, 1.0]], dtype=F64))
    with pytest.raises(ValueError, match=r"x must take the values .* got 4.0"):
        Dequantize(levels=4)(torch.tensor([[4.0]], dtype=F64))
    with pytest.raises(ValueError, match=r"levels must be an int >= 2, got 1"):
        Dequantize(levels=1)
    with pytest.raises(ValueError, match=r"alpha must be a float in \[0, 0.5\), got 0.5"):
        Logit(0.5)
    with pytest.raises(ValueError, match=r"does not fit Standardize statistics of shape \(3,\)"):
        fitted_standardize((3,))(torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"x must be a non-empty batch of shape \(n, \.\.\.\)"):
        Logit()(torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match=r"transforms\[1\] must be a cnf.transforms.Transform"):
        Compose(Logit(), "standardize")  # type: ignore[arg-type]


def test_config_rebuilds_the_same_map() -> None:
    transform = Compose(Dequantize(17), Logit(0.05), fitted_standardize((3,)))
    copy = build_transform(transform.config())
    x = integer_data(4, 3, levels=17)
    torch.testing.assert_close(copy(x, generator=gen(5)), transform(x, generator=gen(5)))
    with pytest.raises(ValueError, match=r"unknown transform kind 'squeeze'"):
        build_transform({"kind": "squeeze"})


def small_cnf(dim: int = 2, seed: int = 0) -> cnf.CNF:
    torch.manual_seed(seed)
    field = cnf.MLPField(dim, hidden=(16, 16))
    return cnf.CNF(field, solver=cnf.Solver(method="dopri5", rtol=1e-8, atol=1e-8)).to(F64)


def test_preprocessed_2d_density_integrates_to_one() -> None:
    """Data in [0, 1]^2 modelled through Logit then Standardize: the density of x itself."""
    standardize = Standardize(torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([1.5, 0.8], dtype=F64))
    logit = Logit(0.05)
    flow = TransformedFlow(small_cnf(), Compose(logit, standardize))
    low, high = logit.domain
    axis = torch.linspace(low, high, 161, dtype=F64)[1:-1]  # the open support of the model
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    with torch.no_grad():
        density = flow.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp().reshape(xx.shape)
    mass = trapezoid(trapezoid(density.numpy(), axis.numpy(), axis=1), axis.numpy())
    assert abs(mass - 1.0) < 2e-3
    # Without the log|det| of the preprocessing the same grid would not integrate to 1.
    with torch.no_grad():
        y, _ = flow.preprocess(torch.stack([xx.flatten(), yy.flatten()], 1))
        inner = flow.flow.log_prob(y).exp().reshape(xx.shape)
    assert abs(trapezoid(trapezoid(inner.numpy(), axis.numpy(), axis=1), axis.numpy()) - 1.0) > 0.5


def test_bits_per_dim_matches_hand_computation() -> None:
    levels, alpha, dim = 17, 0.05, 5
    zero_field = cnf.LinearField(torch.zeros(dim, dim, dtype=F64))
    inner = cnf.CNF(zero_field, solver=cnf.Solver(method="dopri5", rtol=1e-9, atol=1e-9))
    flow = TransformedFlow(inner, Compose(Dequantize(levels), Logit(alpha)))
    x = integer_data(8, dim, levels)
    with torch.no_grad():
        got = flow.bits_per_dim(x, generator=gen(7))
    # By hand, in numpy: the same uniform noise, the logit, a standard normal in logit space.
    u = torch.rand(x.shape, dtype=F64, generator=gen(7)).numpy()
    y = (x.numpy() + u) / levels
    s = alpha + (1 - 2 * alpha) * y
    z = np.log(s / (1 - s))
    log_q = (-0.5 * z**2 - 0.5 * np.log(2 * np.pi) + np.log(1 - 2 * alpha) - np.log(s) - np.log(1 - s)).sum(1)
    expected = -(log_q - dim * np.log(levels)) / (dim * np.log(2))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)


class UnitCube(nn.Module):
    """The uniform density on [0, 1)^D: log q = 0 there."""

    dim = 4

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros(y.shape[0], dtype=y.dtype)


def test_uniform_model_has_log2_levels_bits_and_units_do_not_matter() -> None:
    x = integer_data(6, 4, levels=17)
    uniform = TransformedFlow(UnitCube(), Dequantize(17))
    torch.testing.assert_close(uniform.bits_per_dim(x), torch.full((6,), math.log2(17), dtype=F64))
    # The same data in steps of 1/16 (pixel intensities in [0, 1]): log p changes by D log 16
    # (a density in other units), bits per dimension do not.
    scaled = TransformedFlow(UnitCube(), Dequantize(17, step=1 / 16))
    torch.testing.assert_close(
        scaled.log_prob(x / 16) - uniform.log_prob(x), torch.full((6,), 4 * math.log(16), dtype=F64)
    )
    torch.testing.assert_close(scaled.bits_per_dim(x / 16), uniform.bits_per_dim(x))
    assert bits_per_dim(torch.tensor([0.0]), 64, 1 / 16).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"must start with Dequantize, got Logit"):
        TransformedFlow(UnitCube(), Logit()).bits_per_dim(x / 17)


def test_samples_are_in_data_units_and_on_the_grid() -> None:
    flow = TransformedFlow(small_cnf(3), Compose(Dequantize(9, low=10.0, step=2.0), Logit(0.05)))
    with torch.no_grad():
        samples = flow.sample(50, generator=gen(0))
    assert samples.shape == (50, 3)
    k = (samples - 10.0) / 2.0
    assert torch.equal(k, k.round()) and bool(((k >= 0) & (k <= 8)).all())
    with torch.no_grad():
        z, delta = flow.transform(samples, generator=gen(1))
        torch.testing.assert_close(
            flow.log_prob(samples, generator=gen(1)), flow.flow.base.log_prob(z) + delta
        )


def test_checkpoint_rebuilds_the_wrapped_flow_weights_only(tmp_path) -> None:
    # float32, as load_checkpoint rebuilds flows in the default dtype
    standardize = Standardize.fit(torch.randn(40, 3, generator=gen(1)) * 2 + 1)
    flow = TransformedFlow(small_cnf(3).float(), Compose(Logit(0.05), standardize))
    path = cnf.save_checkpoint(tmp_path / "model.pt", flow)
    torch.load(path, weights_only=True)  # tensors and plain types only
    restored, _ = cnf.load_checkpoint(path)
    assert isinstance(restored, TransformedFlow)
    x = unit_data((7, 3)).float()
    with torch.no_grad():
        torch.testing.assert_close(restored.log_prob(x), flow.log_prob(x))


def test_training_objectives_see_the_preprocessed_data() -> None:
    standardize = fitted_standardize((2,))
    flow = TransformedFlow(small_cnf(), standardize)
    batch = torch.randn(32, 2, dtype=F64, generator=gen(4)) * 3 + 2
    wrapped = flow_matching_loss(flow, batch, generator=gen(9))
    direct = flow_matching_loss(flow.flow, standardize(batch)[0], generator=gen(9))
    torch.testing.assert_close(wrapped, direct)
    result = cnf.train(flow, batch, batch[:8], iters=3, batch_size=16, val_every=3, progress=False)
    assert result.step == 3 and math.isfinite(result.val_nll)
    log_prob, kinetic, jacobian = flow.regularized_log_prob(batch[:4], generator=gen(0))
    assert log_prob.shape == kinetic.shape == jacobian.shape == (4,)
