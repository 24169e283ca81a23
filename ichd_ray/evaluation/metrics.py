"""Evaluation metrics: pure functions over numpy arrays, no Ray.

* :func:`weighted_log_loss` is the RSNA 2019 challenge metric: a multi-label log loss where ``any``
  weighs 2 and each subtype 1 (sum of weights 7), probabilities clipped to ``[eps, 1 - eps]``
  (eps = 1e-15, as in the metric itself).
* :func:`per_class_auc`, :func:`sensitivity_specificity`: per class, at given thresholds (evaluation
  applies each set where it was chosen: slice thresholds to slice outputs, study thresholds to the
  study head's); :func:`confusion` for calls already made (e.g. the ``flagged`` column).
* Study level: a study is positive for a class if any of its slices is (:func:`study_labels`);
  :func:`consecutive_positive` is the ETH report's rule (positive when >= 3 consecutive slices are
  predicted positive), scored with :func:`f1_score`.
* :func:`choose_thresholds` picks per-class thresholds on out-of-fold predictions (max F1 on a grid).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ichd_ray import CLASS_WEIGHTS, CLASSES

__all__ = [
    "CLASS_WEIGHTS",
    "weighted_log_loss",
    "per_class_auc",
    "sensitivity_specificity",
    "f1_score",
    "confusion",
    "study_labels",
    "consecutive_positive",
    "choose_thresholds",
]



def _check(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.shape != y_prob.shape or y_true.ndim != 2:
        raise ValueError(f"labels {y_true.shape} and probabilities {y_prob.shape} must both be [N, C]")
    if not np.isin(y_true, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y_true, y_prob


def weighted_log_loss(
    y_true: np.ndarray, y_prob: np.ndarray, weights: Sequence[float] = CLASS_WEIGHTS, eps: float = 1e-15
) -> float:
    """The challenge metric: ``-sum_n sum_c w_c [y log p + (1-y) log(1-p)] / (N * sum_c w_c)``.

    Args:
        y_true: [N, C] 0/1 labels (rows: slices or studies).
        y_prob: [N, C] probabilities.
        weights: per-class weights, default ``any`` x2.
        eps: clipping of the probabilities.
    """
    y_true, y_prob = _check(y_true, y_prob)
    w = np.asarray(weights, dtype=np.float64)
    p = np.clip(y_prob, eps, 1.0 - eps)
    per_element = -(y_true * np.log(p) + (1.0 - y_true) * np.log(1.0 - p))
    return float((per_element * w).sum() / (len(y_true) * w.sum()))


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties get half credit); NaN when one class is absent."""
    pos, neg = y == 1, y == 0
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def per_class_auc(y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str] = CLASSES) -> dict[str, float]:
    y_true, y_prob = _check(y_true, y_prob)
    return {c: _auc(y_true[:, i], y_prob[:, i]) for i, c in enumerate(classes)}


def sensitivity_specificity(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: Sequence[float], classes: Sequence[str] = CLASSES
) -> dict[str, dict[str, float]]:
    """Per class: sensitivity (TP / positives) and specificity (TN / negatives) at ``p >= threshold``."""
    y_true, y_prob = _check(y_true, y_prob)
    pred = y_prob >= np.asarray(thresholds, dtype=np.float64)[None, :]
    out = {}
    for i, c in enumerate(classes):
        pos, neg = y_true[:, i] == 1, y_true[:, i] == 0
        out[c] = {
            "sensitivity": float(pred[pos, i].mean()) if pos.any() else float("nan"),
            "specificity": float((~pred[neg, i]).mean()) if neg.any() else float("nan"),
        }
    return out


def f1_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 of binary vectors; 0 when there is nothing to find and nothing found is not defined: NaN."""
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_pred, dtype=bool)
    tp = float((y_true & y_pred).sum())
    denom = float(y_true.sum() + y_pred.sum())
    return float("nan") if denom == 0 else 2.0 * tp / denom


def confusion(y_true: Sequence[bool] | np.ndarray, y_pred: Sequence[bool] | np.ndarray) -> dict[str, float]:
    """Counts and rates of binary calls: tp, fp, fn, tn, sensitivity (tp / positives) and specificity
    (tn / negatives); a rate without any case to measure it on is NaN."""
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_pred, dtype=bool)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"truth {y_true.shape} and calls {y_pred.shape} must be 1-d and of the same length")
    tp, fn = int((y_true & y_pred).sum()), int((y_true & ~y_pred).sum())
    fp, tn = int((~y_true & y_pred).sum()), int((~y_true & ~y_pred).sum())
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
    }


def study_labels(slice_labels: np.ndarray, study_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Study-level labels: a study is positive for a class if any of its slices is.

    Args:
        slice_labels: [N, C] labels (or predictions) per slice.
        study_index: [N] study id per slice (any hashable values).

    Returns:
        (study ids in sorted order, [S, C] max over each study's slices).
    """
    ids, inverse = np.unique(np.asarray(study_index), return_inverse=True)
    out = np.zeros((len(ids), slice_labels.shape[1]), dtype=np.asarray(slice_labels).dtype)
    np.maximum.at(out, inverse, np.asarray(slice_labels))
    return ids, out


def consecutive_positive(slice_positive: np.ndarray, run: int = 3) -> bool:
    """ETH report's study rule: True when at least ``run`` consecutive slices (z order) are positive."""
    best = current = 0
    for value in np.asarray(slice_positive, dtype=bool):
        current = current + 1 if value else 0
        best = max(best, current)
    return best >= run


def choose_thresholds(
    y_true: np.ndarray, y_prob: np.ndarray, grid: Sequence[float] | None = None, default: float = 0.5
) -> list[float]:
    """Per class, the grid threshold with the best F1 on out-of-fold predictions (ties: the one nearest
    0.5); ``default`` for a class without positives."""
    y_true, y_prob = _check(y_true, y_prob)
    grid = np.asarray(grid if grid is not None else np.round(np.arange(0.05, 0.951, 0.05), 2))
    chosen = []
    for i in range(y_true.shape[1]):
        if not y_true[:, i].any():
            chosen.append(default)
            continue
        scores = [f1_score(y_true[:, i], y_prob[:, i] >= t) for t in grid]
        best = max(range(len(grid)), key=lambda k: (np.nan_to_num(scores[k], nan=-1.0), -abs(grid[k] - 0.5)))
        chosen.append(float(grid[best]))
    return chosen
