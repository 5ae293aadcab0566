"""Every example runs in its quick mode and writes real pictures; the anomaly statistics are right."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from matplotlib.image import imread
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import examples/<name>.py by file path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"cnf_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_pictures(folder: Path, names: list[str]) -> None:
    for name in names:
        path = folder / name
        assert path.is_file(), f"{name} was not written"
        if path.suffix == ".png":
            assert imread(path)[..., :3].std() > 0.05, f"{name} looks blank"
        else:
            with Image.open(path) as gif:
                assert gif.n_frames >= 2


def test_two_moons_quick(tmp_path: Path) -> None:
    summary = load_example("two_moons").main(["--quick", "--out", str(tmp_path)])
    assert math.isfinite(summary["cnf_test_nll"]) and math.isfinite(summary["planar_test_nll"])
    assert_pictures(
        tmp_path / "cnf",
        [
            "probability_path.png",
            "trajectories.png",
            "velocity_field.png",
            "discrete_vs_continuous.png",
            "path.gif",
        ]
        + ["training_curves.png"],
    )
    assert_pictures(tmp_path / "planar", ["probability_path.png", "trajectories.png"])


def test_eight_gaussians_quick(tmp_path: Path) -> None:
    summary = load_example("eight_gaussians").main(["--quick", "--out", str(tmp_path)])
    assert summary["cnf_test_nll"] > summary["true_test_nll"] - 0.1  # no model beats the truth (much)
    assert_pictures(
        tmp_path, ["probability_path.png", "trajectories.png", "model_vs_true.png", "training_curves.png"]
    )


def test_checkerboard_quick(tmp_path: Path) -> None:
    summary = load_example("checkerboard").main(["--quick", "--out", str(tmp_path)])
    assert summary["true_test_nll"] == pytest.approx(math.log(32.0))
    assert_pictures(tmp_path, ["probability_path.png", "trajectories.png", "velocity_field.png"])


def test_planar_vs_cnf_quick(tmp_path: Path) -> None:
    nll = load_example("planar_vs_cnf").main(["--quick", "--out", str(tmp_path), "--layers", "2", "8"])
    assert set(nll) == {"planar K=2", "planar K=8", "CNF"} and all(math.isfinite(v) for v in nll.values())
    assert_pictures(tmp_path, ["planar_vs_cnf.png"])


def test_anomaly_detection_quick(tmp_path: Path) -> None:
    metrics = load_example("anomaly_detection").main(["--quick", "--out", str(tmp_path), "--anomalies", "50"])
    assert 0.0 <= metrics["roc_auc_p_value"] <= 1.0 and metrics["n_anomalies"] == 50
    assert_pictures(tmp_path, ["score_map.png"])


def test_digits_quick(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    metrics = load_example("digits").main(["--quick", "--out", str(tmp_path)])
    assert math.isfinite(metrics["test_nll"]) and metrics["test_bits_per_dim"] > 0
    assert 0.0 <= metrics["roc_auc_rotated"] <= 1.0 and 0.0 <= metrics["roc_auc_noisy"] <= 1.0
    assert metrics["median_nn_distance_samples"] > 0
    assert_pictures(tmp_path, ["digits_samples.png", "digits_anomaly.png"])


def test_make_gallery_quick(tmp_path: Path) -> None:
    paths = load_example("make_gallery").main(["--quick", "--out", str(tmp_path)])
    assert [p.name for p in paths] == ["probability_path.png", "trajectories.png", "planar_vs_cnf.png"]
    assert_pictures(tmp_path, [p.name for p in paths])


def test_images_quick(tmp_path: Path) -> None:
    summary = load_example("images").main(["--quick", "--out", str(tmp_path)])
    assert math.isfinite(summary["test_bits_per_dim"]) and summary["test_nfe"] > 0
    assert summary["sample_nn_distance_median"] > 0
    assert_pictures(tmp_path, ["samples.png", "path.png", "interpolation.png"])


def test_roc_auc_and_p_values() -> None:
    example = load_example("anomaly_detection")
    rng = np.random.default_rng(0)
    scores = rng.normal(size=60).round(1)  # with ties
    labels = (rng.random(60) < 0.3).astype(int)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert example.roc_auc(scores, labels) == pytest.approx(pairs)
    assert example.roc_auc(np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1])) == 1.0
    with pytest.raises(ValueError, match="labels must contain both classes"):
        example.roc_auc(np.ones(3), np.zeros(3))
    # p-value: the fraction of calibration log densities strictly below.
    assert example.p_values(np.array([-10.0, 0.5, 10.0]), np.array([0.0, 1.0, 2.0, 3.0])).tolist() == [
        0,
        0.25,
        1,
    ]


@pytest.mark.parametrize(
    "name",
    ["two_moons", "eight_gaussians", "checkerboard", "planar_vs_cnf", "anomaly_detection", "make_gallery", "images"],
)
def test_examples_do_nothing_at_import(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["example", "--no-such-option"])  # would fail if parsed at import
    assert callable(load_example(name).main)


def test_conditional_quick(tmp_path: Path) -> None:
    summary = load_example("conditional").main(["--quick", "--out", str(tmp_path)])
    assert math.isfinite(summary["mixture_test_nll"])
    assert summary["mixture_test_nll"] > summary["mixture_true_nll"] - 0.1  # nothing beats the truth
    assert summary["digits_samples_shape"] == [2, 10, 64]
    assert_pictures(tmp_path, ["conditional_densities.png", "digits_by_class.png"])


def test_vae_quick(tmp_path: Path) -> None:
    summary = load_example("vae").main(["--quick", "--images", "2", "--out", str(tmp_path)])
    families = summary["families"]
    assert {"gaussian", "planar", "cnf"} <= set(families)
    for result in families.values():
        assert result["test_iwae"] < 0 and len(result["kl_q_to_true_posterior"]) == 2
        assert all(k > -0.2 for k in result["kl_q_to_true_posterior"])  # a KL, up to quadrature/MC error
        assert result["kl_images"] == 8 and result["mean_kl_test"] > -0.2 and result["mean_kl_test_two_se"] > 0
        approximation, amortisation = result["approximation_gap"][0], result["amortisation_gap"][0]
        assert approximation > -0.2 and abs(approximation + amortisation - result["mean_kl_test"]) < 1e-6
    assert_pictures(tmp_path, ["reconstructions.png", "samples.png", "posteriors.png"])
