"""Anomaly scores from a density model: likelihood p-values and the ROC AUC that rates them.

A flow fitted to normal data gives its density p(x); a new point gets the p-value "fraction of
held-out normal points whose density is lower than p(x)" (the seed lectures: "one can associate a
likelihood p-value to a given event"). Small p-values flag anomalies; the ROC AUC says how well a
score separates anomalies from normal points. Used by examples/anomaly_detection.py and
examples/digits.py.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more anomalous) for 0/1 ``labels``.

    Equals P(score of an anomaly > score of a normal point) + P(tie) / 2, computed from the
    rank sum of the anomalies (Mann-Whitney U; Hanley & McNeil 1982), ties given mean ranks.
    """
    scores = np.asarray(scores, dtype=float).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same length, got {scores.size} and {labels.size}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomaly), got values {np.unique(labels)!r}")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"labels must contain both classes, got {n_pos} anomalies and {n_neg} normal points")
    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def p_values(log_density: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """Fraction of the ``calibration`` log densities (held-out normal points) below each value."""
    reference = np.sort(np.asarray(calibration, dtype=float))
    return np.searchsorted(reference, np.asarray(log_density, dtype=float), side="left") / reference.size
