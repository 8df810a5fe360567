"""dermjax benchmarks: print a table and write JSON. One subcommand per measured stage.

  python scripts/benchmark.py pipeline --images 256 --workers 0 1 2 --out bench_pipeline.json

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

  python scripts/benchmark.py step --models resnet50 --augment --torch --out step.json

`step` times the jitted train step per backbone on a device-resident batch (img/s, compile
seconds, XLA's FLOPs, MFU, peak memory, `--profile DIR` for jax and torch traces); `--torch` adds
PyTorch's same step, eager and torch.compile, in the same process (dermjax/train/bench_torch.py).

  python scripts/benchmark.py e2e --model resnet50 --images 2048 --workers 16 --out e2e.json

`e2e` feeds that step from the grain loader, from the prepared cache and from raw JPEGs, and
reports each as a fraction of the step alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
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


STEP_WORK = {
    False: "no augmentation on either side: synthetic uint8 batches, converted and normalised "
    "inside the step on both sides",
    True: "augmentation on both sides, on the device, parameters per sample: dermjax's "
    "(flip, rotation, scale, colour jitter in random order) vs torch's same family (flip, "
    "rotation, scale as one nearest resampling, then brightness, contrast, saturation, hue)",
}


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def _cell(entry: dict | None, key: str) -> str:
    if not entry:
        return "-"
    if "error" in entry:
        return "failed*"
    value = entry.get(key)
    return "-" if value is None else str(value)


def _ratio(a: float | None, entry: dict | None) -> float | None:
    b = (entry or {}).get("img_s")
    return round(a / b, 2) if a and b else None


def _versions() -> dict:
    from importlib import metadata

    names = ("jax", "jaxlib", "flax", "optax", "torch", "torchvision")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_step(args: argparse.Namespace) -> dict:
    """dermjax's train step, and with --torch PyTorch's same step, eager and torch.compile, in this
    process on this device (torch runs first and frees its cache before jax starts)."""
    import jax

    from dermjax.models import cpu_conv
    from dermjax.train import bench, bench_torch

    rows: list[dict] = []
    result = {
        "argv": sys.argv,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": _versions(),
        "settings": {
            "batch": args.batch_size, "size": args.size, "dtype": args.dtype, "steps": args.steps,
            "windows": args.windows, "augment": args.augment, "compile_mode": args.compile_mode,
            "compile_backend": args.compile_backend, "conv": args.conv,
        },
        "work": STEP_WORK[args.augment],
        "rows": rows,
    }  # fmt: skip
    for name in args.models:
        row: dict = {"model": name}
        rows.append(row)
        if args.torch:
            t = bench_torch.torch_step_rates(
                name, args.size, args.batch_size, args.dtype, args.steps, args.windows,
                augment=args.augment, compile_mode=args.compile_mode,
                compile_backend=args.compile_backend, profile_dir=args.profile,
                profile_steps=args.profile_steps,
            )  # fmt: skip
            if t is not None:
                row["torch_eager"], row["torch_compile"] = t.pop("eager"), t.pop("compile")
                row["torch"] = t
            _write_json(args.out, {"command": args.command, **result})  # kept if jax is cut off
        with cpu_conv.conv_algorithm(args.conv):
            row["dermjax"] = d = bench.step_rate(
                name, args.size, args.batch_size, args.dtype, args.steps, args.windows,
                tuple(args.phases), augment=args.augment, profile_dir=args.profile,
                profile_steps=args.profile_steps,
            )  # fmt: skip
        row["ratio_to_torch_eager"] = _ratio(d.get("main_img_s"), row.get("torch_eager"))
        row["ratio_to_torch_compile"] = _ratio(d.get("main_img_s"), row.get("torch_compile"))
        print(json.dumps(row), flush=True)
        _write_json(args.out, {"command": args.command, **result})
    print_step_table(result)
    return result


def print_step_table(result: dict) -> None:
    s = result["settings"]
    print(
        f"\n{result['device']}, batch {s['batch']}, {s['size']} px, {s['dtype']}, median of "
        f"{s['windows']} windows of {s['steps']} steps; torch.compile backend {s['compile_backend']!r}, "
        f"mode {s['compile_mode']!r}"
        f"\nwork: {result['work']}"
    )
    head = ("model", "dermjax", "torch eager", "torch.compile", "x eager", "x compile",
            "dermjax compile s", "torch.compile s", "peak GiB dermjax/eager/compile",
            "GFLOP/img", "MFU")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    notes = []
    for r in result["rows"]:
        # A row cut off by the time box (gpu_session.sh) has torch's figures only.
        d, e, c = r.get("dermjax") or {}, r.get("torch_eager"), r.get("torch_compile")
        if c and "error" in c:
            notes.append(f"* {r['model']} torch.compile: {c['error']}")
        peaks = "/".join(_gib((x or {}).get("peak_bytes")) for x in (d, e, c))
        mfu = "-" if d.get("mfu") is None else f"{d['mfu']:.0%}"
        cells = (r["model"], d.get("main_img_s", "-"), _cell(e, "img_s"), _cell(c, "img_s"),
                 r.get("ratio_to_torch_eager") or "-", r.get("ratio_to_torch_compile") or "-",
                 d.get("main_compile_s", "-"), _cell(c, "compile_s"), peaks,
                 d.get("gflop_per_image") or "-", mfu)  # fmt: skip
        print("| " + " | ".join(str(x) for x in cells) + " |")
    print("\n".join(notes))


def run_e2e(args: argparse.Namespace) -> dict:
    from dermjax.train import bench

    with tempfile.TemporaryDirectory() as tmp:
        unique = write_photos(tmp, min(args.images, 256))
        paths = unique + [f"{tmp}/copy{i:05d}.jpg" for i in range(args.images - len(unique))]
        for i, path in enumerate(paths[len(unique) :]):
            os.link(unique[i % len(unique)], path)  # same decode cost, distinct paths
        n = len(paths)
        records = pipeline.Records(
            paths=paths,
            labels=np.arange(n, dtype=np.int32) % bench.NUM_CLASSES,
            text=np.zeros((n, bench.TEXT_DIM), np.float32),
            has_text=np.zeros(n, bool),
        )
        size = (args.size, args.size)
        start = time.perf_counter()
        cache.build_cache(
            paths, f"{tmp}/cache", img_size=size, rule=images.SHORTER, num_workers=args.workers
        )
        build_s = time.perf_counter() - start
        train_cache = cache.open_cache(f"{tmp}/cache", paths, size, images.SHORTER)
        rows = [
            bench.end_to_end_rate(
                args.model, records, args.size, args.batch_size, args.dtype, args.workers,
                args.steps, cache=c,
            )
            for c in (train_cache, None)
        ]  # fmt: skip
    step = bench.step_rate(
        args.model, args.size, args.batch_size, args.dtype, args.steps, 3, ("main",)
    )
    print(f"\n{args.model} {args.dtype} batch {args.batch_size}, {args.workers} workers")
    print(f"step only (device-resident batch): {step['main_img_s']} img/s")
    for r in rows:
        print(f"end to end from {r['source']}: {r['img_s']} img/s")
    print(f"cache build: {args.images / build_s:.0f} img/s")
    return {"rows": rows, "step": step, "cache_build_img_s": round(args.images / build_s, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="host input pipeline img/s: original-style vs dermjax")
    p.add_argument("--images", type=int, default=256, help="number of 1024x768 JPEGs to generate")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.set_defaults(run=run_pipeline)
    p = sub.add_parser("step", help="jitted train-step img/s per backbone (+ torch baselines)")
    p.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0", "vit_b_16"])
    p.add_argument("--size", "--img", dest="size", type=int, default=224)
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3, help="timed windows (median reported)")
    p.add_argument("--torch", action="store_true", help="also PyTorch's step: eager, compiled")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (inductor)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--augment", action="store_true", help="on-device augmentation, both sides")
    p.add_argument("--phases", nargs="+", default=["main"], choices=["main", "warmup"])
    p.add_argument("--profile", metavar="DIR", help="write jax/torch profiles of a few steps")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument(
        "--conv", default="auto", choices=["auto", "xla", "matmul"],
        help="dermjax's convolutions: auto (reformulated on CPU where XLA:CPU is slow), xla, matmul",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="JSON file to write")
    p.set_defaults(run=run_step)
    p = sub.add_parser("e2e", help="loader + train step img/s, from the cache and from raw JPEGs")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.set_defaults(run=run_e2e)
    args = parser.parse_args(argv)
    # jax and torch share the card in `step --torch`: jax must not pre-allocate 75% of it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    result = {"command": args.command, **args.run(args)}
    _write_json(args.out, result)
    return result


def _write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's mp_prefetch reads absl flags (google/grain#1355)
    main()
