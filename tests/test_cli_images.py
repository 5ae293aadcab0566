"""`cnf train` / `cnf evaluate` on integer images from a .npy file: bits per dimension."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnf.cli import main


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    images = np.random.default_rng(0).integers(0, 256, (40, 1, 4, 4)).astype(np.uint8)
    path = tmp_path / "images.npy"
    np.save(path, images)
    return path


def test_train_and_evaluate_images_from_a_file(
    image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(image_file), "--iters", "2", "--hidden", "4", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "unet" and summary["objective"] == "flow_matching"
    assert summary["steps"] == 2 and summary["test_n"] == 4
    assert summary["test_bits_per_dim"] > 7.5  # 256 levels: a uniform model scores 8 bits
    said = capsys.readouterr().out  # what it chose, in one line
    assert "images (1, 4, 4), 256 levels, 32 training: dequantize -> logit (alpha 0.0001) -> U-Net CNF 4; " in said
    assert "training flow_matching with lr 0.001, batch 128, cosine schedule, EMA 0.999, validation every 100" in said
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(image_file), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)  # the file it trained on: its test split, as train scored it
    assert metrics["n"] == 4 and metrics["scored"].startswith("4 of 40 images: the test split of the file it trained on")
    assert metrics["bits_per_dim"] == pytest.approx(summary["test_bits_per_dim"], rel=1e-6)  # the same seeded draws
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(image_file), "--json", "--split", "all"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 40 and metrics["bits_per_dim"] > 7.5 and metrics["nfe"] > 0
    assert metrics["nll"] == pytest.approx(metrics["bits_per_dim"] * 16 * np.log(2))
    plots = tmp_path / "plots"
    assert main(["plot", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(image_file), "--out", str(plots)]) == 0
    assert {p.name for p in plots.iterdir()} == {"samples.png", "path.png", "interpolation.png", "training_curves.png"}
    drawn = tmp_path / "drawn.npy"
    assert main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--n", "3", "--out", str(drawn)]) == 0
    samples = np.load(drawn)  # integer images like the data, not floats on the integer grid
    assert samples.shape == (3, 1, 4, 4) and samples.dtype == np.uint8


def test_image_runs_honour_threads_and_say_how_ot_pairs(
    image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--threads N` reaches the training (it used to be reset to the recipe's one thread), and OT
    flow matching says when its assignments are solved ahead in threads."""
    args = ["train", "--data", str(image_file), "--iters", "2", "--hidden", "4", "--objective", "ot_flow_matching"]
    assert main([*args, "--threads", "2", "--out", str(tmp_path / "two")]) == 0
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["threads"] == 2
    assert "2 torch threads, OT assignments solved ahead in 2 threads" in capsys.readouterr().out
    assert main([*args, "--threads", "1", "--out", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["threads"] == 1
    assert "1 torch thread, time limit" in capsys.readouterr().out


def test_multiscale_trains_by_likelihood(image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ms"
    args = ["train", "--data", str(image_file), "--model", "multiscale", "--iters", "1", "--hidden", "4", "--method", "euler"]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "multiscale" and summary["objective"] == "likelihood"
    assert "-> multiscale CNF 4; training likelihood" in capsys.readouterr().out


def test_image_errors_are_reported(image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.npy"
    np.save(bad, -np.ones((5, 1, 2, 2), dtype=np.int64))
    assert main(["train", "--data", str(bad), "--iters", "1", "--out", str(tmp_path / "r")]) == 2
    assert "non-negative integer pixel values; got values in [-1, -1]" in capsys.readouterr().err
    assert main(["train", "--data", str(image_file), "--model", "planar", "--out", str(tmp_path / "p")]) == 2
    assert "--model 'planar' does not apply to images" in capsys.readouterr().err


def test_image_runs_are_protected_like_vector_runs(
    image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(image_file), "--iters", "2", "--hidden", "4", "--out", str(out)]
    assert main(args) == 0
    first = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(args) == 2  # an existing run is never replaced silently
    assert f"--out {str(out)!r} already holds a run" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == first
    resumed = ["train", "--data", str(image_file), "--iters", "4", "--hidden", "4", "--resume", str(out)]
    assert main([*resumed, "--out", str(out)]) == 0  # --resume continues the run in place
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_image_logit_alpha_is_the_recipes_unless_given(image_file: Path, tmp_path: Path) -> None:
    from cnf.checkpoint import load_checkpoint
    from cnf.images import IMAGE_RECIPE
    from cnf.transforms import Logit

    def alpha_of(out: Path) -> float:
        flow, _ = load_checkpoint(out / "checkpoint.pt")
        return next(t.alpha for t in flow.preprocess.leaves() if isinstance(t, Logit))

    args = ["train", "--data", str(image_file), "--iters", "1", "--hidden", "4"]
    assert main([*args, "--out", str(tmp_path / "default")]) == 0
    assert alpha_of(tmp_path / "default") == IMAGE_RECIPE.alpha == 1e-4
    assert main([*args, "--alpha", "0.01", "--out", str(tmp_path / "given")]) == 0
    assert alpha_of(tmp_path / "given") == 0.01


def test_train_scores_at_most_the_capped_number_of_test_images(
    image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnf import cli_images

    monkeypatch.setattr(cli_images, "TRAIN_TEST_IMAGES", 3)  # the file's split holds 4 test images
    args = ["train", "--data", str(image_file), "--iters", "1", "--hidden", "4"]
    assert main([*args, "--out", str(tmp_path / "capped")]) == 0
    assert json.loads((tmp_path / "capped" / "summary.json").read_text())["test_n"] == 3
    assert "scoring the first 3 of 4 test images" in capsys.readouterr().out
    assert main([*args, "--test-n", "2", "--out", str(tmp_path / "two")]) == 0
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["test_n"] == 2
    capsys.readouterr()
    checkpoint = str(tmp_path / "two" / "checkpoint.pt")
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", str(image_file), "--n", "5", "--json", "--split", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 5
    with pytest.raises(SystemExit):
        main(["evaluate", "--checkpoint", checkpoint, "--data", str(image_file), "--n", "0"])
    assert "--n: must be a positive integer, got '0'" in capsys.readouterr().err


def test_an_image_run_resumes_in_its_own_folder(
    image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--resume alone finds the run's images and continues in the run's folder (it used to take
    the images for a toy name, and with --data to write to runs/default)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--data", str(image_file), "--iters", "2", "--hidden", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--iters", "3"]) == 0
    assert f"resuming {out / 'checkpoint.pt'} on {image_file}" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert not (tmp_path / "runs").exists()


def test_train_caps_the_scoring_time_unless_test_n_is_given(
    image_file: Path, tmp_path: Path, record_time_limits
) -> None:
    """Without --test-n, scoring at the end stops after as long as the training took (at least
    MIN_SCORE_SECONDS; a 90 s Fashion-MNIST run used to score for ~65 minutes); --test-n N scores N."""
    from cnf import cli_images

    limits = record_time_limits(cli_images, "evaluate_bits_per_dim")
    args = ["train", "--data", str(image_file), "--iters", "2", "--hidden", "4"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--test-n", "3", "--out", str(tmp_path / "b")]) == 0
    assert limits[0] >= cli_images.MIN_SCORE_SECONDS and limits[1] is None
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["test_n"] == 3
