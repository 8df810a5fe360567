"""Per-convolution forward and forward+backward time: XLA's convolution vs dermjax's CPU plan.

  JAX_PLATFORMS=cpu python scripts/benchmark_conv.py --out conv.json [--batch 32]

Shapes are ones the backbones run (ResNet-50 and EfficientNet-B0 at 64 and 224 px); for each it
prints what `cpu_conv`'s auto rule picks and the milliseconds of XLA's convolution and of the
reformulation (matmul, or per-tap sums for depthwise), forward alone and forward + both gradients.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dermjax.models import cpu_conv

NHWC = ("NHWC", "HWIO", "NHWC")
# (where, input size, in channels, out channels, kernel, stride, groups)
SHAPES = [
    ("resnet50@64 stem", 64, 3, 64, 7, 2, 1),
    ("resnet50@64 layer1 3x3", 16, 64, 64, 3, 1, 1),
    ("resnet50@64 layer1 1x1", 16, 64, 256, 1, 1, 1),
    ("resnet50@64 layer3 3x3", 4, 256, 256, 3, 1, 1),
    ("resnet50@64 layer4.0 3x3/2", 4, 512, 512, 3, 2, 1),
    ("resnet50@64 layer4 3x3", 2, 512, 512, 3, 1, 1),
    ("resnet50@64 layer4 1x1", 2, 512, 2048, 1, 1, 1),
    ("resnet50@224 layer1 3x3", 56, 64, 64, 3, 1, 1),
    ("resnet50@224 layer3 1x1", 14, 1024, 256, 1, 1, 1),
    ("resnet50@224 layer4 3x3", 7, 512, 512, 3, 1, 1),
    ("effnet_b0@64 dw 3x3", 32, 32, 32, 3, 1, 32),
    ("effnet_b0@64 dw 5x5/2", 16, 144, 144, 5, 2, 144),
    ("effnet_b0@64 dw 3x3 last", 2, 1152, 1152, 3, 1, 1152),
    ("effnet_b0@224 dw 3x3/2", 112, 96, 96, 3, 2, 96),
    ("vit_b_16@224 patchify", 224, 3, 768, 16, 16, 1),
]


def _ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats * 1e3


def measure(shape: tuple, batch: int, repeats: int) -> dict:
    """Times of one convolution shape under XLA and under the reformulation."""
    where, size, cin, cout, k, stride, groups = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)) * 0.05, jnp.float32)
    pad = 0 if stride == k else k // 2
    args = ((stride, stride), ((pad, pad), (pad, pad)))

    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    row = {"where": where, "auto": cpu_conv.plan(x, w, *args, None, None, dn, groups, None)}
    for name in ("xla", "matmul"):
        # The algorithm is read while tracing: fresh functions, so jit's cache cannot mix them.
        def conv(x, w):
            return cpu_conv.conv_general_dilated(
                x, w, *args, dimension_numbers=NHWC, feature_group_count=groups
            )

        def train(x, w, conv=conv):
            y, vjp = jax.vjp(conv, x, w)
            return vjp(y)

        with cpu_conv.conv_algorithm(name):
            row[f"{name}_fwd_ms"] = _ms(jax.jit(conv), x, w, repeats=repeats)
            row[f"{name}_train_ms"] = _ms(jax.jit(train), x, w, repeats=repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    rows = []
    print(f"{'convolution':30s} {'auto':>9s} {'xla fwd':>9s} {'new fwd':>9s} {'xla f+b':>9s} "
          f"{'new f+b':>9s}  (ms, batch {args.batch}, {jax.devices()[0].device_kind})")  # fmt: skip
    for shape in SHAPES:
        r = measure(shape, args.batch, args.repeats)
        rows.append(r)
        print(f"{r['where']:30s} {r['auto'] or 'xla':>9s} {r['xla_fwd_ms']:9.1f} "
              f"{r['matmul_fwd_ms']:9.1f} {r['xla_train_ms']:9.1f} {r['matmul_train_ms']:9.1f}",
              flush=True)  # fmt: skip
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "batch": args.batch,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
