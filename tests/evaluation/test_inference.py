"""Evaluation reads the prepared cache that serves its images; the text encoder that embeds
--text is checked against the checkpoint's."""

import logging
import types

import numpy as np
import pytest
from PIL import Image

from dermjax import embedding_file
from dermjax.config import data_paths, encoder_settings, load_config
from dermjax.data import cache, images
from dermjax.data.encoders import HASH_DIM, HashingTextEncoder
from dermjax.errors import DataError
from dermjax.evaluation import inference


def test_evaluation_names_the_prepared_cache_it_reads(tmp_path, caplog):
    cfg = load_config("demo")
    cfg.data.local_root = str(tmp_path)
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(paths[-1])
    cache_dir = data_paths(cfg).cache_dir
    built = cache.folder_name(images.EXACT, (16, 16), paths)  # all four: not the split's own
    cache.build_cache(
        paths, f"{cache_dir}/{built}", img_size=(16, 16), rule=images.EXACT, progress=False
    )
    model = types.SimpleNamespace(cfg=cfg, img_size=(16, 16))
    records = types.SimpleNamespace(paths=paths[:3])
    with caplog.at_level(logging.INFO):
        found = inference._exact_cache(model, records)
    assert found is not None and found.directory == f"{cache_dir}/{built}"
    assert f"using prepared cache at {cache_dir}/{built}" in caplog.text


def _text_model(model_dir, spec):
    """What `text_vector` reads of a loaded model: meta, config, text input size."""
    cfg = load_config("demo")
    cfg.encoder.model_name, cfg.encoder.max_length = str(model_dir), 16
    cfg.encoder.pooling_type = "mean"
    return types.SimpleNamespace(meta={"encoder": spec}, cfg=cfg, text_dim=32)


def test_text_vector_accepts_the_trained_encoder_moved_and_names_what_differs(tmp_path, caplog):
    pytest.importorskip("transformers")
    from tests.text.conftest import save_tiny_bert

    trained = save_tiny_bert(tmp_path / "bert")
    model = _text_model(trained, None)
    spec = embedding_file.text_encoder(model.cfg).spec
    expected = inference.text_vector(_text_model(trained, spec), "red scaly plaque")
    moved = trained.rename(tmp_path / "moved")  # a copy elsewhere: same weights, same encoder
    got = inference.text_vector(_text_model(moved, spec), "red scaly plaque")
    np.testing.assert_array_equal(got, expected)
    other = {**spec, "weights_sha256": "0" * 64}
    with pytest.raises(DataError, match=r"not the one the checkpoint was trained with \(.*"
                       r"weights_sha256: checkpoint '0000"):  # fmt: skip
        inference.text_vector(_text_model(moved, other), "red scaly plaque")
    with pytest.raises(DataError, match=r"not found: .*point --config.encoder.model_name=FOLDER"):
        inference.text_vector(_text_model(trained, spec), "red scaly plaque")
    settings = encoder_settings(model.cfg).as_dict()  # a run trained on a file made elsewhere
    with caplog.at_level(logging.WARNING):
        inference.text_vector(_text_model(moved, settings), "red scaly plaque")
    assert "store no dermjax encoder spec (made elsewhere)" in caplog.text


def test_a_text_with_no_word_the_hashing_encoder_knows_is_said_to_embed_as_zeros(caplog):
    spec = HashingTextEncoder(dim=HASH_DIM).spec
    model = _text_model("hash", spec)
    model.cfg.encoder.model_name, model.text_dim = "hash", HASH_DIM
    with caplog.at_level(logging.WARNING):
        assert inference.text_vector(model, "red plaque").any() and not caplog.text
        assert not inference.text_vector(model, " ").any()
    assert "the text gives an all-zero embedding" in caplog.text
