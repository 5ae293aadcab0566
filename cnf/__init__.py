"""cnf: continuous normalizing flows (neural-ODE flows) on PyTorch and torchdiffeq."""

from cnf.checkpoint import load_checkpoint, save_checkpoint
from cnf.divergence import exact_divergence, hutchinson_divergence
from cnf.fields import LinearField, MLPField
from cnf.flow import CNF, StandardNormal
from cnf.planar import ConditionalPlanarFlow, PlanarFlow
from cnf.recipes import recipe
from cnf.solver import Solver, SolverError, SolveStats
from cnf.training import TrainingError, TrainingInterrupted, TrainSettings, evaluate_nll, train
from cnf.transforms import TransformedFlow

__version__ = "0.1.0"

__all__ = [
    "CNF",
    "ConditionalPlanarFlow",
    "LinearField",
    "MLPField",
    "PlanarFlow",
    "Solver",
    "SolverError",
    "SolveStats",
    "StandardNormal",
    "TrainSettings",
    "TrainingError",
    "TrainingInterrupted",
    "TransformedFlow",
    "__version__",
    "evaluate_nll",
    "exact_divergence",
    "hutchinson_divergence",
    "load_checkpoint",
    "recipe",
    "save_checkpoint",
    "train",
]
