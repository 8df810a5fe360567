"""Command-line entry: compute the text embeddings file of a config.

  python -m dermjax.embed --config=configs/demo.py [--config.encoder.model_name=...]
      [--out FILE] [--resume]

Encodes the text of the rows the config's data section selects (the same filters as training;
rows without text are not encoded: zero vector, has_text false) in batches of
encoder.batch_size, with a progress line (texts/s, ETA), into the original's parquet layout plus
the encoder's spec and settings in the file metadata. The file is `--out`, else the one training
reads (data.embeddings_path, or <dataset>/embeddings/ with encoder.embedding_filename or the name
derived from the encoder, see `dermjax.data.encoders`). It is written atomically, and again
every few minutes while encoding; an existing file is never overwritten: `--resume` encodes only
the rows it still lacks, after checking that the same encoder made it.
"""

from __future__ import annotations

import logging

import jax
from absl import flags
from ml_collections import config_flags

from dermjax import embedding_file, experiment_data, parallel
from dermjax.cli import run_main
from dermjax.config import encoder_settings, packaged_config_path, validate
from dermjax.data import encoding, fs
from dermjax.errors import DataError

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(packaged_config_path("default")), "Config file (default: configs/default.py)."
)
_OUT = flags.DEFINE_string(
    "out", None, "Embeddings parquet to write (local or gs://); default: the file training reads."
)
_RESUME = flags.DEFINE_bool(
    "resume", False, "Complete an existing file: encode only the rows it lacks."
)


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,  # replaces absl's handler, which would print every line twice
    )
    for noisy in ("absl", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str]) -> None:
    del argv
    cfg = _CONFIG.value
    validate(cfg)
    parallel.maybe_initialize_distributed()
    _setup_logging()
    paths, meta = experiment_data.selected_metadata(cfg)
    out = _OUT.value or paths.embeddings
    if out is None:
        raise DataError("no embeddings file to write: pass --out FILE or set data.dataset")
    emb = encoding.compute_embeddings(
        meta,
        out,
        embedding_file.text_encoder(cfg, parallel.make_mesh()),
        settings=encoder_settings(cfg).as_dict(),
        batch_size=cfg.encoder.batch_size,
        resume=_RESUME.value,
        storage_options=fs.storage_options(out),
        write=parallel.is_writer(out),
        progress=jax.process_index() == 0,
    )
    if jax.process_index() == 0:
        print(f"{len(emb)} embeddings in {out}", flush=True)


if __name__ == "__main__":
    run_main(main)
