"""Invertible preprocessing maps with log|det|, composable and stored in checkpoints.

* :class:`Standardize`: (x - mean) / scale, statistics from the training split.
* :class:`Whiten`: ZCA whitening, so that a flow starts from the data's Gaussian fit.
* :class:`Dequantize`: uniform noise within the bins of integer / few-level data.
* :class:`Logit`: logit(alpha + (1 - 2 alpha) x) for data in [0, 1].
* :class:`Compose`: a chain of them.
* :func:`choose_preprocessing`: what a table needs, fitted on its training split.
* :class:`TransformedFlow`: a flow with its preprocessing, reporting log p in the data's units.

Contract: ``forward(x) -> (y, logdet)`` per sample for x of shape (n, ...), ``inverse(y) -> x``,
``config()`` (plain types and tensors); :func:`build_transform` rebuilds from a config.
"""

from cnf.transforms.base import Compose, Transform, build_transform
from cnf.transforms.dequantize import Dequantize
from cnf.transforms.detect import STEPS, choose_preprocessing
from cnf.transforms.flow import TransformedFlow, bits_per_dim, leading_dequantize
from cnf.transforms.logit import DEFAULT_ALPHA, Logit
from cnf.transforms.standardize import Standardize
from cnf.transforms.whiten import Whiten

__all__ = [
    "DEFAULT_ALPHA",
    "STEPS",
    "Compose",
    "Dequantize",
    "Logit",
    "Standardize",
    "Transform",
    "TransformedFlow",
    "Whiten",
    "bits_per_dim",
    "build_transform",
    "choose_preprocessing",
    "leading_dequantize",
]
