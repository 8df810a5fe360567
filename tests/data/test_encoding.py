"""ensure_embeddings: write once, reuse, extend only new or changed rows, one encoder a file."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dermjax.data.embeddings import EncoderMismatchError, join_text, read_embeddings
from dermjax.data.encoders import HashingTextEncoder
from dermjax.data.encoding import ensure_embeddings
from tests.data.test_embeddings import _meta


class CountingEncoder(HashingTextEncoder):
    """HashingTextEncoder that records how many texts it was asked to encode."""

    def encode(self, texts: list[str]) -> np.ndarray:
        object.__setattr__(self, "calls", [*getattr(self, "calls", []), len(texts)])
        return super().encode(texts)


def test_ensure_embeddings_writes_then_reuses_a_covering_file(tmp_path):
    path = str(tmp_path / "embeddings" / "hash.parquet")
    meta = _meta(["rash", np.nan, "scaly plaque"])
    encoder = CountingEncoder(dim=32)
    made = ensure_embeddings(meta, path, encoder)
    assert encoder.calls == [2]  # missing text is not encoded
    assert read_embeddings(path).attrs["encoder_spec"] == encoder.spec
    reused = ensure_embeddings(meta.iloc[:2], path, encoder)
    assert encoder.calls == [2]
    text, has_text = join_text(meta, reused)
    np.testing.assert_array_equal(text, join_text(meta, made)[0])
    assert has_text.tolist() == [True, False, True]
    np.testing.assert_array_equal(text[2], HashingTextEncoder(dim=32).encode(["scaly plaque"])[0])


def test_ensure_embeddings_encodes_only_new_or_changed_rows(tmp_path):
    path = str(tmp_path / "hash.parquet")
    encoder = CountingEncoder(dim=16)
    ensure_embeddings(_meta(["rash", "scaly"]), path, encoder)
    grown = _meta(["rash", "changed text", "new one"])
    result = ensure_embeddings(grown, path, encoder)
    assert encoder.calls == [2, 2]
    assert sorted(read_embeddings(path)["image_id"]) == ["id0", "id1", "id2"]
    text, _ = join_text(grown, result)
    np.testing.assert_array_equal(text, HashingTextEncoder(dim=16).encode(grown["text_desc"]))


def test_ensure_embeddings_refuses_a_file_from_another_encoder(tmp_path):
    path = str(tmp_path / "hash.parquet")
    ensure_embeddings(_meta(["rash"]), path, HashingTextEncoder(dim=16))
    before = pq.read_table(path)
    with pytest.raises(
        EncoderMismatchError, match=r"made by another encoder \(seed: file 0, config 1\)"
    ):
        ensure_embeddings(_meta(["rash", "more"]), path, HashingTextEncoder(dim=16, seed=1))
    assert pq.read_table(path).equals(before)
    assert pq.read_schema(path).metadata == before.schema.metadata


def test_ensure_embeddings_refuses_to_extend_a_file_without_spec(tmp_path):
    path = str(tmp_path / "orig.parquet")
    pd.DataFrame(
        {"image_id": ["id0"], "text_desc": ["rash"], "embedding": [[1.0, 2.0]]}
    ).to_parquet(path, index=False)
    assert len(ensure_embeddings(_meta(["rash"]), path, HashingTextEncoder(dim=2))) == 1
    with pytest.raises(EncoderMismatchError, match="no dermjax encoder spec"):
        ensure_embeddings(_meta(["rash", "more"]), path, HashingTextEncoder(dim=2))
