"""GLUE metrics, computed locally so that evaluation works offline.

The keys follow GLUE's (and the ``evaluate`` library's) names: ``accuracy``, ``f1`` (MRPC and QQP, positive class
1), ``matthews_correlation`` (CoLA), ``pearson`` and ``spearmanr`` (STS-B).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from rsoft_nlp.glue import GlueTask, get_task

__all__ = ["accuracy", "binary_f1", "compute_metrics", "matthews_correlation", "pearson", "spearman"]


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def binary_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class 1; 0 when there are no true positives."""
    true_pos = np.sum((predictions == 1) & (labels == 1))
    if true_pos == 0:
        return 0.0
    precision = true_pos / np.sum(predictions == 1)
    recall = true_pos / np.sum(labels == 1)
    return float(2 * precision * recall / (precision + recall))


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation of two binary labelings; 0 when either is constant."""
    tp = float(np.sum((predictions == 1) & (labels == 1)))
    tn = float(np.sum((predictions == 0) & (labels == 0)))
    fp = float(np.sum((predictions == 1) & (labels == 0)))
    fn = float(np.sum((predictions == 0) & (labels == 1)))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denominator) if denominator > 0 else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant, as the correlation is then undefined."""
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return float("nan")
    return float(stats.pearsonr(predictions, labels).statistic)


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation; NaN when either side is constant."""
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return float("nan")
    return float(stats.spearmanr(predictions, labels).statistic)


def compute_metrics(task: GlueTask | str, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The task's GLUE metrics.

    Args:
        task: The GLUE task.
        predictions: Class ids, or scores for STS-B.
        labels: Gold class ids or scores, as many as ``predictions``.

    Raises:
        ValueError: If the two lengths differ or are zero.
    """
    task = get_task(task) if isinstance(task, str) else task
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if len(predictions) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"`predictions` and `labels` must have the same non-zero length, got {len(predictions)} and {len(labels)}"
        )

    if task.is_regression:
        return {"pearson": pearson(predictions, labels), "spearmanr": spearman(predictions, labels)}
    if task.name == "cola":
        return {"matthews_correlation": matthews_correlation(predictions, labels)}
    if task.name in ("mrpc", "qqp"):
        return {"accuracy": accuracy(predictions, labels), "f1": binary_f1(predictions, labels)}
    return {"accuracy": accuracy(predictions, labels)}
