"""Train-step and end-to-end throughput of dermjax (used by scripts/benchmark.py).

The step measured is the real one (`make_train_step`): on-device augmentation (or none),
normalisation, backbone + the default concat_mlp fusion head, label-smoothed cross-entropy,
AdamW on both groups. bench_torch.py runs PyTorch's same step on the same device.

Timing excludes compilation, blocks on the results, and reports the median of several windows.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dermjax import parallel
from dermjax.data import pipeline
from dermjax.data.augment import AugmentSpec
from dermjax.models import registry
from dermjax.models.classifier import build_model
from dermjax.models.losses import LossSpec
from dermjax.train import optim
from dermjax.train.masking import MaskSpec
from dermjax.train.step import StepSpec, make_train_step, split_model

NUM_CLASSES, TEXT_DIM = 100, 768
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The default config's fusion head, built alike on both sides.
HEAD = {
    "projection_dim": 256,
    "image_projection_hidden": (512,),
    "text_projection_hidden": (512,),
    "projection_dropout": 0.3,
    "final_hidden_sizes": (256, 128),
    "final_dropout": 0.3,
}
LR_BACKBONE, LR_HEAD, WEIGHT_DECAY, LABEL_SMOOTHING = 1e-4, 5e-4, 1e-3, 0.1
# The original's best-run train augmentation (the default config's).
AUGMENT = AugmentSpec(
    horizontal_flip_prob=0.5,
    rotation_degrees=25.0,
    scale=(0.9, 1.1),
    brightness=0.1,
    contrast=0.1,
    saturation=0.1,
    hue=0.01,
)
# Dense bf16 peak FLOP/s by device-kind substring (first match wins; NVL and PCIe variants
# before the SXM name they contain); other cards: MFU unknown.
PEAK_BF16_FLOPS = (
    ("H200 NVL", 835e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H200", 989.4e12),
    ("H100", 989.4e12),
    ("A100", 312e12),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The card's dense peak FLOP/s for `dtype`, when listed (bf16 only)."""
    if dtype != "bfloat16":
        return None
    return next((v for key, v in PEAK_BF16_FLOPS if key in device_kind), None)


def mfu(img_s: float | None, gflop_per_image: float | None, device_kind: str, dtype: str):
    """Model FLOP utilisation of a rate, from the model's FLOPs per image; None when unknown."""
    peak = peak_flops(device_kind, dtype)
    if not (img_s and gflop_per_image and peak):
        return None
    return round(img_s * gflop_per_image * 1e9 / peak, 3)


@dataclasses.dataclass
class Built:
    """A model's train state and steps, ready to run on a device-resident batch."""

    state: Any
    steps: dict[str, Callable]  # "main", "warmup": step(state, batch, key)
    extra: tuple  # (rngs, controls): the trailing arguments of `steps[...].jitted`
    mesh: Any


def build_steps(name: str, size: int, batch: int, dtype: str, *, augment: bool = True) -> Built:
    """`name` with random weights, every backbone layer trainable; `augment`: AUGMENT or none."""
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    model = build_model(
        backbone=name,
        pretrained=False,
        weights_path=None,
        pooling_type="avg",
        img_size=(size, size),
        dtype=compute,
        head=HEAD,
        num_classes=NUM_CLASSES,
        text_dim=TEXT_DIM,
        rngs=nnx.Rngs(0),
    )
    labels = registry.param_labels(model.backbone, name, -1)
    labels = nnx.to_pure_dict(labels) if isinstance(labels, nnx.State) else labels
    parts, params, stats = split_model(model, [], update_frozen_bn_stats=True)
    tx_b = optim.masked_tx(
        optim.make_group_tx("adamw", learning_rate=LR_BACKBONE, weight_decay=WEIGHT_DECAY), labels
    )
    tx_h = optim.make_group_tx("adamw", learning_rate=LR_HEAD, weight_decay=WEIGHT_DECAY)
    state = {
        "params": params,
        "batch_stats": stats,
        "opt_backbone": tx_b.init(params["backbone"]),
        "opt_head": tx_h.init(params["head"]),
        "step": jnp.zeros((), jnp.int32),
    }
    loss = LossSpec.create(
        loss_fn="cross_entropy",
        label_smoothing=LABEL_SMOOTHING,
        class_weights=None,
        use_class_weights_from_data=False,
        alpha=None,
        gamma=None,
        reduction="mean",
        use_auxiliary_loss=False,
        auxiliary_loss_weight=None,
        auxiliary_vision_loss_weight=None,
        auxiliary_text_loss_weight=None,
    )
    spec = StepSpec(
        AUGMENT if augment else AugmentSpec(), MaskSpec(), loss, MEAN, STD, compute_dtype=compute
    )
    mesh = parallel.make_mesh()
    steps = {
        phase: make_train_step(parts, spec, tx_b, tx_h, warmup=phase == "warmup")
        for phase in ("main", "warmup")
    }
    extra = (parts.rngs, spec.default_controls())
    return Built(parallel.replicate(state, mesh), steps, extra, mesh)


def synthetic_batch(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch in the pipeline's layout."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
        "text": rng.standard_normal((batch, TEXT_DIM)).astype(np.float32),
        "has_text": np.ones(batch, bool),
        "valid": np.ones(batch, bool),
        "index": np.arange(batch, dtype=np.int32),
    }


def timed_windows(run_window: Callable[[], None], windows: int) -> list[float]:
    """Seconds of each of `windows` calls of `run_window` (report the median, keep the rest)."""
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        run_window()
        times.append(time.perf_counter() - start)
    return times


def rates(steps: int, batch: int, seconds: list[float]) -> dict[str, Any]:
    """img/s of the median window, and of every window (their spread says how noisy it was)."""
    each = [round(steps * batch / s, 1) for s in seconds]
    return {"img_s": round(steps * batch / statistics.median(seconds), 1), "window_img_s": each}


def _flops(stage: Any) -> float | None:
    try:
        cost = stage.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost["flops"]) if cost and cost.get("flops", 0) > 0 else None
    except Exception:  # optional diagnostics, backend dependent
        return None


def _cost(lowered: Any, compiled: Any) -> dict:
    """XLA's FLOPs (of the lowered program: the model's work, before fusion or library calls
    change the count; else of the compiled step) and memory estimate of a step; None where the
    backend has none."""
    out: dict[str, Any] = {"flops_compiled": _flops(compiled), "flops_lowered": _flops(lowered)}
    out["flops"] = out["flops_lowered"] or out["flops_compiled"]
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        out["xla_step_bytes"] = int(total - m.alias_size_in_bytes)
    except Exception:
        out["xla_step_bytes"] = None
    return out


def step_rate(
    name: str,
    size: int,
    batch: int,
    dtype: str,
    steps: int,
    windows: int,
    phases: tuple[str, ...] = ("main", "warmup"),
    *,
    augment: bool = True,
    profile_dir: str | None = None,
    profile_steps: int = 5,
) -> dict:
    """img/s of the main and/or warm-up (head-only) steps on a device-resident batch, compile
    seconds, XLA's FLOPs per image, MFU where the card's peak is known, peak device memory."""
    built = build_steps(name, size, batch, dtype, augment=augment)
    data = parallel.shard_batch(synthetic_batch(batch, size), built.mesh)
    key = jax.random.key(0)
    device = jax.devices()[0]
    result: dict[str, Any] = {"model": name, "size": size, "batch": batch, "dtype": dtype}
    state, (rngs, controls) = built.state, built.extra
    for label in phases:
        start = time.perf_counter()
        lowered = built.steps[label].jitted.lower(state, rngs, data, key, controls)
        compiled = lowered.compile()
        result[f"{label}_compile_s"] = round(time.perf_counter() - start, 1)
        cost = _cost(lowered, compiled)

        def run(s, n, compiled=compiled):
            for i in range(n):
                s, out = compiled(s, rngs, data, jax.random.fold_in(key, i), controls)
            jax.block_until_ready(out["loss"])
            return s

        holder = {"state": run(state, steps)}  # warm caches / autotuning

        def window(holder=holder, run=run):
            holder["state"] = run(holder["state"], steps)

        measured = rates(steps, batch, timed_windows(window, windows))
        result[f"{label}_img_s"] = rate = measured["img_s"]
        result[f"{label}_window_img_s"] = measured["window_img_s"]
        state = holder["state"]
        if label == "main":
            flops = cost["flops"] / batch if cost["flops"] else None
            result["gflop_per_image"] = None if flops is None else round(flops / 1e9, 2)
            result["flops_step"] = {k: cost[k] for k in ("flops_compiled", "flops_lowered")}
            result["mfu"] = mfu(rate, result["gflop_per_image"], device.device_kind, dtype)
            result["xla_step_bytes"] = cost["xla_step_bytes"]
            if profile_dir:
                trace_dir = os.path.join(profile_dir, f"jax_{name}")
                try:
                    with jax.profiler.trace(trace_dir):
                        state = run(state, profile_steps)
                except Exception as error:  # a failed profile must not cost the figures above
                    result["profile"] = {"error": f"{type(error).__name__}: {error}"[:300]}
                else:
                    summary = xplane_top_ops(trace_dir) or {}
                    result["profile"] = {"trace_dir": trace_dir, **summary}
    stats = device.memory_stats() or {}
    result["peak_bytes"] = stats.get("peak_bytes_in_use")
    result["device"] = str(device.device_kind)
    return result


def xplane_top_ops(trace_dir: str, top: int = 15) -> dict | None:
    """The ops taking the most time in a jax profiler trace, read offline from its .xplane.pb:
    a device plane's "XLA Ops" line, else its stream lines (kernels); on the CPU, the host's
    events less Python frames ($...) and runtime scopes (names with "::" or "(").

    Returns {"ops": per op, "kinds": per kind (the name less its ".N" suffix: all "fusion"s,
    all "convolution"s together)}, each the `top` largest with ms, share and count."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        return None
    try:
        planes = list(jax.profiler.ProfileData.from_file(files[-1]).planes)
    except Exception:  # a summary is optional; the trace stays on disk
        return None
    device = [p for p in planes if p.name.startswith("/device:")]
    lines = [ln for p in device for ln in p.lines if ln.name == "XLA Ops"]
    lines = lines or [ln for p in device for ln in p.lines if ln.name.startswith("Stream")]
    host = not lines
    if host:
        lines = [ln for p in planes if p.name.startswith("/host:") for ln in p.lines]
    ops: list[tuple[str, int]] = []
    for line in lines:
        for event in line.events:
            name = event.name
            if not (host and (name.startswith("$") or "::" in name or "(" in name)):
                ops.append((name, event.duration_ns))
    return {
        "ops": _largest(ops, top),
        "kinds": _largest([(op_kind(name), ns) for name, ns in ops], top),
    }


def op_kind(name: str) -> str:
    """An HLO op's kind: its name less the ".N" that numbers its instances ("fusion.12")."""
    return re.sub(r"\.\d+$", "", name)


def _largest(events: list[tuple[str, int]], top: int) -> list[dict]:
    totals, counts = Counter(), Counter()
    for name, ns in events:
        totals[name] += ns
        counts[name] += 1
    whole = sum(totals.values()) or 1
    return [
        {"op": op, "ms": round(ns / 1e6, 3), "share": round(ns / whole, 3), "count": counts[op]}
        for op, ns in totals.most_common(top)
    ]


def end_to_end_rate(
    name: str,
    records: pipeline.Records,
    size: int,
    batch: int,
    dtype: str,
    workers: int,
    steps: int,
    cache=None,
) -> dict:
    """img/s of loader + main train step together (the loader feeding the device)."""
    built = build_steps(name, size, batch, dtype, augment=True)
    main, mesh, state = built.steps["main"], built.mesh, built.state
    loader = pipeline.train_loader(
        records,
        batch_size=batch,
        img_size=(size, size),
        geometric=True,
        seed=0,
        num_workers=workers,
        prefetch_factor=4,
        cache=cache,
        read_threads=4 if cache is None else 1,
    )
    it = iter(loader)
    key = jax.random.key(0)
    try:
        for _ in range(3):  # compile + fill the buffers
            state, out = main(state, parallel.shard_batch(next(it), mesh), key)
        jax.block_until_ready(out["loss"])
        start = time.perf_counter()
        for i in range(steps):
            state, out = main(
                state, parallel.shard_batch(next(it), mesh), jax.random.fold_in(key, i)
            )
        jax.block_until_ready(out["loss"])
        rate = steps * batch / (time.perf_counter() - start)
    finally:
        it.close()
    return {
        "model": name,
        "batch": batch,
        "dtype": dtype,
        "workers": workers,
        "source": "cache" if cache is not None else "raw",
        "img_s": round(rate, 1),
        "cpus": os.cpu_count(),
    }
