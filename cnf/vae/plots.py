"""Pictures of a VAE: image grids (reconstructions, prior samples) and 2-D posteriors q(z | x)
beside the true posterior on a grid (:func:`cnf.vae.evaluate.grid_posterior`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_image_rows(
    rows: Mapping[str, torch.Tensor], shape: Sequence[int], path: str | Path, title: str = ""
) -> Path:
    """One row of grey images per entry (label -> (n, H*W) values in [0, 1])."""
    n = max(v.shape[0] for v in rows.values())
    fig = _figure(1.0 * n + 1.2, 1.0 * len(rows) + 0.4)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(images.shape[0]):
            ax = fig.add_subplot(len(rows), n, r * n + c + 1)
            ax.imshow(images[c].detach().cpu().reshape(*shape).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)
    return Path(path)


def plot_posteriors(
    panels: Mapping[str, dict[str, torch.Tensor]],
    kl: Mapping[str, torch.Tensor],
    path: str | Path,
) -> Path:
    """Rows: posterior families; per test image two panels, q(z | x) and the true p(z | x) of that
    family's model, with KL(q || p) in the title. ``panels[family]`` is a grid_posterior dict."""
    families = list(panels)
    images = panels[families[0]]["log_q"].shape[0]
    fig = _figure(2.0 * 2 * images, 2.1 * len(families))
    for r, family in enumerate(families):
        grid = panels[family]
        for i in range(images):
            axis = grid["axis"][i].cpu().numpy()  # (R, 2): this image's z1 and z2 grid lines
            size = axis.shape[0]
            for j, (what, key) in enumerate((("q(z|x)", "log_q"), ("true p(z|x)", "log_true"))):
                ax = fig.add_subplot(len(families), 2 * images, r * 2 * images + 2 * i + j + 1)
                density = np.exp(grid[key][i].cpu().numpy()).reshape(size, size)
                ax.pcolormesh(axis[:, 0], axis[:, 1], density, shading="auto", cmap="viridis")
                ax.set_xticks(axis[[0, -1], 0].round(2))
                ax.set_yticks(axis[[0, -1], 1].round(2))
                ax.tick_params(labelsize=5)
                label = f"{family}: {what}" if j == 0 else what
                if j == 0:
                    label += f"\nKL={float(kl[family][i]):.3f}"
                ax.set_title(f"image {i}: {label}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return Path(path)


def plot_vae(vae: torch.nn.Module, images: torch.Tensor, shape: Sequence[int], out: str | Path, *, seed: int = 0) -> list[Path]:
    """``reconstructions.png`` (the first 8 of ``images`` (n, H*W) above E[x | z], z ~ q(z | x))
    and ``samples.png`` (E[x | z] for 16 draws z ~ p(z), two rows) in the folder ``out``; for a
    2-D latent also ``posteriors.png``: q(z | x) beside the true posterior for the first 4 images,
    with KL(q || p), each on a grid around both (:func:`cnf.vae.evaluate.posterior_window`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shown = images[:8]
    vae.eval()
    with torch.no_grad():
        torch.manual_seed(seed)
        reconstructed = vae.reconstruct(shown)
        prior = vae.sample(16, generator=torch.Generator().manual_seed(seed))
    family = vae.posterior.family
    paths = [
        plot_image_rows(
            {"test images": shown, f"{family} posterior": reconstructed}, shape, out / "reconstructions.png",
            "test images and reconstructions E[x | z], z ~ q(z | x)",
        ),
        plot_image_rows({"p(z)": prior[:8], " ": prior[8:]}, shape, out / "samples.png", "E[x | z], z ~ p(z)"),
    ]  # fmt: skip
    if vae.latent_dim == 2:
        from cnf.vae.evaluate import grid_posterior, kl_to_true_posterior, posterior_window

        window = posterior_window(vae, images[:4], seed=seed)
        panel = grid_posterior(vae, images[:4], resolution=100, window=window)
        kl, _ = kl_to_true_posterior(vae, images[:4], panel["log_evidence"], samples=2000, seed=seed)
        paths.append(plot_posteriors({family: panel}, {family: kl}, out / "posteriors.png"))
    return paths
