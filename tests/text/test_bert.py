"""BERT-family encoders against transformers' PyTorch BertModel (float32), loading rules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dermjax.errors import ConfigError, DataError
from dermjax.text import load_text_encoder
from tests.text.conftest import MINILM_DIR, save_tiny_bert, torch, transformers

TEXTS = [
    "a red itchy mole on the left arm",
    "lesion",
    "Patient, 45 y/o male, with scaly plaques on both elbows and knees for three months; "
    "no family history of psoriasis, some nail pitting, worse in winter and after stress.",
    "dark irregular lesion with bleeding",
    "hives",
]
MAX_LENGTH = 32  # the third text is truncated
# float32 on CPU: embeddings and hidden states agree to ~1e-6 of their largest value; bf16
# parameters and compute stay within 3% of the largest value (cosine > 0.999).
RTOL = 1e-5


def reference(model_dir, texts, max_length):
    """transformers' last_hidden_state, attention mask, and the original's cls/mean pooling."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)
    return {
        "ids": batch["input_ids"].numpy(),
        "mask": batch["attention_mask"].numpy(),
        "hidden": hidden.numpy(),
        "cls": hidden[:, 0].numpy(),
        "mean": mean.numpy(),
    }


def assert_close(actual, expected, rtol=RTOL):
    """Relative to the largest reference value (near-zero elements have no relative scale)."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


@pytest.fixture(scope="module")
def minilm_reference():
    return reference(MINILM_DIR, TEXTS, MAX_LENGTH)


@pytest.fixture(scope="module")
def minilm_mean():
    return load_text_encoder(
        str(MINILM_DIR), max_length=MAX_LENGTH, pooling_type="mean", batch_size=4
    )


def test_minilm_hidden_states_equal_transformers(minilm_mean, minilm_reference):
    ref = minilm_reference
    hidden = minilm_mean.hidden_states(ref["ids"], ref["mask"])
    real = ref["mask"].astype(bool)
    assert_close(hidden[real], ref["hidden"][real])


def test_minilm_mean_embeddings_equal_transformers(minilm_mean, minilm_reference):
    embeddings = minilm_mean.encode(TEXTS)
    assert embeddings.shape == (len(TEXTS), 384) and embeddings.dtype == np.float32
    assert_close(embeddings, minilm_reference["mean"])


def test_minilm_cls_embeddings_equal_transformers(minilm_reference):
    encoder = load_text_encoder(
        str(MINILM_DIR), max_length=MAX_LENGTH, pooling_type="cls", batch_size=2
    )
    assert_close(encoder.encode(TEXTS), minilm_reference["cls"])


def test_spec_describes_the_encoder(minilm_mean):
    spec = minilm_mean.spec
    assert json.loads(json.dumps(spec)) == spec
    assert spec["model"] == str(MINILM_DIR) and spec["family"] == "bert"
    assert (spec["pooling"], spec["max_length"], spec["dim"], spec["dtype"]) == (
        "mean", MAX_LENGTH, 384, "float32"
    )  # fmt: skip
    assert spec["instruction"] is None and len(spec["weights_sha256"]) == 64


def test_progress_reports_every_batch(minilm_mean):
    calls = []
    minilm_mean.encode(TEXTS, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 5), (5, 5)]


def test_empty_list_and_invalid_texts(minilm_mean):
    assert minilm_mean.encode([]).shape == (0, 384)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        minilm_mean.encode(["a mole", ""])


def test_tiny_bert_hidden_states_equal_transformers(tiny_bert_dir):
    ref = reference(tiny_bert_dir, TEXTS, MAX_LENGTH)
    encoder = load_text_encoder(
        str(tiny_bert_dir), max_length=MAX_LENGTH, pooling_type="mean", batch_size=8
    )
    real = ref["mask"].astype(bool)
    hidden = encoder.hidden_states(ref["ids"], ref["mask"])
    assert_close(hidden[real], ref["hidden"][real])
    assert_close(encoder.encode(TEXTS), ref["mean"])


def test_sharded_index_loads_the_same_weights(tiny_bert_dir, tmp_path):
    sharded = save_tiny_bert(tmp_path, max_shard_size="20KB")
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"])
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    kwargs = dict(max_length=MAX_LENGTH, pooling_type="cls", batch_size=8)
    whole = load_text_encoder(str(tiny_bert_dir), **kwargs).encode(TEXTS)
    np.testing.assert_array_equal(load_text_encoder(str(sharded), **kwargs).encode(TEXTS), whole)


def test_missing_unexpected_and_misshaped_tensors_are_named(tiny_bert_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_bert_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["encoder.layer.1.output.dense.weight"]
    tensors["encoder.layer.0.attention.self.query.bias"] = np.zeros(7, np.float32)
    tensors["encoder.layer.9.extra.weight"] = np.zeros(3, np.float32)
    tensors["pooler.dense.weight"] = np.zeros((32, 32), np.float32)  # ignored, as documented
    save_file({"bert." + k: v for k, v in tensors.items()}, folder / "model.safetensors")
    with pytest.raises(DataError) as error:
        load_text_encoder(str(folder), max_length=8, pooling_type="cls", batch_size=1)
    message = str(error.value)
    assert "missing tensors (1): encoder.layer.1.output.dense.weight" in message
    assert "unexpected tensors (1): encoder.layer.9.extra.weight" in message
    assert "mis-shaped tensors (1): encoder.layer.0.attention.self.query.bias (7,)" in message


def test_bert_rejects_last_token_and_matryoshka(tiny_bert_dir):
    with pytest.raises(ConfigError, match="last_token' is only for Qwen"):
        load_text_encoder(str(tiny_bert_dir), max_length=8, pooling_type="last_token", batch_size=1)
    with pytest.raises(ConfigError, match="output_dim=8"):
        load_text_encoder(
            str(tiny_bert_dir), max_length=8, pooling_type="cls", batch_size=1, output_dim=8
        )
    with pytest.raises(ConfigError, match="max_length=65 exceeds"):
        load_text_encoder(str(tiny_bert_dir), max_length=65, pooling_type="cls", batch_size=1)


def test_bfloat16_is_close_to_float32(minilm_mean):
    bf16 = load_text_encoder(
        str(MINILM_DIR), max_length=MAX_LENGTH, pooling_type="mean", batch_size=4,
        dtype="bfloat16",
    )  # fmt: skip
    f32, low = minilm_mean.encode(TEXTS), bf16.encode(TEXTS)
    cosine = (f32 * low).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(low, axis=1)
    print("bf16 vs f32: min cosine", cosine.min(), "max abs", np.abs(f32 - low).max())
    assert cosine.min() > 0.999
    assert_close(low, f32, rtol=0.03)


def test_batches_split_over_a_two_device_mesh(tiny_bert_dir):
    """On a 2-device CPU mesh (own process: the device count is fixed at JAX start) batches of 4
    are split over 'data', batches of 3 replicated, parameters split with shard_params; all
    equal the unsharded result."""
    script = f"""
import jax, numpy as np
jax.config.update("jax_num_cpu_devices", 2)
from dermjax.parallel import make_mesh
from dermjax.text import load_text_encoder
texts, mesh = {TEXTS!r}, make_mesh()
kw = dict(max_length=32, pooling_type="mean")
enc = load_text_encoder({str(tiny_bert_dir)!r}, batch_size=4, mesh=mesh, **kw)
assert enc._input_sharding.spec == jax.sharding.PartitionSpec("data"), enc._input_sharding
single = load_text_encoder({str(tiny_bert_dir)!r}, batch_size=4, **kw).encode(texts)
odd = load_text_encoder({str(tiny_bert_dir)!r}, batch_size=3, mesh=mesh, **kw).encode(texts)
np.testing.assert_allclose(enc.encode(texts), single, atol=1e-5)
np.testing.assert_allclose(odd, single, atol=1e-5)
split = load_text_encoder({str(tiny_bert_dir)!r}, batch_size=4, mesh=mesh, shard_params=True, **kw)
kernel = split.model.encoder.layer[0].intermediate.dense.kernel[...]
assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "data"), kernel.sharding
np.testing.assert_allclose(split.encode(texts), single, atol=1e-5)
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
