"""Classification metrics with the original's definitions, and their on-device accumulator.

Everything is derived from one confusion matrix (rows = true class, columns = predicted class)
and the sum and count of per-batch mean losses. The loop adds each step's confusion matrix and
loss on the devices (`totals_of`, `accumulate`: no per-batch transfer) and fetches the totals
once per pass into a host-side `ClassificationMetrics` (`update_confusion`), which computes the
metrics with numpy; `ClassificationMetrics.update` takes labels and predictions instead.

Macro-F1 averages over **all** `num_classes`, absent classes counting 0, as the original does;
sklearn's `f1_score(average="macro")` averages only over labels present in y_true or y_pred.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
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
        self.loss_sum = 0.0  # sum of the counted batches' mean losses
        self.loss_batches = 0

    def update(
        self, labels: Any, preds: Any, *, valid: Any | None = None, loss: Any | None = None
    ) -> None:
        """Adds a batch of integer labels and predictions; `loss` is that batch's mean loss.

        A batch whose `valid` mask is all False adds nothing, not even its loss.
        """
        if valid is not None and not np.asarray(valid).any():
            return
        self.update_confusion(confusion_matrix(labels, preds, self.num_classes, valid), loss=loss)

    def update_confusion(self, matrix: Any, *, loss: Any | None = None, batches: int = 1) -> None:
        """Adds the confusion matrix of `batches` batches computed elsewhere (e.g. on device);
        `loss` is the sum of their mean losses (one batch: its mean loss)."""
        matrix = np.asarray(matrix)
        if matrix.shape != self.matrix.shape:
            raise ValueError(f"confusion matrix shape {matrix.shape} != {self.matrix.shape}")
        self.matrix += matrix.astype(np.int64)
        if loss is not None:
            self.loss_sum += float(loss)
            self.loss_batches += batches

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready counts (stored in checkpoints of a partial epoch)."""
        return {
            "matrix": self.matrix.tolist(),
            "loss_sum": self.loss_sum,
            "loss_batches": self.loss_batches,
        }

    @classmethod
    def from_state_dict(cls, num_classes: int, state: dict[str, Any]) -> ClassificationMetrics:
        """Inverse of `state_dict`; also reads the per-batch loss list of older checkpoints."""
        metrics = cls(num_classes)
        losses = state.get("batch_losses")
        loss_sum = sum(losses) if losses is not None else state["loss_sum"]
        batches = len(losses) if losses is not None else state["loss_batches"]
        metrics.update_confusion(state["matrix"], loss=loss_sum, batches=batches)
        return metrics

    def compute(self) -> dict[str, Any]:
        """Returns loss, accuracy (0–1), macro_f1, balanced_accuracy, per-class recall, matrix.

        `per_class_recall` holds None for classes absent from the labels, so the dict is JSON-ready.
        """
        cm = self.matrix
        recall = per_class_recall(cm)
        return {
            "loss": self.loss_sum / self.loss_batches if self.loss_batches else float("nan"),
            "accuracy": accuracy(cm),
            "macro_f1": macro_f1(cm),
            "balanced_accuracy": balanced_accuracy(cm),
            "per_class_recall": [None if np.isnan(r) else float(r) for r in recall],
            "confusion_matrix": cm.tolist(),
            "num_samples": int(cm.sum()),
        }


# ---- On the devices ---------------------------------------------------------------------------
def totals_of(metrics: ClassificationMetrics) -> dict[str, np.ndarray]:
    """`metrics`' counts as the arrays `accumulate` carries (put them on the devices)."""
    return {
        "confusion": metrics.matrix.astype(np.int32),
        "loss_sum": np.float32(metrics.loss_sum),
        "batches": np.int32(metrics.loss_batches),
    }


@jax.jit
def accumulate(totals: dict, out: dict) -> dict:
    """Adds one step's `confusion` and mean `loss` to `totals`, as `ClassificationMetrics.update`
    does: a batch without valid rows, or whose train step was not finite, adds nothing."""
    counted = out["confusion"].sum() > 0
    if "finite" in out:
        counted &= out["finite"]
    return {
        "confusion": totals["confusion"] + jnp.where(counted, out["confusion"], 0),
        "loss_sum": totals["loss_sum"] + jnp.where(counted, out["loss"], 0.0),
        "batches": totals["batches"] + counted.astype(jnp.int32),
    }


def host_metrics(num_classes: int, totals: dict[str, Any]) -> ClassificationMetrics:
    """`ClassificationMetrics` from fetched totals (the inverse of `totals_of`)."""
    metrics = ClassificationMetrics(num_classes)
    loss_sum = float(totals["loss_sum"])
    metrics.update_confusion(totals["confusion"], loss=loss_sum, batches=int(totals["batches"]))
    return metrics
