"""What a train-mode backbone keeps for its backward pass, per image and per dtype.

  JAX_PLATFORMS=cpu python scripts/saved_activations.py --out saved.json \
      [--models resnet50 efficientnet_b0 densenet121 vit_b_16] [--size 224] [--dtype bfloat16]

Traces (never runs) `jax.vjp` of the backbone and sums the arrays its backward closure holds, at
two batch sizes; the difference is the per-image part (activations, masks), so parameters and
their bf16 copies drop out. This is what autodiff asks to keep before XLA optimises: XLA may
recompute cheap values instead, so it bounds memory traffic rather than measuring it. Runs on any
backend in seconds; the convolutions are traced as XLA's (`--conv xla`), as on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import jax
import jax.numpy as jnp
from flax import nnx

from dermjax.models import cpu_conv
from dermjax.models.registry import create_backbone

BATCHES = (2, 4)


def saved_bytes(name: str, size: int, dtype: str) -> dict[str, float]:
    """Per-image bytes, by dtype name, of what `jax.vjp` of the train-mode backbone keeps."""
    compute = jnp.dtype(dtype)
    with cpu_conv.conv_algorithm("xla"):
        model = nnx.eval_shape(lambda: create_backbone(name, rngs=nnx.Rngs(0), dtype=compute))
        model.train()
        graph, params, rest = nnx.split(model, nnx.Param, ...)

        def backward_closure(params, rest, x):
            def forward(params, x):
                m = nnx.merge(graph, params, jax.tree.map(lambda v: v, rest))
                return m(x), nnx.state(m, nnx.BatchStat)

            return jax.vjp(forward, params, x, has_aux=True)[1]

        totals = []
        for batch in BATCHES:
            x = jax.ShapeDtypeStruct((batch, size, size, 3), compute)
            per_dtype: dict[str, float] = {}
            for leaf in jax.tree.leaves(jax.eval_shape(backward_closure, params, rest, x)):
                key = str(leaf.dtype)
                per_dtype[key] = per_dtype.get(key, 0) + leaf.size * leaf.dtype.itemsize
            totals.append(per_dtype)
    small, large = totals
    span = BATCHES[1] - BATCHES[0]
    return {k: (large.get(k, 0) - small.get(k, 0)) / span for k in sorted(set(small) | set(large))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0", "vit_b_16"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    rows = []
    print(f"| model | MB saved per image ({args.dtype}, {args.size} px) | of which float32 |")
    print("|---|---|---|")
    for name in args.models:
        per_dtype = saved_bytes(name, args.size, args.dtype)
        total = sum(per_dtype.values())
        rows.append({"model": name, "bytes_per_image": per_dtype, "total": total})
        print(f"| {name} | {total / 1e6:.1f} | {per_dtype.get('float32', 0) / 1e6:.1f} |")
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.node(),
        "jax": jax.__version__,
        "size": args.size,
        "dtype": args.dtype,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
