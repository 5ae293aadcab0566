"""`cnf train --context-columns`, `cnf evaluate` (conditional NLL) and `cnf sample --context`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import cnf
from cnf.cli import main

TINY = ["--iters", "3", "--n-train", "500", "--hidden", "8", "--rtol", "1e-3", "--atol", "1e-3"]
#: The planar flow's own size flag instead of the CNF's field and solver flags (refused with it).
TINY_PLANAR = ["--iters", "3", "--n-train", "500", "--layers", "4"]


def tiny(model: str) -> list[str]:
    return TINY_PLANAR if model == "planar" else TINY


def assert_fails(capsys: pytest.CaptureFixture, match: str, argv: list[str]) -> None:
    """The command exits with status 2 and an error naming the problem."""
    capsys.readouterr()
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err), match


def table(path: Path) -> Path:
    """x = (columns 0 and 2), c = (columns 1 and 3) on a large scale: x depends on c."""
    rng = np.random.default_rng(0)
    c = rng.normal([100.0, -5.0], [10.0, 0.1], size=(400, 2))
    x = (c - [100.0, -5.0]) / [10.0, 0.1] + 0.1 * rng.normal(size=(400, 2))
    np.save(path, np.stack([x[:, 0], c[:, 0], x[:, 1], c[:, 1]], 1).astype(np.float32))
    return path


@pytest.mark.parametrize(
    ("model", "preprocess"), [("cnf", "none"), ("planar", "none"), ("cnf", "standardize")]
)
def test_conditional_train_evaluate_sample(
    model: str, preprocess: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = table(tmp_path / "table.npy")
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--context-columns", "1", "3", "--model", model, "--out", str(out)]
    args += ["--preprocess", preprocess]
    assert main(args + tiny(model)) == 0
    checkpoint = out / "checkpoint.pt"
    flow, payload = cnf.load_checkpoint(checkpoint)
    config = payload["config"] if preprocess == "none" else payload["config"]["flow"]
    assert flow.context_dim == 2 and config["context_columns"] == [1, 3]
    assert isinstance(flow, cnf.transforms.TransformedFlow) == (preprocess != "none")
    standardization = next(m for m in flow.modules() if isinstance(m, cnf.context.ContextStandardization))
    np.testing.assert_allclose(standardization.mean.numpy(), [100.0, -5.0], atol=2.0)
    np.testing.assert_allclose(standardization.std.numpy(), [10.0, 0.1], rtol=0.2)
    capsys.readouterr()

    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--json", "--split", "all"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["conditional"] is True and metrics["n"] == 400 and np.isfinite(metrics["nll"])
    x, c = torch.from_numpy(np.load(data)[:, [0, 2]]), torch.from_numpy(np.load(data)[:, [1, 3]])
    with torch.no_grad():
        expected = -flow.log_prob(x, context=c).mean().item()
    assert metrics["nll"] == pytest.approx(expected, rel=1e-4)

    samples = tmp_path / "s.npy"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(checkpoint),
                "--n",
                "7",
                "--context",
                "100,-5",
                "--out",
                str(samples),
            ]
        )
        == 0
    )
    assert np.load(samples).shape == (7, 2)
    contexts = tmp_path / "contexts.npy"
    np.save(contexts, np.array([[90.0, -5.0], [110.0, -4.9], [100.0, -5.1]], dtype=np.float32))
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(checkpoint),
                "--n",
                "5",
                "--context-file",
                str(contexts),
                "--out",
                str(samples),
            ]
        )
        == 0
    )
    assert np.load(samples).shape == (5, 3, 2)
    assert_fails(
        capsys,
        r"conditional \(context_dim=2\): pass --context or --context-file",
        ["sample", "--checkpoint", str(checkpoint), "--n", "5", "--out", str(samples)],
    )
    assert_fails(
        capsys,
        r"shape \(2,\) or \(batch, 2\); got shape \(3,\)",
        ["sample", "--checkpoint", str(checkpoint), "--context", "1,2,3", "--out", str(samples)],
    )
    assert_fails(
        capsys,
        "--context must be comma-separated numbers",
        ["sample", "--checkpoint", str(checkpoint), "--context", "a,b", "--out", str(samples)],
    )


def test_plot_draws_a_conditional_flow_at_its_contexts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`cnf plot` on a conditional 2-D flow draws p(x | c) per context (it used to stop with the
    API's "pass context=" error): by default at the training contexts' mean +- one std."""
    from cnf.plots import conditional_bounds, default_contexts

    data = table(tmp_path / "table.npy")
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--context-columns", "1", "3", "--out", str(out), "--objective", "likelihood"]
    assert main(args + TINY) == 0
    flow, _ = cnf.load_checkpoint(out / "checkpoint.pt")
    c = np.load(data)[:, [1, 3]].astype(np.float64)
    train_rows = c[: int(0.8 * len(c))]  # not the exact split: the statistics agree to a few percent
    expected = train_rows.mean(0) + np.array([-1.0, 0.0, 1.0])[:, None] * train_rows.std(0)
    np.testing.assert_allclose(default_contexts(flow).numpy(), expected, rtol=0.05)
    box = conditional_bounds(flow, default_contexts(flow), samples=200)
    assert box[0] < box[1] and box[2] < box[3]
    capsys.readouterr()
    plots = tmp_path / "plots"
    assert main(["plot", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(plots), "--resolution", "12"]) == 0
    assert (plots / "conditional_densities.png").stat().st_size > 0
    given = ["plot", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(plots), "--resolution", "12"]
    assert main(given + ["--context", "95,-5", "105,-5"]) == 0
    assert_fails(capsys, r"--context needs 2 comma-separated value\(s\) per context", given + ["--context", "1"])
    assert_fails(capsys, "--data is not drawn beside a conditional flow", given + ["--data", str(data)])


def test_context_columns_need_a_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert_fails(
        capsys,
        "--context-columns needs a .npy/.csv table",
        ["train", "--data", "moons", "--context-columns", "1", "--out", str(tmp_path), *TINY],
    )
    data = table(tmp_path / "table.npy")
    assert_fails(
        capsys,
        r"--context-columns \[0, 1, 2, 3\] leave no data columns",
        [
            "train",
            "--data",
            str(data),
            "--context-columns",
            "0",
            "1",
            "2",
            "3",
            "--out",
            str(tmp_path),
            *TINY,
        ],
    )
    assert_fails(
        capsys,
        "distinct column indices of a table with 4 columns, got \\[7\\]",
        ["train", "--data", str(data), "--context-columns", "7", "--out", str(tmp_path), *TINY],
    )
