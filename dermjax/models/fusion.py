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

from dermjax.models import initializers
from dermjax.models.layers import BatchNorm

_ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, negative_slope=0.01),
}
ACTIVATIONS = tuple(_ACTIVATION_FNS)
FUSION_STRATEGIES = ("concat_mlp", "weighted_sum")
# Routes of a batch through the head; `outputs["ablation"]` is the index into this tuple.
ABLATION_MODES = ("multimodal", "text_only", "vision_only")


def torch_linear(
    in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32
) -> nnx.Linear:
    """`nnx.Linear` with `torch.nn.Linear`'s default init: weight and bias ~ U(+-1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_dim)
    init = initializers.uniform(bound)
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
        # torch BatchNorm1d defaults: eps 1e-5, momentum 0.1 (= Flax momentum 0.9); the running
        # variance takes the unbiased batch variance, as torch's.
        self.norm = BatchNorm(
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
        zero_masked_projections: bool = False,
        ablation_routing: bool = False,
        vision_only_l2_normalization: bool = True,
        dtype: Any = jnp.float32,
    ):
        if fusion_strategy not in FUSION_STRATEGIES:
            raise ValueError(f"fusion_strategy={fusion_strategy!r}; use one of {FUSION_STRATEGIES}")
        if ablation_routing and not use_auxiliary_loss:
            raise ValueError("ablation_routing needs use_auxiliary_loss (it uses the aux heads)")
        if text_projection_dropout is None:
            text_projection_dropout = projection_dropout
        self.fusion_strategy = fusion_strategy
        self.use_l2_normalization = use_l2_normalization
        self.use_auxiliary_loss = use_auxiliary_loss
        self.zero_masked_projections = zero_masked_projections
        self.ablation_routing = ablation_routing
        self.vision_only_l2_normalization = vision_only_l2_normalization
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

    def _project(
        self, projection: MLP, emb: jax.Array, valid: jax.Array | None, l2: bool = True
    ) -> jax.Array:
        """Projection; rows of masked samples zeroed (if enabled) *before* the L2 norm (if
        enabled and `l2`)."""
        p = projection(emb)
        if valid is not None and self.zero_masked_projections:
            p = p * valid.astype(p.dtype)[:, None]
        return l2_normalize(p).astype(p.dtype) if self.use_l2_normalization and l2 else p

    def _multimodal(self, vision_emb, text_emb, vision_valid, text_valid) -> dict[str, jax.Array]:
        pv = self._project(self.vision_projection, vision_emb, vision_valid)
        pt = self._project(self.text_projection, text_emb, text_valid)
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

    def _single(self, modality: str, emb: jax.Array) -> dict[str, jax.Array]:
        """Ablation: projection -> (L2) -> that modality's aux head, no masking, no fusion."""
        p = self._project(getattr(self, f"{modality}_projection"), emb, None)
        logits = getattr(self, f"aux_{modality}_classifier")(p).astype(jnp.float32)
        other = "text" if modality == "vision" else "vision"
        return {
            "logits": logits,
            f"aux_{modality}_logits": logits,
            f"aux_{other}_logits": jnp.zeros_like(logits),
        }

    def vision_only(self, vision_emb: jax.Array) -> dict[str, jax.Array]:
        """The vision-only pre-training path: aux vision head on the projection, L2-normalised
        as in the multimodal path unless `vision_only_l2_normalization` is off (the original)."""
        if not self.use_auxiliary_loss:
            raise ValueError("the vision-only path needs use_auxiliary_loss (the aux vision head)")
        p = self._project(
            self.vision_projection, vision_emb, None, l2=self.vision_only_l2_normalization
        )
        return {"logits": self.aux_vision_classifier(p).astype(jnp.float32)}

    def __call__(
        self,
        vision_emb: jax.Array,
        text_emb: jax.Array,
        vision_valid: jax.Array | None = None,
        text_valid: jax.Array | None = None,
        sample_valid: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Logits (and aux logits) of the batch; `*_valid` are bool[B] (True = usable).

        With `ablation_routing` and both validity vectors, a batch whose (real, `sample_valid`)
        samples all lack the image goes text -> projection -> aux text head ("text_only"), one
        that lacks all texts goes the vision way; any other batch (both all masked included) is
        fused. Only the route taken runs, so the other branches get neither gradients nor
        BatchNorm updates. `outputs["ablation"]` then indexes `ABLATION_MODES`.
        """
        if not (self.ablation_routing and vision_valid is not None and text_valid is not None):
            return self._multimodal(vision_emb, text_emb, vision_valid, text_valid)
        real = (
            jnp.ones(vision_valid.shape, bool)
            if sample_valid is None
            else sample_valid.astype(bool)
        )
        vision_gone = ~jnp.any(vision_valid.astype(bool) & real)
        text_gone = ~jnp.any(text_valid.astype(bool) & real)
        mode = jnp.where(vision_gone & ~text_gone, 1, jnp.where(text_gone & ~vision_gone, 2, 0))
        branches = (
            lambda m, v, t, vv, tv: m._multimodal(v, t, vv, tv),
            lambda m, v, t, vv, tv: m._single("text", t),
            lambda m, v, t, vv, tv: m._single("vision", v),
        )
        out = nnx.switch(mode, branches, self, vision_emb, text_emb, vision_valid, text_valid)
        return {**out, "ablation": mode.astype(jnp.int32)}
