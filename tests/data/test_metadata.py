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
    at_the_limit = load_metadata(str(path), min_samples_per_label=3)  # "b": exactly 3 is enough
    assert at_the_limit["label"].value_counts().to_dict() == {"a": 5, "b": 3}


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


def test_a_folder_given_as_the_metadata_csv_is_a_data_error_saying_so(tmp_path):
    with pytest.raises(DataError, match=r"metadata CSV .* is a folder; set data\.metadata_path"):
        metadata.read_metadata_csv(str(tmp_path))


@pytest.mark.parametrize(
    ("filters", "named"),
    [
        (
            {"datasets": ["ddi"]},
            r"no row's dataset is in data\.datasets=\['ddi'\]; the dataset column holds "
            r"\['derm1m', 'isic'\]",
        ),
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


# ---- Zero-size splits (global path) and per-dataset split ratios ------------------------------
def test_zero_test_and_val_sizes_give_no_such_split():
    df = _balanced({"a": 30, "b": 20, "solo": 1})
    assert stratified_split(df, test_size=0.0, val_size=None, seed=1)[0].equals(df)
    train, val, test = stratified_split(df, test_size=0.0, val_size=0.0, seed=1)
    assert train.equals(df) and val is None and test is None
    train, val, test = stratified_split(df, test_size=0.0, val_size=0.2, seed=1)  # unadjusted
    kept = df[df["label"] != "solo"]
    want_train, want_val = train_test_split(
        kept, test_size=0.2, stratify=kept["label"], random_state=1
    )
    assert test is None
    assert val["image_id"].tolist() == want_val["image_id"].tolist()
    assert train["image_id"].tolist() == want_train["image_id"].tolist()
    train, val, test = stratified_split(df, test_size=0.2, val_size=0.0, seed=1)
    want_train, want_test = train_test_split(
        kept, test_size=0.2, stratify=kept["label"], random_state=1
    )
    assert val is None
    assert test["image_id"].tolist() == want_test["image_id"].tolist()


def _datasets(sizes: dict[str, dict[str, int]], seed: int = 0) -> pd.DataFrame:
    """Rows of several datasets interleaved at random, so first appearance decides the order."""
    rows = [(lab, ds, f"{i}.jpg", "t") for ds, n in sizes.items() for lab, k in n.items()
            for i in range(k)]  # fmt: skip
    order = np.random.default_rng(seed).permutation(len(rows))
    return _frame([rows[i] for i in order])


def _sklearn_by_hand(df: pd.DataFrame, ratios: dict, seed: int) -> dict[str, list[str]]:
    """The expected image ids of each split, following the documented steps one by one."""
    want = {"train": [], "val": [], "test": []}
    for name in pd.unique(df["dataset"]):
        r = ratios.get(name, {"train": 0.8, "val": 0.1, "test": 0.1})
        tr, va, te = r.get("train", 0.0), r.get("val", 0.0), r.get("test", 0.0)
        rows = df[df["dataset"] == name]
        rows = rows[rows.groupby("label")["label"].transform("size") >= 2]
        train, val, test = rows, rows.iloc[:0], rows.iloc[:0]
        if va == 0 and te > 0:
            train, test = train_test_split(
                rows, test_size=te, stratify=rows["label"], random_state=seed
            )
        elif te == 0 and va > 0:
            train, val = train_test_split(
                rows, test_size=va, stratify=rows["label"], random_state=seed
            )
        elif va > 0 and te > 0:
            train_val, test = train_test_split(
                rows, test_size=te, stratify=rows["label"], random_state=seed
            )
            sizes = train_val.groupby("label")["label"].transform("size")
            train_val = train_val[sizes >= 2]
            train, val = train_test_split(
                train_val, test_size=va / (tr + va), stratify=train_val["label"], random_state=seed
            )
        for split, part in (("train", train), ("val", val), ("test", test)):
            want[split] += part["image_id"].tolist()
    return want


SIZES = {
    "isic": {"nevus": 30, "melanoma": 21, "bcc": 12, "one": 1},
    "derm1m": {"nevus": 40, "psoriasis": 25, "one": 9},
    "ddi": {"melanoma": 20, "bcc": 20},
}


@pytest.mark.parametrize(
    "ratios",
    [
        {d: {"train": 0.9, "val": 0.0, "test": 0.1} for d in SIZES},
        {d: {"train": 0.9, "val": 0.1, "test": 0.0} for d in SIZES},
        {d: {"train": 0.3, "val": 0.4, "test": 0.3} for d in SIZES},
        {d: {"train": 1.0, "val": 0.0, "test": 0.0} for d in SIZES},
        {d: {"train": 0.595, "val": 0.3, "test": 0.1} for d in SIZES},  # val / (train + val)
        {  # mixed, with a dataset missing from the map and one absent from the data
            "isic": {"train": 0.7, "val": 0.2, "test": 0.1},
            "derm1m": {"train": 0.9, "val": 0.0, "test": 0.1},
            "scin": {"train": 0.5, "val": 0.5, "test": 0.0},
        },
    ],
)
@pytest.mark.parametrize("seed", [0, 7])
def test_per_dataset_split_rows_equal_sklearn_per_dataset(ratios, seed):
    df = _datasets(SIZES, seed)
    train, val, test = metadata.per_dataset_split(df, ratios, seed=seed)
    want = _sklearn_by_hand(df, ratios, seed)
    assert train["image_id"].tolist() == want["train"]
    for got, split in ((val, "val"), (test, "test")):
        assert (got is None) == (not want[split])
        assert (got["image_id"].tolist() if got is not None else []) == want[split]


def test_per_dataset_split_warns_for_a_dataset_missing_from_the_map(caplog):
    df = _datasets(SIZES)
    metadata.per_dataset_split(df, {"isic": {"train": 1.0}, "derm1m": {"train": 1.0}}, seed=0)
    assert "no entry for 'ddi'" in caplog.text and "'test': 0.1" in caplog.text


def test_per_dataset_split_drops_rare_labels_per_dataset_but_keeps_their_class():
    df = _datasets(SIZES)  # "one": a single isic row, 9 derm1m rows
    ratios = {d: {"train": 0.8, "val": 0.2, "test": 0.0} for d in SIZES}
    train, val, _ = metadata.per_dataset_split(df, ratios, seed=0)
    kept = pd.concat([train, val])
    assert set(kept.loc[kept["label"] == "one", "dataset"]) == {"derm1m"}
    assert "one" in class_list(df)


def test_a_missing_ratio_key_counts_as_zero():
    _, val, test = metadata.per_dataset_split(
        _datasets(SIZES), {d: {"train": 0.9, "test": 0.1} for d in SIZES}, seed=0
    )
    assert val is None and len(test) > 0


def test_ratios_that_do_not_sum_to_one_are_a_data_error():
    with pytest.raises(DataError, match=r"per_dataset_split_ratios\.ddi=.*must be 1"):
        metadata.per_dataset_split(_datasets(SIZES), {"ddi": {"train": 0.5, "val": 0.1}}, seed=0)


def test_a_dataset_too_small_to_stratify_is_a_data_error_naming_it_and_the_fix():
    df = _datasets({"isic": {"a": 30, "b": 30}, "ddi": {c: 2 for c in "abcde"}})
    ratios = {d: {"train": 0.8, "val": 0.1, "test": 0.1} for d in ("isic", "ddi")}
    with pytest.raises(
        DataError,
        match=r"data\.per_dataset_split_ratios\.ddi\.test=0\.1 takes 1 of 10 rows for the ddi "
        r"test split.*fewer rows than the 5 classes; use data\.per_dataset_split_ratios\.ddi\.test "
        r"between 0\.5 and 0\.5 \(and adjust the other ratios of ddi\), or drop ddi from "
        r"data\.datasets",
    ):
        metadata.per_dataset_split(df, ratios, seed=0)


CSV = "image_id,dataset,filename,label,text_desc\n"


def _csv(tmp_path, body: str, name: str = "meta.csv") -> str:
    path = tmp_path / name
    path.write_text(CSV + body)
    return str(path)


def test_ids_files_and_labels_are_read_as_written(tmp_path):
    # DDI-style ids would lose their zeros as integers, and match no embeddings file row.
    body = "000001,ddi,a.png,1,t\n000002,ddi,b.png,2,t\n000003,ddi,c.png,1,t\n"
    out = load_metadata(_csv(tmp_path, body))
    assert out["image_id"].tolist() == ["000001", "000002", "000003"]
    assert class_list(out) == ["1", "2"]


def test_a_compressed_csv_is_read(tmp_path):
    import gzip

    path = tmp_path / "meta.csv.gz"
    path.write_bytes(gzip.compress((CSV + "i1,isic,a.jpg,x,t\ni2,isic,b.jpg,y,t\n").encode()))
    assert load_metadata(str(path))["image_id"].tolist() == ["i1", "i2"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"image_id;dataset;filename;label\ni1;isic;a.jpg;x\n", r"looks ';'-separated"),
        ((CSV + "i1,isic,a.jpg,eczéma,t\n").encode("latin-1"), r"is not UTF-8 text .*save it as"),
    ],
)
def test_a_csv_in_another_format_says_how_to_save_it(tmp_path, content, message):
    path = tmp_path / "meta.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        metadata.read_metadata_csv(str(path))


def test_an_unreadable_csv_path_is_a_data_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"metadata CSV .*file/meta\.csv cannot be read \("):
        metadata.read_metadata_csv(str(tmp_path / "file" / "meta.csv"))


@pytest.mark.parametrize("column", ["image_id", "filename"])
def test_rows_without_an_id_or_file_are_refused_with_their_lines(tmp_path, column):
    rows = pd.read_csv(_csv(tmp_path, "i1,isic,a.jpg,x,t\ni2,isic,b.jpg,y,t\n"), dtype=str)
    rows.loc[1, column] = None
    rows.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(
        DataError, match=rf"1 row\(s\) without {column} \(CSV rows 3 \(header = row 1\)\)"
    ):
        load_metadata(str(tmp_path / "m.csv"))


def test_rows_without_a_label_are_dropped_with_their_lines(tmp_path, caplog):
    body = "i1,isic,a.jpg,x,t\ni2,isic,b.jpg,,t\ni3,isic,c.jpg,y,t\n"
    out = load_metadata(_csv(tmp_path, body))
    assert out["image_id"].tolist() == ["i1", "i3"]
    frame = pd.read_csv(tmp_path / "meta.csv", dtype=str).set_axis([0, 1, 0])  # repeated labels
    assert load_metadata(frame)["image_id"].tolist() == ["i1", "i3"]
    assert "dropping 1 row(s) without a label (CSV rows 3 (header = row 1))" in caplog.text


def test_an_image_id_on_two_selected_rows_is_refused(tmp_path):
    # Text embeddings are matched by id: one of the two rows would get the other's text.
    body = "i1,isic,a.jpg,x,melanoma on arm\ni1,isic,b.jpg,y,psoriasis on arm\ni3,ddi,c.jpg,y,t\n"
    with pytest.raises(
        DataError, match=r"1 image_id value\(s\) .*\['i1'\]; CSV rows 2, 3 \(header = row 1\)\)"
    ):
        load_metadata(_csv(tmp_path, body))
    assert len(load_metadata(_csv(tmp_path, body), datasets=["ddi"])) == 1  # not selected


def test_shared_image_files_and_near_duplicate_labels_are_warned_about(tmp_path, caplog):
    body = "i1,isic,a.jpg,melanoma,t\ni2,isic,a.jpg,psoriasis,t\ni3,isic,c.jpg,Melanoma ,t\n"
    out = load_metadata(_csv(tmp_path, body))
    assert len(out) == 3 and class_list(out) == ["Melanoma ", "melanoma", "psoriasis"]
    assert "1 image file(s) appear on several rows (e.g. ['a.jpg']), 1 of them with different" in (
        caplog.text
    )
    assert "differ only in case or spaces are separate classes: [['Melanoma ', 'melanoma']]" in (
        caplog.text
    )


def test_a_data_fraction_too_small_to_stratify_names_the_range(tmp_path):
    df = _balanced({"a": 15, "b": 15, "c": 15})
    with pytest.raises(DataError, match=r"data_fraction=0\.05 keeps 2 of 45 rows.*between 0\.067"):
        load_metadata(df, data_fraction=0.05)
    assert len(load_metadata(df, data_fraction=0.1)) == 4
