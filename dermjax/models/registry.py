"""The one table of backbones: model class, variant, feature size, units, image and patch size.

Each family module (`resnet`, `densenet`, `efficientnet`, `vgg`, `vit`) holds one model class
whose keyword arguments pick the variant, and `unfreeze_units(model)` (the original's top-level
units, in order, as NNX path prefixes; parameter-less units count). A family may also expose
`trainable_prefixes(model, n)` (ViT: the last n encoder blocks plus the embeddings and final
LayerNorm). Family modules are imported on first use.

`unfreeze_layers` has two rules (`UNFREEZE_RULES`): "children", the original's rule at 700cca3
(the last N units above, for every backbone), and "conv_count", the later original's rule for
resnet50/101 (the last N Conv2d layers, see `param_labels`); other backbones keep "children"
under "conv_count", as in the original.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dermjax.models.layers import check_pooling_type

# Top-level attributes holding torchvision's classification head (absent when include_top=False).
HEAD_NAMES = ("fc", "classifier", "heads")
UNFREEZE_RULES = ("children", "conv_count")
# Backbones whose unfreeze_layers counts Conv2d layers under the "conv_count" rule.
CONV_COUNT_BACKBONES = ("resnet50", "resnet101")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Everything dermjax knows about one backbone name.

    `units` is what the original's `unfreeze_layers` counts: ResNet the 8 top-level children of
    `Sequential(children[:-2])` (conv1, bn1, relu, maxpool, layer1-4); EfficientNet the 9
    children of `.features` (stem, 7 stages, head conv); DenseNet the 12 children of `.features`
    (conv0, norm0, relu0, pool0, 4 dense blocks, 3 transitions, norm5); VGG16 the 31 children of
    `.features` (13 convs, 13 ReLUs, 5 max-pools); ViT the encoder blocks.
    """

    model: str  # "<family module>.<class>" under dermjax.models
    feature_dim: int  # pooled features with avg/max pooling (ViT: class-token width)
    units: int
    variant: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # class kwargs
    image_size: int = 224  # crop size of the default torchvision weights
    patch_size: int | None = None  # ViT only


def _vit(patch: int, layers: int, heads: int, dim: int, mlp: int) -> BackboneSpec:
    """A ViT entry: patch size, block count and width are also what the table reports."""
    variant = {
        "patch_size": patch,
        "num_layers": layers,
        "num_heads": heads,
        "hidden_dim": dim,
        "mlp_dim": mlp,
    }
    return BackboneSpec("vit.VisionTransformer", dim, layers, variant, patch_size=patch)


def _efficientnet(width: float, depth: float, dropout: float, dim: int, size: int) -> BackboneSpec:
    """An EfficientNet entry (width/depth multipliers, classifier dropout)."""
    variant = {"width_mult": width, "depth_mult": depth, "dropout": dropout}
    return BackboneSpec("efficientnet.EfficientNet", dim, 9, variant, image_size=size)


_SPECS = {
    "resnet50": BackboneSpec("resnet.ResNet", 2048, 8, {"depths": (3, 4, 6, 3)}),
    "resnet101": BackboneSpec("resnet.ResNet", 2048, 8, {"depths": (3, 4, 23, 3)}),
    "densenet121": BackboneSpec("densenet.DenseNet", 1024, 12),
    "efficientnet_b0": _efficientnet(1.0, 1.0, 0.2, 1280, 224),
    "efficientnet_b1": _efficientnet(1.0, 1.1, 0.2, 1280, 240),
    "efficientnet_b2": _efficientnet(1.1, 1.2, 0.3, 1408, 288),
    "efficientnet_b3": _efficientnet(1.2, 1.4, 0.3, 1536, 300),
    "efficientnet_b4": _efficientnet(1.4, 1.8, 0.4, 1792, 380),
    "vgg16": BackboneSpec("vgg.VGG", 512, 31),
    "vit_b_16": _vit(16, 12, 12, 768, 3072),
    "vit_b_32": _vit(32, 12, 12, 768, 3072),
    "vit_l_16": _vit(16, 24, 16, 1024, 4096),
    "vit_l_32": _vit(32, 24, 16, 1024, 4096),
}
BACKBONES = tuple(_SPECS)

_log = logging.getLogger(__name__)


def backbone_spec(name: str) -> BackboneSpec:
    """The table entry for `name`; ValueError listing the choices for an unknown name."""
    if name not in _SPECS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    return _SPECS[name]


def _family_module(name: str) -> ModuleType:
    return importlib.import_module(f"dermjax.models.{backbone_spec(name).model.split('.')[0]}")


def is_vit(name: str) -> bool:
    return backbone_spec(name).patch_size is not None


def vit_patch_size(name: str) -> int | None:
    """The patch size of ViT `name` (images must be square multiples of it); None for CNNs."""
    return backbone_spec(name).patch_size


def default_image_size(name: str) -> int:
    """Crop size of the default torchvision weights for `name`."""
    return backbone_spec(name).image_size


def feature_dim(name: str, pooling_type: str = "avg") -> int:
    """Size of the backbone embedding: doubled by `concat` pooling (ignored for ViTs)."""
    dim = backbone_spec(name).feature_dim
    check_pooling_type(pooling_type)
    return dim * 2 if pooling_type == "concat" and not is_vit(name) else dim


def unit_count(name: str) -> int:
    """How many units `unfreeze_layers` counts for `name` (see `BackboneSpec`)."""
    return backbone_spec(name).units


def create_backbone(
    name: str,
    *,
    rngs: nnx.Rngs,
    include_top: bool = False,
    num_classes: int = 1000,
    pooling_type: str = "avg",
    dtype: Any = jnp.float32,
    image_size: int | tuple[int, int] = 224,
) -> nnx.Module:
    """A torchvision-exact backbone taking NHWC float images.

    include_top=True returns torchvision's full classifier (logits of `num_classes`); otherwise
    pooled features of size `feature_dim(name, pooling_type)` (ViT: class token after the final
    LayerNorm). `dtype` is the compute dtype; parameters stay float32 (float64 for float64).
    `image_size` (side, or (height, width)) fixes a ViT's position embedding, so a ViT needs a
    square size; CNNs accept any input size and ignore it.
    """
    spec = backbone_spec(name)
    kwargs: dict[str, Any] = {
        "rngs": rngs,
        "include_top": include_top,
        "num_classes": num_classes,
        "dtype": dtype,
    }
    if spec.patch_size is None:
        kwargs["pooling_type"] = pooling_type
    else:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height != width:
            raise ValueError(f"{name} needs a square image size, got {height}x{width}")
        kwargs["image_size"] = height
    model_class = getattr(_family_module(name), spec.model.split(".")[1])
    return model_class(**spec.variant, **kwargs)


def _trainable_prefixes(model: nnx.Module, name: str, n: int) -> list[tuple]:
    module = _family_module(name)
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


def _resnet_leaves(model: nnx.Module) -> list[tuple[tuple, bool]]:
    """ResNet's parameterised leaf modules in torch registration order, as (path, is_conv).

    The stem conv1, bn1, then per bottleneck conv1, bn1, conv2, bn2, conv3, bn3 and the
    downsample conv and BN: the order of the original's `_get_all_individual_layers`.
    """
    leaves: list[tuple[tuple, bool]] = [(("conv1",), True), (("bn1",), False)]
    for index, stage in enumerate(model.stages(), start=1):
        for number, block in enumerate(stage):
            prefix = (f"layer{index}", number)
            for k in (1, 2, 3):
                leaves += [((*prefix, f"conv{k}"), True), ((*prefix, f"bn{k}"), False)]
            if block.downsample is not None:
                leaves += [((*prefix, "downsample", 0), True), ((*prefix, "downsample", 1), False)]
    return leaves


def _rule_units(
    model: nnx.Module, name: str, rule: str
) -> tuple[int, str, Callable[[int], list[tuple]]]:
    """(unit count, unit word, n -> trainable prefixes for 0 < n <= count) under `rule`."""
    if rule not in UNFREEZE_RULES:
        raise ValueError(f"unfreeze rule {rule!r}; expected one of {UNFREEZE_RULES}")
    if rule == "conv_count" and name in CONV_COUNT_BACKBONES:
        leaves = _resnet_leaves(model)
        convs = [i for i, (_, is_conv) in enumerate(leaves) if is_conv]
        return len(convs), "Conv2d layers", lambda n: [p for p, _ in leaves[convs[-n] :]]
    return unit_count(name), "units", lambda n: _trainable_prefixes(model, name, n)


def param_labels(
    model: nnx.Module, name: str, unfreeze_layers: int, *, rule: str = "children"
) -> Any:
    """`nnx.state(model, nnx.Param)` with every Variable replaced by "trainable" or "frozen".

    The original's rule: -1 all trainable; 0 all frozen; N > 0 the last N units trainable (all,
    with a warning, when N exceeds the unit count). Under `rule="children"` the units are
    `unit_count(name)`'s; under `rule="conv_count"` resnet50/101 count their 53/104 Conv2d layers
    (downsample convs included) and every parameterised layer from the N-th-from-last conv on is
    trainable (its BN and later ones too); other backbones keep the children rule.
    torchvision head parameters (`fc`, `classifier`, `heads`; only present with
    include_top=True) come after every unit, so they are trainable whenever N != 0. The result
    is a prefix tree of the params for `optax.multi_transform`.
    """
    count, word, select = _rule_units(model, name, rule)
    if unfreeze_layers > count:
        _log.warning(
            "unfreeze_layers=%d exceeds the %d %s of %s; unfreezing the whole backbone",
            unfreeze_layers,
            count,
            word,
            name,
        )
    if unfreeze_layers == 0:
        prefixes, everything = [], False
    elif unfreeze_layers < 0 or unfreeze_layers > count:
        prefixes, everything = [], True
    else:
        prefixes, everything = select(unfreeze_layers), False
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
