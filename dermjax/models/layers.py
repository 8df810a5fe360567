"""Small building blocks shared by the torchvision-exact backbones.

Dtype convention (all families): `dtype` is the compute dtype of convolutions and matmuls and
of the activations between layers (in bfloat16 mode a BatchNorm output is bfloat16, as under
torch autocast, so the backward pass saves and reads half the bytes). Parameters are float32
(float64 when `dtype` is float64, for parity tests), BatchNorm normalises and keeps its
statistics in at least float32, and features/logits leave the model in at least float32
(`stat_dtype`). Padding is always explicit and symmetric, as in torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dermjax.models import cpu_conv, initializers, normalize

Dtype = Any
Initializer = Callable[..., jax.Array]

POOLING_TYPES = ("avg", "max", "concat")

# torch's default Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in)).
torch_default_init = initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# torch kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated (ResNet, VGG, EffNet).
kaiming_normal_fan_out = initializers.variance_scaling(2.0, "fan_out", "normal")
# torch kaiming_normal_() defaults: fan_in, relu gain (DenseNet).
kaiming_normal_fan_in = initializers.variance_scaling(2.0, "fan_in", "normal")


def torch_bias_init(fan_in: int) -> Initializer:
    """torch's default bias init for Conv2d/Linear: U(±1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return initializers.uniform(bound)


def param_dtype(dtype: Dtype) -> Dtype:
    """Storage dtype for parameters: float64 for float64 models, float32 otherwise."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def stat_dtype(dtype: Dtype) -> Dtype:
    """Dtype for normalisation statistics, pooled features and logits: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    bias: bool = False,
    kernel_init: Initializer = torch_default_init,
    bias_init: Initializer | None = None,
    rngs: nnx.Rngs,
    dtype: Dtype = jnp.float32,
) -> nnx.Conv:
    """torch.nn.Conv2d equivalent (square kernel, symmetric explicit padding) in NHWC; on CPU the
    slow cases of XLA's convolution are reformulated (`cpu_conv`)."""
    fan_in = in_features // groups * kernel_size * kernel_size
    return nnx.Conv(
        in_features,
        out_features,
        (kernel_size, kernel_size),
        strides=stride,
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=kernel_init,
        bias_init=bias_init or torch_bias_init(fan_in),
        dtype=dtype,
        param_dtype=param_dtype(dtype),
        conv_general_dilated=cpu_conv.conv_general_dilated,
        rngs=rngs,
    )


def linear(
    in_features: int,
    out_features: int,
    *,
    kernel_init: Initializer = torch_default_init,
    bias_init: Initializer | None = None,
    rngs: nnx.Rngs,
    dtype: Dtype = jnp.float32,
) -> nnx.Linear:
    """torch.nn.Linear equivalent (kernel stored transposed, (in, out)); on CPU, inputs with more
    than two axes multiply as 2-D rows (`cpu_conv.dot_general`)."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=kernel_init,
        bias_init=bias_init or torch_bias_init(in_features),
        dtype=dtype,
        param_dtype=param_dtype(dtype),
        dot_general=cpu_conv.dot_general,
        rngs=rngs,
    )


class BatchNorm(nnx.BatchNorm):
    """torch.nn.BatchNorm1d/2d over the last (feature) axis, running statistics included.

    Train mode normalises with the biased batch variance, as torch does, but the running
    variance is updated with the unbiased one (n/(n-1), n values per feature), so running
    statistics after training equal a PyTorch run's; `nnx.BatchNorm` stores the biased one.
    `momentum` is Flax's (torch's 0.1 is 0.9). Statistics are reduced over the global batch: under
    `jit` with a sharded batch XLA inserts the cross-device sums and n is the global count. With
    n = 1 (where torch raises) the running variance takes the biased value 0. Normalisation runs
    in at least float32 and the result is cast to `dtype`; running statistics are float32
    (float64 when `param_dtype` is float64). Train mode goes through `normalize.normalize`, whose
    backward pass keeps only the input (see that module).
    """

    def __init__(
        self,
        num_features: int,
        *,
        rngs: nnx.Rngs,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        super().__init__(
            num_features,
            momentum=momentum,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_fast_variance=False,
            rngs=rngs,
        )
        stats = stat_dtype(param_dtype)
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), stats))
        self.var = nnx.BatchStat(jnp.ones((num_features,), stats))

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        if use_running_average is None:
            use_running_average = self.use_running_average
        scale, bias = self.scale[...], self.bias[...]
        if use_running_average:
            compute = stat_dtype(jnp.promote_types(x.dtype, self.dtype))
            mul = jax.lax.rsqrt(self.var[...].astype(compute) + self.epsilon)
            mul = mul * scale.astype(compute)
            y = (x.astype(compute) - self.mean[...].astype(compute)) * mul
            return (y + bias.astype(compute)).astype(self.dtype)
        axes = tuple(range(x.ndim - 1))
        y, mean, var = normalize.normalize(x, scale, bias, axes, self.epsilon, self.dtype)
        self._update_running(mean.reshape(-1), var.reshape(-1), math.prod(x.shape[:-1]))
        return y

    def _update_running(self, mean: jax.Array, var: jax.Array, count: int) -> None:
        """Running averages of the batch mean and the unbiased batch variance (not trained)."""
        unbiased = var * (count / (count - 1)) if count > 1 else var
        keep = self.momentum
        new_mean = keep * self.mean[...] + (1 - keep) * mean
        new_var = keep * self.var[...] + (1 - keep) * unbiased
        self.mean[...] = jax.lax.stop_gradient(new_mean).astype(self.mean.dtype)
        self.var[...] = jax.lax.stop_gradient(new_var).astype(self.var.dtype)


def batch_norm(
    num_features: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32, epsilon: float = 1e-5
) -> BatchNorm:
    """torch.nn.BatchNorm2d(eps, momentum=0.1) for a backbone of compute dtype `dtype`.

    Normalisation and the running statistics use at least float32; the output is `dtype`.
    """
    return BatchNorm(
        num_features,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype(dtype),
        rngs=rngs,
    )


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
    """torch MaxPool2d (floor mode, padding with -inf) on NHWC."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    # A Python scalar init keeps reduce_window on its differentiable max-monoid path.
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1), pad
    )


def avg_pool(x: jax.Array, kernel: int, stride: int) -> jax.Array:
    """torch AvgPool2d without padding (floor mode) on NHWC."""
    window = (1, kernel, kernel, 1)
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1, stride, stride, 1), "VALID")
    return summed / (kernel * kernel)


def _adaptive_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Row i averages input positions [floor(i*in/out), ceil((i+1)*in/out)), as torch does."""
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """torch AdaptiveAvgPool2d on NHWC for any input size (overlapping bins included)."""
    height, width = x.shape[1], x.shape[2]
    if (height, width) == tuple(output_size):
        return x
    rows = jnp.asarray(_adaptive_matrix(height, output_size[0]), x.dtype)
    cols = jnp.asarray(_adaptive_matrix(width, output_size[1]), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", rows, cols, x)


def global_pool(x: jax.Array, pooling_type: str) -> jax.Array:
    """Global pooling of NHWC features to (B, C), or (B, 2C) for `concat` (avg first, then max).

    Computed in at least float32, as the original's AdaptiveAvg/MaxPool2d(1) heads.
    """
    x = x.astype(stat_dtype(x.dtype))
    if pooling_type == "avg":
        return jnp.mean(x, axis=(1, 2))
    if pooling_type == "max":
        return jnp.max(x, axis=(1, 2))
    if pooling_type == "concat":
        return jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], axis=-1)
    raise ValueError(f"pooling_type={pooling_type!r}; expected one of {POOLING_TYPES}")


def check_pooling_type(pooling_type: str) -> None:
    """Fails at construction, not at the first forward, on an unknown pooling type."""
    if pooling_type not in POOLING_TYPES:
        raise ValueError(f"pooling_type={pooling_type!r}; expected one of {POOLING_TYPES}")


class Sequential(nnx.List):
    """torch.nn.Sequential: an `nnx.List` whose items are applied in order (paths `name.i`)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self:
            x = layer(x)
        return x


class ReLU(nnx.Module):
    """Parameter-less torch.nn.ReLU, so it can hold its index in an `nnx.List`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class MaxPool2d(nnx.Module):
    """Parameter-less torch.nn.MaxPool2d, so it can hold its index in an `nnx.List`."""

    def __init__(self, kernel: int, stride: int, padding: int = 0):
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool(x, self.kernel, self.stride, self.padding)
