"""torchvision ViT-B/16, B/32, L/16, L/32 in Flax NNX, NHWC input.

Attribute paths equal torchvision's state_dict keys, e.g. `encoder.layers.encoder_layer_3.mlp.0`
and `encoder.pos_embedding`. Attention holds torch's fused `in_proj` (q, k, v stacked along the
output) and `out_proj`, and runs `jax.nn.dot_product_attention` (cuDNN flash attention on GPU in
bf16/fp16; XLA attention elsewhere). Without the top the model returns the class token after the
final LayerNorm (the original's embedding); with it, torchvision's `heads.head` logits.

Unlike the original (224 only), any image size divisible by the patch size is accepted; the
weight loader resizes a checkpoint's position embedding with `resize_pos_embedding`, which is
torchvision's `interpolate_embeddings` (bicubic, align_corners=True).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dermjax.models import initializers, layers, normalize
from dermjax.models.layers import Dtype

LAYER_NORM_EPS = 1e-6
_LOG = logging.getLogger(__name__)
_ZEROS = nnx.initializers.zeros_init()
_XAVIER = initializers.xavier_uniform()


def _layer_norm(dim: int, *, rngs: nnx.Rngs, dtype: Dtype) -> normalize.LayerNorm:
    """LayerNorm(eps=1e-6): statistics and normalisation in at least float32, output in the
    compute dtype (the next matmul's input), backward through `normalize`."""
    return normalize.LayerNorm(
        dim,
        epsilon=LAYER_NORM_EPS,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=layers.param_dtype(dtype),
        rngs=rngs,
    )


class GELU(nnx.Module):
    """Parameter-less exact (erf) GELU, holding its index in the MLP."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x, approximate=False)


class MultiheadAttention(nnx.Module):
    """torch.nn.MultiheadAttention(batch_first=True) self-attention, no attention dropout."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.num_heads = num_heads
        self.in_proj = layers.linear(
            dim, 3 * dim, kernel_init=_XAVIER, bias_init=_ZEROS, rngs=rngs, dtype=dtype
        )
        self.out_proj = layers.linear(dim, dim, bias_init=_ZEROS, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        qkv = self.in_proj(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        out = _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return self.out_proj(out.reshape(batch, tokens, dim))


def _attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v on (batch, tokens, heads, head_dim) arrays.

    On GPU in bf16/fp16 this is cuDNN's fused flash attention (jax 0.10 picks plain XLA unless
    asked). Where JAX refuses it while tracing (no cuDNN, an unsupported cuDNN version or shape)
    the model runs XLA's attention instead and logs why once, rather than failing the run. XLA's
    version takes its softmax in float32, so float64 (parity tests) uses the same formula
    written out.
    """
    if query.dtype == jnp.float64:
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(query.shape[-1])
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), value)
    half = query.dtype in (jnp.bfloat16, jnp.float16)
    if half and jax.default_backend() == "gpu":
        try:
            return jax.nn.dot_product_attention(query, key, value, implementation="cudnn")
        except (RuntimeError, ValueError, NotImplementedError) as err:
            _warn_cudnn_refused(f"{type(err).__name__}: {err}")
    return jax.nn.dot_product_attention(query, key, value, implementation="xla")


@functools.cache
def _warn_cudnn_refused(reason: str) -> None:
    """Logs, once per distinct reason, that attention fell back from cuDNN to XLA."""
    _LOG.warning("cuDNN attention unavailable (%s); using XLA attention", reason)


class EncoderBlock(nnx.Module):
    """Pre-norm block: x + attention(ln_1(x)), then + mlp(ln_2(.)) with MLP indices 0 and 3."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype,
    ):
        kw = {"rngs": rngs, "dtype": dtype}
        mlp_init = {"kernel_init": _XAVIER, "bias_init": initializers.normal(1e-6)}
        self.ln_1 = _layer_norm(dim, **kw)
        self.self_attention = MultiheadAttention(dim, num_heads, **kw)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.ln_2 = _layer_norm(dim, **kw)
        self.mlp = layers.Sequential(
            [
                layers.linear(dim, mlp_dim, **mlp_init, **kw),
                GELU(),
                nnx.Dropout(dropout, rngs=rngs),
                layers.linear(mlp_dim, dim, **mlp_init, **kw),
                nnx.Dropout(dropout, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.dropout(self.self_attention(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


class EncoderLayers(nnx.Module):
    """torch `layers.Sequential(OrderedDict(encoder_layer_i=...))`: blocks as named attributes."""

    def __init__(self, blocks: list[EncoderBlock]):
        self.num_layers = len(blocks)
        for i, block in enumerate(blocks):
            setattr(self, f"encoder_layer_{i}", block)

    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = getattr(self, f"encoder_layer_{i}")(x)
        return x


class Encoder(nnx.Module):
    """Adds the position embedding (class token included), runs the blocks, final LayerNorm."""

    def __init__(
        self,
        seq_length: int,
        num_layers: int,
        num_heads: int,
        dim: int,
        mlp_dim: int,
        dropout: float,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype,
    ):
        kw = {"rngs": rngs, "dtype": dtype}
        init = initializers.normal(0.02)
        self.pos_embedding = nnx.Param(
            init(rngs.params(), (1, seq_length, dim), layers.param_dtype(dtype))
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.layers = EncoderLayers(
            [EncoderBlock(dim, num_heads, mlp_dim, dropout, **kw) for _ in range(num_layers)]
        )
        self.ln = _layer_norm(dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.pos_embedding[...].astype(x.dtype)
        return self.ln(self.layers(self.dropout(x)))


class Heads(nnx.Module):
    """torch `heads = layers.Sequential(OrderedDict(head=Linear))`."""

    def __init__(self, dim: int, num_classes: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.head = layers.linear(
            dim, num_classes, kernel_init=_ZEROS, bias_init=_ZEROS, rngs=rngs, dtype=dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(x)


class VisionTransformer(nnx.Module):
    """Patchify (p x p conv) -> prepend class token -> encoder -> class token [-> heads].

    The variant is set by `patch_size`, `num_layers` (encoder blocks), `num_heads`, `hidden_dim`
    (token width) and `mlp_dim`.
    """

    def __init__(
        self,
        *,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        rngs: nnx.Rngs,
        include_top: bool = False,
        num_classes: int = 1000,
        image_size: int = 224,
        dropout: float = 0.0,
        dtype: Dtype = jnp.float32,
    ):
        if image_size % patch_size:
            nearest = max(patch_size, image_size // patch_size * patch_size)
            raise ValueError(
                f"image_size={image_size} is not divisible by the patch size {patch_size}; "
                f"use a multiple of {patch_size} (e.g. {nearest})."
            )
        self.dtype = dtype
        self.image_size = image_size
        self.num_features = hidden_dim
        kw = {"rngs": rngs, "dtype": dtype}
        self.conv_proj = layers.conv(
            3,
            hidden_dim,
            patch_size,
            stride=patch_size,
            bias=True,
            kernel_init=initializers.normal(math.sqrt(1 / (3 * patch_size * patch_size))),
            bias_init=_ZEROS,
            **kw,
        )
        self.class_token = nnx.Param(jnp.zeros((1, 1, hidden_dim), layers.param_dtype(dtype)))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(
            seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, **kw
        )
        self.heads = Heads(hidden_dim, num_classes, **kw) if include_top else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"input is {x.shape[1]}x{x.shape[2]} but the model was built for "
                f"{self.image_size}x{self.image_size} (its position embedding fixes the size)."
            )
        x = self.conv_proj(x.astype(self.dtype))
        batch, height, width, dim = x.shape
        x = x.reshape(batch, height * width, dim)  # row-major patch order, as torch's flatten
        token = jnp.broadcast_to(self.class_token[...].astype(x.dtype), (batch, 1, dim))
        x = self.encoder(jnp.concatenate([token, x], axis=1))[:, 0]
        out = x if self.heads is None else self.heads(x)
        return out.astype(layers.stat_dtype(self.dtype))


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights (torch's A=-0.75) for taps at offsets -1, 0, 1, 2."""
    x = np.stack([t + 1, t, 1 - t, 2 - t], axis=-1)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, far)


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(out, in) matrix of torch's bicubic interpolation with align_corners=True, clamped edges."""
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    src = np.arange(size_out, dtype=np.float64) * scale
    base = np.floor(src).astype(np.int64)
    weights = _cubic_weights(src - base)
    matrix = np.zeros((size_out, size_in))
    for tap in range(4):
        index = np.clip(base - 1 + tap, 0, size_in - 1)
        np.add.at(matrix, (np.arange(size_out), index), weights[:, tap])
    return matrix


def resize_pos_embedding(pos_embedding: np.ndarray, num_tokens_new: int) -> np.ndarray:
    """torchvision's `interpolate_embeddings` for a (1, 1 + g*g, D) position embedding.

    `num_tokens_new` is the new total length, class token included (1 + g'*g'). The class entry
    is kept; the g x g grid is resized to g' x g' with bicubic interpolation (A=-0.75,
    align_corners=True, clamped borders), computed in float64 and returned in the input dtype.
    """
    _, length, dim = pos_embedding.shape
    if pos_embedding.shape[0] != 1:
        raise ValueError(f"unexpected position embedding shape {pos_embedding.shape}")
    if num_tokens_new == length:
        return pos_embedding
    grid, grid_new = math.isqrt(length - 1), math.isqrt(num_tokens_new - 1)
    if grid * grid != length - 1 or grid_new * grid_new != num_tokens_new - 1:
        raise ValueError(
            f"position embeddings of length {length} -> {num_tokens_new}: both must be "
            "1 + a square number of patches."
        )
    image = np.asarray(pos_embedding[0, 1:], np.float64).reshape(grid, grid, dim)
    matrix = _bicubic_matrix(grid, grid_new)
    resized = np.einsum("ih,jw,hwd->ijd", matrix, matrix, image).reshape(1, -1, dim)
    resized = np.concatenate([np.asarray(pos_embedding[:, :1], np.float64), resized], axis=1)
    return resized.astype(pos_embedding.dtype)


def unfreeze_units(model: VisionTransformer) -> list[tuple]:
    """The encoder blocks in order (the units `unfreeze_layers` counts from the end)."""
    return [
        ("encoder", "layers", f"encoder_layer_{i}") for i in range(model.encoder.layers.num_layers)
    ]


def trainable_prefixes(model: VisionTransformer, n: int) -> list[tuple]:
    """The original's rule: n=-1 everything, 0 nothing, n>0 the last n blocks plus embeddings.

    For n > 0 the patch projection, class token, position embedding and final LayerNorm are
    trainable too, whatever n is.
    """
    if n == 0:
        return []
    if n < 0:
        return [()]
    blocks = unfreeze_units(model)[-n:]
    return [
        *blocks,
        ("conv_proj",),
        ("class_token",),
        ("encoder", "pos_embedding"),
        ("encoder", "ln"),
    ]
