"""Sentence pooling of token hidden states, exactly as the original's `encode_with_transformers`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLING = ("cls", "mean", "last_token")  # encoder.pooling_type


def pool(hidden: jax.Array, mask: jax.Array, pooling_type: str) -> jax.Array:
    """[B, T, D] hidden states and [B, T] attention mask -> [B, D] in float32.

    `cls`: token 0. `mean`: mask-weighted mean, denominator clamped at 1e-6. `last_token`: the
    last column when every row's last mask entry is 1 (left padding), else the token at
    `sum(mask) - 1` of each row.
    """
    hidden = hidden.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    if pooling_type == "cls":
        return hidden[:, 0]
    if pooling_type == "mean":
        total = (hidden * mask[:, :, None]).sum(axis=1)
        return total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1e-6)
    if pooling_type == "last_token":
        left_padded = jnp.all(mask[:, -1] == 1)
        last = jnp.where(left_padded, hidden.shape[1] - 1, mask.sum(axis=1).astype(jnp.int32) - 1)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    raise ValueError(f"pooling_type {pooling_type!r} is not one of {POOLING}")


def matryoshka(embeddings: jax.Array, output_dim: int) -> jax.Array:
    """The first `output_dim` dimensions, L2-normalised (Qwen3-Embedding's MRL truncation)."""
    head = embeddings[:, :output_dim]
    return head / jnp.maximum(jnp.linalg.norm(head, axis=-1, keepdims=True), 1e-12)
