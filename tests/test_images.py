"""Image flows: dequantisation + logit + multi-scale CNF, bits per dimension by hand, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cnf
from cnf.images import (
    evaluate_bits_per_dim,
    image_flow,
    image_trajectory,
    interpolate,
    latent_interpolation,
    set_solver,
)

SHAPE = (1, 2, 2)
LEVELS = 4
ALPHA = 0.05


def identity_flow(model: str) -> cnf.TransformedFlow:
    flow = image_flow(SHAPE, LEVELS, model=model, hidden=(3,), scales=2, alpha=ALPHA).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.zero_()  # zero velocity: every CNF block is the identity
    return flow


def hand_bits_per_dim(pixels: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Uniform dequantisation, logit with margin alpha, standard normal: every Jacobian by hand."""
    d = pixels[0].size
    y = (pixels + u) / LEVELS
    s = ALPHA + (1 - 2 * ALPHA) * y
    w = np.log(s / (1 - s))
    log_normal = -0.5 * w**2 - 0.5 * math.log(2 * math.pi)
    log_jac_logit = math.log(1 - 2 * ALPHA) - np.log(s) - np.log(1 - s)
    log_p = (log_normal + log_jac_logit).reshape(len(pixels), -1).sum(1) - d * math.log(LEVELS)
    return -log_p / (d * math.log(2))


@pytest.mark.parametrize("model", ["multiscale", "cnf"])
def test_bits_per_dim_of_identity_blocks_by_hand(model: str) -> None:
    flow = identity_flow(model)
    pixels = torch.tensor([[[[0, 3], [1, 2]]], [[[3, 3], [0, 0]]]], dtype=torch.float64)
    u = torch.rand(pixels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = hand_bits_per_dim(pixels.numpy(), u.numpy())
    bpd = flow.bits_per_dim(pixels, generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(bpd.detach().numpy(), expected, rtol=1e-10)
    result = evaluate_bits_per_dim(flow, pixels.long(), generator=torch.Generator().manual_seed(5))
    assert result.n == 2 and result.mean == pytest.approx(expected.mean(), rel=1e-10)
    assert result.se == pytest.approx(expected.std(ddof=1) / math.sqrt(2), rel=1e-8)


def test_train_accepts_integer_images_and_scores_bits_per_dim() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, LEVELS, (64, *SHAPE), generator=gen, dtype=torch.uint8)
    torch.manual_seed(0)
    flow = image_flow(SHAPE, LEVELS, hidden=(4,), solver=cnf.Solver(method="rk4", step_size=0.5)).double()
    result = cnf.train(flow, images[:48], images[48:], iters=3, batch_size=16, val_every=3, progress=False)
    assert result.step == 3 and math.isfinite(result.val_nll)
    set_solver(flow, cnf.Solver(rtol=1e-5, atol=1e-5))
    score = evaluate_bits_per_dim(flow, images[48:])
    # uniform pixels over LEVELS levels cost 2 bits each; an untrained model pays more
    assert score.mean > 2.0 and score.nfe > 0 and score.n == 16
    # a time limit stops before the next batch: here after the first (the first n images are scored)
    seeded = {"generator": torch.Generator().manual_seed(3), "batch_size": 5}
    first = evaluate_bits_per_dim(flow, images[48:], time_limit=0.0, **seeded)
    seeded["generator"] = torch.Generator().manual_seed(3)
    assert first.n == 5 and first.mean == pytest.approx(evaluate_bits_per_dim(flow, images[48:53], **seeded).mean)


def test_interpolation_and_path_pictures_have_the_right_shapes_and_ends() -> None:
    torch.manual_seed(0)
    flow = image_flow((1, 4, 4), LEVELS, hidden=(4,), solver=cnf.Solver(rtol=1e-8, atol=1e-8)).double()
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, LEVELS, (2, 1, 4, 4), generator=gen)
    for spherical in (False, True):
        strip = latent_interpolation(flow, a, b, steps=5, spherical=spherical)
        assert strip.shape == (5, 1, 4, 4)
        assert torch.equal(strip[0], a.double()) and torch.equal(strip[-1], b.double())
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=gen)
    path = image_trajectory(flow, z, [0.0, 0.5, 1.0])
    assert path.shape == (3, 3, 1, 4, 4)
    assert set(path.unique().tolist()) <= set(range(LEVELS))


def test_image_flow_checkpoint_round_trip(tmp_path) -> None:
    flow = image_flow(SHAPE, LEVELS, hidden=(3,)).double()
    cnf.save_checkpoint(tmp_path / "f.pt", flow)
    restored, _ = cnf.load_checkpoint(tmp_path / "f.pt")
    restored.double()
    x = torch.tensor([[[[0, 3], [1, 2]]]], dtype=torch.float64)
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(restored.log_prob(x, generator=gen()), flow.log_prob(x, generator=gen()))


def test_image_flow_errors() -> None:
    with pytest.raises(ValueError, match="unknown image model 'glow'"):
        image_flow(SHAPE, LEVELS, model="glow")
    with pytest.raises(ValueError, match=r"integers in \[0, 4\).*\[0, 9\]"):
        evaluate_bits_per_dim(image_flow(SHAPE, LEVELS), torch.tensor([[[[0, 9], [1, 2]]]]))


def test_spherical_interpolation_keeps_the_norm_where_the_line_cuts_inside() -> None:
    gen = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    z1 = z1 * z0.norm() / z1.norm()  # equal norms: slerp stays on the sphere
    sphere = interpolate(z0, z1, 7, spherical=True)
    line = interpolate(z0, z1, 7)
    torch.testing.assert_close(sphere[[0, -1]], torch.stack([z0, z1]))
    torch.testing.assert_close(line[[0, -1]], torch.stack([z0, z1]))
    norms = sphere.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, float(z0.norm())))
    assert line[3].norm() < 0.9 * z0.norm()  # the chord's middle is closer to the origin
    # the great-circle steps are equal angles
    cosines = (sphere[1:] * sphere[:-1]).flatten(1).sum(1) / norms[0] ** 2
    torch.testing.assert_close(cosines, torch.full_like(cosines, float(cosines[0])))
