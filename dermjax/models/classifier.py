"""The full model: a torchvision-exact backbone feeding the multimodal fusion head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import config_dict

from dermjax.models import create_backbone, registry
from dermjax.models.fusion import MultimodalClassifier


class DermClassifier(nnx.Module):
    """Backbone (image -> pooled features) + MultimodalClassifier (features, text -> logits)."""

    def __init__(self, backbone: nnx.Module, head: MultimodalClassifier):
        self.backbone = backbone
        self.head = head

    def __call__(self, images: jax.Array, text: jax.Array) -> dict[str, jax.Array]:
        features = self.backbone(images).astype(jnp.float32)
        return self.head(features, text)


def build_model(
    cfg: config_dict.ConfigDict, *, num_classes: int, text_dim: int, rngs: nnx.Rngs
) -> DermClassifier:
    """Builds backbone and head from config; `vision_model.pretrained` loads converted
    torchvision weights (classifier head dropped), else the backbone is randomly initialised."""
    v = cfg.vision_model
    dtype = jnp.bfloat16 if cfg.training.dtype == "bfloat16" else jnp.float32
    height, width = cfg.data.img_size
    kwargs = dict(
        pooling_type=v.pooling_type,
        dtype=dtype,
        image_size=height if height == width else (height, width),
    )
    if v.pretrained:  # built straight from the converted weights: no random init to discard
        from dermjax.weights.torchvision import pretrained_backbone

        backbone = pretrained_backbone(v.name, v.weights_path, **kwargs)
    else:
        backbone = create_backbone(v.name, rngs=rngs, **kwargs)
    head = MultimodalClassifier.from_config(
        cfg.multimodal_classifier.to_dict(),
        registry.feature_dim(v.name, v.pooling_type),
        text_dim,
        num_classes,
        rngs=rngs,
    )
    return DermClassifier(backbone, head)
