"""Random weight initialisers, sampled on the host with NumPy from the JAX key's bits.

Why not `jax.random`: eagerly, each distinct parameter shape compiles its own XLA sampler
(threefry + the normal transform), 0.4-0.8 s apiece on a CPU, so a randomly initialised
ResNet-50 took ~13 s to build, almost all compilation, in every process that trains (the demo,
every test run, each host of a multi-process run). NumPy samples the same distributions with no
compilation (ResNet-50: under a second). The values are a deterministic function of the key,
eager or traced: under `jit` the sampler runs as a host callback, and under `eval_shape`
nothing is sampled. Same key, shape and dtype give the same weights on every process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]
Sampler = Callable[[np.random.Generator, tuple[int, ...], np.dtype], np.ndarray]


def _generator(key_bits: np.ndarray) -> np.random.Generator:
    return np.random.default_rng([int(b) for b in np.asarray(key_bits).ravel()])


def _host_sampled(sample: Sampler) -> Initializer:
    """An initializer that draws `sample(generator, shape, dtype)` from the key's bits."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        bits = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key

        def host(b: np.ndarray) -> np.ndarray:
            return np.asarray(sample(_generator(b), shape, dtype), dtype=dtype)

        if isinstance(bits, jax.core.Tracer):
            out = jax.ShapeDtypeStruct(shape, dtype)
            return jax.pure_callback(host, out, bits, vmap_method="sequential")
        return jnp.asarray(host(np.asarray(bits)))

    return init


def _float_dtype(dtype: np.dtype) -> np.dtype:
    """NumPy samples float32 or float64; other float dtypes are drawn in float32 and cast."""
    return dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)


def _normal(g: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, std: float):
    return std * g.standard_normal(shape, dtype=_float_dtype(dtype))


def _uniform(g: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, bound: float):
    return g.uniform(-bound, bound, shape).astype(_float_dtype(dtype))


def normal(std: float) -> Initializer:
    """N(0, std^2)."""
    return _host_sampled(lambda g, s, d: _normal(g, s, d, std))


def uniform(bound: float) -> Initializer:
    """U(-bound, bound)."""
    return _host_sampled(lambda g, s, d: _uniform(g, s, d, bound))


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a Flax kernel: [..., in, out], leading axes the receptive field."""
    if len(shape) < 2:
        raise ValueError(f"a fan needs a kernel of at least 2 dimensions, got shape {shape}")
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
    """Variance `scale / fan` with fan = fan_in, fan_out or their mean (`mode`), from a
    "normal" (untruncated) or "uniform" distribution; torch's kaiming/xavier inits are cases."""
    if mode not in ("fan_in", "fan_out", "fan_avg") or distribution not in ("normal", "uniform"):
        raise ValueError(f"unsupported variance_scaling({mode!r}, {distribution!r})")

    def sample(g: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        fan_in, fan_out = fans(shape)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        variance = scale / max(1.0, fan)
        if distribution == "normal":
            return _normal(g, shape, dtype, math.sqrt(variance))
        return _uniform(g, shape, dtype, math.sqrt(3 * variance))

    return _host_sampled(sample)


def xavier_uniform() -> Initializer:
    """torch's xavier_uniform_: U(+-sqrt(6 / (fan_in + fan_out)))."""
    return variance_scaling(1.0, "fan_avg", "uniform")
