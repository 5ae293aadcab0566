"""Tests for cnf.data: toy samplers, the 8gaussians density, loading, splitting, energies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid

from cnf.data import (
    ENERGIES,
    TOY_DATASETS,
    check_batch,
    eight_gaussians_log_prob,
    energy,
    load_data,
    sample_toy,
    split,
    target_log_density,
    true_log_prob,
)

# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("name", TOY_DATASETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 500])
def test_sampler_shape_dtype(name: str, dtype: torch.dtype, n: int) -> None:
    x = sample_toy(name, n, seed=0, dtype=dtype)
    assert isinstance(x, torch.Tensor)
    assert x.shape == (n, 2)
    assert x.dtype == dtype
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_sampler_seeding(name: str) -> None:
    a = sample_toy(name, 256, seed=3, dtype=torch.float64)
    b = sample_toy(name, 256, seed=3, dtype=torch.float64)
    c = sample_toy(name, 256, seed=4, dtype=torch.float64)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # seed=None draws fresh points
    assert not torch.equal(sample_toy(name, 64), sample_toy(name, 64))


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_sampler_extent(name: str) -> None:
    x = sample_toy(name, 20_000, seed=1, dtype=torch.float64)
    # FFJORD's toy data all live roughly in [-4, 4]^2.
    assert x.abs().max() < 6.0
    assert x.std(dim=0).min() > 0.3


def test_eight_gaussians_structure() -> None:
    x = sample_toy("8gaussians", 80_000, seed=0, dtype=torch.float64)
    assert torch.allclose(x.mean(dim=0), torch.zeros(2, dtype=torch.float64), atol=0.03)
    # every point is near one of 8 centres on the circle of radius 4 / 1.414
    radius = x.norm(dim=1)
    assert abs(radius.mean().item() - 4.0 / 1.414) < 0.05
    angles = torch.atan2(x[:, 1], x[:, 0])
    sector = torch.round(angles / (math.pi / 4)).remainder(8).long()
    counts = torch.bincount(sector, minlength=8).double() / x.shape[0]
    assert torch.allclose(counts, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.01)
    # within-component spread is 0.5 / 1.414 in the radial direction
    assert abs(radius.std().item() - 0.5 / 1.414) < 0.01


def test_moons_mean_and_extent() -> None:
    n = 100_000
    x = sample_toy("moons", n, seed=0, dtype=torch.float64).numpy()
    # make_moons has mean (0.5, 0.25); FFJORD maps x -> 2x + (-1, -0.2)
    np.testing.assert_allclose(x.mean(axis=0), [0.0, 0.3], atol=0.02)
    # reference: sklearn's make_moons construction (linspace half circles + noise 0.1)
    rng = np.random.default_rng(123)
    t = np.linspace(0.0, np.pi, n // 2)
    outer = np.stack([np.cos(t), np.sin(t)], axis=1)
    inner = np.stack([1 - np.cos(t), 1 - np.sin(t) - 0.5], axis=1)
    ref = np.concatenate([outer, inner]) + rng.normal(scale=0.1, size=(n, 2))
    ref = ref * 2 + np.array([-1.0, -0.2])
    qs = [0.01, 0.1, 0.5, 0.9, 0.99]
    np.testing.assert_allclose(np.quantile(x, qs, axis=0), np.quantile(ref, qs, axis=0), atol=0.03)


def test_rings_and_circles_radii() -> None:
    r = sample_toy("rings", 40_000, seed=0, dtype=torch.float64).norm(dim=1).numpy()
    for radius in (0.75, 1.5, 2.25, 3.0):
        assert np.mean(np.abs(r - radius) < 0.25) > 0.2
    r = sample_toy("circles", 40_000, seed=0, dtype=torch.float64).norm(dim=1).numpy()
    for radius in (1.5, 3.0):
        assert np.mean(np.abs(r - radius) < 0.5) > 0.4


def test_checkerboard_cells() -> None:
    x = sample_toy("checkerboard", 20_000, seed=0, dtype=torch.float64)
    assert x.min() >= -4.0 and x.max() <= 4.0
    cell = torch.floor(x / 2.0).long()
    # occupied cells are those with an even coordinate sum (a checkerboard)
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()


# ----------------------------------------------------------------------------- true density


def test_eight_gaussians_log_prob_integrates_to_one() -> None:
    grid = torch.linspace(-5.0, 5.0, 801, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx, yy], dim=-1)
    density = eight_gaussians_log_prob(pts).exp().numpy()
    g = grid.numpy()
    total = trapezoid(trapezoid(density, g, axis=1), g)
    assert abs(total - 1.0) < 1e-3


def test_eight_gaussians_entropy() -> None:
    x = sample_toy("8gaussians", 200_000, seed=0, dtype=torch.float64)
    nll = -eight_gaussians_log_prob(x).mean().item()
    std = 0.5 / 1.414
    entropy = math.log(8.0) + 1.0 + math.log(2.0 * math.pi * std**2)
    assert abs(entropy - 2.838) < 1e-3
    assert abs(nll - entropy) < 0.02


def test_eight_gaussians_log_prob_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    x = sample_toy("8gaussians", 50, seed=2, dtype=torch.float64)
    std = 0.5 / 1.414
    angles = [0, math.pi, math.pi / 2, -math.pi / 2, math.pi / 4, -math.pi / 4]
    angles += [3 * math.pi / 4, -3 * math.pi / 4]
    means = [4.0 / 1.414 * np.array([math.cos(a), math.sin(a)]) for a in angles]
    ref = np.log(sum(stats.multivariate_normal(m, std**2 * np.eye(2)).pdf(x.numpy()) for m in means) / 8)
    np.testing.assert_allclose(eight_gaussians_log_prob(x).numpy(), ref, rtol=1e-10)
    assert eight_gaussians_log_prob(x).dtype == torch.float64
    assert torch.equal(true_log_prob("8gaussians", x), eight_gaussians_log_prob(x))


def test_true_log_prob_errors() -> None:
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"'moons'.*no closed-form density.*8gaussians"):
        true_log_prob("moons", x)
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'"):
        true_log_prob("nope", x)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 2\); got shape \(3, 3\)"):
        eight_gaussians_log_prob(torch.zeros(3, 3))


# ----------------------------------------------------------------------------- sampler errors


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"name": "moon", "n": 5}, ValueError, r"unknown dataset 'moon'; choose one of moons"),
        ({"name": "moons", "n": 0}, ValueError, r"n must be a positive int, got 0"),
        ({"name": "moons", "n": -3}, ValueError, r"n must be a positive int, got -3"),
        ({"name": "moons", "n": 2.5}, TypeError, r"n must be a positive int, got 2\.5"),
        ({"name": "moons", "n": True}, TypeError, r"n must be a positive int, got True"),
        ({"name": "moons", "n": 5, "seed": -1}, ValueError, r"seed .* got -1"),
        ({"name": "moons", "n": 5, "seed": "a"}, TypeError, r"seed .* got 'a'"),
        ({"name": "moons", "n": 5, "dtype": torch.int64}, TypeError, r"dtype .* torch\.int64"),
    ],
)
def test_sample_toy_errors(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        sample_toy(**kwargs)


# ----------------------------------------------------------------------------- check_batch


def test_check_batch_returns_input() -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    assert check_batch(x) is x
    assert check_batch(x, dim=3) is x


@pytest.mark.parametrize(
    ("x", "kwargs", "exc", "match"),
    [
        (np.zeros((2, 2)), {}, TypeError, r"x must be a torch\.Tensor, got ndarray"),
        (torch.zeros(2, 2, dtype=torch.long), {}, TypeError, r"x must have a floating dtype"),
        (
            torch.zeros(2),
            {},
            ValueError,
            r"x must be a batch of shape \(n, dim\); got shape \(2,\) — use x\.unsqueeze\(0\)",
        ),
        (torch.zeros(2, 2, 2), {}, ValueError, r"got shape \(2, 2, 2\)"),
        (torch.zeros(0, 2), {}, ValueError, r"x must be non-empty; got shape \(0, 2\)"),
        (torch.zeros(3, 2), {"dim": 3}, ValueError, r"x must have 3 columns.*got shape \(3, 2\)"),
        (torch.zeros(3, 2), {"dim": 0}, ValueError, r"dim must be a positive int, got 0"),
        (torch.zeros(3, 2), {"name": "z0", "dim": 4}, ValueError, r"z0 must have 4 columns"),
    ],
)
def test_check_batch_errors(x: object, kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        check_batch(x, **kwargs)  # type: ignore[arg-type]


def test_check_batch_non_finite() -> None:
    x = torch.zeros(5, 2)
    x[2, 1] = float("nan")
    x[3, 0] = float("inf")
    x[4, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x must be finite; got 2 NaN and 1 Inf .*row 2"):
        check_batch(x)


# ----------------------------------------------------------------------------- load_data


def test_load_data_name_array_tensor() -> None:
    x = load_data("pinwheel", n=100, seed=5)
    assert x.shape == (100, 2) and x.dtype == torch.float32
    assert torch.equal(x, sample_toy("pinwheel", 100, seed=5))
    arr = np.arange(12, dtype=np.int64).reshape(6, 2)
    y = load_data(arr, dtype=torch.float64)
    assert y.dtype == torch.float64
    np.testing.assert_array_equal(y.numpy(), arr)
    t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z = load_data(t, dtype=torch.float64)
    assert torch.equal(z, t.detach()) and not z.requires_grad


def test_load_data_npy_round_trip(tmp_path) -> None:
    arr = np.random.default_rng(0).normal(size=(50, 3))
    path = tmp_path / "data.npy"
    np.save(path, arr)
    for source in (path, str(path)):
        x = load_data(source, dtype=torch.float64)
        np.testing.assert_array_equal(x.numpy(), arr)


@pytest.mark.parametrize("header", [True, False])
def test_load_data_csv_round_trip(tmp_path, header: bool) -> None:
    arr = np.random.default_rng(1).normal(size=(20, 2))
    path = tmp_path / "data.csv"
    np.savetxt(path, arr, delimiter=",", header="x,y" if header else "", comments="")
    x = load_data(path, dtype=torch.float64)
    np.testing.assert_allclose(x.numpy(), arr, rtol=1e-15, atol=0)


def test_load_data_csv_single_column(tmp_path) -> None:
    path = tmp_path / "one.csv"
    path.write_text("value\n1.0\n2.0\n3.0\n")
    x = load_data(path, dtype=torch.float64)
    assert x.shape == (3, 1)


def test_load_data_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.npy"):
        load_data(str(tmp_path / "missing.npy"))
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        load_data(tmp_path / "missing.csv")
    bad = tmp_path / "data.txt"
    bad.write_text("1,2\n")
    with pytest.raises(ValueError, match=r"unknown file extension '\.txt'"):
        load_data(bad)
    with pytest.raises(ValueError, match=r"unknown dataset 'moon'"):
        load_data("moon")
    with pytest.raises(TypeError, match=r"source must be .* got list"):
        load_data([[1.0, 2.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"batch of shape \(n, d\); got shape \(3,\)"):
        load_data(np.zeros(3))
    one_d = tmp_path / "one_d.npy"
    np.save(one_d, np.zeros(4))
    with pytest.raises(ValueError, match=r"batch of shape \(n, d\); got shape \(4,\)"):
        load_data(one_d)
    with pytest.raises(ValueError, match=r"data must be non-empty; got shape \(0, 2\)"):
        load_data(np.zeros((0, 2)))
    arr = np.zeros((6, 2))
    arr[4, 0] = np.nan
    arr[5, 1] = np.inf
    with pytest.raises(ValueError, match=r"data must be finite; got 1 NaN and 1 Inf .*row 4"):
        load_data(arr)
    text = tmp_path / "text.csv"
    text.write_text("a,b\n1,x\n")
    with pytest.raises(ValueError, match=r"text\.csv.*not a numeric"):
        load_data(text)
    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.csv.* is empty"):
        load_data(empty)
    with pytest.raises(TypeError, match=r"dtype must be a floating torch\.dtype"):
        load_data("moons", dtype=torch.int32)


# ----------------------------------------------------------------------------- split


def test_split_partitions_rows() -> None:
    data = torch.arange(200, dtype=torch.float64).reshape(100, 2)
    train, val, test = split(data)
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    rows = torch.cat([train, val, test])[:, 0].sort().values
    assert torch.equal(rows, data[:, 0])
    again = split(data)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    other = split(data, seed=1)
    assert not torch.equal(train, other[0])
    a, b = split(data, fractions=(0.5, 0.5))
    assert len(a) == len(b) == 50


@pytest.mark.parametrize(
    ("fractions", "exc", "match"),
    [
        ((0.5, 0.4), ValueError, r"fractions must sum to 1, got \(0\.5, 0\.4\)"),
        ((1.2, -0.2), ValueError, r"fractions must be positive numbers, got \(1\.2, -0\.2\)"),
        ((), ValueError, r"fractions must be positive numbers, got \(\)"),
        (("a", "b"), TypeError, r"fractions must be a sequence of numbers"),
        ((0.98, 0.01, 0.01), ValueError, r"leave an empty part"),
    ],
)
def test_split_errors(fractions: tuple, exc: type[Exception], match: str) -> None:
    data = torch.zeros(10, 2)
    with pytest.raises(exc, match=match):
        split(data, fractions=fractions)


# ----------------------------------------------------------------------------- energies


@pytest.mark.parametrize("name", ENERGIES)
def test_energies_finite_and_differentiable(name: str) -> None:
    z = torch.randn(500, 2, dtype=torch.float64, requires_grad=True) * 3
    u = energy(name, z)
    assert u.shape == (500,)
    assert torch.isfinite(u).all()
    (grad,) = torch.autograd.grad(u.sum(), z)
    assert torch.isfinite(grad).all()
    # far-away points do not overflow (logsumexp form)
    far = torch.tensor([[50.0, -50.0], [-40.0, 30.0]], dtype=torch.float64)
    assert torch.isfinite(energy(name, far)).all()
    log_density = target_log_density(name.upper())
    assert torch.equal(log_density(z.detach()), -energy(name, z.detach()))


def test_u1_minimum_on_ring() -> None:
    grid = torch.linspace(-4.0, 4.0, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx, yy], dim=-1).reshape(-1, 2)
    u = energy("u1", pts)
    best = pts[u.argmin()]
    assert abs(best.norm().item() - 2.0) < 0.05
    # along every ray the minimum over the radius is near 2 (the two modes at z1 = +-2
    # pull it slightly outwards off the axes)
    radii = torch.linspace(0.0, 4.0, 801, dtype=torch.float64)
    for angle in torch.linspace(0.0, 2 * math.pi, 12, dtype=torch.float64):
        ray = radii[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)])
        r_min = radii[energy("u1", ray).argmin()].item()
        assert 1.9 < r_min < 2.4


def test_u2_minimum_on_sine() -> None:
    z1 = torch.linspace(-4.0, 4.0, 50, dtype=torch.float64)
    z = torch.stack([z1, torch.sin(2 * math.pi * z1 / 4)], dim=1)
    assert torch.allclose(energy("u2", z), torch.zeros(50, dtype=torch.float64))


def test_energy_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown energy 'u5'; choose one of u1, u2, u3, u4"):
        energy("u5", torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"unknown energy 'u9'"):
        target_log_density("u9")
    with pytest.raises(ValueError, match=r"z must have shape \(\.\.\., 2\); got shape \(4, 3\)"):
        energy("u1", torch.zeros(4, 3))
    with pytest.raises(TypeError, match=r"z must be a torch\.Tensor, got list"):
        energy("u1", [[0.0, 0.0]])  # type: ignore[arg-type]


def _printed_sine_energy(name: str, z: np.ndarray) -> np.ndarray:
    """U2-U4 exactly as printed in Rezende & Mohamed (2015), Table 1 (no wall)."""
    z1, z2 = z[:, 0], z[:, 1]
    w1 = np.sin(2 * np.pi * z1 / 4)
    w2 = 3 * np.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    w3 = 3 / (1 + np.exp(-(z1 - 1) / 0.3))
    if name == "u2":
        return 0.5 * ((z2 - w1) / 0.4) ** 2
    if name == "u3":
        return -np.log(np.exp(-0.5 * ((z2 - w1) / 0.35) ** 2) + np.exp(-0.5 * ((z2 - w1 + w2) / 0.35) ** 2))
    return -np.log(np.exp(-0.5 * ((z2 - w1) / 0.4) ** 2) + np.exp(-0.5 * ((z2 - w1 + w3) / 0.35) ** 2))


@pytest.mark.parametrize("name", ["u2", "u3", "u4"])
def test_sine_energies_are_the_printed_ones_inside_the_square_plus_a_wall_outside(name: str) -> None:
    # As printed, exp(-U2..U4) does not decay along z1 and log Z is infinite; cnf adds a
    # Gaussian wall 0.5 * ((|z1| - 4) / 0.4)**2 outside |z1| <= 4 and nothing inside.
    z1 = np.array([-4.0, -2.5, 0.0, 1.0, 3.9, 4.0, 4.4, -4.8, 6.0])
    z = np.stack([z1, 0.7 * np.sin(z1)], axis=1)
    wall = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 2.0, 12.5])
    expected = _printed_sine_energy(name, z) + wall
    got = energy(name, torch.tensor(z, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
