"""cnf.plots on tiny analytic models: images are drawn, densities integrate to 1, GIFs have frames."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread
from PIL import Image
from scipy.linalg import expm
from scipy.stats import multivariate_normal

import cnf
from cnf import plots
from cnf.cli import main as cli_main

A = np.array([[0.3, 0.5], [-0.4, 0.1]])
BOX = (-7.0, 7.0, -7.0, 7.0)


def assert_drawn(path: Path) -> None:
    """The file is a real picture: not one flat colour."""
    assert path.is_file(), path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert image[..., :3].std() > 0.05, f"{path.name} looks blank"


@pytest.fixture
def linear_flow() -> cnf.CNF:
    """u(x, t) = A x in float64: p_t = N(0, expm(tA) expm(tA)^T) exactly."""
    field = cnf.LinearField(torch.tensor(A, dtype=torch.float64))
    return cnf.CNF(field, solver=cnf.Solver(rtol=1e-6, atol=1e-6))


@pytest.fixture
def mlp_flow() -> cnf.CNF:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        field = cnf.MLPField(2, hidden=(8, 8)).double()
    return cnf.CNF(field, solver=cnf.Solver(rtol=1e-5, atol=1e-5))


@pytest.fixture
def planar_flow() -> cnf.PlanarFlow:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        flow = cnf.PlanarFlow(2, layers=4).double()
        with torch.no_grad():
            flow.u.mul_(8.0)  # visible layers
    return flow


def test_probability_path_masses_and_exact_density(linear_flow: cnf.CNF, tmp_path: Path) -> None:
    data = torch.randn(300, 2, dtype=torch.float64)
    fig = plots.plot_probability_path(
        linear_flow, data=data, bounds=BOX, resolution=71, path=tmp_path / "p.png"
    )
    assert isinstance(fig, Figure)
    assert_drawn(tmp_path / "p.png")
    assert fig.path_times == list(plots.DEFAULT_TIMES)
    assert len(fig.path_masses) == 5
    assert all(abs(m - 1) < 1e-2 for m in fig.path_masses), fig.path_masses
    assert [ax.get_title() for ax in fig.axes[:5]][2] == f"t = 0.5\nmass {fig.path_masses[2]:.3f}"
    # The panels show the true p_t: the pushforward N(0, expm(tA) expm(tA)^T).
    xs, ys, density = fig.path_densities[2]
    gx, gy = np.meshgrid(xs, ys)
    m = expm(0.5 * A)
    expected = multivariate_normal(cov=m @ m.T).pdf(np.stack([gx, gy], -1))
    np.testing.assert_allclose(density, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mlp", "planar"])
def test_probability_path_integrates_to_one(kind: str, request: pytest.FixtureRequest) -> None:
    flow = request.getfixturevalue(f"{kind}_flow")
    fig = plots.plot_probability_path(flow, (0.0, 0.3, 0.6, 1.0), bounds=BOX, resolution=61, tolerance=None)
    assert all(abs(m - 1) < 1e-2 for m in fig.path_masses), fig.path_masses


def test_planar_path_is_piecewise_constant_in_layers(planar_flow: cnf.PlanarFlow) -> None:
    # K = 4: t = 0.3 and t = 0.45 both mean 1 layer; t = 0.5 means 2.
    grids = [plots.density_grid(planar_flow, t, bounds=BOX, resolution=21)[2] for t in (0.3, 0.45, 0.5)]
    np.testing.assert_array_equal(grids[0], grids[1])
    assert not np.allclose(grids[1], grids[2])


def test_trajectories(linear_flow: cnf.CNF, planar_flow: cnf.PlanarFlow, tmp_path: Path) -> None:
    fig = plots.plot_trajectories(
        linear_flow, 50, steps=11, bounds=BOX, resolution=40, tolerance=None, path=tmp_path / "t.png"
    )
    assert_drawn(tmp_path / "t.png")
    positions = fig.trajectories
    assert positions.shape == (11, 50, 2)
    np.testing.assert_allclose(positions[-1], positions[0] @ expm(A).T, atol=1e-5)
    fig = plots.plot_trajectories(planar_flow, 20, bounds=BOX, resolution=20)
    assert fig.trajectories.shape == (5, 20, 2)  # one point per layer


def test_velocity_field(linear_flow: cnf.CNF, planar_flow: cnf.PlanarFlow, tmp_path: Path) -> None:
    fig = plots.plot_velocity_field(
        linear_flow, (0.0, 1.0), arrows=9, bounds=BOX, resolution=30, path=tmp_path / "v.png"
    )
    assert_drawn(tmp_path / "v.png")
    grid = np.stack(np.meshgrid(np.linspace(-7, 7, 9), np.linspace(-7, 7, 9)), -1).reshape(-1, 2)
    np.testing.assert_allclose(fig.velocity_fields[0], grid @ A.T, atol=1e-12)
    plots.plot_velocity_field(
        planar_flow, (0.1, 0.9), arrows=6, background=False, bounds=BOX, path=tmp_path / "w.png"
    )
    assert_drawn(tmp_path / "w.png")


def test_discrete_vs_continuous(planar_flow: cnf.PlanarFlow, mlp_flow: cnf.CNF, tmp_path: Path) -> None:
    fig = plots.plot_discrete_vs_continuous(planar_flow, bounds=BOX, resolution=51, path=tmp_path / "d.png")
    assert_drawn(tmp_path / "d.png")
    assert len(fig.discrete_masses) == 5 and len(fig.continuous_masses) == 6
    assert fig.continuous_times == [0.0, 0.25, 1.5 / 4, 0.5, 0.75, 1.0]
    assert all(abs(m - 1) < 1e-2 for m in fig.discrete_masses + fig.continuous_masses)
    titles = [ax.get_title() for ax in fig.axes]
    assert any("1.5/4" in title for title in titles) and any(
        "undefined" in t.get_text() for t in fig.axes[2].texts
    )
    # Against another CNF, with chosen layers and no extra column.
    fig = plots.plot_discrete_vs_continuous(
        planar_flow, mlp_flow, layers=[0, 4], between=None, bounds=BOX, resolution=21
    )
    assert fig.continuous_times == [0.0, 1.0]
    with pytest.raises(ValueError, match="between must be a fractional layer index"):
        plots.plot_discrete_vs_continuous(planar_flow, between=2, bounds=BOX, resolution=11)
    with pytest.raises(TypeError, match="planar must be a cnf.PlanarFlow"):
        plots.plot_discrete_vs_continuous(mlp_flow)


def test_animation_has_the_requested_frames(linear_flow: cnf.CNF, tmp_path: Path) -> None:
    path = tmp_path / "path.gif"
    fig = plots.animate_path(linear_flow, path, frames=4, n=50, bounds=BOX, resolution=20, dpi=40)
    assert fig.n_frames == 4
    with Image.open(path) as gif:
        assert gif.n_frames == 4
    with pytest.raises(ValueError, match="path must end in .gif"):
        plots.animate_path(linear_flow, tmp_path / "path.png", frames=2)
    with pytest.raises(ValueError, match="frames must be an int >= 2, got 1"):
        plots.animate_path(linear_flow, frames=1)


def _write_log(path: Path) -> None:
    records = []
    for step in range(1, 61):
        record = {
            "step": step,
            "seconds": 0.1 * step,
            "loss": 3 - step / 40,
            "nfe_forward": 20 + step // 10,
            "nfe_backward": 0,
        }
        if step % 20 == 0:
            record.update(val_nll=3.1 - step / 40, val_nfe=26)
        records.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_training_curves(tmp_path: Path) -> None:
    _write_log(tmp_path / "train_log.jsonl")
    plots.plot_training_curves(tmp_path / "train_log.jsonl", path=tmp_path / "curves.png")
    assert_drawn(tmp_path / "curves.png")
    labels = [ax.get_xlabel() for ax in plots.plot_training_curves(tmp_path / "train_log.jsonl").axes]
    assert labels == ["iteration", "wall time (s)", "iteration"]
    with pytest.raises(ValueError, match="log has no training records"):
        plots.plot_training_curves([])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plots.plot_training_curves(tmp_path / "missing.jsonl")


def test_plot_densities_with_a_callable(linear_flow: cnf.CNF, tmp_path: Path) -> None:
    def standard_normal(x: torch.Tensor) -> torch.Tensor:
        return -0.5 * (x**2).sum(-1) - np.log(2 * np.pi)

    fig = plots.plot_densities(
        {"flow": linear_flow, "N(0, I)": standard_normal}, bounds=BOX, resolution=41, path=tmp_path / "m.png"
    )
    assert_drawn(tmp_path / "m.png")
    assert set(fig.masses) == {"flow", "N(0, I)"} and all(abs(m - 1) < 1e-2 for m in fig.masses.values())


def test_plot_all_writes_everything(planar_flow: cnf.PlanarFlow, tmp_path: Path) -> None:
    _write_log(tmp_path / "train_log.jsonl")
    paths = plots.plot_all(
        planar_flow, tmp_path / "plots", data=torch.randn(200, 2), log=tmp_path / "train_log.jsonl",
        animate=True, frames=3, resolution=24,
    )  # fmt: skip
    names = sorted(p.name for p in paths)
    assert names == sorted(
        ["probability_path.png", "trajectories.png", "velocity_field.png", "discrete_vs_continuous.png", "path.gif", "training_curves.png"]
    )  # fmt: skip
    for path in paths:
        if path.suffix == ".png":
            assert_drawn(path)
    with Image.open(tmp_path / "plots" / "path.gif") as gif:
        assert gif.n_frames == 3


def test_errors_name_the_argument(linear_flow: cnf.CNF) -> None:
    with pytest.raises(
        ValueError, match=r"times must be a non-empty sequence of floats in \[0, 1\], got \[0.5, 1.5\]"
    ):
        plots.plot_probability_path(linear_flow, [0.5, 1.5])
    with pytest.raises(ValueError, match=r"bounds must satisfy xmin < xmax"):
        plots.plot_probability_path(linear_flow, bounds=(1, -1, 0, 1))
    with pytest.raises(ValueError, match="resolution must be an int >= 2, got 1"):
        plots.density_grid(linear_flow, bounds=BOX, resolution=1)
    flow3 = cnf.CNF(cnf.MLPField(3, hidden=(4,)))
    with pytest.raises(ValueError, match=r"flow must be a 2-D flow to be plotted, got flow.dim=3"):
        plots.plot_trajectories(flow3)
    with pytest.raises(TypeError, match="flow must be a flow with log_prob"):
        plots.plot_velocity_field("moons")
    with pytest.raises(ValueError, match=r"data must have shape \(n, 2\)"):
        plots.plot_probability_path(linear_flow, data=np.zeros((5, 3)))


def test_cli_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        flow = cnf.PlanarFlow(2, layers=2)
    cnf.save_checkpoint(tmp_path / "run" / "checkpoint.pt", flow)
    _write_log(tmp_path / "run" / "train_log.jsonl")
    code = cli_main(
        ["plot", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "out"),
         "--times", "0", "0.5", "1", "--animate", "--frames", "3", "--data", "moons", "--n", "200", "--resolution", "20"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "training_curves.png" in printed and "path.gif" in printed
    assert_drawn(tmp_path / "out" / "probability_path.png")
    assert cli_main(["plot", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--times", "2"]) == 2
    assert "times must be a non-empty sequence" in capsys.readouterr().err


def test_no_global_backend_is_chosen() -> None:
    code = (
        "import sys, torch, cnf, cnf.plots as p\n"
        "f = cnf.CNF(cnf.LinearField(torch.eye(2) * 0.1))\n"
        "p.plot_probability_path(f, (0.0, 1.0), bounds=(-4, 4, -4, 4), resolution=10)\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"


def test_planar_field_ode_is_the_exact_solve_of_the_planar_field(planar_flow: cnf.PlanarFlow) -> None:
    """The closed form equals a tight numerical solve of planar.as_field() (up to the field's
    1e-6 grid slack at slice boundaries), and both differ from the Euler (planar) layers."""
    exact = plots.PlanarFieldODE(planar_flow)
    numeric = cnf.CNF(planar_flow.as_field(), solver=cnf.Solver(rtol=1e-9, atol=1e-9, max_steps=100_000))
    x = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (0.1, 0.6):
            np.testing.assert_allclose(exact.log_prob(x, t), numeric.log_prob(x, t), atol=1e-4)
        np.testing.assert_array_equal(exact.log_prob(x, 0.0), planar_flow.log_prob(x, 0.0))
        assert (exact.log_prob(x) - planar_flow.log_prob(x)).abs().max() > 1e-2


def test_sample_pairs_draws_the_flows_samples_beside_the_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Beyond 2-D: the lower triangle scatters the chosen pairs of the flow's own samples (seeded)
    and of the data; `cnf plot` writes it with the training curves for such a checkpoint."""
    flow = cnf.CNF(cnf.LinearField(torch.diag(torch.tensor([0.5, -0.3, 0.2]))))
    data = torch.randn(50, 3) * torch.tensor([1.0, 2.0, 3.0])
    fig = plots.plot_sample_pairs(flow, data, dims=[2, 0], n=100, seed=4, path=tmp_path / "pairs.png")
    assert_drawn(tmp_path / "pairs.png")
    axes = fig.axes
    assert sum(ax.axison for ax in axes) == 3  # two diagonal histograms, one scatter
    scatter = axes[2]  # row 1 (dimension 0) against column 0 (dimension 2)
    expected = flow.sample(100, generator=torch.Generator().manual_seed(4)).detach().numpy()
    np.testing.assert_allclose(scatter.collections[0].get_offsets(), expected[:, [2, 0]], rtol=1e-5)
    np.testing.assert_allclose(scatter.collections[1].get_offsets(), data.numpy()[:, [2, 0]], rtol=1e-6)
    with pytest.raises(ValueError, match=r"dims must be indices of the flow's 3 dimensions, got \[3\]"):
        plots.plot_sample_pairs(flow, dims=[3])

    cnf.save_checkpoint(tmp_path / "run" / "checkpoint.pt", cnf.CNF(cnf.MLPField(3, hidden=(4,))))
    _write_log(tmp_path / "run" / "train_log.jsonl")
    assert cli_main(["plot", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "out")]) == 0
    assert "sample_pairs.png" in capsys.readouterr().out
    assert_drawn(tmp_path / "out" / "sample_pairs.png")
    assert_drawn(tmp_path / "out" / "training_curves.png")
