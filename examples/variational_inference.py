"""Variational inference on Rezende & Mohamed's four energies: planar flows against a CNF.

    python examples/variational_inference.py                # about 3 minutes on 2 CPU cores
    python examples/variational_inference.py --quick        # seconds (a smoke test)

Fits planar flows with K = 2, 8, 32 layers and a CNF to each unnormalised target
p~(z) = exp(-U(z)), U1..U4 of Rezende & Mohamed (2015, Table 1, Figure 3), by minimising the
reverse KL E_q[log q - log p~] (:func:`cnf.variational.fit_variational`, with their annealing of
the target). Each fitted model is scored on fresh samples: the KL estimate, the true KL(q || p)
with log Z by trapezoidal quadrature on [-4, 4]^2, and the normalised effective sample size of
the importance weights p~/q. The CNF's density is evaluated at rtol = atol = 1e-5 (it is trained
at a looser tolerance). Writes ``variational_inference.png`` (rows = energies, columns = the true
density and each model's density, KL in the titles) and ``variational_inference.json`` to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import cnf
from cnf.data import ENERGIES, ENERGY_BOX, target_log_density
from cnf.variational import fit_variational, log_normalizer, variational_report

EVAL_SOLVER = cnf.Solver(rtol=1e-5, atol=1e-5)
TRAIN_SOLVER = cnf.Solver(rtol=1e-3, atol=1e-3)
#: The square of the paper's figures, inside which U2-U4 carry no wall.
PLOT_BOUNDS = (-ENERGY_BOX, ENERGY_BOX, -ENERGY_BOX, ENERGY_BOX)


def make_model(kind: str, layers: int = 0) -> nn.Module:
    """A planar flow with ``layers`` layers, or a small CNF (two hidden layers of 32)."""
    if kind == "planar":
        return cnf.PlanarFlow(2, layers)
    return cnf.CNF(cnf.MLPField(2, hidden=(32, 32)), solver=TRAIN_SOLVER)


def model_name(kind: str, layers: int = 0) -> str:
    return f"planar K={layers}" if kind == "planar" else "CNF"


def run(
    energies: Sequence[str] = ENERGIES,
    layers: Sequence[int] = (2, 8, 32),
    planar_seconds: float = 5.0,
    cnf_seconds: float = 20.0,
    n_eval: int = 5000,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], nn.Module]]:
    """Fit every model to every energy; returns the table rows and the fitted models."""
    rows: list[dict[str, Any]] = []
    models: dict[tuple[str, str], nn.Module] = {}
    specs = [("planar", k) for k in layers] + [("cnf", 0)]
    for energy in energies:
        log_density = target_log_density(energy)
        log_z = log_normalizer(log_density)
        for kind, k in specs:
            torch.manual_seed(seed)
            model = make_model(kind, k)
            seconds = planar_seconds if kind == "planar" else cnf_seconds
            anneal = 200 if kind == "planar" else 50
            result = fit_variational(
                model,
                log_density,
                iters=10**9,
                batch_size=256,
                lr=1e-2,
                time_limit=seconds,
                anneal_iters=anneal,
                seed=seed,
                progress=False,
            )
            if kind == "cnf":
                model.solver = EVAL_SOLVER
            report = variational_report(
                model, log_density, n_eval, log_z=log_z, generator=torch.Generator().manual_seed(seed + 1)
            )
            name = model_name(kind, k)
            models[(energy, name)] = model
            rows.append(
                {
                    "energy": energy.upper(),
                    "model": name,
                    "kl": report["kl"],
                    "kl_estimate": report["kl_estimate"],
                    "kl_stderr": report["kl_stderr"],
                    "ess": report["ess"],
                    "log_z": log_z,
                    "steps": result.step,
                    "train_seconds": round(result.seconds, 2),
                }
            )
    return rows, models


def plot(
    rows: list[dict[str, Any]],
    models: dict[tuple[str, str], nn.Module],
    path: Path,
    resolution: int = 100,
) -> Path:
    """One figure: rows = energies, columns = true density and each model's density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    energies = list(dict.fromkeys(energy for energy, _ in models))
    names = list(dict.fromkeys(name for _, name in models))
    kl = {(r["energy"].lower(), r["model"]): r["kl"] for r in rows}
    xmin, xmax, ymin, ymax = PLOT_BOUNDS
    xs, ys = np.linspace(xmin, xmax, resolution), np.linspace(ymin, ymax, resolution)
    grid = torch.as_tensor(
        np.stack(np.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2), dtype=torch.float32
    )
    fig, axes = plt.subplots(
        len(energies), len(names) + 1, figsize=(2.2 * (len(names) + 1), 2.2 * len(energies)), squeeze=False
    )
    for i, energy in enumerate(energies):
        log_density = target_log_density(energy)
        log_z = log_normalizer(log_density)
        with torch.no_grad():
            images = [(log_density(grid) - log_z).exp()]
            titles = [f"{energy.upper()}: true"]
            for name in names:
                images.append(models[(energy, name)].log_prob(grid).exp())
                titles.append(f"{name}\nKL {kl[(energy, name)]:.3f}")
        for j, (image, title) in enumerate(zip(images, titles)):
            ax = axes[i, j]
            ax.imshow(
                image.reshape(resolution, resolution).numpy(),
                origin="lower",
                extent=PLOT_BOUNDS,
                cmap="viridis",
            )
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/variational", help="output folder")
    parser.add_argument("--energies", nargs="+", default=list(ENERGIES), choices=ENERGIES)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32], help="planar layer counts K")
    parser.add_argument("--planar-seconds", type=float, default=5.0, help="training seconds per planar flow")
    parser.add_argument("--cnf-seconds", type=float, default=20.0, help="training seconds per CNF")
    parser.add_argument("--n-eval", type=int, default=5000, help="samples for the KL and ESS estimates")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2-D problems are fastest on 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.energies, args.layers = ["u1", "u2"], [2, 8]
        args.planar_seconds, args.cnf_seconds, args.n_eval = 0.5, 1.0, 500
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, models = run(
        args.energies, args.layers, args.planar_seconds, args.cnf_seconds, args.n_eval, args.seed
    )
    out = Path(args.out)
    figure = plot(rows, models, out / "variational_inference.png", resolution=60 if args.quick else 100)
    (out / "variational_inference.json").write_text(json.dumps(rows, indent=2))
    print(f"{'energy':6} {'model':12} {'KL':>8} {'KL est.':>8} {'ESS':>6} {'steps':>6}")
    for r in rows:
        print(
            f"{r['energy']:6} {r['model']:12} {r['kl']:8.3f} {r['kl_estimate']:8.3f} {r['ess']:6.3f} {r['steps']:6d}"
        )
    print(f"wrote {figure} and {out / 'variational_inference.json'} in {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
