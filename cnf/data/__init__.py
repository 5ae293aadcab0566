"""Data for continuous normalizing flows: 2-D toy samplers, target energies, user tables.

* :mod:`cnf.data.toy`: FFJORD's 2-D toy samplers and closed-form densities.
* :mod:`cnf.data.energies`: the unnormalised targets U1..U4 of Rezende & Mohamed (2015).
* :mod:`cnf.data.files`: ``.npy`` / ``.csv`` files, arrays and tensors; train/val/test splits.
* :mod:`cnf.data.real`: digits, wine, breast cancer (scikit-learn) and pzflow's galaxies, fixed splits.
* :mod:`cnf.data.checks`: :func:`check_batch`, the one validation function called before every solve.
"""

from cnf.data.checks import check_batch
from cnf.data.energies import ENERGIES, ENERGY_BOX, energy, target_log_density
from cnf.data.files import load_data, split
from cnf.data.real import REAL_DATASETS, RealDataset, load_real
from cnf.data.toy import TOY_DATASETS, eight_gaussians_log_prob, sample_toy, true_log_prob

__all__ = [
    "ENERGIES",
    "ENERGY_BOX",
    "REAL_DATASETS",
    "RealDataset",
    "TOY_DATASETS",
    "check_batch",
    "eight_gaussians_log_prob",
    "energy",
    "load_data",
    "load_real",
    "sample_toy",
    "split",
    "target_log_density",
    "true_log_prob",
]
