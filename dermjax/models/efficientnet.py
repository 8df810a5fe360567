"""torchvision EfficientNet-B0 to B4 (V1, MBConv) in Flax NNX, NHWC.

Attribute paths equal torchvision's state_dict keys: `features.1.0.block.0.0.weight` is the NNX
path `('features', 1, 0, 'block', 0, 0, 'kernel')`. Without the top, the model is the original's
`.features` followed by global pooling; with it, torchvision's full forward (average pool,
dropout, linear). Stochastic depth and classifier dropout draw from the `dropout` rng stream and
are active in `model.train()` mode only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dermjax.models import layers
from dermjax.models.layers import Dtype

# (expand_ratio, kernel, stride, in_channels, out_channels, num_layers) before width/depth scaling.
STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
# B0-B4 keep BatchNorm2d's eps 1e-5.
STOCHASTIC_DEPTH_PROB = 0.2
_ZEROS = nnx.initializers.zeros_init()


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: nearest multiple of `divisor`, never 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def stage_settings(width_mult: float, depth_mult: float) -> list[tuple[int, ...]]:
    """The (expand, kernel, stride, in, out, layers) rows of `STAGES` scaled to a variant."""
    return [
        (
            e,
            k,
            s,
            make_divisible(i * width_mult),
            make_divisible(o * width_mult),
            math.ceil(n * depth_mult),
        )
        for e, k, s, i, o, n in STAGES
    ]


class SiLU(nnx.Module):
    """Parameter-less torch.nn.SiLU, holding its index in a `Conv2dNormActivation`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(x)


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel: int,
    *,
    stride: int = 1,
    groups: int = 1,
    activation: bool = True,
    rngs: nnx.Rngs,
    dtype: Dtype,
) -> layers.Sequential:
    """torchvision `Conv2dNormActivation`: conv (no bias, padding (k-1)//2), BN, optional SiLU."""
    conv = layers.conv(
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        padding=(kernel - 1) // 2,
        groups=groups,
        kernel_init=layers.kaiming_normal_fan_out,
        rngs=rngs,
        dtype=dtype,
    )
    norm = layers.batch_norm(out_channels, rngs=rngs, dtype=dtype)
    return layers.Sequential([conv, norm, SiLU()] if activation else [conv, norm])


class SqueezeExcitation(nnx.Module):
    """Global average -> fc1 (1x1 conv, bias) -> SiLU -> fc2 -> sigmoid gate on the channels."""

    def __init__(self, channels: int, squeeze: int, *, rngs: nnx.Rngs, dtype: Dtype):
        kw = {"bias": True, "kernel_init": layers.kaiming_normal_fan_out, "bias_init": _ZEROS}
        self.fc1 = layers.conv(channels, squeeze, 1, rngs=rngs, dtype=dtype, **kw)
        self.fc2 = layers.conv(squeeze, channels, 1, rngs=rngs, dtype=dtype, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = jnp.mean(x.astype(layers.stat_dtype(x.dtype)), axis=(1, 2), keepdims=True)
        scale = jax.nn.sigmoid(self.fc2(jax.nn.silu(self.fc1(scale))))
        return x * scale.astype(x.dtype)


class MBConv(nnx.Module):
    """Inverted residual: [1x1 expand], kxk depthwise, SE, 1x1 project; residual with drop-path.

    The SE squeeze width is `max(1, in_channels // 4)` of the block input, as in torchvision.
    Stochastic depth ("row" mode: one Bernoulli draw per sample, scaled by 1/(1-p)) applies to
    the branch of residual blocks only.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand_ratio: int,
        kernel: int,
        stride: int,
        drop_path: float,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype,
    ):
        expanded = make_divisible(in_channels * expand_ratio)
        kw = {"rngs": rngs, "dtype": dtype}
        block = []
        if expanded != in_channels:
            block.append(conv_norm_act(in_channels, expanded, 1, **kw))
        block.append(
            conv_norm_act(expanded, expanded, kernel, stride=stride, groups=expanded, **kw)
        )
        block.append(SqueezeExcitation(expanded, max(1, in_channels // 4), **kw))
        block.append(conv_norm_act(expanded, out_channels, 1, activation=False, **kw))
        self.block = layers.Sequential(block)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.stochastic_depth = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.block(x)
        if not self.use_res_connect:
            return out
        return self.stochastic_depth(out) + x


class EfficientNet(nnx.Module):
    """`features` (stem, 7 MBConv stages, 1x1 head conv) -> pooling -> optional classifier.

    The variant is set by `width_mult` and `depth_mult` (channel and layer scaling of `STAGES`)
    and `dropout` (before the classifier).
    """

    def __init__(
        self,
        *,
        width_mult: float,
        depth_mult: float,
        dropout: float,
        rngs: nnx.Rngs,
        include_top: bool = False,
        num_classes: int = 1000,
        pooling_type: str = "avg",
        dtype: Dtype = jnp.float32,
    ):
        layers.check_pooling_type(pooling_type)
        self.dtype = dtype
        self.pooling_type = pooling_type
        settings = stage_settings(width_mult, depth_mult)
        kw = {"rngs": rngs, "dtype": dtype}
        features = [conv_norm_act(3, settings[0][3], 3, stride=2, **kw)]
        total_blocks = sum(row[5] for row in settings)
        block_index = 0
        for expand, kernel, stride, in_channels, out_channels, num_layers in settings:
            stage = []
            for i in range(num_layers):
                drop_path = STOCHASTIC_DEPTH_PROB * block_index / total_blocks
                block_in, block_stride = (in_channels, stride) if i == 0 else (out_channels, 1)
                stage.append(
                    MBConv(block_in, out_channels, expand, kernel, block_stride, drop_path, **kw)
                )
                block_index += 1
            features.append(layers.Sequential(stage))
        # torchvision's 1x1 head conv widens the last stage's output 4x.
        self.num_features = 4 * settings[-1][4]
        features.append(conv_norm_act(settings[-1][4], self.num_features, 1, **kw))
        self.features = layers.Sequential(features)
        classifier = None
        if include_top:
            # torchvision: weight ~ U(±1/sqrt(out_features)), zero bias.
            head = layers.linear(
                self.num_features,
                num_classes,
                kernel_init=layers.torch_bias_init(num_classes),
                bias_init=_ZEROS,
                rngs=rngs,
                dtype=dtype,
            )
            classifier = layers.Sequential([nnx.Dropout(dropout, rngs=rngs), head])
        self.classifier = classifier

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.features(x.astype(self.dtype))
        if self.classifier is None:
            return layers.global_pool(x, self.pooling_type)
        logits = self.classifier(layers.global_pool(x, "avg"))
        return logits.astype(layers.stat_dtype(self.dtype))


def unfreeze_units(model: EfficientNet) -> list[tuple]:
    """The 9 children of torchvision's `.features` (stem, 7 stages, head conv), in order."""
    return [("features", i) for i in range(len(model.features))]
