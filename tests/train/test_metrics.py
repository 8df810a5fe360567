"""Metrics follow the original's definitions: macro-F1 over all classes, loss = mean of batch means."""

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from dermjax.train.metrics import (
    ClassificationMetrics,
    balanced_accuracy,
    confusion_matrix,
    macro_f1,
)


def test_confusion_matrix_matches_sklearn_and_drops_masked_samples():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    mask = rng.random(200) < 0.7
    cm = confusion_matrix(y_true, y_pred, 5, mask)
    expected = skm.confusion_matrix(y_true[mask], y_pred[mask], labels=range(5))
    np.testing.assert_array_equal(cm, expected)


def test_confusion_matrix_rejects_class_ids_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], 3)


def test_masked_padding_labels_may_be_out_of_range():
    cm = confusion_matrix([1, -1], [1, 0], 2, mask=[True, False])
    np.testing.assert_array_equal(cm, [[0, 0], [0, 1]])


def test_macro_f1_counts_absent_classes_as_zero_unlike_sklearn_macro():
    # Classes 2 and 3 never occur; class 4 is predicted once but never true.
    y_true = np.array([0, 0, 1, 1, 1])
    y_pred = np.array([0, 1, 1, 1, 4])
    cm = confusion_matrix(y_true, y_pred, 5)
    # class 0: P=1, R=1/2 -> 2/3; class 1: P=2/3, R=2/3 -> 2/3; classes 2, 3, 4: 0.
    assert macro_f1(cm) == pytest.approx((2 / 3 + 2 / 3) / 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sklearn_macro = skm.f1_score(y_true, y_pred, average="macro")
        sklearn_all = skm.f1_score(
            y_true, y_pred, labels=range(5), average="macro", zero_division=0
        )
    assert macro_f1(cm) != pytest.approx(sklearn_macro)
    assert macro_f1(cm) == pytest.approx(sklearn_all)


def test_balanced_accuracy_averages_recall_over_classes_present_in_labels():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 3])
    cm = confusion_matrix(y_true, y_pred, 4)
    assert balanced_accuracy(cm) == pytest.approx((3 / 4 + 1 / 2 + 0) / 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert balanced_accuracy(cm) == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))


def test_accumulated_loss_is_the_mean_of_batch_means_and_padding_is_ignored():
    m = ClassificationMetrics(3)
    m.update([0, 1, 2, 2], [0, 1, 1, 2], loss=1.0)
    m.update([1, 0, 0, 0], [1, 2, 0, 0], valid=[True, False, False, False], loss=3.0)
    m.update([0, 0], [1, 1], valid=[False, False], loss=np.nan)  # all padding: ignored
    out = m.compute()
    assert out["loss"] == pytest.approx(2.0)  # per-sample mean would be (4*1 + 1*3) / 5
    assert out["num_samples"] == 5
    assert out["accuracy"] == pytest.approx(4 / 5)
    assert out["confusion_matrix"] == [[1, 0, 0], [0, 2, 0], [0, 1, 1]]
    assert out["per_class_recall"] == pytest.approx([1.0, 1.0, 0.5])


def test_compute_is_json_ready_with_none_recall_for_absent_classes():
    m = ClassificationMetrics(3)
    m.update(np.array([0, 0]), np.array([0, 2]), loss=np.float32(0.5))
    out = m.compute()
    assert out["per_class_recall"] == [0.5, None, None]
    assert json.loads(json.dumps(out, allow_nan=False)) == out


def test_update_confusion_accumulates_like_update():
    rng = np.random.default_rng(2)
    a, b = ClassificationMetrics(4), ClassificationMetrics(4)
    for _ in range(3):
        y, p = rng.integers(0, 4, 16), rng.integers(0, 4, 16)
        a.update(y, p, loss=0.25)
        b.update_confusion(confusion_matrix(y, p, 4), loss=0.25)
    assert a.compute() == b.compute()
