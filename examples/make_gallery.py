"""Regenerate the README gallery: docs/gallery/{probability_path,trajectories,planar_vs_cnf}.png.

One short training run (planar flows with K = 2, 8, 32 and a CNF on two moons, as in
``planar_vs_cnf.py``) feeds all three pictures, saved small (dpi 80).

    python examples/make_gallery.py               # about 3-4 minutes on 2 CPU cores
    python examples/make_gallery.py --quick --out /tmp/gallery
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from cnf import plots
from cnf.threads import torch_threads

GALLERY = ("probability_path.png", "trajectories.png", "planar_vs_cnf.png")


def _sibling(name: str) -> ModuleType:
    """Import another example of this folder by file path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"cnf_example_{name}", Path(__file__).with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Train, draw the three gallery pictures into ``--out`` and return their paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/gallery", help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest here)")
    parser.add_argument("--quick", action="store_true", help="a few iterations and small grids (seconds)")
    parser.add_argument("--data", default="moons")
    parser.add_argument("--dpi", type=float, default=80.0)
    args = parser.parse_args(argv)
    # One torch thread: these small 2-D problems gain nothing from more, and on shared
    # cores torch's threads slow a training step down tenfold (measured).
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> list[Path]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    comparison = _sibling("planar_vs_cnf")
    flows, test_nll, test = comparison.fit_flows(
        args.data, (2, 8, 32), cnf_seconds=75.0, planar_seconds=45.0, quick=args.quick
    )
    flow = flows["CNF"]
    grid = {"bounds": plots.default_bounds(data=test), "resolution": 24 if args.quick else 90}
    title = f"CNF on {args.data}: the probability path p_t (test NLL {test_nll['CNF']:.3f})"
    paths = [out / name for name in GALLERY]
    plots.plot_probability_path(flow, data=test, title=title, path=paths[0], dpi=args.dpi, **grid)
    plots.plot_trajectories(flow, 60 if args.quick else 400, path=paths[1], dpi=args.dpi, **grid)
    title = f"{args.data}: planar flows (K = 2, 8, 32) and a CNF, with their test NLL"
    comparison.plot_comparison(
        flows, test_nll, test, title=title, path=paths[2], dpi=args.dpi, resolution=grid["resolution"]
    )
    for path in paths:
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")
    return paths


if __name__ == "__main__":
    main()
