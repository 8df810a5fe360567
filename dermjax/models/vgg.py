"""torchvision VGG-16 (configuration "D", no BatchNorm) in Flax NNX, NHWC.

`features` and `classifier` are `nnx.List`s in which ReLU, max-pool and dropout hold their torch
indices, so `features.28.weight` is `('features', 28, 'kernel')` and `classifier.6.bias` is
`('classifier', 6, 'bias')`. Without the top the model is the original's `vgg16.features`
followed by global pooling (512 features).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dermjax.models import initializers, layers
from dermjax.models.layers import Dtype

CONFIG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
POOL_SIZE = (7, 7)
HIDDEN = 4096
DROPOUT = 0.5


class VGG(nnx.Module):
    """VGG-16: 13 3x3 convs with bias + ReLU, 5 max-pools; adaptive 7x7 pool + 3 Linears."""

    def __init__(
        self,
        *,
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
        modules: list[nnx.Module] = []
        channels = 3
        for item in CONFIG_D:
            if item == "M":
                modules.append(layers.MaxPool2d(2, 2))
                continue
            modules.append(
                layers.conv(
                    channels,
                    item,
                    3,
                    padding=1,
                    bias=True,
                    kernel_init=layers.kaiming_normal_fan_out,
                    bias_init=nnx.initializers.zeros_init(),
                    rngs=rngs,
                    dtype=dtype,
                )
            )
            modules.append(layers.ReLU())
            channels = item
        self.features = nnx.List(modules)
        self.num_features = channels
        self.classifier = (
            self._classifier(channels, num_classes, rngs, dtype) if include_top else None
        )

    @staticmethod
    def _classifier(channels: int, num_classes: int, rngs: nnx.Rngs, dtype: Dtype) -> nnx.List:
        kw = {
            "kernel_init": initializers.normal(0.01),
            "bias_init": nnx.initializers.zeros_init(),
            "rngs": rngs,
            "dtype": dtype,
        }
        flat = channels * POOL_SIZE[0] * POOL_SIZE[1]
        return nnx.List(
            [
                layers.linear(flat, HIDDEN, **kw),
                layers.ReLU(),
                nnx.Dropout(DROPOUT, rngs=rngs),
                layers.linear(HIDDEN, HIDDEN, **kw),
                layers.ReLU(),
                nnx.Dropout(DROPOUT, rngs=rngs),
                layers.linear(HIDDEN, num_classes, **kw),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        for module in self.features:
            x = module(x)
        if not self.include_top:
            return layers.global_pool(x, self.pooling_type)
        x = layers.adaptive_avg_pool(x, POOL_SIZE)
        # torch flattens NCHW: channel-major order, which classifier.0's weight expects.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        for module in self.classifier:
            x = module(x)
        return x.astype(layers.stat_dtype(self.dtype))


def unfreeze_units(model: VGG) -> list[tuple]:
    """The 31 children of `vgg16.features` (convs, ReLUs and pools), as path prefixes."""
    return [("features", i) for i in range(len(model.features))]
