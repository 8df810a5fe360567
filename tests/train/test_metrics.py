"""Metrics follow the original's definitions: macro-F1 over all classes, loss = mean of batch means;
the on-device accumulator counts what the host-side update counts."""

import json
import warnings

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from dermjax.train.metrics import (
    ClassificationMetrics,
    accumulate,
    balanced_accuracy,
    confusion_matrix,
    host_metrics,
    macro_f1,
    totals_of,
)
from dermjax.train.step import batch_confusion


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


def test_device_accumulator_counts_like_the_host_update_and_skips_what_it_skips():
    rng = np.random.default_rng(3)
    host, totals = ClassificationMetrics(4), totals_of(ClassificationMetrics(4))
    cases = [(0.5, True, 12), (np.nan, False, 12), (2.0, True, 5), (np.nan, True, 0)]
    for loss, finite, valid_rows in cases:  # a non-finite step, an all-padding batch: not counted
        labels, preds = rng.integers(0, 4, (2, 12)).astype(np.int32)
        labels[valid_rows:] = 7  # padding labels may be out of range
        valid = np.arange(12) < valid_rows
        out = {
            "confusion": batch_confusion(labels, preds, valid, 4),
            "loss": np.float32(loss),
            "finite": np.bool_(finite),
        }
        totals = accumulate(totals, out)
        if finite:
            host.update(labels, preds, valid=valid, loss=loss)
    device = host_metrics(4, jax.device_get(totals))
    assert device.loss_batches == 2
    assert device.compute() == host.compute()


def test_state_dict_round_trips_and_reads_the_older_per_batch_losses():
    m = ClassificationMetrics(3)
    m.update([0, 1, 2], [0, 2, 2], loss=1.0)
    m.update([1], [1], loss=2.0)
    state = json.loads(json.dumps(m.state_dict()))
    assert ClassificationMetrics.from_state_dict(3, state).compute() == m.compute()
    older = {"matrix": state["matrix"], "batch_losses": [1.0, 2.0]}
    assert ClassificationMetrics.from_state_dict(3, older).compute() == m.compute()
