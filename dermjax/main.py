"""Command-line entry: validate the config, train, evaluate on the test split.

  python -m dermjax.main --config=configs/demo.py [--config.a.b=V ...] [--workdir=DIR]

A config with bad values exits with status 2 and one message naming every bad field, before any
data is read. Re-running the same command with the same --workdir resumes from its latest
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from dermjax.config import validate_or_exit

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder (metrics, checkpoints); default workdirs/<experiment_name>."
)


def _setup_logging(workdir: str) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):  # absl's own handler would print every line twice
        root.removeHandler(handler)
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(f"{workdir}/train.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str]) -> None:
    del argv
    cfg = _CONFIG.value
    validate_or_exit(cfg)
    workdir = _WORKDIR.value or os.path.join("workdirs", cfg.output.experiment_name)
    os.makedirs(workdir, exist_ok=True)
    _setup_logging(workdir)

    from dermjax import parallel
    from dermjax.train.loop import train_and_evaluate

    parallel.maybe_initialize_distributed()
    summary = train_and_evaluate(cfg, workdir)
    if "test" in summary:
        brief = {k: summary[k] for k in ("val", "test", "baseline") if k in summary}
        print(json.dumps(brief, indent=1, default=str))


def run() -> None:
    """Console-script entry point (`dermjax --config=...`)."""
    app.run(main)


if __name__ == "__main__":
    run()
