"""Synthetic demo dataset in the original's layout, learnable from both image and text.

`python -m dermjax.data.demo --out DIR [--seed S] [--n N]` writes, from the seed alone:
  DIR/metadata_all_harmonized.csv   the harmonized columns plus fitzpatrick_scale (1-6)
  DIR/imgs/{dataset}_{image_id}.jpg|.png   skin-tone background with a class-specific lesion
  DIR/embeddings/hash256.parquet    text embeddings from HashingTextEncoder(dim=256)
  DIR/DONE                          written last; a directory without it is regenerated
Each class has its own lesion colour and coarse shape (robust to flips, rotation, mild jitter,
and visible at 64 px) and some descriptions carry class-indicative words, so each modality alone
beats the majority class and both together do best: about 30% of the lesions are faint and
about 40% of descriptions say nothing about the class, so neither modality is enough alone.
Missing text appears both as NaN and as "" (pandas reads both back as NaN from the CSV).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import shutil
import time

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from dermjax.data import fs
from dermjax.data.encoders import HashingTextEncoder
from dermjax.data.encoding import ensure_embeddings
from dermjax.data.metadata import DERM1M_SOURCES
from dermjax.errors import UserError

log = logging.getLogger(__name__)

METADATA_FILENAME = "metadata_all_harmonized.csv"
EMBEDDING_FILENAME = "hash256.parquet"
DEFAULT_N = 1200
_VERSION = 1
_PHOTO_SIZES = ((1024, 768), (768, 1024), (1200, 900))
_PHOTO_FRACTION = 0.03
_FAINT_FRACTION = 0.3
_INDICATIVE_FRACTION = 0.6
_NAN_TEXT, _EMPTY_TEXT = 0.12, 0.06


@dataclasses.dataclass(frozen=True)
class LesionClass:
    """How one synthetic condition looks and how it tends to be described."""

    name: str
    weight: float  # relative frequency
    colour: tuple[int, int, int]
    shape: str
    words: tuple[str, ...]
    category: str
    malignant: bool = False


CLASSES = (
    LesionClass("eczema-dermatitis", 5.0, (226, 132, 146), "diffuse",
                ("intensely itchy", "dry flaking skin", "weeping areas", "worse in winter"),
                "inflammatory"),
    LesionClass("benign-nevus", 4.0, (118, 72, 42), "round",
                ("present since childhood", "uniform colour", "stable in size", "smooth edge"),
                "neoplastic"),
    LesionClass("psoriasis", 3.2, (206, 80, 74), "plaques",
                ("silvery scale", "thick plaques", "on the elbows", "sharply demarcated"),
                "inflammatory"),
    LesionClass("basal-cell-carcinoma", 2.6, (242, 204, 212), "nodule",
                ("pearly surface", "rolled border", "visible vessels", "does not heal"),
                "neoplastic", malignant=True),
    LesionClass("acne-vulgaris", 2.0, (182, 36, 48), "dots",
                ("pustules", "blackheads", "oily face", "teenage onset"), "inflammatory"),
    LesionClass("melanoma", 1.6, (34, 28, 48), "irregular",
                ("irregular border", "changing colour", "recently enlarged", "asymmetric spot"),
                "neoplastic", malignant=True),
    LesionClass("vitiligo", 1.3, (252, 248, 240), "patches",
                ("loss of pigment", "milky white", "depigmented areas", "spreading pale"),
                "pigmentary"),
    LesionClass("tinea-corporis", 1.0, (150, 96, 40), "ring",
                ("ring shaped", "central clearing", "scaly active edge", "caught from a cat"),
                "infectious"),
)  # fmt: skip

SKIN_TONES = {  # Fitzpatrick I-VI background colours
    1: (244, 214, 192), 2: (228, 186, 156), 3: (200, 152, 116),
    4: (162, 114, 80), 5: (116, 78, 52), 6: (72, 48, 34),
}  # fmt: skip
_TONE_PROBS = (0.2, 0.24, 0.2, 0.15, 0.12, 0.09)
DATASETS = {"fitzpatrick17k": 0.3, "ddi": 0.1, "isic": 0.2, "derm1m": 0.4}
_SITES = ("back", "chest", "face", "forearm", "lower leg", "scalp", "abdomen", "hand", "neck")
_NOISE = ("First noticed a few months ago.", "No prior treatment.", "Seen at the clinic.",
          "Photo taken in daylight.", "No family history reported.", "Mild discomfort.",
          "Otherwise healthy.", "Photographed up close.")  # fmt: skip
_ALPHANUMERIC = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Where a generated demo dataset lives (the original's per-dataset layout)."""

    root: str
    metadata: str
    img_prefix: str
    embeddings: str


def demo_paths(root: str) -> DemoPaths:
    return DemoPaths(
        root=root,
        metadata=os.path.join(root, METADATA_FILENAME),
        img_prefix=os.path.join(root, "imgs"),
        embeddings=os.path.join(root, "embeddings", EMBEDDING_FILENAME),
    )


def _exact_counts(n: int, weights: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of n * weights / sum(weights), each at least 1 when n allows."""
    raw = n * weights / weights.sum()
    counts = np.maximum(np.floor(raw).astype(int), 1 if n >= len(weights) else 0)
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    for i in range(n - counts.sum()):
        counts[order[i % len(order)]] += 1
    while counts.sum() > n:
        counts[np.argmax(counts)] -= 1
    return counts


def _shuffled(rng: np.random.Generator, values, counts) -> np.ndarray:
    return rng.permutation(np.repeat(np.asarray(values, dtype=object), counts))


def _description(cls: LesionClass, dataset: str, rng: np.random.Generator) -> str:
    sex = rng.choice(["male", "female"])
    age = int(rng.integers(4, 18)) * 5
    site = rng.choice(_SITES)
    parts = []
    if rng.random() < _INDICATIVE_FRACTION:
        parts.append(f"Findings: {'; '.join(rng.choice(cls.words, 2, replace=False))}.")
    if rng.random() < 0.35:
        other = CLASSES[rng.integers(len(CLASSES))]
        parts.append(f"Possibly {rng.choice(other.words)}.")
    parts.append(str(rng.choice(_NOISE)))
    if dataset == "ddi":
        parts.insert(0, f"This lesion is {'malignant' if cls.malignant else 'benign'}.")
    elif dataset == "isic":
        parts.insert(0, f"The patient is {sex}. Approximate age is {age}. The site is the {site}.")
    elif dataset == "derm1m":
        parts.append(f"Gender: {sex}. Age: {age}. Body location: {site}.")
    order = rng.permutation(len(parts)) if rng.random() < 0.3 else range(len(parts))
    return " ".join(parts[i] for i in order)


def _identity(dataset: str, k: int, rng: np.random.Generator) -> tuple[str, str, str]:
    """(image_id, orig_filename, ext) in each source dataset's naming style."""
    if dataset == "fitzpatrick17k":
        image_id, ext = rng.bytes(16).hex(), ".png" if rng.random() < 0.2 else ".jpg"
        return image_id, f"{image_id}{ext}", ext
    if dataset == "ddi":
        return f"{k + 1:06d}", f"{k + 1:06d}.png", ".png"
    if dataset == "isic":
        image_id = f"ISIC_{24_306 + 37 * k:07d}"
        return image_id, f"{image_id}.jpg", ".jpg"
    source = DERM1M_SOURCES[k % len(DERM1M_SOURCES)]
    token = "".join(rng.choice(_ALPHANUMERIC, 11))
    stem = f"{token}_frame_{int(rng.integers(1, 3000))}" if source == "youtube" else token
    return f"{source}_{stem}", f"{source}/{stem}.jpg", ".jpg"


def make_metadata(seed: int, n: int = DEFAULT_N) -> pd.DataFrame:
    """The harmonized metadata table (with "" and NaN text kept distinct), from the seed alone."""
    rng = np.random.default_rng([seed, 0])
    labels = _shuffled(
        rng, range(len(CLASSES)), _exact_counts(n, np.array([c.weight for c in CLASSES]))
    )
    datasets = _shuffled(rng, list(DATASETS), _exact_counts(n, np.array(list(DATASETS.values()))))
    rows, seen = [], {d: 0 for d in DATASETS}
    for label, dataset in zip(labels, datasets, strict=True):
        cls = CLASSES[label]
        image_id, orig, ext = _identity(dataset, seen[dataset], rng)
        seen[dataset] += 1
        draw = rng.random()
        text = np.nan if draw < _NAN_TEXT else "" if draw < _NAN_TEXT + _EMPTY_TEXT else None
        rows.append({
            "image_id": image_id,
            "dataset": dataset,
            "filename": f"{dataset}_{image_id}{ext}",
            "orig_filename": orig,
            "label": cls.name,
            "text_desc": _description(cls, dataset, rng) if text is None else text,
            "fitzpatrick_scale": int(rng.choice(6, p=_TONE_PROBS)) + 1,
            "level_1": cls.category if dataset == "derm1m" else np.nan,
            "level_2": cls.name if dataset == "derm1m" else np.nan,
        })  # fmt: skip
    df = pd.DataFrame(rows)
    if df["image_id"].duplicated().any():
        raise RuntimeError("demo generator produced a duplicate image_id; change the seed")
    return df


def _blob(draw: ImageDraw.ImageDraw, centre, radius: float, irregularity: float, rng) -> None:
    """A filled closed shape whose radius wobbles with a few random harmonics."""
    angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    wobble = sum(
        rng.normal(0, irregularity / k) * np.cos(k * angles + rng.uniform(0, 6.3))
        for k in (2, 3, 5)
    )
    r = radius * np.clip(1 + wobble, 0.4, 1.8)
    draw.polygon(
        [
            (centre[0] + x, centre[1] + y)
            for x, y in zip(r * np.cos(angles), r * np.sin(angles), strict=True)
        ],
        fill=255,
    )


def _draw_lesion(cls: LesionClass, size: tuple[int, int], rng) -> tuple[Image.Image, Image.Image]:
    """(main mask, accent mask) in 'L' mode; the accent holds scale or vessels where relevant."""
    w, h = size
    s = min(w, h)
    main, accent = Image.new("L", size), Image.new("L", size)
    dm, da = ImageDraw.Draw(main), ImageDraw.Draw(accent)

    def spot(spread: float = 0.18):
        return (w / 2 + rng.uniform(-spread, spread) * w, h / 2 + rng.uniform(-spread, spread) * h)

    if cls.shape == "irregular":
        _blob(dm, spot(0.08), s * rng.uniform(0.22, 0.32), 0.3, rng)
    elif cls.shape == "round":
        _blob(dm, spot(0.1), s * rng.uniform(0.1, 0.16), 0.03, rng)
    elif cls.shape in ("plaques", "diffuse", "patches"):
        for _ in range(int(rng.integers(2, 4))):
            _blob(dm, spot(0.22), s * rng.uniform(0.12, 0.22), 0.25, rng)
        if cls.shape == "plaques":
            for _ in range(int(rng.integers(40, 80))):
                x, y = spot(0.3)
                r = s * 0.012
                da.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif cls.shape == "nodule":
        cx, cy = spot(0.1)
        _blob(dm, (cx, cy), s * rng.uniform(0.13, 0.19), 0.06, rng)
        for _ in range(4):
            a = rng.uniform(0, 2 * np.pi)
            da.line(
                (cx, cy, cx + np.cos(a) * s * 0.15, cy + np.sin(a) * s * 0.15),
                fill=255,
                width=max(1, s // 60),
            )
    elif cls.shape == "dots":
        for _ in range(int(rng.integers(12, 24))):
            x, y = spot(0.32)
            r = s * rng.uniform(0.03, 0.05)
            dm.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif cls.shape == "ring":
        cx, cy = spot(0.08)
        r = s * rng.uniform(0.2, 0.3)
        dm.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=max(2, int(s * 0.07)))
    blur = s * (0.04 if cls.shape == "diffuse" else 0.008)
    return main.filter(ImageFilter.GaussianBlur(blur)), accent.filter(
        ImageFilter.GaussianBlur(s * 0.004)
    )


def render_image(cls: LesionClass, fitzpatrick: int, rng: np.random.Generator) -> Image.Image:
    """One RGB picture: shaded noisy skin of the given tone with the class's lesion.

    Photo-sized pictures are drawn at a quarter of their size and upscaled, which keeps the
    generator fast while the files still have realistic dimensions.
    """
    if rng.random() < _PHOTO_FRACTION:
        size = _PHOTO_SIZES[rng.integers(len(_PHOTO_SIZES))]
    else:
        width = int(rng.integers(96, 320))
        size = (width, int(width / rng.choice([0.75, 1.0, 1.0, 4 / 3, 1.5])))
    canvas = size if max(size) <= 400 else (size[0] // 4, size[1] // 4)
    w, h = canvas
    skin = np.asarray(SKIN_TONES[fitzpatrick], np.float32) + rng.normal(0, 6, 3).astype(np.float32)
    tilt_x, tilt_y = rng.uniform(-0.1, 0.1, 2).astype(np.float32)
    shade = (
        0.95
        + tilt_x * np.linspace(0, 1, w, dtype=np.float32)
        + tilt_y * np.linspace(0, 1, h, dtype=np.float32)[:, None]
    )
    image = skin * shade[..., None] + 4 * rng.standard_normal((h, w, 1), np.float32)
    main, accent = _draw_lesion(cls, canvas, rng)
    strength = rng.uniform(0.12, 0.3) if rng.random() < _FAINT_FRACTION else rng.uniform(0.85, 1.0)
    colour = np.asarray(cls.colour, np.float32) + rng.normal(0, 8, 3).astype(np.float32)
    accent_colour = (245, 242, 236) if cls.shape == "plaques" else (150, 24, 36)
    for mask, paint in ((main, colour), (accent, np.asarray(accent_colour, np.float32))):
        alpha = np.asarray(mask, np.float32)[..., None] * np.float32(strength / 255)
        image += alpha * (paint - image)
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")
    return picture if canvas == size else picture.resize(size, Image.Resampling.BICUBIC)


def _save(image: Image.Image, path: str, rng: np.random.Generator) -> None:
    if path.endswith(".png"):
        rgba = rng.random() < 0.05  # a few RGBA files exercise the decoder's RGB conversion
        (image.convert("RGBA") if rgba else image).save(path, compress_level=1)
    else:
        image.save(path, quality=90)


def generate(out: str, *, seed: int = 0, n: int = DEFAULT_N) -> DemoPaths:
    """Writes the whole demo dataset into `out` (DONE last) and returns its paths."""
    start = time.perf_counter()
    paths = demo_paths(out)
    fs.ensure_writable_folder(
        paths.img_prefix,
        "demo data folder",
        "use a folder you can write (data.local_root; --out of python -m dermjax.data.demo)",
    )
    df = make_metadata(seed, n)
    by_name = {c.name: c for c in CLASSES}
    for row, (label, tone, filename) in enumerate(
        zip(df["label"], df["fitzpatrick_scale"], df["filename"], strict=True)
    ):
        rng = np.random.default_rng([seed, 1, row])
        _save(
            render_image(by_name[label], int(tone), rng),
            os.path.join(paths.img_prefix, filename),
            rng,
        )
    df.to_csv(paths.metadata, index=False, quoting=csv.QUOTE_NONNUMERIC)  # "" stays visible
    ensure_embeddings(df, paths.embeddings, HashingTextEncoder(dim=256))
    with open(os.path.join(out, "DONE"), "w") as f:
        json.dump({"seed": seed, "n": n, "version": _VERSION}, f)
    log.info("demo data: %d rows in %s (%.1f s)", n, out, time.perf_counter() - start)
    return paths


def completed(root: str) -> dict | None:
    """What the complete demo dataset under `root` was made with ({"seed", "n", "version"}),
    None when there is none."""
    try:
        with open(os.path.join(root, "DONE")) as f:
            return json.load(f)
    except (OSError, ValueError):  # ValueError: also undecodable bytes
        return None


def is_complete(root: str, seed: int = 0, n: int = DEFAULT_N) -> bool:
    """Whether `root` holds a complete demo dataset of this seed and size (and version)."""
    return completed(root) == {"seed": seed, "n": n, "version": _VERSION}


def ensure_demo_data(root: str, seed: int = 0, n: int = DEFAULT_N) -> DemoPaths:
    """Returns the demo dataset under `root`, (re)generating it unless a complete one with the
    same seed and size is there; only files the generator writes are removed."""
    paths = demo_paths(root)
    if is_complete(root, seed, n):
        return paths
    done = os.path.join(root, "DONE")
    if os.path.exists(done):
        os.remove(done)
    shutil.rmtree(paths.img_prefix, ignore_errors=True)
    for stale in (paths.metadata, paths.embeddings):
        if os.path.exists(stale):
            os.remove(stale)
    return generate(root, seed=seed, n=n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="number of images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = ensure_demo_data(args.out, seed=args.seed, n=args.n)
    except UserError as e:
        parser.exit(1, f"error: {e}\n")
    print(f"metadata: {paths.metadata}\nimages: {paths.img_prefix}\nembeddings: {paths.embeddings}")


if __name__ == "__main__":
    main()
