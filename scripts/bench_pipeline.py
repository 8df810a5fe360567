"""`python scripts/benchmark.py pipeline`: the host input pipeline, original-style vs dermjax.

`pipeline` writes photo-sized JPEGs (1024x768, smooth colour fields + texture + sensor noise,
quality 90) to a temp dir and measures, on the same files and machine, images per second of
  (a) the original's path: full PIL decode + its train transforms on the CPU (Resize(1.1 H),
      RandomCrop, hflip, rotation +-25 NEAREST, affine scale 0.9-1.1 NEAREST, ColorJitter
      0.1/0.1/0.1/0.01 in random order, to float, normalize), one process and a process pool;
  (b) the dermjax train loader from the raw files (reduced-size decode, resize, crop);
  (c) the dermjax train loader from the prepared cache;
  (d) the on-device augmentation (`dermjax.data.augment.augment` + normalize) on this machine's
      default jax backend.
Each figure is the median of `--repeats` runs; the headline figures are single-process.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import statistics
import tempfile
import time

import numpy as np
from PIL import Image, ImageEnhance

from dermjax.data import cache, images, pipeline

MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


# ---------------------------------------------------------------------------------------------
# Test images
# ---------------------------------------------------------------------------------------------


def synthetic_photo(rng: np.random.Generator, h: int = 768, w: int = 1024) -> np.ndarray:
    """Smooth colour regions, mid-frequency texture and sensor noise: JPEG-compresses like a photo."""

    def field(rows: int, cols: int, sigma: float) -> np.ndarray:
        small = rng.normal(0, sigma, (rows, cols, 3)).astype(np.float32)
        layers = [
            Image.fromarray(small[..., c], "F").resize((w, h), Image.Resampling.BICUBIC)
            for c in range(3)
        ]
        return np.stack([np.asarray(x) for x in layers], -1)

    pixels = 128 + field(6, 8, 50) + field(48, 64, 18) + rng.normal(0, 4, (h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_photos(directory: str, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = os.path.join(directory, f"photo{i:05d}.jpg")
        Image.fromarray(synthetic_photo(rng)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# (a) The original's per-sample CPU path, with PIL/numpy equivalents of its torchvision ops
# ---------------------------------------------------------------------------------------------


def _adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    hue = (np.asarray(h, np.int16) + np.int16(round(shift * 255))) % 256
    return Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8), "L"), s, v)).convert("RGB")


def original_style_sample(path: str, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """One sample as the original's DataLoader produced it: float32 CHW, normalised."""
    img = Image.open(path).convert("RGB")
    oh, ow = images.resized_size((img.height, img.width), (size, size), images.SHORTER)
    img = img.resize((ow, oh), Image.Resampling.BILINEAR)
    top, left = rng.integers(0, oh - size + 1), rng.integers(0, ow - size + 1)
    img = img.crop((left, top, left + size, top + size))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.rotate(rng.uniform(-25, 25), Image.Resampling.NEAREST, fillcolor=(0, 0, 0))
    scale, c = rng.uniform(0.9, 1.1), size / 2
    matrix = (1 / scale, 0, c - c / scale, 0, 1 / scale, c - c / scale)
    img = img.transform(
        img.size, Image.Transform.AFFINE, matrix, Image.Resampling.NEAREST, fillcolor=(0, 0, 0)
    )
    ops = [
        lambda x: ImageEnhance.Brightness(x).enhance(rng.uniform(0.9, 1.1)),
        lambda x: ImageEnhance.Contrast(x).enhance(rng.uniform(0.9, 1.1)),
        lambda x: ImageEnhance.Color(x).enhance(rng.uniform(0.9, 1.1)),
        lambda x: _adjust_hue(x, rng.uniform(-0.01, 0.01)),
    ]
    for k in rng.permutation(4):
        img = ops[k](img)
    x = np.asarray(img, np.float32) / 255
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def _original_worker(args: tuple[str, int, int]) -> int:
    path, seed, size = args
    original_style_sample(path, np.random.default_rng(seed), size)
    return 1


def _started_pid(_: int) -> int:
    time.sleep(0.05)
    return os.getpid()


def original_style_rate(paths: list[str], size: int, workers: int, count: int) -> float:
    jobs = [(paths[i % len(paths)], i, size) for i in range(count)]
    if workers == 0:
        _original_worker(jobs[0])
        start = time.perf_counter()
        for job in jobs:
            _original_worker(job)
        return count / (time.perf_counter() - start)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        while len(set(pool.map(_started_pid, range(4 * workers), chunksize=1))) < workers:
            pass  # wait until every worker has started and imported, so start-up is not timed
        start = time.perf_counter()
        sum(pool.imap_unordered(_original_worker, jobs, chunksize=2))
        return count / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# (b), (c) dermjax loaders; (d) on-device augmentation
# ---------------------------------------------------------------------------------------------


def loader_rate(
    records, size: int, workers: int, batch: int, count: int, train_cache=None
) -> float:
    prefetch = 2
    loader = pipeline.train_loader(
        records,
        batch_size=batch,
        img_size=(size, size),
        geometric=True,
        seed=0,
        num_workers=workers,
        prefetch_factor=prefetch,
        cache=train_cache,
    )
    it = iter(loader)
    try:
        for _ in range(2 + workers * prefetch):  # start-up, then drain the pre-filled buffers
            next(it)
        steps = max(1, count // batch)
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        return steps * batch / (time.perf_counter() - start)
    finally:
        it.close()


def augment_rate(size: int, batch: int) -> float | None:
    try:
        import jax

        from dermjax.data.augment import augment, normalize
        from dermjax.train.bench import AUGMENT as spec
    except ImportError:
        return None
    x = jax.device_put(
        np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    )
    step = jax.jit(lambda key, im: normalize(augment(key, im, spec), MEAN, STD))
    key = jax.random.key(0)
    step(key, x).block_until_ready()
    reps = 5
    start = time.perf_counter()
    for i in range(reps):
        step(jax.random.fold_in(key, i), x).block_until_ready()
    return reps * batch / (time.perf_counter() - start)


def run_pipeline(args: argparse.Namespace) -> dict:
    size, batch, count = args.size, args.batch_size, args.images
    result: dict = {"per_workers": {"original_style": {}, "raw": {}, "cached": {}}}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = write_photos(tmp, count)
        print(f"wrote {count} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
        sizes = [os.path.getsize(p) for p in paths]
        n = len(paths)
        records = pipeline.Records(paths, np.arange(n) % 4, np.zeros((n, 1)), np.zeros(n, bool))
        t0 = time.perf_counter()
        train_cache = cache.build_cache(
            paths,
            os.path.join(tmp, "cache"),
            img_size=(size, size),
            rule=images.SHORTER,
            num_workers=max(args.workers),
            progress=False,
        )
        result["cache_build_img_s"] = round(n / (time.perf_counter() - t0), 1)
        runs = {
            "original_style": lambda w: original_style_rate(paths, size, w, count),
            "raw": lambda w: loader_rate(records, size, w, batch, count),
            "cached": lambda w: loader_rate(records, size, w, batch, 4 * count, train_cache),
        }
        samples = {(kind, w): [] for kind in runs for w in args.workers}
        for r in range(args.repeats):  # interleaved, so load from other processes hits all alike
            for w in args.workers:
                for kind, run in runs.items():
                    samples[kind, w].append(run(w))
            print(f"repeat {r + 1}/{args.repeats} done", flush=True)
        result["samples"] = {kind: {} for kind in runs}
        for (kind, w), rates in samples.items():
            result["per_workers"][kind][w] = round(statistics.median(rates), 1)
            result["samples"][kind][w] = [round(r, 1) for r in rates]
    augment = augment_rate(size, batch)
    per = result["per_workers"]
    base = per["original_style"][min(args.workers)]
    result.update(
        original_style_img_s=base,
        raw_img_s=per["raw"][min(args.workers)],
        cached_img_s=per["cached"][min(args.workers)],
        augment_img_s=None if augment is None else round(augment, 1),
        ratios_vs_original={
            kind: {w: round(v / per["original_style"][w], 2) for w, v in per[kind].items()}
            for kind in ("raw", "cached")
        },
        images={
            "count": count,
            "hw": [768, 1024],
            "jpeg_quality": 90,
            "mean_kb": round(np.mean(sizes) / 1024, 1),
        },
        settings={
            "size": size,
            "batch_size": batch,
            "repeats": args.repeats,
            "workers": args.workers,
        },
        machine={
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    print_table(result)
    return result


def print_table(result: dict) -> None:
    per = result["per_workers"]
    workers = list(per["original_style"])
    print(f"\n{'img/s':<26}" + "".join(f"{f'workers={w}':>12}" for w in workers))
    names = {
        "original_style": "(a) original-style CPU",
        "raw": "(b) dermjax raw files",
        "cached": "(c) dermjax cache",
    }
    for kind, name in names.items():
        print(f"{name:<26}" + "".join(f"{per[kind][w]:>12}" for w in workers))
    for kind in ("raw", "cached"):
        row = result["ratios_vs_original"][kind]
        print(f"{f'{kind} / original':<26}" + "".join(f"{f'{row[w]}x':>12}" for w in workers))
    print(
        f"(d) device augmentation: {result['augment_img_s']} img/s; cache build: {result['cache_build_img_s']} img/s"
    )
    machine = result["machine"]
    print(
        f"{machine['cpu_count']} CPUs, load {machine['loadavg_before']} -> {machine['loadavg_after']}"
    )
