"""The built-in hashing text encoder and the settings that name embeddings files."""

import numpy as np
import pytest

from dermjax.data.encoders import HASH_MODEL, EncoderSettings, HashingTextEncoder


def test_hashing_encoder_is_deterministic_raw_and_case_insensitive():
    texts = ["Itchy red rash on the elbows", "itchy RED rash on the elbows", "scaly"]
    first = HashingTextEncoder(dim=64).encode(texts)
    again = HashingTextEncoder(dim=64).encode(texts)
    assert first.dtype == np.float32 and first.shape == (3, 64)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.array_equal(first, HashingTextEncoder(dim=64, seed=1).encode(texts))
    # 6 unigrams + 5 bigrams of signed counts; no L2 normalisation.
    wide = HashingTextEncoder(dim=1 << 16).encode(texts[:1])
    assert np.abs(wide).sum() == 11
    assert set(np.unique(wide)) <= {-1.0, 0.0, 1.0}


def test_hashing_encoder_ngram_range_is_inclusive():
    unigrams = HashingTextEncoder(dim=1 << 16, ngram=(1, 1)).encode(["a b c"])
    trigrams = HashingTextEncoder(dim=1 << 16, ngram=(1, 3)).encode(["a b c"])
    assert (np.abs(unigrams).sum(), np.abs(trigrams).sum()) == (3, 6)


def test_hashing_encoder_rejects_bad_dim_or_ngram_naming_both():
    for bad in ({"dim": 0}, {"ngram": (2, 1)}, {"ngram": (0, 1)}):
        with pytest.raises(ValueError, match=r"dim=.*ngram="):
            HashingTextEncoder(**bad)


def test_settings_drop_what_the_model_ignores():
    hashing = EncoderSettings.create(
        HASH_MODEL,
        max_length=256,
        pooling_type="cls",
        instruction="x",
        output_dim=8,
        dtype="float32",
    )
    assert hashing == EncoderSettings(HASH_MODEL)
    assert hashing.filename() == "hash256.parquet"
    cls = EncoderSettings.create(
        "some/folder/", max_length=128, pooling_type="cls", instruction="ignored", output_dim=None,
        dtype="bfloat16",
    )  # fmt: skip
    assert cls.instruction is None
    assert cls.filename() == "folder_128_cls_bf16.parquet"
