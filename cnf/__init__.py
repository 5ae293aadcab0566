"""cnf: continuous normalizing flows (neural-ODE flows) on PyTorch and torchdiffeq."""

from cnf.divergence import exact_divergence, hutchinson_divergence
from cnf.fields import LinearField, MLPField
from cnf.flow import CNF, StandardNormal
from cnf.solver import Solver, SolverError, SolveStats

__version__ = "0.1.0"

__all__ = [
    "CNF",
    "LinearField",
    "MLPField",
    "Solver",
    "SolverError",
    "SolveStats",
    "StandardNormal",
    "__version__",
    "exact_divergence",
    "hutchinson_divergence",
]
