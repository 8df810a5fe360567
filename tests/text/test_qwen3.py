"""Qwen3 embedding encoders against transformers' PyTorch Qwen3Model (float32)."""

from __future__ import annotations

import numpy as np
import pytest

from dermjax.errors import ConfigError
from dermjax.text import load_text_encoder, qwen_text
from dermjax.text.pooling import pool
from tests.text.conftest import save_tiny_qwen3, torch, transformers

TEXTS = ["a red itchy mole", "scaly plaques on both elbows for three months", "hives"]
INSTRUCTION = "Represent the patient's description"
RTOL = 1e-5  # of the largest reference value; float32 agrees to ~1e-6


def assert_close(actual, expected, rtol=RTOL):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


@pytest.fixture(scope="module")
def encoder(tiny_qwen3_dir):
    return load_text_encoder(
        str(tiny_qwen3_dir), max_length=64, pooling_type="last_token", batch_size=4,
        instruction=INSTRUCTION,
    )  # fmt: skip


@pytest.fixture(scope="module")
def torch_model(tiny_qwen3_dir):
    return transformers.AutoModel.from_pretrained(tiny_qwen3_dir).eval()


def torch_batch(model_dir, texts, padding_side):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, padding_side=padding_side)
    return tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")


def test_hidden_states_equal_transformers_under_left_padding(encoder, torch_model, tiny_qwen3_dir):
    batch = torch_batch(tiny_qwen3_dir, TEXTS, "left")
    assert not batch["attention_mask"][:, 0].all()  # some rows are left-padded
    with torch.no_grad():
        expected = torch_model(**batch).last_hidden_state.numpy()
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    real = mask.astype(bool)
    assert_close(encoder.hidden_states(ids, mask)[real], expected[real])


def test_last_token_embedding_equals_transformers(encoder, torch_model, tiny_qwen3_dir):
    formatted = [qwen_text(INSTRUCTION, t) for t in TEXTS]
    batch = torch_batch(tiny_qwen3_dir, formatted, "left")
    with torch.no_grad():
        expected = torch_model(**batch).last_hidden_state[:, -1].numpy()
    assert_close(encoder.encode(TEXTS), expected)


def test_left_and_right_padding_give_the_same_last_token(encoder):
    tokens = encoder.tokenize(TEXTS)
    assert {row[-1] for row in tokens} == {encoder.tokenizer.pad_token_id}  # <|endoftext|>
    ids, mask = encoder.pad(tokens, 64, left=False)
    assert not mask[:, -1].all()  # right padded: pooled at sum(mask) - 1
    right = np.asarray(pool(encoder.hidden_states(ids, mask), mask, "last_token"))
    assert_close(encoder.encode(TEXTS), right)


def test_instruction_prefix_is_applied(encoder, tiny_qwen3_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    expected = tokenizer(f"Instruct: {INSTRUCTION}\nQuery: {TEXTS[0]}")["input_ids"]
    assert encoder.tokenize(TEXTS[:1]) == [expected]
    assert encoder.spec["instruction"] == INSTRUCTION
    plain = load_text_encoder(
        str(tiny_qwen3_dir), max_length=64, pooling_type="last_token", batch_size=4
    )
    assert plain.tokenize(TEXTS[:1]) == [tokenizer(TEXTS[0])["input_ids"]]
    assert not np.allclose(plain.encode(TEXTS[:1]), encoder.encode(TEXTS[:1]))


def test_qwen_requires_last_token(tiny_qwen3_dir):
    with pytest.raises(ConfigError, match="Qwen models need 'last_token'"):
        load_text_encoder(str(tiny_qwen3_dir), max_length=8, pooling_type="mean", batch_size=1)


def test_matryoshka_truncates_and_normalises(encoder, tiny_qwen3_dir):
    short = load_text_encoder(
        str(tiny_qwen3_dir), max_length=64, pooling_type="last_token", batch_size=4,
        instruction=INSTRUCTION, output_dim=8,
    )  # fmt: skip
    full, truncated = encoder.encode(TEXTS), short.encode(TEXTS)
    assert truncated.shape == (3, 8) and short.spec["dim"] == 8
    np.testing.assert_allclose(np.linalg.norm(truncated, axis=1), 1.0, rtol=1e-6)
    head = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    assert_close(truncated, head)


def test_causal_lm_checkpoint_with_model_prefix_loads(encoder, tmp_path):
    lm_dir = save_tiny_qwen3(tmp_path, causal_lm=True)  # `model.` keys and an lm_head
    loaded = load_text_encoder(
        str(lm_dir), max_length=64, pooling_type="last_token", batch_size=4,
        instruction=INSTRUCTION,
    )  # fmt: skip
    np.testing.assert_array_equal(loaded.encode(TEXTS), encoder.encode(TEXTS))


def test_bfloat16_is_close_to_float32(encoder, tiny_qwen3_dir):
    bf16 = load_text_encoder(
        str(tiny_qwen3_dir), max_length=64, pooling_type="last_token", batch_size=4,
        instruction=INSTRUCTION, dtype="bfloat16",
    )  # fmt: skip
    f32, low = encoder.encode(TEXTS), bf16.encode(TEXTS)
    cosine = (f32 * low).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(low, axis=1)
    print("bf16 vs f32: min cosine", cosine.min(), "max abs", np.abs(f32 - low).max())
    assert cosine.min() > 0.999
    assert_close(low, f32, rtol=0.03)
