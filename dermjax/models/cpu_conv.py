"""Convolutions reformulated where XLA:CPU's own kernels are slow; every other backend uses XLA's.

XLA:CPU runs a convolution fast when Eigen's spatial convolution applies. Three cases the
backbones hit fall to a generic loop instead, 10-80x slower (docs/performance.md, "CPU
convolutions"): depthwise convolutions (EfficientNet), kernels larger than the output (3x3 on the
2x2 maps of ResNet's last stage at 64 px), and the input gradient of such strided convolutions.
1x1 convolutions and ViT's patch embedding are plain matmuls and faster as such. On CPU those cases
are written as strided slices feeding one matmul (im2col) or, for depthwise, a sum of per-tap
products; JAX differentiates both into slices, pads and matmuls, which XLA:CPU runs well.
The results equal `lax.conv_general_dilated` up to summation order (tests/models/test_cpu_conv.py).

Every matmul here, and `dot_general` for dense layers on 3-D inputs (ViT's tokens), runs on rows
flattened to 2-D: autodiff then gives the weight gradient as a matmul contracting the rows, which
XLA:CPU runs in place, where contracting (N, H, W) or (B, T) makes it copy both operands
transposed first (ResNet-50's CPU step +10% at 224 px, +23% at 64 px; docs/performance.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

ALGORITHMS = ("auto", "xla", "matmul")
_NHWC = ("NHWC", "HWIO", "NHWC")
_algorithm = "auto"


@contextlib.contextmanager
def conv_algorithm(name: str) -> Iterator[None]:
    """Forces an algorithm while tracing: "xla" (XLA's convolution everywhere), "matmul" (the
    reformulation wherever it applies, on any backend) or "auto" (the CPU rules above)."""
    global _algorithm
    if name not in ALGORITHMS:
        raise ValueError(f"conv algorithm {name!r}: expected one of {ALGORITHMS}")
    previous, _algorithm = _algorithm, name
    try:
        yield
    finally:
        _algorithm = previous


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated` with the same signature (as `nnx.Conv` calls it)."""
    kind = plan(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, out_sharding,
    )  # fmt: skip
    if kind is None:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision, preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )  # fmt: skip
    if kind == "depthwise":
        return _depthwise(lhs, rhs, tuple(window_strides), padding, preferred_element_type)
    return _im2col(lhs, rhs, tuple(window_strides), padding, precision, preferred_element_type)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """`lax.dot_general` (as `nnx.Linear` calls it); a (..., K) x (K, F) product runs on the
    leading axes flattened where the algorithm is "matmul", or "auto" on CPU."""
    flat = (
        (_algorithm == "matmul" or (_algorithm == "auto" and jax.default_backend() == "cpu"))
        and out_sharding is None
        and lhs.ndim > 2
        and rhs.ndim == 2
        and tuple(map(tuple, dimension_numbers[0])) == ((lhs.ndim - 1,), (0,))
        and not any(dimension_numbers[1])
    )
    if not flat:
        return lax.dot_general(
            lhs, rhs, dimension_numbers, precision=precision,
            preferred_element_type=preferred_element_type, out_sharding=out_sharding,
        )  # fmt: skip
    out = lax.dot_general(
        lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=preferred_element_type,
    )  # fmt: skip
    return out.reshape(*lhs.shape[:-1], rhs.shape[-1])


def plan(
    lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups, out_sharding
) -> str | None:
    """What `conv_general_dilated` runs for these arguments under the current algorithm:
    "matmul", "depthwise" or None (XLA's convolution)."""
    if _algorithm == "xla" or (_algorithm == "auto" and jax.default_backend() != "cpu"):
        return None
    supported = (
        lhs.ndim == 4
        and out_sharding is None
        and not isinstance(padding, str)
        and all(d == 1 for d in (*(lhs_dilation or (1, 1)), *(rhs_dilation or (1, 1))))
        and _is_nhwc(dimension_numbers, lhs.shape, rhs.shape)
    )
    if not supported:
        return None
    kh, kw, cin_per_group, cout = rhs.shape
    if groups == lhs.shape[-1] and cin_per_group == 1 and cout == groups:
        return "depthwise"
    if groups != 1:
        return None
    if _algorithm == "matmul":
        return "matmul"
    ho, wo = _out_size(lhs.shape, rhs.shape, strides, padding)
    pointwise = kh == kw == 1
    patchify = tuple(strides) == (kh, kw) and all(p == (0, 0) for p in padding)
    return "matmul" if pointwise or patchify or ho < kh or wo < kw else None


def _is_nhwc(dimension_numbers, lhs_shape, rhs_shape) -> bool:
    if dimension_numbers is None:
        return False
    want = lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC)
    return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) == want


def _out_size(lhs_shape, rhs_shape, strides, padding) -> tuple[int, int]:
    return tuple(
        (lhs_shape[1 + a] + sum(padding[a]) - rhs_shape[a]) // strides[a] + 1 for a in range(2)
    )


def _taps(lhs, rhs_shape, strides, padding) -> Iterator[tuple[int, int, jax.Array]]:
    """(i, j, the input window that kernel tap (i, j) sees at every output position)."""
    x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    (ho, wo), (sh, sw) = _out_size(lhs.shape, rhs_shape, strides, padding), strides
    n, _, _, c = x.shape
    for i in range(rhs_shape[0]):
        for j in range(rhs_shape[1]):
            end = (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c)
            yield i, j, lax.slice(x, (0, i, j, 0), end, (1, sh, sw, 1))


def _patches(lhs, rhs_shape, strides, padding) -> jax.Array:
    """(N, Ho, Wo, kh*kw*C) patches in HWIO's (i, j, c) order."""
    kh, kw = rhs_shape[:2]
    if tuple(strides) == (kh, kw) and all(p == (0, 0) for p in padding):
        n, h, w, c = lhs.shape
        ho, wo = h // kh, w // kw
        x = lhs[:, : ho * kh, : wo * kw].reshape(n, ho, kh, wo, kw, c)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, ho, wo, kh * kw * c)
    windows = [window for _, _, window in _taps(lhs, rhs_shape, strides, padding)]
    return windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)


def _im2col(lhs, rhs, strides, padding, precision, preferred_element_type) -> jax.Array:
    """One matmul over (N*Ho*Wo, kh*kw*C) rows (2-D on purpose: module docstring)."""
    patches = _patches(lhs, rhs.shape, strides, padding)
    n, ho, wo, k = patches.shape
    out = jnp.matmul(
        patches.reshape(n * ho * wo, k), rhs.reshape(k, rhs.shape[-1]), precision=precision,
        preferred_element_type=preferred_element_type,
    )  # fmt: skip
    return out.reshape(n, ho, wo, -1)


def _depthwise(lhs, rhs, strides, padding, preferred_element_type) -> jax.Array:
    """Sum over kernel taps of window * weight, accumulated in at least float32."""
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    total = None
    for i, j, window in _taps(lhs, rhs.shape, strides, padding):
        term = window.astype(acc_dtype) * rhs[i, j, 0].astype(acc_dtype)
        total = term if total is None else total + term
    return total.astype(out_dtype)
