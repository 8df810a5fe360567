"""Finding text encoders: local folders, the Hugging Face cache, aliases; never downloading."""

from __future__ import annotations

import hashlib

import pytest

from dermjax.errors import DataError
from dermjax.text import ALIASES, resolve_model_dir
from dermjax.text.hub import revision, weights_sha256

BLOB = "ab" * 32  # a cache blob is named by its content's sha256


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    return cache


def fake_snapshot(cache, model_id, rev):
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / rev
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / BLOB).write_bytes(b"weights")
    (snapshot / "model.safetensors").symlink_to(f"../../blobs/{BLOB}")
    (snapshot / "config.json").write_text('{"model_type": "bert"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return snapshot


def test_aliases_are_the_original_ids():
    assert ALIASES == {
        "pubmedbert": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext",
        "biosyn": "dmis-lab/biosyn-sapbert-bc5cdr-disease",
        "sapbert": "cambridgeltl/SapBERT-from-PubMedBERT-fulltext",
        "qwen": "Qwen/Qwen3-Embedding-8B",
    }


def test_local_folder_is_used_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path)) == tmp_path
    assert revision(tmp_path) is None


def test_alias_resolves_to_the_cache_snapshot_of_refs_main(hf_cache):
    snapshot = fake_snapshot(hf_cache, ALIASES["sapbert"], "c0ffee")
    assert resolve_model_dir("SapBERT") == snapshot
    assert resolve_model_dir(ALIASES["sapbert"]) == snapshot
    assert revision(snapshot) == "c0ffee"


def test_renamed_pubmedbert_is_found_under_its_new_id(hf_cache):
    snapshot = fake_snapshot(
        hf_cache, "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext", "1234"
    )
    assert resolve_model_dir("pubmedbert") == snapshot


def test_weights_hash_uses_blob_names_and_changes_with_config(hf_cache):
    snapshot = fake_snapshot(hf_cache, ALIASES["biosyn"], "r1")
    before = weights_sha256(snapshot)
    expected = hashlib.sha256()
    config_sha = hashlib.sha256(b'{"model_type": "bert"}').hexdigest()
    expected.update(f"config.json:{config_sha}\nmodel.safetensors:{BLOB}\n".encode())
    assert before == expected.hexdigest()
    (snapshot / "config.json").write_text('{"model_type": "bert", "x": 1}')
    assert weights_sha256(snapshot) != before


def test_missing_model_names_the_search_and_the_download_command(hf_cache):
    with pytest.raises(DataError) as error:
        resolve_model_dir("biosyn")
    message = str(error.value)
    assert "hf download dmis-lab/biosyn-sapbert-bc5cdr-disease" in message
    assert str(hf_cache / "models--dmis-lab--biosyn-sapbert-bc5cdr-disease") in message


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(DataError, match=r"has no config\.json"):
        resolve_model_dir(str(tmp_path))
