"""dermjax benchmarks: print a table and write JSON. One subcommand per measured stage.

  python scripts/benchmark.py pipeline --images 256 --workers 0 1 2 --out bench_pipeline.json

`pipeline` compares the host input paths (scripts/bench_pipeline.py).

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
import os
import platform
import sys
import tempfile
import time

import numpy as np
from bench_pipeline import run_pipeline, write_photos

from dermjax.data import cache, images, pipeline
from dermjax.errors import first_line

STEP_WORK = {
    False: "no augmentation on either side: synthetic uint8 batches, converted and normalised "
    "inside the step on both sides",
    True: "augmentation on both sides, on the device, parameters per sample: dermjax's "
    "(flip, rotation, scale, colour jitter in random order) vs torch's same family (flip, "
    "rotation, scale as one nearest resampling, then brightness, contrast, saturation, hue)",
}
# What differs between the two steps beyond STEP_WORK (both: the batch already on the device,
# the same backbone + fusion head, label-smoothed cross-entropy, AdamW on two groups).
STEP_DIFFERENCES = (
    "dermjax also checks the update for non-finite values and selects the old state on one, "
    "masks modalities and counts a confusion matrix; torch.compile compiles forward + backward, "
    "its optimizer step runs eagerly (fused AdamW on CUDA), no CUDA graphs"
)


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
    process on this device, in the order `--first` names. The JSON is rewritten after each side,
    so a time box that cuts the second side off keeps the first side's figures."""
    import jax

    from dermjax.models import cpu_conv
    from dermjax.train import bench, bench_torch

    rows: list[dict] = []
    device = jax.devices()[0].device_kind
    result = {
        "argv": sys.argv,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "devices": jax.device_count(),  # dermjax's step is split over all of them
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "versions": _versions(),
        "settings": {
            "batch": args.batch_size, "size": args.size, "dtype": args.dtype, "steps": args.steps,
            "windows": args.windows, "augment": args.augment, "compile_mode": args.compile_mode,
            "compile_backend": args.compile_backend, "conv": args.conv, "first": args.first,
        },
        "work": STEP_WORK[args.augment],
        "differences": STEP_DIFFERENCES,
        "rows": rows,
    }  # fmt: skip

    def keep_torch(row: dict, t: dict) -> None:
        t = dict(t)
        row["torch_eager"], row["torch_compile"] = t.pop("eager", None), t.pop("compile", None)
        row["torch"] = t
        _write_json(args.out, {"command": args.command, **result})  # eager outlives the compile

    def measure_torch(row: dict) -> None:
        try:
            t = bench_torch.torch_step_rates(
                row["model"], args.size, args.batch_size, args.dtype, args.steps, args.windows,
                augment=args.augment, compile_mode=args.compile_mode,
                compile_backend=args.compile_backend, profile_dir=args.profile,
                profile_steps=args.profile_steps, report=lambda t: keep_torch(row, t),
            )  # fmt: skip
        except Exception as error:  # e.g. out of memory next to jax's pool: reported, not fatal
            row["torch_error"] = first_line(error)
            return
        keep_torch(row, t)

    def measure_dermjax(row: dict) -> None:
        with cpu_conv.conv_algorithm(args.conv):
            row["dermjax"] = bench.step_rate(
                row["model"], args.size, args.batch_size, args.dtype, args.steps, args.windows,
                tuple(args.phases), augment=args.augment, profile_dir=args.profile,
                profile_steps=args.profile_steps,
            )  # fmt: skip

    sides = [measure_dermjax]
    if args.torch:
        sides.insert(0 if args.first == "torch" else 1, measure_torch)
    for name in args.models:
        row: dict = {"model": name}
        rows.append(row)
        for measure in sides:
            measure(row)
            _write_json(args.out, {"command": args.command, **result})
        d = row["dermjax"]
        row["ratio_to_torch_eager"] = _ratio(d.get("main_img_s"), row.get("torch_eager"))
        row["ratio_to_torch_compile"] = _ratio(d.get("main_img_s"), row.get("torch_compile"))
        for side in ("torch_eager", "torch_compile"):  # the same model work: the same FLOPs
            if row.get(side) and "img_s" in row[side]:
                gflop = d.get("gflop_per_image")
                row[side]["mfu"] = bench.mfu(row[side]["img_s"], gflop, device, args.dtype)
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
        f"\ndifferences: {result.get('differences', '-')}"
    )
    if s["windows"] < 3 or result.get("devices", 1) > 1:
        print(
            f"note: {s['windows']} window(s), {result.get('devices', 1)} device(s) for dermjax, "
            "one for torch: read the rates with care (spread in the JSON's window_img_s)"
        )
    head = ("model", "dermjax", "torch eager", "torch.compile", "x eager", "x compile",
            "dermjax compile s", "torch.compile s", "peak GiB dermjax/eager/compile",
            "GFLOP/img", "MFU dermjax/eager/compile")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    notes = []
    for r in result["rows"]:
        # A row cut off by the time box (gpu_session.sh) has torch's figures only.
        d, e, c = r.get("dermjax") or {}, r.get("torch_eager"), r.get("torch_compile")
        if "torch_error" in r:
            notes.append(f"* {r['model']} torch: {r['torch_error']}")
        if c and "error" in c:
            notes.append(f"* {r['model']} torch.compile: {c['error']}")
        peaks = "/".join(_gib((x or {}).get("peak_bytes")) for x in (d, e, c))
        mfu = "/".join(
            "-" if (x or {}).get("mfu") is None else f"{x['mfu']:.0%}" for x in (d, e, c)
        )
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
    p.add_argument(
        "--first", default="torch", choices=["torch", "dermjax"],
        help="side measured first with --torch. torch: it empties its memory cache before jax "
        "starts, so jax may use the whole card. dermjax: jax keeps its memory pool, so torch gets "
        "what jax left (fine when both fit); its figures survive a time box that torch.compile's "
        "compile would otherwise use up",
    )  # fmt: skip
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
    problems = input_problems(args)  # found before minutes of measuring, not after
    if problems:
        parser.error("; ".join(problems))
    result = {"command": args.command, **args.run(args)}
    _write_json(args.out, result)
    return result


def input_problems(args: argparse.Namespace) -> list[str]:
    """What in the arguments would fail only after minutes of measuring."""
    problems = []
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        problems.append(
            f"--out {args.out}: folder {out_dir} does not exist; create it or pick another"
        )
    if args.command != "step":
        return problems
    import importlib.util

    import jax

    from dermjax.models import registry

    for name in args.models:
        if name not in registry.BACKBONES:
            problems.append(f"--models {name}: not a backbone ({', '.join(registry.BACKBONES)})")
        elif (patch := registry.vit_patch_size(name)) and args.size % patch:
            problems.append(f"--size {args.size}: {name} needs a multiple of its patch, {patch}")
    if args.batch_size % jax.device_count():
        problems.append(
            f"--batch {args.batch_size}: not divisible by the {jax.device_count()} devices"
        )
    if args.torch and not all(importlib.util.find_spec(m) for m in ("torch", "torchvision")):
        problems.append(
            '--torch: torch and torchvision are not installed (pip install -e ".[torch]")'
        )
    return problems


def _write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's mp_prefetch reads absl flags (google/grain#1355)
    main()
