"""The full model: a torchvision-exact backbone feeding the multimodal fusion head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dermjax.models import registry
from dermjax.models.fusion import MultimodalClassifier


class DermClassifier(nnx.Module):
    """Backbone (image -> pooled features) + MultimodalClassifier (features, text -> logits)."""

    def __init__(self, backbone: nnx.Module, head: MultimodalClassifier):
        self.backbone = backbone
        self.head = head

    def __call__(
        self,
        images: jax.Array,
        text: jax.Array,
        vision_valid: jax.Array | None = None,
        text_valid: jax.Array | None = None,
        sample_valid: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Head outputs; the validity vectors go to the head (zeroing, ablation routing)."""
        features = self.backbone(images).astype(jnp.float32)
        return self.head(features, text, vision_valid, text_valid, sample_valid)

    def vision_only(self, images: jax.Array) -> dict[str, jax.Array]:
        """Vision-only pre-training path: backbone -> vision projection -> aux vision head."""
        return self.head.vision_only(self.backbone(images).astype(jnp.float32))


def build_model(
    *,
    backbone: str,
    pretrained: bool,
    weights_path: str | None,
    pooling_type: str,
    img_size: tuple[int, int],
    dtype: Any,
    head: Mapping[str, Any],
    num_classes: int,
    text_dim: int,
    rngs: nnx.Rngs,
) -> DermClassifier:
    """Backbone `backbone` (compute `dtype`) + a float32 `MultimodalClassifier(**head)`.

    `pretrained` builds the backbone straight from converted torchvision weights (`weights_path`,
    else the weights folder; classifier head dropped, no random init to discard); otherwise it is
    randomly initialised from `rngs`. `img_size` is (height, width) of the input images.
    """
    kwargs = {"pooling_type": pooling_type, "dtype": dtype, "image_size": tuple(img_size)}
    if pretrained:
        from dermjax.weights.torchvision import pretrained_backbone

        features = pretrained_backbone(backbone, weights_path, **kwargs)
    else:
        features = registry.create_backbone(backbone, rngs=rngs, **kwargs)
    fusion = MultimodalClassifier(
        registry.feature_dim(backbone, pooling_type), text_dim, num_classes, rngs=rngs, **head
    )
    return DermClassifier(features, fusion)
