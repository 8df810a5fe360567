"""Backbone names, feature sizes, and the original's `unfreeze_layers` rule as optax labels.

Each family module (`resnet`, `densenet`, `efficientnet`, `vgg`, `vit`) exposes
`build(name, *, rngs, include_top, num_classes, pooling_type, dtype, image_size)` and
`unfreeze_units(model)` (the original's top-level units, in order, as NNX path prefixes;
parameter-less units count). A family may instead expose `trainable_prefixes(model, n)` (ViT:
the last n encoder blocks plus the embeddings and final LayerNorm). Families are imported
lazily, so one missing family never breaks the others.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dermjax.models.layers import POOLING_TYPES

BACKBONES = (
    "resnet50",
    "resnet101",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b4",
    "vgg16",
    "vit_b_16",
    "vit_b_32",
    "vit_l_16",
    "vit_l_32",
)

# Top-level attributes holding torchvision's classification head (absent when include_top=False).
HEAD_NAMES = ("fc", "classifier", "heads")

_FAMILY = {
    "resnet50": "resnet",
    "resnet101": "resnet",
    "densenet121": "densenet",
    "efficientnet_b0": "efficientnet",
    "efficientnet_b1": "efficientnet",
    "efficientnet_b4": "efficientnet",
    "vgg16": "vgg",
    "vit_b_16": "vit",
    "vit_b_32": "vit",
    "vit_l_16": "vit",
    "vit_l_32": "vit",
}
_FEATURE_DIM = {
    "resnet50": 2048,
    "resnet101": 2048,
    "densenet121": 1024,
    "efficientnet_b0": 1280,
    "efficientnet_b1": 1280,
    "efficientnet_b4": 1792,
    "vgg16": 512,
    "vit_b_16": 768,
    "vit_b_32": 768,
    "vit_l_16": 1024,
    "vit_l_32": 1024,
}
# Units counted by the original's `unfreeze_layers` (ORIGINAL_WORKFLOW.md §7); ViT: blocks.
_UNIT_COUNT = {
    "resnet50": 8,
    "resnet101": 8,
    "densenet121": 12,
    "efficientnet_b0": 9,
    "efficientnet_b1": 9,
    "efficientnet_b4": 9,
    "vgg16": 31,
    "vit_b_16": 12,
    "vit_b_32": 12,
    "vit_l_16": 24,
    "vit_l_32": 24,
}
# Crop size of each backbone's default torchvision weights (EfficientNet B1 240, B4 380).
_DEFAULT_IMAGE_SIZE = {"efficientnet_b1": 240, "efficientnet_b4": 380}

_log = logging.getLogger(__name__)


def _check_name(name: str) -> None:
    if name not in _FAMILY:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")


def family(name: str) -> ModuleType:
    """The family module implementing `name` (imported on first use)."""
    _check_name(name)
    return importlib.import_module(f"dermjax.models.{_FAMILY[name]}")


def is_vit(name: str) -> bool:
    _check_name(name)
    return _FAMILY[name] == "vit"


def default_image_size(name: str) -> int:
    """Crop size of the default torchvision weights for `name`."""
    _check_name(name)
    return _DEFAULT_IMAGE_SIZE.get(name, 224)


def feature_dim(name: str, pooling_type: str = "avg") -> int:
    """Size of the backbone embedding: doubled by `concat` pooling (ignored for ViTs)."""
    _check_name(name)
    if pooling_type not in POOLING_TYPES:
        raise ValueError(f"pooling_type={pooling_type!r}; expected one of {POOLING_TYPES}")
    dim = _FEATURE_DIM[name]
    return dim * 2 if pooling_type == "concat" and not is_vit(name) else dim


def unit_count(name: str) -> int:
    """How many units `unfreeze_layers` counts for `name` (ViT: encoder blocks)."""
    _check_name(name)
    return _UNIT_COUNT[name]


def create_backbone(
    name: str,
    *,
    rngs: nnx.Rngs,
    include_top: bool = False,
    num_classes: int = 1000,
    pooling_type: str = "avg",
    dtype: Any = jnp.float32,
    image_size: int = 224,
) -> nnx.Module:
    """A torchvision-exact backbone taking NHWC float images.

    include_top=True returns torchvision's full classifier (logits of `num_classes`); otherwise
    pooled features of size `feature_dim(name, pooling_type)` (ViT: class token after the final
    LayerNorm). `dtype` is the compute dtype; parameters stay float32 (float64 for float64).
    """
    return family(name).build(
        name,
        rngs=rngs,
        include_top=include_top,
        num_classes=num_classes,
        pooling_type=pooling_type,
        dtype=dtype,
        image_size=image_size,
    )


def _trainable_prefixes(model: nnx.Module, name: str, n: int) -> list[tuple]:
    module = family(name)
    if hasattr(module, "trainable_prefixes"):
        return list(module.trainable_prefixes(model, n))
    return list(module.unfreeze_units(model))[-n:]


def _path_names(key_path: tuple) -> tuple:
    names = []
    for key in key_path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(key.key)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(key.idx)
    return tuple(names)


def param_labels(model: nnx.Module, name: str, unfreeze_layers: int) -> Any:
    """`nnx.state(model, nnx.Param)` with every Variable replaced by "trainable" or "frozen".

    The original's rule: -1 all trainable; 0 all frozen; N > 0 the last N units trainable (all,
    with a warning, when N exceeds `unit_count(name)`). torchvision head parameters (`fc`,
    `classifier`, `heads`; only present with include_top=True) come after every unit, so they are
    trainable whenever N != 0. The result is a prefix tree of the params for
    `optax.multi_transform`.
    """
    count = unit_count(name)
    if unfreeze_layers > count:
        _log.warning(
            "unfreeze_layers=%d exceeds the %d units of %s; unfreezing the whole backbone",
            unfreeze_layers,
            count,
            name,
        )
    if unfreeze_layers == 0:
        prefixes, everything = [], False
    elif unfreeze_layers < 0 or unfreeze_layers > count:
        prefixes, everything = [], True
    else:
        prefixes, everything = _trainable_prefixes(model, name, unfreeze_layers), False
    heads = unfreeze_layers != 0

    def label(key_path: tuple, _: nnx.Variable) -> str:
        path = _path_names(key_path)
        trainable = (
            everything
            or (heads and path[0] in HEAD_NAMES)
            or any(path[: len(p)] == tuple(p) for p in prefixes)
        )
        return "trainable" if trainable else "frozen"

    return jax.tree.map_with_path(
        label, nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
