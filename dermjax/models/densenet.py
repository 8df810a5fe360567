"""torchvision DenseNet-121 in Flax NNX, NHWC.

Attribute paths equal torchvision's state_dict keys (`features.denseblock1.denselayer1.norm1.*`
is `('features', 'denseblock1', 'denselayer1', 'norm1', ...)`).

Features vs logits: the original workflow's backbone is `densenet.features`, which ends at
`norm5` **without** the ReLU that `DenseNet.forward` applies. So `include_top=False` pools the
`norm5` output as is (matching the original's embeddings), while `include_top=True` equals
torchvision's full forward: ReLU, global average pool, `classifier`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dermjax.models import layers
from dermjax.models.layers import Dtype

GROWTH_RATE = 32
BN_SIZE = 4
BLOCK_CONFIG = (6, 12, 24, 16)
NUM_INIT_FEATURES = 64


class DenseLayer(nnx.Module):
    """Pre-activation BN-ReLU-1x1 conv-BN-ReLU-3x3 conv producing `growth_rate` new channels."""

    def __init__(self, in_features: int, *, rngs: nnx.Rngs, dtype: Dtype):
        width = BN_SIZE * GROWTH_RATE
        kw = {"kernel_init": layers.kaiming_normal_fan_in, "rngs": rngs, "dtype": dtype}
        self.norm1 = layers.batch_norm(in_features, rngs=rngs, dtype=dtype)
        self.conv1 = layers.conv(in_features, width, 1, **kw)
        self.norm2 = layers.batch_norm(width, rngs=rngs, dtype=dtype)
        self.conv2 = layers.conv(width, GROWTH_RATE, 3, padding=1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv1(jax.nn.relu(self.norm1(x)))
        return self.conv2(jax.nn.relu(self.norm2(out)))


class DenseBlock(nnx.Module):
    """`denselayer1..N`; each layer sees the channel concatenation of the input and all outputs."""

    def __init__(self, num_layers: int, in_features: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.num_layers = num_layers
        for i in range(num_layers):
            layer = DenseLayer(in_features + i * GROWTH_RATE, rngs=rngs, dtype=dtype)
            setattr(self, f"denselayer{i + 1}", layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            new = getattr(self, f"denselayer{i + 1}")(x)
            x = jnp.concatenate([x, new.astype(x.dtype)], axis=-1)
        return x


class Transition(nnx.Module):
    """BN, ReLU, 1x1 conv halving the channels, 2x2/2 average pool."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.norm = layers.batch_norm(in_features, rngs=rngs, dtype=dtype)
        self.conv = layers.conv(
            in_features,
            out_features,
            1,
            kernel_init=layers.kaiming_normal_fan_in,
            rngs=rngs,
            dtype=dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.avg_pool(self.conv(jax.nn.relu(self.norm(x))), 2, 2)


class DenseNetFeatures(nnx.Module):
    """torchvision's `DenseNet.features`: stem, 4 dense blocks with 3 transitions, `norm5`."""

    def __init__(self, *, rngs: nnx.Rngs, dtype: Dtype):
        self.dtype = dtype
        self.conv0 = layers.conv(
            3,
            NUM_INIT_FEATURES,
            7,
            stride=2,
            padding=3,
            kernel_init=layers.kaiming_normal_fan_in,
            rngs=rngs,
            dtype=dtype,
        )
        self.norm0 = layers.batch_norm(NUM_INIT_FEATURES, rngs=rngs, dtype=dtype)
        channels = NUM_INIT_FEATURES
        for i, num_layers in enumerate(BLOCK_CONFIG):
            setattr(
                self,
                f"denseblock{i + 1}",
                DenseBlock(num_layers, channels, rngs=rngs, dtype=dtype),
            )
            channels += num_layers * GROWTH_RATE
            if i + 1 < len(BLOCK_CONFIG):
                transition = Transition(channels, channels // 2, rngs=rngs, dtype=dtype)
                setattr(self, f"transition{i + 1}", transition)
                channels //= 2
        self.norm5 = layers.batch_norm(channels, rngs=rngs, dtype=dtype)
        self.num_features = channels

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.norm0(self.conv0(x.astype(self.dtype))))
        x = layers.max_pool(x, 3, 2, 1)
        for i in range(len(BLOCK_CONFIG)):
            x = getattr(self, f"denseblock{i + 1}")(x)
            if i + 1 < len(BLOCK_CONFIG):
                x = getattr(self, f"transition{i + 1}")(x)
        return self.norm5(x)


class DenseNet(nnx.Module):
    """DenseNet-121: `features`, then pooling (backbone) or ReLU + avg pool + `classifier`."""

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
        self.features = DenseNetFeatures(rngs=rngs, dtype=dtype)
        self.num_features = self.features.num_features
        self.classifier = (
            layers.linear(
                self.num_features,
                num_classes,
                bias_init=nnx.initializers.zeros_init(),
                rngs=rngs,
                dtype=dtype,
            )
            if include_top
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.features(x)
        if not self.include_top:
            return layers.global_pool(x, self.pooling_type)
        logits = self.classifier(jnp.mean(jax.nn.relu(x), axis=(1, 2)))
        return logits.astype(layers.stat_dtype(self.dtype))


def unfreeze_units(model: DenseNet) -> list[tuple]:
    """The 12 children of `densenet.features` (conv0 ... norm5), as path prefixes."""
    del model
    names = ["conv0", "norm0", "relu0", "pool0"]
    for i in range(1, len(BLOCK_CONFIG) + 1):
        names.append(f"denseblock{i}")
        if i < len(BLOCK_CONFIG):
            names.append(f"transition{i}")
    names.append("norm5")
    return [("features", n) for n in names]
