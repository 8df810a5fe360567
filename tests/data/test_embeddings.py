"""Embeddings parquet layout, ensure/extend rules and the 1:1 text join."""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dermjax.data.embeddings import (
    build_records,
    join_text,
    read_embeddings,
    spec_differences,
    write_embeddings,
)
from dermjax.data.encoders import HashingTextEncoder
from dermjax.data.encoding import ensure_embeddings
from dermjax.errors import DataError


def _meta(texts: list) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": [f"id{i}" for i in range(len(texts))],
            "filename": [f"isic_id{i}.jpg" for i in range(len(texts))],
            "label": ["a" if i % 2 else "b" for i in range(len(texts))],
            "text_desc": texts,
        }
    )


def test_parquet_round_trip_keeps_original_layout(tmp_path):
    path = str(tmp_path / "sub" / "emb.parquet")
    df = pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "text_desc": ["itchy rash", None, np.nan],
            "embedding": [np.arange(4, dtype=np.float32) + i for i in range(3)],
        }
    )
    write_embeddings(df, path, encoder_spec={"name": "test"})
    schema = pq.read_schema(path)
    assert schema.names == ["image_id", "text_desc", "embedding"]
    assert schema.field("image_id").type == pa.string()
    assert schema.field("text_desc").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float32())
    back = read_embeddings(path)
    assert back["image_id"].tolist() == ["a", "b", "c"]
    assert back["text_desc"][0] == "itchy rash"
    assert back["text_desc"].isna().tolist() == [False, True, True]
    np.testing.assert_array_equal(np.stack(back["embedding"]), np.stack(df["embedding"]))
    assert back.attrs["encoder_spec"] == {"name": "test"}
    assert not [f for f in os.listdir(tmp_path / "sub") if ".tmp" in f]


def test_reads_files_written_like_the_original(tmp_path):
    path = str(tmp_path / "orig.parquet")
    original = pd.DataFrame(
        {"image_id": ["x", "y"], "text_desc": ["t", None], "embedding": [[0.5, 1.5], [2.0, -1.0]]}
    )
    original.to_parquet(path, index=False)  # list<double>, no dermjax spec
    back = read_embeddings(path)
    assert back.attrs["encoder_spec"] is None
    assert back["embedding"][1].dtype == np.float32
    np.testing.assert_array_equal(back["embedding"][1], [2.0, -1.0])


def test_join_missing_text_as_nan_empty_or_absent_row_gives_zeros():
    meta = _meta(["rash", "", np.nan, "no embedding row", "scaly"])
    emb = pd.DataFrame(
        {
            "image_id": ["id4", "id0", "id1", "id2"],
            "text_desc": ["scaly", "rash", None, None],
            "embedding": [np.full(3, 4.0), np.full(3, 1.0), np.full(3, 9.0), np.full(3, 9.0)],
        }
    )
    text, has_text = join_text(meta, emb)
    assert has_text.tolist() == [True, False, False, False, True]
    assert text.dtype == np.float32 and text.shape == (5, 3)
    np.testing.assert_array_equal(text[:, 0], [1.0, 0.0, 0.0, 0.0, 4.0])


def _written(tmp_path, vectors: list, ids=None) -> pd.DataFrame:
    """Embeddings with these vectors written to and read back from emb.parquet."""
    ids = ids or [f"id{i}" for i in range(len(vectors))]
    frame = pd.DataFrame({"image_id": ids, "text_desc": ["t"] * len(ids), "embedding": vectors})
    path = str(tmp_path / "emb.parquet")
    table = pa.table(
        {
            "image_id": frame["image_id"],
            "text_desc": frame["text_desc"],
            "embedding": pa.array([np.asarray(v, np.float32).tolist() for v in vectors]),
        }
    )
    pq.write_table(table, path)
    return read_embeddings(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_join_rejects_nan_and_inf_embeddings_naming_file_and_ids(tmp_path, bad):
    emb = _written(tmp_path, [np.zeros(2), np.array([0.0, bad]), np.ones(2)])
    with pytest.raises(DataError, match=r"emb\.parquet: NaN or inf text embeddings.*\['id1'\]"):
        join_text(_meta(["rash", "scaly", "itch"]), emb)


def test_join_rejects_mixed_dimensions_naming_file_and_ids(tmp_path):
    emb = _written(tmp_path, [np.zeros(3), np.zeros(2), np.zeros(3), np.zeros(4)])
    with pytest.raises(
        DataError, match=r"emb\.parquet: embeddings of mixed dimensions.*\['id1', 'id3'\]"
    ):
        join_text(_meta(["a", "b", "c", "d"]), emb)


def test_an_unreadable_parquet_file_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "emb.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"emb\.parquet cannot be read as parquet"):
        read_embeddings(str(path))


def test_a_path_that_cannot_be_opened_says_to_check_the_path_not_to_regenerate(tmp_path):
    with pytest.raises(DataError, match=r"cannot be opened \(IsADirectoryError.*check its perm"):
        read_embeddings(str(tmp_path))


def test_a_parquet_file_without_the_embedding_column_is_a_data_error(tmp_path):
    path = str(tmp_path / "emb.parquet")
    pq.write_table(pa.table({"image_id": ["id0"], "vector": [[1.0]]}), path)
    with pytest.raises(
        DataError, match=r"emb\.parquet lacks column\(s\) \['embedding'\].*'vector'"
    ):
        read_embeddings(path)


def test_join_rejects_duplicate_image_ids():
    meta = _meta(["rash"])
    emb = pd.DataFrame(
        {"image_id": ["id0", "id0"], "text_desc": ["rash"] * 2, "embedding": [np.zeros(2)] * 2}
    )
    with pytest.raises(DataError, match="unique"):
        join_text(meta, emb)


def test_build_records_joins_paths_labels_and_text():
    meta = _meta(["rash", "", "scaly"])
    meta.loc[2, "filename"] = "/lead_slash.png"
    emb = ensure_embeddings(meta, None, HashingTextEncoder(dim=8))
    records = build_records(
        meta, img_prefix="gs://bucket/imgs/", class_to_idx={"a": 0, "b": 1}, emb_df=emb
    )
    assert records.paths == [
        "gs://bucket/imgs/isic_id0.jpg",
        "gs://bucket/imgs/isic_id1.jpg",
        "gs://bucket/imgs/lead_slash.png",
    ]
    assert records.labels.dtype == np.int32 and records.labels.tolist() == [1, 0, 1]
    assert records.has_text.tolist() == [True, False, True]
    assert records.text.shape == (3, 8)
    with pytest.raises(ValueError, match="not in class_to_idx"):
        build_records(meta, img_prefix="x", class_to_idx={"a": 0}, emb_df=emb)


def test_spec_differences_ignore_where_the_same_weights_were_loaded_from():
    spec = {"model": "/a/minilm", "model_id": "/a/minilm", "revision": None,
            "weights_sha256": "abc", "pooling": "mean", "dim": 384}  # fmt: skip
    moved = {**spec, "model": "/b/minilm", "model_id": "/b/minilm", "revision": "r1"}
    assert spec_differences(spec, moved) == []
    assert spec_differences(spec, {**moved, "pooling": "cls"}, ("checkpoint", "local")) == [
        "pooling: checkpoint 'mean', local 'cls'"
    ]
    other = {**moved, "weights_sha256": "def"}
    assert [d.split(":")[0] for d in spec_differences(spec, other)] == [
        "model", "model_id", "revision", "weights_sha256"
    ]  # fmt: skip
    no_hash = {k: v for k, v in spec.items() if k != "weights_sha256"}  # settings, not a spec
    assert spec_differences(no_hash, {**no_hash, "model": "/b/minilm"}) == [
        "model: file '/a/minilm', config '/b/minilm'"
    ]
