"""Builds the prepared image caches a config's training and evaluation will read.

  python -m dermjax.prepare --config=configs/default.py [--config.a.b=V ...] [--workers=16]

Decodes and resizes every image of the filtered splits once and stores it in ArrayRecord shards
under `data.cache_dir` (default `<dataset>/cache`; local or gs://), one cache per resize rule and
image size.
Training then says "using prepared cache at ..." and reads pixels instead of JPEGs. An
interrupted build resumes where it stopped. Each cache folder is named after its rule, size and
image list, so caches of other splits or filters stay as they are (the log lists them, to delete
those no longer needed). Nothing is built when none of a sample of the images exists (a wrong
data.img_prefix), and a build whose every image is unreadable is an error. Build a gs:// cache
once, from one machine: every host of a multi-host run then reads only the records of its own
batch slices from it.
"""

from __future__ import annotations

import logging
import os
import time

from absl import flags
from ml_collections import config_flags

from dermjax.cli import run_main
from dermjax.config import packaged_config_path, validate
from dermjax.data import cache, fs
from dermjax.errors import DataError, UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(packaged_config_path("default")), "Config file (default: configs/default.py)."
)
_WORKERS = flags.DEFINE_integer(
    "workers",
    None,
    "Decode processes; 0 decodes in the main process (default: training.num_workers).",
)


def main(argv: list[str]) -> None:
    del argv
    cfg = _CONFIG.value
    if _WORKERS.value is not None and _WORKERS.value < 0:
        raise UserError(
            f"--workers={_WORKERS.value}: must be 0 or more (0 decodes in the main process)"
        )
    validate(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from dermjax.experiment_data import cache_plan, split_paths

    data_paths, splits = split_paths(cfg)  # images only: no text embeddings read or computed
    workers = _WORKERS.value if _WORKERS.value is not None else cfg.training.num_workers
    plan = cache_plan(cfg, data_paths.cache_dir, splits)
    for _, paths in plan.values():
        _check_some_exist(paths, data_paths.img_prefix)
    for rule, (directory, paths) in plan.items():
        ready = cache.find_cache(data_paths.cache_dir, rule, cfg.data.img_size, paths)
        if ready is not None:
            logging.info("the %s images are already prepared at %s", rule, ready.directory)
            continue
        logging.info("building the %s cache of %d images at %s", rule, len(paths), directory)
        start = time.perf_counter()
        cache.build_cache(
            paths,
            directory,
            img_size=tuple(cfg.data.img_size),
            rule=rule,
            num_workers=workers,
        )
        bad = cache.bad_paths(directory)
        if len(bad) == len(set(paths)):
            path, reason = next(iter(bad.items()))
            raise DataError(
                f"none of the {len(bad)} images of the {rule} cache at {directory} could be "
                f"read (e.g. {path}: {reason}); check data.img_prefix={data_paths.img_prefix}, "
                "then run again: images that appear or change are read again"
            )
        logging.info(
            "%s cache ready: %d images at %s (%.0f s)%s",
            rule,
            len(set(paths)),
            directory,
            time.perf_counter() - start,
            f"; {len(bad)} unreadable, listed with their reasons in its shard-*.done.json files"
            if bad
            else "",
        )
        _list_others(directory, rule, cfg.data.img_size)


def _check_some_exist(paths: list[str], img_prefix: str, sample: int = 16) -> None:
    """DataError, before anything is built, when none of `sample` evenly spread paths exists."""
    picked = paths[:: max(1, len(paths) // sample)][:sample]
    if picked and not any(fs.exists(p) for p in picked):
        raise DataError(
            f"none of {len(picked)} sampled images exists (e.g. {picked[0]}); check "
            f"data.img_prefix={img_prefix} (or data.local_root / data.dataset); nothing was built"
        )


def _list_others(directory: str, rule: str, img_size) -> None:
    """Logs the other caches of the same rule and size next to `directory`."""
    parent, name = os.path.split(directory.rstrip("/"))
    others = [n for n in cache.same_kind(parent, rule, img_size) if n != name]
    if others:
        logging.info(
            "other prepared caches of this rule and size in %s (other splits or filters; "
            "delete those no longer needed): %s",
            parent,
            ", ".join(others),
        )


def run() -> None:
    """Command-line entry point (`python -m dermjax.prepare --config=...`)."""
    run_main(main)


if __name__ == "__main__":
    run()
