"""The multimodal fusion head of the original `MultimodalClassifier`, in Flax NNX.

Projects the backbone's image features and the text embedding to a common size, optionally
L2-normalises them, fuses them (concatenation or a learnt softmax-weighted sum) and classifies.
Auxiliary linear heads on each projection give the per-modality losses. Every Linear is
initialised as PyTorch does (weight and bias ~ U(+-1/sqrt(fan_in))), not with Flax's default.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

_ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, negative_slope=0.01),
}
ACTIVATIONS = tuple(_ACTIVATION_FNS)
FUSION_STRATEGIES = ("concat_mlp", "weighted_sum")


def torch_linear(
    in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32
) -> nnx.Linear:
    """`nnx.Linear` with `torch.nn.Linear`'s default init: weight and bias ~ U(+-1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_dim)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(in_dim, out_dim, kernel_init=init, bias_init=init, dtype=dtype, rngs=rngs)


def _check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use one of {ACTIVATIONS}")


class _HiddenBlock(nnx.Module):
    """Linear -> BatchNorm1d -> activation -> Dropout."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        activation: str,
        dropout: float,
        *,
        rngs: nnx.Rngs,
        dtype: Any,
    ):
        self.linear = torch_linear(in_dim, out_dim, rngs=rngs, dtype=dtype)
        # torch BatchNorm1d defaults: eps 1e-5, momentum 0.1 (= Flax momentum 0.9).
        self.norm = nnx.BatchNorm(
            out_dim, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
        )
        self.activation = activation
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dropout(_ACTIVATION_FNS[self.activation](self.norm(self.linear(x))))


class MLP(nnx.Module):
    """The original `model/utils.MLP`: hidden blocks then a final Linear (no act/dropout)."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ):
        _check_activation(activation)
        sizes = [in_dim, *hidden]
        self.hidden = nnx.List(
            [
                _HiddenBlock(a, b, activation, dropout, rngs=rngs, dtype=dtype)
                for a, b in itertools.pairwise(sizes)
            ]
        )
        self.out = torch_linear(sizes[-1], out_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.hidden:
            x = block(x)
        return self.out(x)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`torch.nn.functional.normalize(x, dim=-1)` in float32, with a finite gradient at 0."""
    x = x.astype(jnp.float32)
    # max(||x||, eps) == sqrt(max(||x||^2, eps^2)); the latter has no 0/0 in its gradient.
    norm = jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))
    return x / norm


class MultimodalClassifier(nnx.Module):
    """Fusion head: `model(vision_emb, text_emb) -> {"logits", ["aux_vision_logits", ...]}`."""

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        projection_dim: int,
        image_projection_hidden: Sequence[int] = (),
        text_projection_hidden: Sequence[int] = (),
        projection_activation: str = "relu",
        projection_dropout: float = 0.2,
        text_projection_dropout: float | None = None,
        use_l2_normalization: bool = False,
        final_hidden_sizes: Sequence[int] = (),
        final_activation: str = "relu",
        final_dropout: float = 0.3,
        fusion_strategy: str = "concat_mlp",
        use_auxiliary_loss: bool = False,
        dtype: Any = jnp.float32,
    ):
        if fusion_strategy not in FUSION_STRATEGIES:
            raise ValueError(f"fusion_strategy={fusion_strategy!r}; use one of {FUSION_STRATEGIES}")
        if text_projection_dropout is None:
            text_projection_dropout = projection_dropout
        self.fusion_strategy = fusion_strategy
        self.use_l2_normalization = use_l2_normalization
        self.use_auxiliary_loss = use_auxiliary_loss
        self.vision_projection = MLP(
            vision_dim,
            tuple(image_projection_hidden),
            projection_dim,
            activation=projection_activation,
            dropout=projection_dropout,
            rngs=rngs,
            dtype=dtype,
        )
        self.text_projection = MLP(
            text_dim,
            tuple(text_projection_hidden),
            projection_dim,
            activation=projection_activation,
            dropout=text_projection_dropout,
            rngs=rngs,
            dtype=dtype,
        )
        if fusion_strategy == "weighted_sum":
            self.alpha_vision = nnx.Param(jnp.asarray(0.5, jnp.float32))
            self.alpha_text = nnx.Param(jnp.asarray(0.5, jnp.float32))
            final_in = projection_dim
        else:
            final_in = 2 * projection_dim
        self.final_classifier = MLP(
            final_in,
            tuple(final_hidden_sizes),
            num_classes,
            activation=final_activation,
            dropout=final_dropout,
            rngs=rngs,
            dtype=dtype,
        )
        if use_auxiliary_loss:
            self.aux_vision_classifier = torch_linear(
                projection_dim, num_classes, rngs=rngs, dtype=dtype
            )
            self.aux_text_classifier = torch_linear(
                projection_dim, num_classes, rngs=rngs, dtype=dtype
            )

    def __call__(self, vision_emb: jax.Array, text_emb: jax.Array) -> dict[str, jax.Array]:
        pv = self.vision_projection(vision_emb)
        pt = self.text_projection(text_emb)
        if self.use_l2_normalization:
            pv, pt = l2_normalize(pv).astype(pv.dtype), l2_normalize(pt).astype(pt.dtype)
        if self.fusion_strategy == "weighted_sum":
            w = jax.nn.softmax(jnp.stack([self.alpha_vision[...], self.alpha_text[...]]))
            fused = w[0].astype(pv.dtype) * pv + w[1].astype(pt.dtype) * pt
        else:
            fused = jnp.concatenate([pv, pt], axis=-1)
        out = {"logits": self.final_classifier(fused).astype(jnp.float32)}
        if self.use_auxiliary_loss:
            out["aux_vision_logits"] = self.aux_vision_classifier(pv).astype(jnp.float32)
            out["aux_text_logits"] = self.aux_text_classifier(pt).astype(jnp.float32)
        return out
