"""Metadata filters, splits, class list and weights follow the original ml_workflow exactly."""

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from dermjax.data import metadata
from dermjax.data.metadata import class_list, class_weights, stratified_split
from dermjax.errors import DataError


def load_metadata(data, **kwargs) -> pd.DataFrame:
    """The filters alone: one class left is fine here (its own test covers the 2-class rule)."""
    return metadata.load_metadata(data, **{"min_classes": 1, **kwargs})


def _frame(rows: list[tuple]) -> pd.DataFrame:
    """Rows of (label, dataset, orig_filename, text_desc) with ids and filenames filled in."""
    df = pd.DataFrame(rows, columns=["label", "dataset", "orig_filename", "text_desc"])
    df.insert(0, "image_id", [f"id{i}" for i in range(len(df))])
    df.insert(1, "filename", [f"{d}_id{i}.jpg" for i, d in enumerate(df["dataset"])])
    return df


def _balanced(n_per_label: dict[str, int]) -> pd.DataFrame:
    labels = [label for label, n in n_per_label.items() for _ in range(n)]
    rng = np.random.default_rng(0)
    labels = list(rng.permutation(labels))
    return _frame([(label, "isic", f"{i}.jpg", "text") for i, label in enumerate(labels)])


def test_min_samples_filter_counts_whole_csv_before_other_filters(tmp_path):
    rows = [("a", "isic", "x.jpg", "t")] * 3 + [("a", "ddi", "x.jpg", "t")] * 2
    rows += [("b", "isic", "x.jpg", "t")] * 3
    path = tmp_path / "meta.csv"
    _frame(rows).to_csv(path, index=False)
    out = load_metadata(str(path), min_samples_per_label=4, datasets=["isic"])
    # "a" has 5 rows in the whole CSV (only 3 in isic) and survives; "b" has 3 and does not.
    assert out["label"].tolist() == ["a", "a", "a"]
    assert set(out["dataset"]) == {"isic"}


def test_datasets_filter_keeps_only_listed_datasets():
    df = _frame([("a", d, "x.jpg", "t") for d in ("isic", "ddi", "fitzpatrick17k", "isic")])
    out = load_metadata(df, datasets=["isic", "fitzpatrick17k"])
    assert out["dataset"].tolist() == ["isic", "fitzpatrick17k", "isic"]


def test_has_text_treats_nan_and_empty_alike():
    df = _frame([("a", "isic", "x.jpg", t) for t in ("some text", "", np.nan, None, " ")])
    assert load_metadata(df, has_text=True)["image_id"].tolist() == ["id0", "id4"]
    assert load_metadata(df, has_text=False)["image_id"].tolist() == ["id1", "id2", "id3"]
    assert len(load_metadata(df, has_text=None)) == 5


def test_derm1m_source_from_first_path_component():
    df = _frame(
        [
            ("a", "derm1m", "youtube/abc_frame_12.jpg", "t"),
            ("a", "derm1m", "reddit/youtube/x.jpg", "t"),
            ("a", "derm1m", "youtube_no_slash.jpg", "t"),
            ("a", "derm1m", np.nan, "t"),
            ("a", "isic", "reddit/kept_anyway.jpg", "t"),
        ]
    )
    out = load_metadata(df, datasets=["derm1m", "isic"], derm1m_sources=["youtube"])
    assert out["image_id"].tolist() == ["id0", "id4"]


def test_datasets_none_keeps_all_without_crash():
    df = _frame(
        [
            ("a", "derm1m", "youtube/v.jpg", "t"),
            ("a", "derm1m", "pubmed/p.jpg", "t"),
            ("a", "ddi", "000001.png", "t"),
        ]
    )
    # datasets=None means every dataset, so the derm1m source filter still applies.
    assert load_metadata(df, datasets=None, derm1m_sources=["pubmed"])["image_id"].tolist() == [
        "id1",
        "id2",
    ]
    # derm1m_sources=None means every source.
    assert len(load_metadata(df, datasets=["derm1m"], derm1m_sources=None)) == 2
    assert len(load_metadata(df)) == 3


def test_data_fraction_uses_seed_42_stratified():
    df = _balanced({"a": 30, "b": 20, "c": 10, "solo": 1})
    out = load_metadata(df, data_fraction=0.5)
    usable = df[df["label"] != "solo"]  # labels with fewer than 2 rows are dropped first
    expected, _ = train_test_split(
        usable, train_size=0.5, stratify=usable["label"], random_state=42
    )
    other_seed, _ = train_test_split(
        usable, train_size=0.5, stratify=usable["label"], random_state=0
    )
    assert out["image_id"].tolist() == expected["image_id"].tolist()
    assert out["image_id"].tolist() != other_seed["image_id"].tolist()
    assert out["label"].value_counts().to_dict() == {"a": 15, "b": 10, "c": 5}


def test_data_fraction_outside_open_unit_interval_is_ignored():
    df = _balanced({"a": 4, "solo": 1})
    assert len(load_metadata(df, data_fraction=1.0)) == 5
    assert len(load_metadata(df, data_fraction=0.0)) == 5


def test_filters_run_in_original_order_end_to_end():
    rng = np.random.default_rng(1)
    rows = []
    for i in range(300):
        dataset = ["isic", "ddi", "derm1m"][i % 3]
        source = ["youtube", "reddit", "edu"][(i // 3) % 3]
        text = [np.nan, "", "desc"][int(rng.integers(3))] if i % 4 == 0 else "desc"
        rows.append((f"l{int(rng.integers(6))}", dataset, f"{source}/f{i}.jpg", text))
    df = _frame(rows)
    out = load_metadata(
        df,
        min_samples_per_label=50,
        datasets=["isic", "derm1m"],
        has_text=True,
        derm1m_sources=["youtube", "edu"],
        data_fraction=0.6,
    )
    counts = df["label"].value_counts()
    step = df[df["label"].isin(counts.index[counts >= 50])]
    step = step[step["dataset"].isin(["isic", "derm1m"])]
    step = step[step["text_desc"].notna() & (step["text_desc"] != "")]
    source = step["orig_filename"].str.split("/").str[0]
    step = step[(step["dataset"] != "derm1m") | source.isin(["youtube", "edu"])]
    expected, _ = train_test_split(step, train_size=0.6, stratify=step["label"], random_state=42)
    assert out["image_id"].tolist() == expected["image_id"].tolist()


def test_missing_required_column_is_a_data_error_naming_file_columns_and_columns_found(
    tmp_path,
):
    df = _frame([("a", "isic", "x.jpg", "t")])
    path = tmp_path / "meta.csv"
    df.drop(columns=["label"]).to_csv(path, index=False)
    with pytest.raises(
        DataError, match=r"meta\.csv lacks column\(s\) \['label'\].*found: \['image_id'"
    ):
        load_metadata(str(path))
    with pytest.raises(DataError, match=r"\['dataset'\].*data\.datasets filter"):
        load_metadata(df.drop(columns=["dataset"]), datasets=["isic"])
    with pytest.raises(DataError, match=r"my\.csv lacks .*\['text_desc'\].*data\.has_text"):
        load_metadata(df.drop(columns=["text_desc"]), has_text=True, source="my.csv")


def test_a_missing_metadata_csv_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.csv does not exist; set data\.metadata_path"):
        metadata.load_metadata(str(tmp_path / "nowhere.csv"))


@pytest.mark.parametrize(
    ("filters", "named"),
    [
        ({"datasets": ["ddi"]}, r"0 row\(s\) and 0 class\(es\).*data\.datasets=\['ddi'\]"),
        (
            {"min_samples_per_label": 3},
            r"4 row\(s\) and 1 class\(es\).*data\.min_samples_per_label=3",
        ),
        ({"has_text": False}, r"0 row\(s\).*data\.has_text=False"),
        (
            {"datasets": ["derm1m"], "derm1m_sources": ["reddit"]},
            r"1 row\(s\) and 1 class.*data\.datasets=\['derm1m'\], data\.derm1m_sources=\['reddit'\]",
        ),
        (
            {"datasets": ["isic"], "data_fraction": 0.5},
            r"4 row\(s\) and 1 class.*data\.datasets=\['isic'\], data\.data_fraction=0\.5",
        ),
    ],
)
def test_filters_leaving_fewer_than_two_classes_are_a_data_error_naming_them(filters, named):
    rows = [("a", "isic", "x.jpg", "t")] * 4 + [("b", "derm1m", "youtube/x.jpg", "t")] * 2
    rows += [("c", "derm1m", "reddit/x.jpg", "t")]
    df = _frame(rows)
    with pytest.raises(DataError, match=named):
        metadata.load_metadata(df, **filters)


def test_split_returns_the_rows_sklearn_returns():
    df = _balanced({"a": 60, "b": 30, "c": 10})
    train, val, test = stratified_split(df, test_size=0.1, val_size=0.2, seed=7)
    rest, want_test = train_test_split(df, test_size=0.1, stratify=df["label"], random_state=7)
    want_train, want_val = train_test_split(
        rest, test_size=0.2 / 0.9, stratify=rest["label"], random_state=7
    )
    for got, want in ((train, want_train), (val, want_val), (test, want_test)):
        assert got["image_id"].tolist() == want["image_id"].tolist()


def test_split_sizes_are_fractions_of_the_whole_and_stratified():
    df = _balanced({"a": 100, "b": 50, "c": 50})
    train, val, test = stratified_split(df, test_size=0.1, val_size=0.1, seed=42)
    assert (len(train), len(val), len(test)) == (160, 20, 20)
    assert test["label"].value_counts().to_dict() == {"a": 10, "b": 5, "c": 5}
    assert val["label"].value_counts().to_dict() == {"a": 10, "b": 5, "c": 5}
    ids = [set(part["image_id"]) for part in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_split_is_deterministic_for_a_seed_and_varies_with_it():
    df = _balanced({"a": 40, "b": 40})
    first = stratified_split(df, test_size=0.2, val_size=0.2, seed=3)
    again = stratified_split(df, test_size=0.2, val_size=0.2, seed=3)
    other = stratified_split(df, test_size=0.2, val_size=0.2, seed=4)
    assert all(a.equals(b) for a, b in zip(first, again, strict=True))
    assert first[2]["image_id"].tolist() != other[2]["image_id"].tolist()


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        (
            {"test_size": 0.1, "val_size": None},
            r"data\.test_size=0\.1 takes 3 of 30 rows for the test split, leaving the test split "
            r"with fewer rows than the 5 classes; use data\.test_size between 0\.167 and 0\.833",
        ),
        (
            {"test_size": 0.5, "val_size": 0.05},
            r"data\.val_size=0\.05 takes 2 of 15 rows for the validation split, leaving the "
            r"validation split with fewer rows than the 5 classes; use data\.val_size between "
            r"0\.167 and 0\.333",
        ),
        (
            {"test_size": 0.9, "val_size": None},
            r"data\.test_size=0\.9 takes 27 of 30 rows .* leaving the rest with fewer rows",
        ),
    ],
)
def test_a_split_too_small_for_the_classes_is_a_data_error_saying_what_works(sizes, message):
    df = _balanced({c: 6 for c in "abcde"})
    with pytest.raises(DataError, match=message):
        stratified_split(df, seed=0, **sizes)


def test_a_suggested_split_size_works():
    df = _balanced({c: 6 for c in "abcde"})
    train, val, test = stratified_split(df, test_size=0.167, val_size=0.167, seed=0)
    assert min(len(part) for part in (train, val, test)) >= 5


def test_no_class_left_for_the_val_split_is_a_data_error_offering_no_val_split():
    df = _balanced({c: 2 for c in "abcde"})  # the test split takes one row of every class
    with pytest.raises(DataError, match=r"no class has the 2 rows.*data\.val_size=None"):
        stratified_split(df, test_size=0.5, val_size=0.1, seed=0)


def test_split_without_val_size_returns_no_val():
    df = _balanced({"a": 20, "b": 20})
    train, val, test = stratified_split(df, test_size=0.25, val_size=None, seed=0)
    assert val is None
    assert (len(train), len(test)) == (30, 10)


def test_split_drops_classes_with_fewer_than_two_rows_at_each_stage():
    df = _balanced({"a": 40, "b": 40, "pair": 2, "solo": 1})
    train, val, test = stratified_split(df, test_size=0.5, val_size=0.25, seed=0)
    # "solo" cannot be stratified at all; "pair" leaves one row in train, dropped before val.
    assert "solo" not in set(pd.concat([train, val, test])["label"])
    assert (test["label"] == "pair").sum() == 1
    assert "pair" not in set(train["label"]) | set(val["label"])
    assert len(train) + len(val) + len(test) == 81


def test_class_list_is_sorted_and_taken_before_split_filtering():
    meta = _balanced({"b": 40, "a": 40, "pair": 2, "solo": 1})
    classes = class_list(meta)
    train, _, _ = stratified_split(meta, test_size=0.5, val_size=0.25, seed=0)
    assert classes == ["a", "b", "pair", "solo"]
    weights = class_weights(train, classes)
    assert weights[2] == weights[3] == 1.0  # never trained: absent from train


def test_class_list_sorts_labels_as_strings():
    meta = _frame([(label, "isic", "x.jpg", "t") for label in (10, 9, 2)])
    assert class_list(meta) == ["10", "2", "9"]


def test_class_weights_are_raw_inverse_counts_in_class_order():
    train = _balanced({"a": 4, "b": 1, "c": 8})
    weights = class_weights(train, ["a", "b", "c", "d"])
    assert weights.dtype == np.float32
    np.testing.assert_array_equal(weights, np.array([0.25, 1.0, 0.125, 1.0], np.float32))
