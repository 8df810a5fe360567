"""BERT encoders (BERT, PubMedBERT/BiomedBERT, SapBERT, BioSyn, MiniLM) in Flax NNX.

Matches transformers' `BertModel` without its pooler: word + position + token-type embeddings,
LayerNorm (eps from config.json), post-LN transformer blocks with exact GELU. Submodules are named
like the Hugging Face tensors (`encoder.layer.3.attention.self.query.weight`), so weights load
mechanically (see `dermjax.text.weights`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dermjax.errors import DataError

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT config.json the encoder uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_hf(cls, config: dict[str, Any], where: str) -> BertConfig:
        """Reads config.json; raises `DataError` for variants this encoder does not implement."""
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise DataError(f"{where}: only absolute position embeddings are supported")
        if config.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise DataError(f"{where}: hidden_act {config['hidden_act']!r} is not supported")
        if config.get("is_decoder"):
            raise DataError(f"{where}: decoder BERT models are not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


class Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        embed = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **embed)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **embed)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, **embed)
        self.LayerNorm = _layer_norm(cfg, dtype, rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)
        )
        return self.LayerNorm(x)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.query = _linear(d, d, dtype, rngs)
        self.key = _linear(d, d, dtype, rngs)
        self.value = _linear(d, d, dtype, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, d = x.shape
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (layer(x).reshape(shape) for layer in (self.query, self.key, self.value))
        return jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(b, t, d)


class Output(nnx.Module):
    """dense -> residual add -> LayerNorm (BertSelfOutput and BertOutput)."""

    def __init__(self, cfg: BertConfig, d_in: int, *, dtype: Any, rngs: nnx.Rngs):
        self.dense = _linear(d_in, cfg.hidden_size, dtype, rngs)
        self.LayerNorm = _layer_norm(cfg, dtype, rngs)

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.self = SelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.output = Output(cfg, cfg.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return self.output(self.self(x, mask), x)


class Intermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.dense = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(self.dense(x))


class Layer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.attention = Attention(cfg, dtype=dtype, rngs=rngs)
        self.intermediate = Intermediate(cfg, dtype=dtype, rngs=rngs)
        self.output = Output(cfg, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Encoder(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.layer = nnx.List(
            [Layer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertModel(nnx.Module):
    """BERT without pooler: `(input_ids, attention_mask, token_type_ids) -> [B, T, hidden]`."""

    def __init__(self, cfg: BertConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = attention_mask.astype(bool)[:, None, None, :]  # padded keys get no attention
        return self.encoder(self.embeddings(input_ids, token_type_ids), mask)


def _linear(d_in: int, d_out: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _layer_norm(cfg: BertConfig, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Statistics in float32 and two-pass variance, as torch's layer_norm.
    return nnx.LayerNorm(
        cfg.hidden_size,
        epsilon=cfg.layer_norm_eps,
        dtype=dtype,
        param_dtype=dtype,
        use_fast_variance=False,
        rngs=rngs,
    )
