"""Torchvision-exact backbones (NHWC, Flax NNX), their registry, and the classifier head."""

from dermjax.models.registry import (
    BACKBONES,
    create_backbone,
    default_image_size,
    feature_dim,
    is_vit,
    param_labels,
    unit_count,
    vit_patch_size,
)

__all__ = [
    "BACKBONES",
    "create_backbone",
    "default_image_size",
    "feature_dim",
    "is_vit",
    "param_labels",
    "unit_count",
    "vit_patch_size",
]
