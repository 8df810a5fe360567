"""Host-side classification metrics with the original's definitions (numpy only).

Everything is derived from one confusion matrix (rows = true class, columns = predicted class), so
the jitted eval step may return either predictions (`ClassificationMetrics.update`) or its own
per-batch confusion matrix (`ClassificationMetrics.update_confusion`).

Macro-F1 averages over **all** `num_classes`, absent classes counting 0, as the original does;
sklearn's `f1_score(average="macro")` averages only over labels present in y_true or y_pred.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(
    y_true: Any, y_pred: Any, num_classes: int, mask: Any | None = None
) -> np.ndarray:
    """Counts (true, predicted) pairs into an int64 [num_classes, num_classes] matrix.

    Samples where `mask` is False (evaluation padding, skipped images) are left out.
    """
    y_true = np.asarray(y_true).reshape(-1).astype(np.int64)
    y_pred = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} entries but y_pred has {y_pred.size}")
    if mask is not None:
        keep = np.asarray(mask, dtype=bool).reshape(-1)
        y_true, y_pred = y_true[keep], y_pred[keep]
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} holds class ids outside [0, {num_classes}): "
                f"min {values.min()}, max {values.max()}"
            )
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def accuracy(cm: np.ndarray) -> float:
    """Fraction (0–1) of samples on the diagonal; NaN for an empty matrix."""
    return float(_ratio(np.trace(cm), cm.sum()))


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of each class; NaN for classes absent from y_true."""
    return _ratio(np.diag(cm), cm.sum(axis=1))


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    """F1 of each class, 0 where precision + recall is 0 (including classes never seen)."""
    tp = np.diag(cm).astype(np.float64)
    precision = np.nan_to_num(_ratio(tp, cm.sum(axis=0)))
    recall = np.nan_to_num(_ratio(tp, cm.sum(axis=1)))
    return np.nan_to_num(_ratio(2 * precision * recall, precision + recall))


def macro_f1(cm: np.ndarray) -> float:
    """Mean per-class F1 over all classes of the matrix (absent classes count 0)."""
    return float(per_class_f1(cm).mean())


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in y_true (sklearn's balanced_accuracy_score)."""
    recall = per_class_recall(cm)
    present = ~np.isnan(recall)
    return float(recall[present].mean()) if present.any() else float("nan")


class ClassificationMetrics:
    """Accumulates one epoch (or evaluation) of predictions and per-batch mean losses.

    The loss is the mean of the per-batch mean losses, as in the original (not a per-sample mean).
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), np.int64)
        self.batch_losses: list[float] = []

    def update(
        self, labels: Any, preds: Any, *, valid: Any | None = None, loss: Any | None = None
    ) -> None:
        """Adds a batch of integer labels and predictions; `loss` is that batch's mean loss.

        A batch whose `valid` mask is all False adds nothing, not even its loss.
        """
        if valid is not None and not np.asarray(valid).any():
            return
        self.update_confusion(confusion_matrix(labels, preds, self.num_classes, valid), loss=loss)

    def update_confusion(self, matrix: Any, *, loss: Any | None = None) -> None:
        """Adds a batch's confusion matrix computed elsewhere (e.g. on device)."""
        matrix = np.asarray(matrix)
        if matrix.shape != self.matrix.shape:
            raise ValueError(f"confusion matrix shape {matrix.shape} != {self.matrix.shape}")
        self.matrix += matrix.astype(np.int64)
        if loss is not None:
            self.batch_losses.append(float(loss))

    def compute(self) -> dict[str, Any]:
        """Returns loss, accuracy (0–1), macro_f1, balanced_accuracy, per-class recall, matrix.

        `per_class_recall` holds None for classes absent from the labels, so the dict is JSON-ready.
        """
        cm = self.matrix
        recall = per_class_recall(cm)
        return {
            "loss": float(np.mean(self.batch_losses)) if self.batch_losses else float("nan"),
            "accuracy": accuracy(cm),
            "macro_f1": macro_f1(cm),
            "balanced_accuracy": balanced_accuracy(cm),
            "per_class_recall": [None if np.isnan(r) else float(r) for r in recall],
            "confusion_matrix": cm.tolist(),
            "num_samples": int(cm.sum()),
        }
