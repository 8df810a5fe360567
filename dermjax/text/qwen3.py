"""Qwen3 embedding models (Qwen3-Embedding 0.6B/4B/8B) in Flax NNX.

The Qwen3 decoder without LM head, as transformers' `Qwen3Model`: RMSNorm (float32 statistics),
grouped-query attention with per-head q/k RMSNorm and rotary embeddings (positions 0..T-1, as
transformers uses when no position ids are given; rotary embeddings are relative, so left and
right padding give the same outputs up to rounding), causal attention that also skips padded
keys, SwiGLU MLP. Submodules are named like the Hugging Face tensors (`layers.3.self_attn.q_proj`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dermjax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """The fields of a Qwen3 config.json the encoder uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_bias: bool = False

    @classmethod
    def from_hf(cls, config: dict[str, Any], where: str) -> Qwen3Config:
        """Reads config.json (transformers 4 or 5 layout); raises `DataError` for variants this
        encoder does not implement (sliding windows, scaled RoPE, another activation)."""
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        problems = []
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            problems.append(f"RoPE scaling {rope.get('rope_type')!r}")
        if config.get("use_sliding_window"):
            problems.append("sliding-window attention")
        if config.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {config['hidden_act']!r}")
        if problems:
            raise DataError(f"{where}: not supported by the Qwen3 encoder: {', '.join(problems)}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        values.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        return cls(**values)


class RMSNorm(nnx.Module):
    """x / rms(x) in float32, cast back, then scaled (transformers' Qwen3RMSNorm)."""

    def __init__(self, dim: int, eps: float, *, dtype: Any):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rotary(x: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of `x` [B, T, heads, head_dim] at positions 0..T-1."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class SelfAttention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype: Any, rngs: nnx.Rngs):
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.theta = cfg.rope_theta
        d, q_dim, kv_dim = (
            cfg.hidden_size,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        bias = cfg.attention_bias
        self.q_proj = _linear(d, q_dim, dtype, rngs, bias)
        self.k_proj = _linear(d, kv_dim, dtype, rngs, bias)
        self.v_proj = _linear(d, kv_dim, dtype, rngs, bias)
        self.o_proj = _linear(q_dim, d, dtype, rngs, bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype=dtype)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, t, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        q, k = rotary(q, self.theta), rotary(k, self.theta)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return self.o_proj(out.reshape(b, t, self.heads * self.head_dim))


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype: Any, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(d, f, dtype, rngs, False)
        self.up_proj = _linear(d, f, dtype, rngs, False)
        self.down_proj = _linear(f, d, dtype, rngs, False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype: Any, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = SelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nnx.Module):
    """Qwen3 without LM head: `(input_ids, attention_mask) -> [B, T, hidden]` (final norm)."""

    def __init__(self, cfg: Qwen3Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [Layer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        del token_type_ids  # BERT-only input, accepted for a common signature
        t = input_ids.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


def _linear(d_in: int, d_out: int, dtype: Any, rngs: nnx.Rngs, bias: bool) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
