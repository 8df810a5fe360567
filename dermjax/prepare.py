"""Builds the prepared image caches a config's training and evaluation will read.

  python -m dermjax.prepare --config=configs/default.py [--config.a.b=V ...] [--workers=16]

Decodes and resizes every image of the filtered splits once and stores it in ArrayRecord shards
under `data.cache_dir` (default `<dataset>/cache`; local or gs://), one cache per resize rule and
image size.
Training then says "using prepared cache at ..." and reads pixels instead of JPEGs. An
interrupted build resumes where it stopped; a cache built for other paths, size or rule is not
used (the log says why). Build a gs:// cache once, from one machine: every host of a multi-host
run then reads only the records of its own batch slices from it.
"""

from __future__ import annotations

import logging
import tempfile

from absl import flags
from ml_collections import config_flags

from dermjax.cli import run_main
from dermjax.config import packaged_config_path, validate
from dermjax.errors import UserError

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
    from dermjax.data.cache import build_cache
    from dermjax.experiment_data import cache_plan, load_data

    cfg.training.compute_stats = False  # statistics belong to the training run, not the cache
    with tempfile.TemporaryDirectory() as scratch:
        data = load_data(cfg, scratch)
    workers = _WORKERS.value if _WORKERS.value is not None else cfg.training.num_workers
    for rule, (directory, paths) in cache_plan(cfg, data).items():
        logging.info("building the %s cache of %d images at %s", rule, len(paths), directory)
        build_cache(
            paths,
            directory,
            img_size=tuple(cfg.data.img_size),
            rule=rule,
            num_workers=workers,
        )


def run() -> None:
    """Command-line entry point (`python -m dermjax.prepare --config=...`)."""
    run_main(main)


if __name__ == "__main__":
    run()
