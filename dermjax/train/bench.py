"""Training-step and end-to-end throughput measurements (used by scripts/benchmark.py).

The step measured is the real one (`make_train_step`): device augmentation with the original's
best-run settings, normalisation, backbone + fusion head, loss, AdamW on both groups. Timing
excludes compilation, uses `block_until_ready`, and reports the median of several windows.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from dermjax import parallel
from dermjax.config import load_config
from dermjax.data import pipeline
from dermjax.experiment import init_training, make_model, step_spec
from dermjax.train.step import make_train_step

NUM_CLASSES, TEXT_DIM = 100, 768


def _config(name: str, size: int, batch: int, dtype: str):
    cfg = load_config("default")
    cfg.vision_model.name, cfg.vision_model.pretrained = name, False
    cfg.data.img_size, cfg.training.batch_size, cfg.training.dtype = (size, size), batch, dtype
    return cfg


def build_steps(name: str, size: int, batch: int, dtype: str) -> tuple[Any, Any, Any, Any]:
    """(state, warmup_step, main_step, mesh) for `name` with random weights."""
    cfg = _config(name, size, batch, dtype)
    model = make_model(cfg, num_classes=NUM_CLASSES, text_dim=TEXT_DIM, rngs=nnx.Rngs(0))
    cfg.vision_model.unfreeze_layers = -1
    parts, state, tx_b, tx_h = init_training(cfg, model)
    mesh = parallel.make_mesh()
    state = parallel.replicate(state, mesh)
    spec = step_spec(cfg, np.ones(NUM_CLASSES), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    warm = make_train_step(parts, spec, tx_b, tx_h, warmup=True)
    main = make_train_step(parts, spec, tx_b, tx_h, warmup=False)
    return state, warm, main, mesh


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


def _timed_windows(run_window, windows: int) -> float:
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        run_window()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_rate(
    name: str,
    size: int,
    batch: int,
    dtype: str,
    steps: int,
    windows: int,
    phases: tuple[str, ...] = ("main", "warmup"),
) -> dict:
    """img/s of the main and/or warm-up (head-only) train steps on a device-resident batch."""
    state, warm, main, mesh = build_steps(name, size, batch, dtype)
    data = parallel.shard_batch(synthetic_batch(batch, size), mesh)
    key = jax.random.key(0)
    result: dict[str, Any] = {"model": name, "size": size, "batch": batch, "dtype": dtype}
    for label, fn in (("main", main), ("warmup", warm)):
        if label not in phases:
            continue
        start = time.perf_counter()
        state, out = fn(state, data, key)
        jax.block_until_ready(out["loss"])
        result[f"{label}_compile_s"] = round(time.perf_counter() - start, 1)
        holder = {"state": state}

        def window(fn=fn, holder=holder):
            s = holder["state"]
            for i in range(steps):
                s, out = fn(s, data, jax.random.fold_in(key, i))
            jax.block_until_ready(out["loss"])
            holder["state"] = s

        window()  # warm caches / autotuning
        result[f"{label}_img_s"] = round(steps * batch / _timed_windows(window, windows), 1)
        state = holder["state"]
    result["device"] = str(jax.devices()[0].device_kind)
    return result


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
    state, _, main, mesh = build_steps(name, size, batch, dtype)
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


def torch_step_rate(name: str, size: int, batch: int, steps: int, windows: int) -> dict | None:
    """The PyTorch baseline on the same card: torchvision model, bf16 autocast, channels_last,
    AdamW, eager; None when torch/torchvision/CUDA are unavailable."""
    try:
        import torch
        import torchvision
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    model = torchvision.models.get_model(name, num_classes=NUM_CLASSES).cuda()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), device="cuda")

    def window():
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()

    window()
    rate = steps * batch / _timed_windows(window, windows)
    return {"model": name, "torch": torch.__version__, "bf16_eager_img_s": round(rate, 1)}
