"""torchvision ResNet-50/101 (v1.5: stride on the 3x3 conv) in Flax NNX, NHWC.

Attribute paths equal torchvision's state_dict keys (`layer1.0.downsample.1.running_mean` is
`('layer1', 0, 'downsample', 1, 'mean')`). Without the top, the model is the original's
`Sequential(children[:-2])` followed by global pooling; with it, torchvision's full forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dermjax.models import layers
from dermjax.models.layers import Dtype

WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (stride) -> 1x1 bottleneck with an optional 1x1 conv + BN shortcut."""

    def __init__(self, in_features: int, width: int, stride: int, *, rngs: nnx.Rngs, dtype: Dtype):
        out_features = width * EXPANSION
        init = layers.kaiming_normal_fan_out
        kw = {"kernel_init": init, "rngs": rngs, "dtype": dtype}
        self.conv1 = layers.conv(in_features, width, 1, **kw)
        self.bn1 = layers.batch_norm(width, rngs=rngs, dtype=dtype)
        self.conv2 = layers.conv(width, width, 3, stride=stride, padding=1, **kw)
        self.bn2 = layers.batch_norm(width, rngs=rngs, dtype=dtype)
        self.conv3 = layers.conv(width, out_features, 1, **kw)
        self.bn3 = layers.batch_norm(out_features, rngs=rngs, dtype=dtype)
        needs_projection = stride != 1 or in_features != out_features
        self.downsample = (
            nnx.List(
                [
                    layers.conv(in_features, out_features, 1, stride=stride, **kw),
                    layers.batch_norm(out_features, rngs=rngs, dtype=dtype),
                ]
            )
            if needs_projection
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        return jax.nn.relu(out + identity)


class ResNet(nnx.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), four bottleneck stages, pool, optional fc.

    `depths`: bottleneck blocks in each of the four stages (the variant).
    """

    def __init__(
        self,
        *,
        depths: tuple[int, int, int, int],
        rngs: nnx.Rngs,
        include_top: bool = False,
        num_classes: int = 1000,
        pooling_type: str = "avg",
        dtype: Dtype = jnp.float32,
    ):
        layers.check_pooling_type(pooling_type)
        self.dtype = dtype
        self.include_top = include_top
        self.pooling_type = pooling_type
        init = layers.kaiming_normal_fan_out
        self.conv1 = layers.conv(
            3, 64, 7, stride=2, padding=3, kernel_init=init, rngs=rngs, dtype=dtype
        )
        self.bn1 = layers.batch_norm(64, rngs=rngs, dtype=dtype)
        in_features = 64
        for index, (depth, width) in enumerate(zip(depths, WIDTHS, strict=True)):
            blocks = []
            for block in range(depth):
                stride = 2 if block == 0 and index > 0 else 1
                blocks.append(Bottleneck(in_features, width, stride, rngs=rngs, dtype=dtype))
                in_features = width * EXPANSION
            setattr(self, f"layer{index + 1}", nnx.List(blocks))
        self.num_features = in_features
        self.fc = (
            layers.linear(in_features, num_classes, rngs=rngs, dtype=dtype) if include_top else None
        )

    def stages(self) -> list[nnx.List]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.bn1(self.conv1(x.astype(self.dtype))))
        x = layers.max_pool(x, 3, 2, 1)
        for stage in self.stages():
            for block in stage:
                x = block(x)
        if not self.include_top:
            return layers.global_pool(x, self.pooling_type)
        logits = self.fc(jnp.mean(x, axis=(1, 2)))
        return logits.astype(layers.stat_dtype(self.dtype))


def unfreeze_units(model: ResNet) -> list[tuple]:
    """The original's 8 top-level children of `Sequential(children[:-2])`, as path prefixes."""
    del model
    return [("conv1",), ("bn1",), ("relu",), ("maxpool",)] + [(f"layer{i}",) for i in range(1, 5)]
