"""Overall classification metrics from labels and predicted probabilities (JSON-ready dicts).

Inputs are integer labels [N] and probabilities [N, C] whose rows sum to 1; the predicted label is
the argmax. Accuracy, balanced accuracy and the original's macro-F1 (all C classes, absent ones
counting 0) come from `dermjax.train.metrics`, so evaluation and training report the same numbers;
the rest (scikit-learn's macro-F1, per-class scores, AUROC) uses scikit-learn.

Calibration: the expected calibration error bins the top-1 confidence into `n_bins` equal-width
bins (lo, hi] (a confidence of exactly 0 falls into the first) and weights each bin's
|accuracy - confidence| by its share of samples (Guo et al., 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support, roc_auc_score

from dermjax.train import metrics as train_metrics


def _number(value: float) -> float | None:
    """A plain float, or None for NaN/inf (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def check_inputs(labels: Any, probs: Any, num_classes: int | None = None) -> tuple[np.ndarray, ...]:
    """Validates and returns (labels int64 [N], probs float64 [N, C]); ValueError when unusable."""
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.size == 0:
        raise ValueError("no samples to evaluate (labels is empty)")
    if probs.ndim != 2 or probs.shape[0] != labels.size:
        raise ValueError(f"probs must have shape [{labels.size}, C], got {probs.shape}")
    if num_classes is not None and probs.shape[1] != num_classes:
        raise ValueError(f"probs has {probs.shape[1]} columns for {num_classes} classes")
    if not np.isfinite(probs).all():
        raise ValueError("probs holds NaN or infinite values")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs rows must sum to 1 (pass softmax outputs, not logits)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels hold class ids outside [0, {probs.shape[1]})")
    return labels, probs


def _confidence_bins(probs: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 confidence [N] and its bin index [N] in 0..n_bins-1 ((lo, hi] bins)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence = probs.max(axis=1)
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    return confidence, index


def _bin_means(sums: np.ndarray, count: np.ndarray) -> list[float | None]:
    return [_number(s / c) if c else None for s, c in zip(sums, count, strict=True)]


def reliability_bins(labels: Any, probs: Any, n_bins: int = 15) -> dict[str, list]:
    """Per equal-width bin of top-1 confidence: mean confidence, accuracy and sample count.

    Returns {"edges": [n_bins + 1], "confidence": [n_bins], "accuracy": [n_bins], "count":
    [n_bins]}; empty bins have None confidence and accuracy. Feeds the reliability diagram.
    """
    labels, probs = check_inputs(labels, probs)
    confidence, index = _confidence_bins(probs, n_bins)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(index, weights=correct, minlength=n_bins)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "confidence": _bin_means(conf_sum, count),
        "accuracy": _bin_means(correct_sum, count),
        "count": count.tolist(),
    }


def expected_calibration_error(labels: Any, probs: Any, n_bins: int = 15) -> float:
    """ECE of the top-1 confidence: sum over bins of (n_bin / N) * |accuracy - confidence|."""
    labels, probs = check_inputs(labels, probs)
    confidence, index = _confidence_bins(probs, n_bins)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    gap = np.bincount(index, weights=correct - confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / labels.size)


def brier_score(labels: Any, probs: Any) -> float:
    """Multi-class Brier score: mean over samples of sum_c (p_c - onehot_c)^2 (0 best, 2 worst)."""
    labels, probs = check_inputs(labels, probs)
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def top_k_accuracy(labels: Any, probs: Any, k: int) -> float:
    """Fraction of samples whose label is among the k highest probabilities (1.0 when k >= C)."""
    labels, probs = check_inputs(labels, probs)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k >= probs.shape[1]:
        return 1.0
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def per_class_auroc(labels: Any, probs: Any) -> list[float | None]:
    """One-vs-rest AUROC of each class; None for a class without both positives and negatives."""
    labels, probs = check_inputs(labels, probs)
    out: list[float | None] = []
    for c in range(probs.shape[1]):
        positive = labels == c
        if positive.all() or not positive.any():
            out.append(None)
        else:
            out.append(float(roc_auc_score(positive, probs[:, c])))
    return out


def macro_auroc(labels: Any, probs: Any) -> float | None:
    """Mean one-vs-rest AUROC over the classes that have positives and negatives; None if none."""
    values = [v for v in per_class_auroc(labels, probs) if v is not None]
    return float(np.mean(values)) if values else None


def classification_metrics(
    labels: Any,
    probs: Any,
    classes: Sequence[str],
    top_k: Sequence[int] = (1, 3, 5),
    n_bins: int = 15,
) -> dict[str, Any]:
    """All overall metrics of one split as a JSON-ready dict.

    Keys: n, accuracy, balanced_accuracy, macro_f1 (the original's: mean F1 over all classes,
    absent ones counting 0), macro_f1_sklearn (scikit-learn's average="macro": only classes
    present in labels or predictions), top_k_accuracy ({"k": value}; k >= C gives 1.0),
    per_class ({class: precision, recall, f1, support, auroc}; None where undefined: precision
    of a class never predicted, recall of one absent, F1 of one neither predicted nor present,
    as training's `per_class_recall` does), auroc_macro (one-vs-rest, over
    classes with positives and negatives; None when none), ece, brier, confusion_matrix (rows =
    true class) and reliability (`reliability_bins`, for the reliability diagram).
    """
    labels, probs = check_inputs(labels, probs, len(classes))
    num_classes = len(classes)
    preds = probs.argmax(axis=1)
    cm = train_metrics.confusion_matrix(labels, preds, num_classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=list(range(num_classes)), zero_division=np.nan
    )
    auroc = per_class_auroc(labels, probs)
    present = [v for v in auroc if v is not None]
    return {
        "n": int(labels.size),
        "accuracy": train_metrics.accuracy(cm),
        "balanced_accuracy": train_metrics.balanced_accuracy(cm),
        "macro_f1": train_metrics.macro_f1(cm),
        "macro_f1_sklearn": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "top_k_accuracy": {str(k): top_k_accuracy(labels, probs, k) for k in top_k},
        "per_class": {
            str(name): {
                "precision": _number(precision[c]),
                "recall": _number(recall[c]),
                "f1": _number(f1[c]),
                "support": int(support[c]),
                "auroc": auroc[c],
            }
            for c, name in enumerate(classes)
        },
        "auroc_macro": float(np.mean(present)) if present else None,
        "ece": expected_calibration_error(labels, probs, n_bins),
        "brier": brier_score(labels, probs),
        "confusion_matrix": cm.tolist(),
        "reliability": reliability_bins(labels, probs, n_bins),
    }
