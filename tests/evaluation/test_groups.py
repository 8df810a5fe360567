"""Skin-type codings, the group table join, and group metrics with bootstrap intervals."""

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from dermjax.errors import ConfigError, DataError
from dermjax.evaluation import groups
from dermjax.evaluation.metrics import classification_metrics, expected_calibration_error

CLASSES = ["a", "b", "c"]


def _predictions(n: int, skill: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), labels] += skill
    probs = np.exp(logits)
    return labels, probs / probs.sum(axis=1, keepdims=True)


def test_fitzpatrick_coding_maps_1_to_6_and_minus_one_to_missing():
    values = pd.Series([1, 2, 3, 4, 5, 6, -1, None, 7, "3", 2.0])
    got = groups.fitzpatrick_skin_type(values).tolist()
    assert got == ["I", "II", "III", "IV", "V", "VI", None, None, None, "III", "II"]


def test_ddi_coding_maps_12_34_56_to_type_pairs():
    got = groups.ddi_skin_type(pd.Series([12, 34, 56, 0, "34", None])).tolist()
    assert got == ["I-II", "III-IV", "V-VI", None, "III-IV", None]


def test_both_codings_share_the_coarse_skin_type_groups():
    frame = pd.DataFrame(
        {
            "dataset": ["fitzpatrick17k"] * 4 + ["ddi"] * 3,
            "fitzpatrick_scale": [1, 4, 6, -1, None, None, None],
            "skin_tone": [None, None, None, None, 12, 34, 56],
        }
    )
    out = groups.add_skin_type(frame)
    assert out["skin_type"].tolist() == ["I", "IV", "VI", None, "I-II", "III-IV", "V-VI"]
    assert out["skin_type_group"].tolist() == [
        "I-II", "III-IV", "V-VI", None, "I-II", "III-IV", "V-VI"
    ]  # fmt: skip


def test_group_frame_defaults_to_dataset_and_skin_type_group_aligned_to_meta():
    meta = pd.DataFrame(
        {"dataset": ["ddi", "isic", "ddi"], "fitzpatrick_scale": [2, -1, 5], "label": [0, 1, 2]},
        index=[10, 11, 12],
    )
    out = groups.group_frame(meta, None, None)
    assert list(out.columns) == ["dataset", "skin_type_group"]
    assert list(out.index) == [10, 11, 12]
    assert out["skin_type_group"].tolist() == ["I-II", None, "V-VI"]
    assert list(groups.group_frame(meta.drop(columns="fitzpatrick_scale")).columns) == ["dataset"]


def test_group_frame_joins_a_ddi_side_table_on_image_id(tmp_path):
    path = tmp_path / "ddi_tones.csv"
    pd.DataFrame({"image_id": ["001", "003"], "skin_tone": [56, 12]}).to_csv(path, index=False)
    meta = pd.DataFrame({"image_id": ["001", "002", "003"], "dataset": ["ddi"] * 3})
    out = groups.group_frame(meta, ["skin_type", "skin_type_group"], groups.load_group_table(path))
    assert out["skin_type"].tolist() == ["V-VI", None, "I-II"]  # "001" keeps its leading zeros
    assert out["skin_type_group"].tolist() == ["V-VI", None, "I-II"]


def test_group_frame_names_the_config_field_and_columns_for_an_unknown_column():
    meta = pd.DataFrame({"dataset": ["ddi"], "label": [0]})
    with pytest.raises(ConfigError, match=r"evaluation\.group_columns.*'sex'.*available.*dataset"):
        groups.group_frame(meta, ["sex"], None)


def test_load_group_table_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=r"nope\.csv.*evaluation\.groups_path"):
        groups.load_group_table(str(missing))
    no_id = tmp_path / "no_id.csv"
    pd.DataFrame({"id": [1], "skin_tone": [12]}).to_csv(no_id, index=False)
    with pytest.raises(DataError, match=r"no_id\.csv.*image_id"):
        groups.load_group_table(str(no_id))
    table = tmp_path / "tones.parquet"
    pd.DataFrame({"image_id": ["x", "y"], "fitzpatrick_scale": [3, -1]}).to_parquet(table)
    assert groups.load_group_table(str(table))["fitzpatrick_scale"].tolist() == [3, -1]


def test_group_metrics_match_direct_metrics_per_group_with_gap_and_worst_group():
    labels_a, probs_a = _predictions(90, 3.0, seed=1)  # a good group
    labels_b, probs_b = _predictions(60, 0.5, seed=2)  # a poor group
    labels = np.r_[labels_a, labels_b, [0, 1]]
    probs = np.r_[probs_a, probs_b, probs_a[:2]]
    table = pd.DataFrame({"site": ["A"] * 90 + ["B"] * 60 + [None, None]})
    out = groups.group_metrics(labels, probs, table, CLASSES, n_boot=200, seed=0)["site"]
    assert out["n_missing"] == 2
    assert list(out["groups"]) == ["A", "B"]
    for name, (y, p) in {"A": (labels_a, probs_a), "B": (labels_b, probs_b)}.items():
        got, direct = out["groups"][name], classification_metrics(y, p, CLASSES)
        assert got["n"] == len(y)
        for key in ("accuracy", "balanced_accuracy", "auroc_macro"):
            assert got[key] == pytest.approx(direct[key])
        assert got["macro_f1"] == pytest.approx(direct["macro_f1_sklearn"])
        assert got["ece"] == pytest.approx(expected_calibration_error(y, p))
    for key in groups.GROUP_METRICS:
        a, b = out["groups"]["A"][key], out["groups"]["B"][key]
        assert out["worst_group_gap"][key] == pytest.approx(abs(a - b))
    assert out["worst_group"]["accuracy"] == "B"
    eces = {g: out["groups"][g]["ece"] for g in "AB"}
    assert eces["A"] != eces["B"]
    assert out["worst_group"]["ece"] == max(eces, key=eces.get)  # higher ECE is worse


def test_bootstrap_interval_contains_the_point_and_shrinks_with_more_rows():
    widths = []
    for n in (60, 960):
        labels, probs = _predictions(n, 1.0, seed=3)
        table = pd.DataFrame({"all": ["x"] * n})
        result = groups.group_metrics(labels, probs, table, CLASSES, n_boot=300, seed=0)
        stats = result["all"]["groups"]["x"]
        for key in groups.GROUP_METRICS:
            lo, hi = stats[f"{key}_ci"]
            assert lo <= stats[key] <= hi, key
        widths.append({k: np.diff(stats[f"{k}_ci"])[0] for k in groups.GROUP_METRICS})
    for key in groups.GROUP_METRICS:
        assert widths[1][key] < widths[0][key] / 2, key  # ~1/sqrt(16) of the width


@pytest.mark.parametrize("ci", [0.95, 0.8])
def test_bootstrap_interval_is_the_central_percentile_range_of_the_resampled_metrics(ci):
    labels, probs = _predictions(100, 1.0, seed=5)
    got = groups.bootstrap_intervals(labels, probs, n_boot=50, seed=7, ci=ci)
    weights = groups._resample_weights(np.random.default_rng(7), labels.size, 50)  # same draws
    resampled = groups._resample_metrics(weights, labels, probs)
    tail = (1 - ci) / 2 * 100
    for key in groups.GROUP_METRICS:
        expected = np.percentile(resampled[key], [tail, 100 - tail])
        assert got[key] == pytest.approx(expected.tolist()), key


def test_bootstrap_intervals_are_reproducible_for_a_fixed_seed():
    labels, probs = _predictions(100, 1.0)
    first = groups.bootstrap_intervals(labels, probs, n_boot=50, seed=7)
    assert groups.bootstrap_intervals(labels, probs, n_boot=50, seed=7) == first
    assert groups.bootstrap_intervals(labels, probs, n_boot=50, seed=8) != first


def test_vectorised_resample_metrics_equal_metrics_of_each_resampled_set():
    labels, probs = _predictions(80, 1.0, seed=4)
    probs = np.round(probs, 1)  # many tied scores, for the AUROC tie handling
    probs /= probs.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    weights = groups._resample_weights(rng, labels.size, 4)
    got = groups._resample_metrics(weights, labels, probs)
    for b in range(4):
        rows = np.repeat(np.arange(labels.size), weights[:, b].astype(int))
        y, p = labels[rows], probs[rows]
        direct = classification_metrics(y, p, CLASSES)
        assert got["accuracy"][b] == pytest.approx(direct["accuracy"])
        assert got["balanced_accuracy"][b] == pytest.approx(direct["balanced_accuracy"])
        assert got["macro_f1"][b] == pytest.approx(direct["macro_f1_sklearn"])
        assert got["auroc_macro"][b] == pytest.approx(direct["auroc_macro"])
        assert got["ece"][b] == pytest.approx(direct["ece"], abs=1e-6)


def test_a_group_with_one_class_has_no_auroc_and_no_auroc_interval():
    labels, probs = _predictions(30, 1.0)
    table = pd.DataFrame({"g": np.where(labels == 0, "only_a", "rest")})
    stats = groups.group_metrics(labels, probs, table, CLASSES, n_boot=20)["g"]["groups"]
    assert stats["only_a"]["auroc_macro"] is None and stats["only_a"]["auroc_macro_ci"] is None
    assert stats["rest"]["auroc_macro"] == pytest.approx(
        np.mean([skm.roc_auc_score(labels[labels > 0] == c, probs[labels > 0, c]) for c in (1, 2)])
    )


def test_a_ready_skin_type_column_is_normalised():
    frame = pd.DataFrame({"skin_type": ["ii", " V-VI", "x", 4, None]})
    out = groups.add_skin_type(frame)
    assert out["skin_type"].tolist() == ["II", "V-VI", None, "IV", None]
    assert out["skin_type_group"].tolist() == ["I-II", "V-VI", None, "III-IV", None]


def test_a_side_table_with_numeric_ids_joins_whole_numbers_and_names_lost_zeros(tmp_path, caplog):
    table = tmp_path / "tones.parquet"
    pd.DataFrame({"image_id": [1.0, 3.0], "skin_tone": [56, 12]}).to_parquet(table)
    side = groups.load_group_table(str(table))
    meta = pd.DataFrame({"image_id": ["1", "2", "3"]})
    out = groups.group_frame(meta, ["skin_type_group"], side)  # 1.0 matches "1"
    assert out["skin_type_group"].tolist() == ["V-VI", None, "I-II"]
    padded = pd.DataFrame({"image_id": ["x", "000003"]})
    match = r"matches none of the 2 .*'3', the metadata '000003'.*leading zeros.*as text"
    with pytest.raises(DataError, match=match):
        groups.group_frame(padded, ["skin_type_group"], side, side_source=str(table))
    out = groups.group_frame(padded, ["skin_type_group"], side, strict=False)
    assert out["skin_type_group"].tolist() == [None, None]
    assert "matches none" in caplog.text
    text_table = tmp_path / "tones.csv"  # read as text: the zeros were lost before, in the file
    pd.DataFrame({"image_id": ["1", "3"], "skin_tone": [56, 12]}).to_csv(text_table, index=False)
    side = groups.load_group_table(str(text_table))
    match = r"'3', the metadata '000003'\); its ids lost their leading zeros .*write image_id"
    with pytest.raises(DataError, match=match):
        groups.group_frame(padded, ["skin_type_group"], side, side_source=str(text_table))


def test_named_skin_type_columns_are_normalised_with_unknown_values_left_out():
    meta = pd.DataFrame({"fitzpatrick_scale": [3, -1, "vi"], "skin_tone": [None, 34, "V-VI"]})
    out = groups.group_frame(meta, ["fitzpatrick_scale", "skin_tone"])
    assert out["fitzpatrick_scale"].tolist() == ["III", None, "VI"]  # numbers or names
    assert out["skin_tone"].tolist() == [None, "III-IV", "V-VI"]
    result = groups.group_metrics(*_predictions(3, 1.0), out, CLASSES, n_boot=0)
    assert result["fitzpatrick_scale"]["n_missing"] == 1
    assert set(result["fitzpatrick_scale"]["groups"]) == {"III", "VI"}


def test_values_outside_a_skin_type_coding_are_named_in_a_warning(caplog):
    frame = pd.DataFrame({"fitzpatrick_scale": [1, -1, 12, 56, None, "", " ", "-1.0"]})
    assert groups.add_skin_type(frame)["skin_type"].tolist() == [
        "I", None, None, None, None, None, None, None
    ]  # fmt: skip
    assert "2 value(s) of the column 'fitzpatrick_scale'" in caplog.text
    assert "['12', '56']" in caplog.text and "'-1'" not in caplog.text


def test_booleans_are_not_skin_types():
    assert groups.fitzpatrick_skin_type(pd.Series([True, 1, False])).tolist() == [None, "I", None]


def test_groups_below_min_group_size_are_reported_but_left_out_of_the_gap():
    labels, probs = _predictions(41, 3.0, seed=5)
    probs[40] = np.eye(3)[(labels[40] + 1) % 3] * 0.8 + 0.2 / 3  # "tiny"'s one sample: wrong
    table = pd.DataFrame({"g": ["big"] * 40 + ["tiny"]})
    out = groups.group_metrics(labels, probs, table, CLASSES, n_boot=0, min_group_size=10)["g"]
    assert out["groups"]["tiny"]["accuracy"] == 0.0 and out["small_groups"] == ["tiny"]
    # one group left to compare: no gap, rather than a gap of 0 that reads as parity
    assert out["worst_group"]["accuracy"] is None and out["worst_group_gap"]["accuracy"] is None
    out = groups.group_metrics(labels, probs, table, CLASSES, n_boot=0, min_group_size=1)["g"]
    assert out["worst_group"]["accuracy"] == "tiny" and out["small_groups"] == []


def test_skin_type_columns_are_not_parsed_for_other_groupings(caplog):
    meta = pd.DataFrame({"dataset": ["ddi", "isic"], "fitzpatrick_scale": [12, 3]})
    assert groups.group_frame(meta, ["dataset"])["dataset"].tolist() == ["ddi", "isic"]
    assert "outside its skin-type coding" not in caplog.text
