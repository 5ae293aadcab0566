"""U-Net velocity field on images: divergence, per-image independence, shapes, checkpoints, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cnf
from cnf.cli import main
from cnf.divergence import exact_divergence_loop
from cnf.fields import UNetField
from cnf.images import image_flow

SHAPE = (2, 4, 4)


@pytest.fixture
def field() -> UNetField:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNetField(SHAPE, hidden=(4, 6), embedding=8).double()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_unet_exact_divergence_is_the_jacobian_trace(field: UNetField) -> None:
    x = images(3).requires_grad_(True)
    f = field(0.4, x)
    assert f.shape == x.shape and f.abs().sum() > 0
    d = x[0].numel()
    expected = torch.stack(
        [
            torch.trace(torch.autograd.functional.jacobian(lambda s: field(0.4, s[None])[0], s).reshape(d, d))
            for s in x.detach()
        ]
    )
    assert expected.abs().min() > 1e-6  # a trace of zero would make the check empty
    torch.testing.assert_close(exact_divergence_loop(f, x, False), expected)


def test_each_image_is_mapped_alone_and_time_broadcasts(field: UNetField) -> None:
    x = images(4)
    together = field(torch.full((4,), 0.3, dtype=torch.float64), x)
    alone = torch.cat([field(0.3, x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone)  # group norm statistics are per image
    assert not torch.allclose(field(0.3, x), field(0.8, x))  # the time enters the field


def test_unet_shape_errors_name_the_shape() -> None:
    with pytest.raises(ValueError, match=r"divisible by 4, got shape \(1, 6, 6\)"):
        UNetField((1, 6, 6), hidden=(4, 4, 4))
    with pytest.raises(ValueError, match="hidden must be a non-empty sequence"):
        UNetField((1, 4, 4), hidden=())
    with pytest.raises(ValueError, match=r"x must be images of shape \(n, \*\(2, 4, 4\)\).*\(3, 1, 4, 4\)"):
        UNetField(SHAPE, hidden=(4,))(0.0, torch.zeros(3, 1, 4, 4))


def test_unet_image_flow_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    flow = image_flow((1, 4, 4), 16, model="unet", hidden=(4, 4))
    assert flow.config()["flow"]["field"] == {"kind": "unet", "shape": [1, 4, 4], "hidden": [4, 4], "embedding": 64}
    cnf.save_checkpoint(tmp_path / "unet.pt", flow)
    restored, _ = cnf.load_checkpoint(tmp_path / "unet.pt")
    x = torch.randint(0, 16, (3, 1, 4, 4)).float()
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731 - the same dequantisation and probe
    torch.testing.assert_close(restored.log_prob(x, generator=gen()), flow.log_prob(x, generator=gen()))


def test_cli_trains_the_unet_on_images_and_refuses_it_on_vectors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "images.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (40, 1, 4, 4)).astype(np.uint8))
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), "--model", "unet", "--hidden", "4", "4", "--iters", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "unet" and summary["objective"] == "flow_matching" and summary["steps"] == 2
    assert "-> U-Net CNF 4-4; training flow_matching" in capsys.readouterr().out
    assert main(["train", "--data", "moons", "--model", "unet", "--out", str(tmp_path / "v")]) == 2
    assert "--model unet needs integer images (C, H, W); --data 'moons' is vectors" in capsys.readouterr().err


def test_the_default_image_model_is_the_unet_where_its_halvings_fit(tmp_path: Path, capsys) -> None:
    from cnf.images import IMAGE_RECIPE

    assert IMAGE_RECIPE.model_for((1, 28, 28)) == "unet" and IMAGE_RECIPE.model_for((3, 8, 8)) == "unet"
    assert IMAGE_RECIPE.model_for((1, 6, 6)) == "cnf"  # 6 / 4: the conv field instead
    assert image_flow((1, 8, 8), 17).config()["flow"]["field"]["hidden"] == list(IMAGE_RECIPE.unet_hidden)
    assert image_flow((1, 6, 6), 17).config()["flow"]["field"]["kind"] == "conv"
    path = tmp_path / "odd.npy"
    np.save(path, np.random.default_rng(0).integers(0, 4, (20, 1, 6, 6)).astype(np.uint8))
    assert main(["train", "--data", str(path), "--iters", "1", "--hidden", "4", "--out", str(tmp_path / "r")]) == 0
    assert "-> conv CNF 4; training flow_matching" in capsys.readouterr().out
