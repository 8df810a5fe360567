"""Dataset channel statistics with the original's definition (`compute_stats: true`).

Each image is resized exactly to H x W and scaled to [0, 1]. The mean is the average over images of
each image's per-channel mean; the std is the average over images of each image's per-channel
unbiased (ddof=1) std — a mean of per-image stds, not a pooled std. Bad images are left out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import numpy as np

from dermjax.data import fs
from dermjax.data.cache import paths_digest
from dermjax.data.pipeline import Records, close_iterator, eval_loader
from dermjax.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image channel means and unbiased stds of uint8[B, H, W, 3] in [0, 1]: two [B, 3]."""
    b, h, w, c = images.shape  # B may be 0: a batch of unreadable images only
    x = images.reshape(b, h * w, c).astype(np.float64) / 255.0
    return x.mean(axis=1), x.std(axis=1, ddof=1)


def compute_stats(
    paths: Sequence[str],
    img_size: tuple[int, int],
    *,
    num_workers: int = 0,
    cache_file: str | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(mean[3], std[3]) of the images at `paths`; reused from `cache_file` when its key matches.

    The key is the paths digest and the image size; a mismatching or unreadable file is
    recomputed and overwritten. `cache_file` may be local or gs://.
    """
    key = {"paths_sha256": paths_digest(list(paths)), "img_size": [int(s) for s in img_size]}
    if cache_file and fs.exists(cache_file):
        try:
            with fs.open_file(cache_file, "r") as f:
                saved = json.load(f)
            if saved.get("key") == key:
                return np.asarray(saved["mean"]), np.asarray(saved["std"])
            logging.info("stats in %s are for other data; recomputing", cache_file)
        except (OSError, ValueError, KeyError) as e:
            logging.warning("cannot read stats from %s (%s); recomputing", cache_file, e)
    n = len(paths)
    records = Records(list(paths), np.zeros(n), np.zeros((n, 0)), np.zeros(n, bool))
    loader = eval_loader(
        records, batch_size=batch_size, img_size=img_size, split="train", num_workers=num_workers
    )
    means, stds = [], []
    it = iter(loader)
    try:
        for batch in it:
            m, s = image_stats(batch["image"][batch["valid"]])
            means.append(m)
            stds.append(s)
    finally:
        close_iterator(it)
    if not any(len(m) for m in means):
        raise DataError(
            f"none of the {n} training images could be read to compute normalisation stats; "
            "check data.img_prefix and the image files or set training.compute_stats=False"
        )
    mean, std = np.concatenate(means).mean(axis=0), np.concatenate(stds).mean(axis=0)
    if cache_file:
        with fs.open_file(cache_file, "w") as f:
            json.dump({"key": key, "mean": mean.tolist(), "std": std.tolist()}, f)
    return mean, std
