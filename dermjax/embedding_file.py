"""The run's text-embeddings file, from the config: its encoder, its checks, the fix command.

`text_embeddings` returns the embeddings a run trains with: the file is computed first when it
does not exist (as the original did); an existing file is checked against the configured encoder
(stored settings, dimension, every selected row with text present) and never overwritten. Every
problem is a DataError that prints the `python -m dermjax.embed` command fixing it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shlex
from typing import Any

import jax
import pandas as pd
from absl import flags
from ml_collections import config_dict

from dermjax import parallel
from dermjax.config import data_paths, encoder_settings, load_config, packaged_config_path
from dermjax.data import embeddings, encoders, encoding, fs, metadata
from dermjax.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def text_encoder(
    cfg: config_dict.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> encoders.TextEncoder:
    """The configured text encoder: the built-in hashing one for `hash`, else `dermjax.text`'s."""
    e = cfg.encoder
    if e.model_name == encoders.HASH_MODEL:
        return encoders.HashingTextEncoder(dim=encoders.HASH_DIM)
    try:
        from dermjax import text  # lazy: transformers is only needed to compute embeddings
    except ImportError as err:
        raise ConfigError(
            f"encoder.model_name={e.model_name!r}: computing its embeddings needs the text "
            f"extra ({err}); install it with: pip install 'dermjax[text]'"
        ) from err
    return text.load_text_encoder(
        e.model_name,
        max_length=e.max_length,
        pooling_type=e.pooling_type,
        batch_size=e.batch_size,
        instruction=encoder_settings(cfg).instruction,
        output_dim=e.output_dim,
        dtype=e.dtype,
        mesh=mesh,
    )


# data fields that decide which rows (and which files) `dermjax.embed` reads
_EMBED_DATA_FIELDS = (
    "use_local", "dataset", "local_root", "gcs_root", "metadata_path", "embeddings_path",
    "min_samples_per_label", "datasets", "derm1m_sources", "has_text", "data_fraction", "demo",
    "demo_size", "seed",
)  # fmt: skip


def _config_source() -> tuple[str, config_dict.ConfigDict]:
    """This process's --config file (a packaged one as configs/NAME.py) and what it loads."""
    flag = flags.FLAGS["config"] if "config" in flags.FLAGS else None  # noqa: SIM401 (no .get)
    path = getattr(flag, "config_filename", None) if flags.FLAGS.is_parsed() else None
    path = path or str(packaged_config_path("default"))
    file, _, arg = path.partition(":")
    packaged = packaged_config_path(pathlib.Path(file).stem)
    shown = file
    if packaged.is_file() and pathlib.Path(file).resolve() == packaged.resolve():
        shown = f"configs/{packaged.name}"
    return shown + (f":{arg}" if arg else ""), load_config(file, arg or None)


def _override(field: str, value: Any) -> list[str]:
    flag = f"--config.{field}"
    if isinstance(value, tuple | list):
        return [shlex.quote(f"{flag}={v}") for v in value] or [f"{flag}=()"]
    if isinstance(value, bool):
        return [f"{flag}={str(value).lower()}"]
    return [shlex.quote(f"{flag}={value}")]


def embed_command(
    cfg: config_dict.ConfigDict, *, out: str | None = None, resume: bool = False
) -> str:
    """The `python -m dermjax.embed` command that computes `cfg`'s embeddings file."""
    shown, base = _config_source()
    args = ["python -m dermjax.embed", shlex.quote(f"--config={shown}")]
    for section, fields in (("data", _EMBED_DATA_FIELDS), ("encoder", tuple(cfg.encoder))):
        for field in fields:
            if cfg[section][field] != base[section][field]:
                args += _override(f"{section}.{field}", cfg[section][field])
    args += ["--out", shlex.quote(out)] if out else []
    return " ".join(args + (["--resume"] if resume else []))


def _check_embeddings(
    cfg: config_dict.ConfigDict, emb: pd.DataFrame, meta: pd.DataFrame, path: str
) -> None:
    """Raises DataError unless `emb` was made by the configured encoder and covers `meta`."""
    settings = encoder_settings(cfg)
    stored_spec, stored_settings = emb.attrs["encoder_spec"], emb.attrs["encoder_settings"]
    differences = []
    if stored_settings is not None:
        differences += embeddings.spec_differences(stored_settings, settings.as_dict())
    is_hash = settings.model_name == encoders.HASH_MODEL
    if is_hash and stored_spec is not None:
        hash_spec = encoders.HashingTextEncoder(dim=encoders.HASH_DIM).spec
        named = {d.split(":")[0] for d in differences}
        differences += [
            d
            for d in embeddings.spec_differences(stored_spec, hash_spec)
            if d.split(":")[0] not in named
        ]
    elif (
        stored_settings is None and stored_spec is not None and stored_spec.get("name") == "hashing"
    ):
        differences.append(
            f"encoder: file the built-in hashing encoder, config {settings.model_name!r}"
        )
    dim = next((len(v) for v in emb[embeddings.EMBEDDING_COL] if v is not None), None)
    wanted = encoders.HASH_DIM if is_hash else cfg.encoder.output_dim
    if (
        None not in (dim, wanted)
        and dim != wanted
        and not any(d.startswith("dim:") for d in differences)
    ):
        differences.append(f"dim: file {dim}, config {wanted}")
    other = os.path.join(os.path.dirname(path), settings.filename())
    if other == path:
        digest = hashlib.sha256(json.dumps(settings.as_dict(), sort_keys=True).encode())
        other = f"{path.removesuffix('.parquet')}_{digest.hexdigest()[:8]}.parquet"

    def elsewhere() -> str:  # only on error: it reads the --config file again
        return (
            f"compute this config's embeddings into another file with "
            f"`{embed_command(cfg, out=other)}` and train with "
            f"--config.data.embeddings_path={shlex.quote(other)}"
        )

    if differences:
        raise embeddings.EncoderMismatchError(
            f"embeddings file {path} was made by another encoder than the config's "
            f"({'; '.join(differences)}); it is never overwritten: {elsewhere()}, or delete it"
        )
    missing = embeddings.stale_ids(emb, meta, with_text=True)
    if missing and _keyed_as_numbers(missing, emb):
        raise DataError(
            f"embeddings file {path} keys its rows by image_id read as numbers ({missing[0]} is "
            f"stored as {missing[0].lstrip('0') or '0'}), as files made from an all-numeric "
            "image_id column before dermjax read ids as text; ids keep their zeros now: "
            f"{elsewhere()}"
        )
    if missing:
        texted = int((~metadata.text_is_missing(meta[metadata.TEXT_DESC_COL])).sum())
        fix = (
            elsewhere()
            if stored_spec is None
            else f"complete it with `{embed_command(cfg, resume=True)}`"
        )
        raise DataError(
            f"embeddings file {path} lacks {len(missing)} of the {texted} selected rows with text "
            f"(no vector, or one made for another text_desc; e.g. {missing[:3]}); {fix}"
        )
    if stored_settings is None and not (is_hash and stored_spec is not None):
        log.warning(
            "embeddings file %s stores no dermjax encoder settings (made elsewhere, e.g. by the "
            "original): the encoder that made it cannot be checked; used since its ids and "
            "dimension fit",
            path,
        )


def _keyed_as_numbers(missing: list[str], emb: pd.DataFrame) -> bool:
    """Whether every missing id is digits with leading zeros the file stores without them."""
    if not all(m.isdigit() and m.startswith("0") for m in missing):
        return False
    stored = set(emb[embeddings.IMG_ID_COL].astype(str))
    return all((m.lstrip("0") or "0") in stored for m in missing)


def text_embeddings(cfg: config_dict.ConfigDict, meta: pd.DataFrame, path: str | None):
    """The embeddings file `path`: computed first when absent, else checked, never overwritten."""
    if path is None:
        raise DataError("no text embeddings file: set data.embeddings_path (or data.dataset)")
    metadata.require_columns(
        meta, [metadata.TEXT_DESC_COL], "the text embeddings", data_paths(cfg).metadata
    )
    options = fs.storage_options(path)
    try:
        emb = embeddings.read_embeddings(path, storage_options=options)
    except FileNotFoundError:
        log.info("embeddings file %s not found: computing it first", path)
        # Every process takes part in encoding (the encoder is sharded over all devices) and
        # `parallel.is_writer` says which write. `resume`: a file another process finished in
        # the meantime (shared storage, an encoder without collectives) is used, not refused.
        return encoding.compute_embeddings(
            meta,
            path,
            text_encoder(cfg, parallel.make_mesh()),
            settings=encoder_settings(cfg).as_dict(),
            batch_size=cfg.encoder.batch_size,
            storage_options=options,
            resume=True,
            write=parallel.is_writer(path),
        )
    _check_embeddings(cfg, emb, meta, path)
    return emb
