"""From a validated config to the data side of a run: selected and split metadata, records with
their text embeddings, class weights, normalisation statistics and the prepared caches to read.

`load_data(cfg, run_dir)` is what `dermjax.experiment.compose` starts from; `dermjax.prepare`
(`split_paths`), `dermjax.embed` and the evaluation read the same selection through
`selected_metadata` and `split_metadata`, so every command sees the rows a training run sees.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pandas as pd
from ml_collections import config_dict

from dermjax.config import DataPaths, data_paths, encoder_settings
from dermjax.configs import default
from dermjax.data import cache as prepared
from dermjax.data import demo, embeddings, fs, images, metadata, pipeline, stats
from dermjax.data.augment import AugmentSpec
from dermjax.embedding_file import text_embeddings
from dermjax.errors import DataError

log = logging.getLogger(__name__)

Splits = tuple[list[str] | None, ...]  # image paths of train, val, test; None: no such split


@dataclasses.dataclass
class PreparedData:
    """Everything a run needs from the data side, before any loader is built."""

    paths: DataPaths
    classes: list[str]
    class_weights: np.ndarray
    train: pipeline.Records
    val: pipeline.Records | None
    test: pipeline.Records | None
    mean: tuple[float, float, float] | None  # None: training.use_normalization is false
    std: tuple[float, float, float] | None
    text_dim: int
    majority_class: int
    encoder_spec: dict

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


def selected_metadata(
    cfg: config_dict.ConfigDict, *, make_demo: bool = True
) -> tuple[DataPaths, pd.DataFrame]:
    """The data paths and the metadata rows the config selects.

    With `data.demo` the demo data is made if absent; with `make_demo=False` (evaluating a
    trained run) it must already be there: generating it elsewhere, or for another seed, would
    silently evaluate on data the run never saw, or replace the run's.
    """
    d = cfg.data
    if d.demo:
        root = os.path.join(os.path.expanduser(d.local_root), d.dataset)
        if make_demo:
            demo.ensure_demo_data(root, seed=d.seed, n=d.demo_size)
        elif not demo.is_complete(root, seed=d.seed, n=d.demo_size):
            there = demo.completed(root)
            raise DataError(
                f"no demo data of seed {d.seed} and size {d.demo_size} at "
                f"{os.path.abspath(root)}{f' (it holds {there})' if there else ''}: run from the "
                "folder the run was trained in, or pass --config.data.local_root=DIR (the folder "
                f"that holds {d.dataset}/)"
            )
    paths = data_paths(cfg)
    meta = metadata.load_metadata(
        paths.metadata,
        storage_options=fs.storage_options(paths.metadata),
        min_samples_per_label=d.min_samples_per_label,
        datasets=d.datasets,
        derm1m_sources=d.derm1m_sources,
        has_text=d.has_text,
        data_fraction=d.data_fraction,
    )
    return paths, meta


def split_metadata(
    cfg: config_dict.ConfigDict, meta: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """(train, val, test) rows, each dataset on its own when data.per_dataset_split_ratios is set.

    That split ignores data.test_size and data.val_size, as the original's does (a warning says
    so when they differ from the defaults). A split of size 0 is None.
    """
    d = cfg.data
    if d.per_dataset_split_ratios is None:
        return metadata.stratified_split(
            meta, test_size=d.test_size, val_size=d.val_size, seed=d.seed
        )
    defaults = default.get_config().data
    if (d.test_size, d.val_size) != (defaults.test_size, defaults.val_size):
        log.warning(
            "data.test_size=%s and data.val_size=%s are ignored: data.per_dataset_split_ratios "
            "sets the splits",
            d.test_size,
            d.val_size,
        )
    return metadata.per_dataset_split(meta, d.per_dataset_split_ratios, seed=d.seed)


def load_data(cfg: config_dict.ConfigDict, run_dir: str) -> PreparedData:
    """Metadata filtered and split as the original, text joined, normalisation statistics."""
    d = cfg.data
    paths, meta = selected_metadata(cfg)
    classes = metadata.class_list(meta)
    train_df, val_df, test_df = split_metadata(cfg, meta)
    weights = np.asarray(metadata.class_weights(train_df, classes), np.float32)
    emb = text_embeddings(cfg, meta, paths.embeddings)
    class_to_idx = {c: i for i, c in enumerate(classes)}

    def records(df: pd.DataFrame | None) -> pipeline.Records | None:
        if df is None:
            return None
        return embeddings.build_records(
            df, img_prefix=paths.img_prefix, class_to_idx=class_to_idx, emb_df=emb
        )

    train, val, test = records(train_df), records(val_df), records(test_df)
    if not cfg.training.use_normalization:  # no Normalize anywhere: images stay in [0, 1]
        mean = std = None
        if cfg.training.compute_stats:
            log.info("training.use_normalization is false: training.compute_stats is ignored")
    elif cfg.training.compute_stats:
        mean, std = stats.compute_stats(
            train.paths,
            tuple(d.img_size),
            num_workers=cfg.training.num_workers,
            cache_file=os.path.join(run_dir, "normalization_stats.json"),
        )
    else:
        mean, std = stats.IMAGENET_MEAN, stats.IMAGENET_STD
    log.info(
        "data: %d classes; train %d, val %d, test %d rows; text dim %d",
        len(classes),
        len(train.labels),
        0 if val is None else len(val.labels),
        0 if test is None else len(test.labels),
        train.text.shape[1],
    )
    return PreparedData(
        paths=paths,
        classes=classes,
        class_weights=weights,
        train=train,
        val=val,
        test=test,
        mean=None if mean is None else tuple(float(x) for x in mean),
        std=None if std is None else tuple(float(x) for x in std),
        text_dim=int(train.text.shape[1]),
        majority_class=int(np.bincount(train.labels, minlength=len(classes)).argmax()),
        encoder_spec=emb.attrs.get("encoder_spec") or encoder_settings(cfg).as_dict(),
    )


def augment_spec(cfg: config_dict.ConfigDict) -> AugmentSpec:
    return AugmentSpec.create(**cfg.augmentation.to_dict())


def split_paths(cfg: config_dict.ConfigDict) -> tuple[DataPaths, Splits]:
    """The data paths and the image paths of train, val and test (None for an absent split), as
    `load_data` selects them but without the text embeddings: all `dermjax.prepare` needs."""
    paths, meta = selected_metadata(cfg)
    frames = split_metadata(cfg, meta)
    return paths, tuple(
        None if df is None else embeddings.image_paths(df, paths.img_prefix) for df in frames
    )


def run_splits(data: PreparedData) -> Splits:
    """A loaded run's image paths of train, val and test, as `split_paths` gives them."""
    return tuple(None if r is None else list(r.paths) for r in (data.train, data.val, data.test))


def cache_plan(
    cfg: config_dict.ConfigDict, cache_dir: str, splits: Splits
) -> dict[str, tuple[str, list[str]]]:
    """{rule: (cache folder, paths)} of the prepared caches this config's loaders read, for the
    image paths of train, val and test (`split_paths`, `run_splits`).

    Training reads the train split at its resize rule (shorter side + crop when geometric
    augmentation is on, else exact); evaluation reads val and test resized exactly. A folder
    is named after its rule, size and image list (`<rule>_<H>x<W>_<digest>`), so the caches
    of other splits or filters stay side by side instead of replacing each other.
    """
    h, w = cfg.data.img_size
    train_rule = images.train_rule(augment_spec(cfg).geometric)
    train, *evaluated = splits
    plan: dict[str, list[str]] = {train_rule: list(train)}
    for paths in evaluated:
        if paths is not None:
            plan.setdefault(images.EXACT, []).extend(paths)
    return {
        rule: (os.path.join(cache_dir, prepared.folder_name(rule, (h, w), paths)), paths)
        for rule, paths in plan.items()
    }


def open_caches(cfg: config_dict.ConfigDict, data: PreparedData) -> dict[str, prepared.Cache]:
    """The prepared caches that serve this run's images, by resize rule (`cache.find_cache`)."""
    if not cfg.data.use_cache:
        return {}
    caches = {}
    for rule, (_, paths) in cache_plan(cfg, data.paths.cache_dir, run_splits(data)).items():
        found = prepared.find_cache(data.paths.cache_dir, rule, cfg.data.img_size, paths)
        if found is not None:
            log.info("using prepared cache at %s", found.directory)
            caches[rule] = found
    return caches
