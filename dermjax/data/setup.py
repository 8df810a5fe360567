"""From a validated config to training-ready records: metadata, splits, text, statistics.

This is the original's `create_dataloaders` minus the loaders: filters and splits with the
original's semantics, classes sorted over the filtered metadata, raw 1/count class weights, text
embeddings joined by image_id, and the normalisation statistics.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pandas as pd
from ml_collections import config_dict

from dermjax.config import DataPaths, data_paths
from dermjax.data import demo, embeddings, images, metadata, stats
from dermjax.data.augment import AugmentSpec
from dermjax.data.pipeline import Records

log = logging.getLogger(__name__)

HASH_ENCODER_DIM = 256


@dataclasses.dataclass
class PreparedData:
    """Everything a run needs from the data side, before any loader is built."""

    paths: DataPaths
    classes: list[str]
    class_weights: np.ndarray
    train: Records
    val: Records | None
    test: Records
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    text_dim: int
    majority_accuracy: float
    encoder_spec: dict

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


def _storage_options(path: str) -> dict | None:
    return {"token": os.environ.get("FSSPEC_GCS_TOKEN")} if path.startswith("gs://") else None


def _text_embeddings(cfg: config_dict.ConfigDict, meta: pd.DataFrame, path: str | None):
    """Reads the embeddings parquet; the built-in hash encoder computes it when absent."""
    if path is None:
        raise FileNotFoundError("encoder.embedding_filename / data.embeddings_path is not set")
    if cfg.encoder.model_name == "hash":
        encoder = embeddings.HashingTextEncoder(dim=HASH_ENCODER_DIM)
        return embeddings.ensure_embeddings(meta, path, encoder)
    try:
        return embeddings.read_embeddings(path, storage_options=_storage_options(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"text embeddings not found at {path}. dermjax reads precomputed embeddings in the "
            "original's parquet layout (image_id, text_desc, embedding); set "
            "data.embeddings_path, or use encoder.model_name=hash for the built-in encoder."
        ) from e


def prepare_data(cfg: config_dict.ConfigDict, workdir: str) -> PreparedData:
    """Loads, filters and splits the metadata and builds the three record sets."""
    d = cfg.data
    if d.demo:
        demo.ensure_demo_data(os.path.join(d.local_root, d.dataset), seed=d.seed, n=d.demo_size)
    paths = data_paths(cfg)
    meta = metadata.load_metadata(
        metadata.read_metadata_csv(paths.metadata, _storage_options(paths.metadata)),
        min_samples_per_label=d.min_samples_per_label,
        datasets=d.datasets,
        derm1m_sources=d.derm1m_sources,
        has_text=d.has_text,
        data_fraction=d.data_fraction,
    )
    if len(meta) == 0 or meta[metadata.LABEL_COL].nunique() < 2:
        raise ValueError(
            f"{paths.metadata}: {len(meta)} rows and "
            f"{meta[metadata.LABEL_COL].nunique() if len(meta) else 0} classes left after the "
            f"filters (min_samples_per_label={d.min_samples_per_label}, datasets={d.datasets}, "
            f"has_text={d.has_text}, data_fraction={d.data_fraction}); need at least 2 classes"
        )
    classes = metadata.class_list(meta)
    train_df, val_df, test_df = metadata.stratified_split(
        meta, test_size=d.test_size, val_size=d.val_size, seed=d.seed
    )
    weights = np.asarray(metadata.class_weights(train_df, classes), np.float32)
    emb = _text_embeddings(cfg, meta, paths.embeddings)
    class_to_idx = {c: i for i, c in enumerate(classes)}

    def records(df: pd.DataFrame | None) -> Records | None:
        if df is None:
            return None
        return embeddings.build_records(
            df, img_prefix=paths.img_prefix, class_to_idx=class_to_idx, emb_df=emb
        )

    train, val, test = records(train_df), records(val_df), records(test_df)
    if cfg.training.compute_stats:
        mean, std = stats.compute_stats(
            train.paths,
            tuple(d.img_size),
            num_workers=cfg.training.num_workers,
            cache_file=os.path.join(workdir, "normalization_stats.json"),
        )
    else:
        mean, std = stats.IMAGENET_MEAN, stats.IMAGENET_STD
    majority = int(np.bincount(train.labels, minlength=len(classes)).argmax())
    log.info(
        "data: %d classes; train %d, val %d, test %d rows; text dim %d",
        len(classes),
        len(train.labels),
        0 if val is None else len(val.labels),
        len(test.labels),
        train.text.shape[1],
    )
    return PreparedData(
        paths=paths,
        classes=classes,
        class_weights=weights,
        train=train,
        val=val,
        test=test,
        mean=tuple(float(x) for x in mean),
        std=tuple(float(x) for x in std),
        text_dim=int(train.text.shape[1]),
        majority_accuracy=float(np.mean(test.labels == majority)),
        encoder_spec={
            k: cfg.encoder[k] for k in ("model_name", "max_length", "pooling_type", "qwen_instr")
        },
    )


def cache_plan(cfg: config_dict.ConfigDict, data: PreparedData) -> dict[str, tuple[str, list[str]]]:
    """{rule: (cache folder, paths)} of the prepared caches this config's loaders read.

    Training reads the train split at its resize rule (shorter side + crop when geometric
    augmentation is on, else exact); evaluation reads val and test resized exactly.
    """
    h, w = cfg.data.img_size
    train_rule = images.train_rule(AugmentSpec.from_config(cfg.augmentation).geometric)
    plan: dict[str, list[str]] = {train_rule: list(data.train.paths)}
    for records in (data.val, data.test):
        if records is not None:
            plan.setdefault(images.EXACT, []).extend(records.paths)
    return {
        rule: (os.path.join(data.paths.cache_dir, f"{rule}_{h}x{w}"), paths)
        for rule, paths in plan.items()
    }
