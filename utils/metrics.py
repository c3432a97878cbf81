"""Mean average precision, as Charades reports it (classification and per-frame localisation)."""
from __future__ import annotations

import numpy as np


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """AP of one class: the area under the step-wise precision-recall curve, each distinct score a
    threshold (ties move together), as scikit-learn's ``average_precision_score``. NaN when the
    class has no positive."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    positives = int(labels.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    # the last index of every run of equal scores: a threshold takes the whole run
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(labels)[last]
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean over classes (columns) of :func:`average_precision`; classes without a positive
    are left out, as they have no AP. NaN when no class has one."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    aps = [average_precision(labels[:, c], scores[:, c]) for c in range(labels.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")
