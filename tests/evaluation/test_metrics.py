"""Overall metrics: scikit-learn agreement, the original's macro-F1, hand-computed ECE and Brier."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from dermjax.evaluation.metrics import (
    brier_score,
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
)


def _predictions(n: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels covering every class and softmax probabilities that favour the true class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), labels] += 1.0
    probs = np.exp(logits)
    return labels, probs / probs.sum(axis=1, keepdims=True)


def test_classification_metrics_match_sklearn_on_crafted_predictions():
    labels, probs = _predictions(300, 6)
    classes = [f"c{i}" for i in range(6)]
    preds = probs.argmax(axis=1)
    out = classification_metrics(labels, probs, classes, top_k=(1, 3, 5))
    assert out["n"] == 300
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
    assert out["macro_f1_sklearn"] == pytest.approx(skm.f1_score(labels, preds, average="macro"))
    assert out["macro_f1"] == pytest.approx(out["macro_f1_sklearn"])  # every class present
    for k in (1, 3, 5):
        expected = skm.top_k_accuracy_score(labels, probs, k=k, labels=range(6))
        assert out["top_k_accuracy"][str(k)] == pytest.approx(expected)
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=range(6))
    for c, name in enumerate(classes):
        got = out["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p[c], r[c], f[c]))
        assert got["support"] == s[c]
        assert got["auroc"] == pytest.approx(skm.roc_auc_score(labels == c, probs[:, c]))
    expected_auroc = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert out["auroc_macro"] == pytest.approx(expected_auroc)
    assert out["confusion_matrix"] == skm.confusion_matrix(labels, preds).tolist()
    assert out["brier"] == pytest.approx(brier_score(labels, probs))
    json.dumps(out, allow_nan=False)  # plain JSON types only


def test_macro_f1_counts_absent_classes_as_zero_unlike_sklearn():
    labels, probs2 = _predictions(40, 2)
    probs = np.zeros((40, 4))
    probs[:, :2] = probs2  # classes 2 and 3 never occur nor get predicted
    out = classification_metrics(labels, probs, ["a", "b", "c", "d"])
    assert out["macro_f1"] == pytest.approx(out["macro_f1_sklearn"] / 2)
    assert out["per_class"]["c"]["auroc"] is None
    undefined = {"precision": None, "recall": None, "f1": None, "support": 0, "auroc": None}
    assert out["per_class"]["c"] == undefined  # not 0: nothing to be right or wrong about


def test_precision_of_a_class_never_predicted_is_undefined_not_zero():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])
    out = classification_metrics(np.array([0, 0, 1]), probs, ["a", "b"])
    assert out["per_class"]["b"]["precision"] is None
    assert out["per_class"]["b"]["recall"] == 0.0 and out["per_class"]["b"]["f1"] == 0.0
    assert out["per_class"]["a"]["precision"] == pytest.approx(2 / 3)
    assert out["auroc_macro"] == pytest.approx(
        np.mean([out["per_class"][c]["auroc"] for c in "ab"])
    )


def test_top_k_accuracy_is_one_when_k_reaches_the_number_of_classes():
    labels, probs = _predictions(30, 3)
    out = classification_metrics(labels, probs, ["a", "b", "c"], top_k=(1, 3, 5))
    assert out["top_k_accuracy"]["3"] == 1.0 and out["top_k_accuracy"]["5"] == 1.0
    assert out["top_k_accuracy"]["1"] < 1.0


def test_auroc_macro_is_none_when_no_class_has_positives_and_negatives():
    probs = np.array([[0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])
    out = classification_metrics(np.zeros(3, dtype=int), probs, ["a", "b"])
    assert out["auroc_macro"] is None
    assert [m["auroc"] for m in out["per_class"].values()] == [None, None]


def test_expected_calibration_error_matches_a_hand_computed_case():
    # top-1 confidences 0.9 (right), 0.9 (wrong), 0.7 (right), 0.65 (wrong), 0.55 (right)
    conf = np.array([0.9, 0.9, 0.7, 0.65, 0.55])
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = np.array([0, 1, 0, 1, 0])
    # 5 bins: (0.8, 1] acc 1/2 conf 0.9; (0.6, 0.8] acc 1/2 conf 0.675; (0.4, 0.6] acc 1 conf 0.55
    expected = 2 / 5 * 0.4 + 2 / 5 * 0.175 + 1 / 5 * 0.45
    assert expected_calibration_error(labels, probs, n_bins=5) == pytest.approx(expected)
    bins = reliability_bins(labels, probs, n_bins=5)
    assert bins["count"] == [0, 0, 1, 2, 2]
    assert bins["accuracy"][:2] == [None, None]
    assert bins["accuracy"][2:] == pytest.approx([1.0, 0.5, 0.5])
    assert bins["confidence"][2:] == pytest.approx([0.55, 0.675, 0.9])
    assert bins["edges"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_a_confidence_on_a_bin_edge_falls_in_the_lower_bin():
    """Bins are (lo, hi]: 0.8 at 5 bins is in (0.6, 0.8], as 1.0 is in (0.8, 1]."""
    probs = np.array([[0.8, 0.2], [1.0, 0.0]])
    assert reliability_bins(np.array([0, 0]), probs, n_bins=5)["count"] == [0, 0, 0, 1, 1]
    # both right: each bin's gap is 1 - its confidence
    assert expected_calibration_error(np.array([0, 0]), probs, n_bins=5) == pytest.approx(0.1)


def test_labels_outside_the_classes_are_refused():
    probs = np.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        expected_calibration_error(np.array([0, 3]), probs)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        expected_calibration_error(np.array([-1, 0]), probs)


def test_perfectly_confident_correct_predictions_have_zero_ece():
    probs = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error([0, 1, 2, 1], probs) == 0.0


def test_brier_score_matches_a_hand_computed_case():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    # (0.3² + 0.2² + 0.1²) = 0.14 and (0.5² + 0.3² + 0.8²) = 0.98
    assert brier_score([0, 2], probs) == pytest.approx((0.14 + 0.98) / 2)


def test_empty_input_raises_a_clear_value_error():
    with pytest.raises(ValueError, match="no samples"):
        classification_metrics(np.zeros(0, dtype=int), np.zeros((0, 2)), ["a", "b"])


def test_logits_instead_of_probabilities_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        classification_metrics([0, 1], np.array([[2.0, -1.0], [0.5, 3.0]]), ["a", "b"])
