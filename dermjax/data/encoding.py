"""Filling an embeddings file: encode the texts it lacks in batches, save often, never mix encoders.

`compute_embeddings` writes the parquet layout of `dermjax.data.embeddings` atomically every few
minutes and at the end, so an interrupted run leaves a valid partial file that `resume` completes.
An existing file is never overwritten, and one made by another encoder (its stored spec or
settings differ) is never extended. Missing text is never encoded: it stays the zero vector.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from dermjax.data import fs
from dermjax.data.embeddings import (
    EMBEDDING_COL,
    SOURCE_ATTR,
    EncoderMismatchError,
    canonical_spec,
    read_embeddings,
    spec_differences,
    stale_ids,
    texts_of,
    write_embeddings,
)
from dermjax.data.encoders import TextEncoder
from dermjax.data.metadata import IMG_ID_COL, TEXT_DESC_COL
from dermjax.errors import DataError
from dermjax.tracking import Progress

log = logging.getLogger(__name__)

CHUNK_BATCHES = 8  # compute_embeddings gives the encoder 8 batches per call (sorted by length)


def _frame(ids: Sequence[str], texts: Sequence[str | None], matrix: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {IMG_ID_COL: list(ids), TEXT_DESC_COL: list(texts), EMBEDDING_COL: list(matrix)}
    )


def _encode_into(
    matrix: np.ndarray, texts: list[str | None], encoder: TextEncoder, batch_size: int,
    progress: Progress | None = None,
) -> Iterator[int]:  # fmt: skip
    """Encodes the present texts in batches into `matrix` (missing text stays zero).

    Yields after each batch how many leading rows of `matrix` are final.
    """
    present = [i for i, t in enumerate(texts) if t is not None]
    for b in range(0, len(present), batch_size):
        rows = present[b : b + batch_size]
        encoded = np.asarray(encoder.encode([texts[i] for i in rows]), np.float32)
        if encoded.shape != (len(rows), matrix.shape[1]):
            raise ValueError(
                f"encoder returned shape {encoded.shape}, expected ({len(rows)}, {matrix.shape[1]})"
            )
        matrix[rows] = encoded
        if progress is not None:
            progress.update(len(rows))
        yield present[b + batch_size] if b + batch_size < len(present) else len(texts)


def encode_frame(
    df: pd.DataFrame, encoder: TextEncoder, *, batch_size: int | None = None
) -> pd.DataFrame:
    """Embeds each row's text_desc; rows without text get the zero vector (not encoded)."""
    texts = texts_of(df)
    matrix = np.zeros((len(df), int(encoder.spec["dim"])), np.float32)
    for _ in _encode_into(matrix, texts, encoder, batch_size or max(1, len(df))):
        pass
    return _frame(df[IMG_ID_COL].astype(str), texts, matrix)


def _check_same_encoder(
    existing: pd.DataFrame, path: str, spec: dict[str, Any], settings: dict[str, Any] | None
) -> None:
    stored_spec, stored_settings = (
        existing.attrs["encoder_spec"],
        existing.attrs["encoder_settings"],
    )
    differences = [] if stored_spec is None else spec_differences(stored_spec, spec)
    if stored_settings is not None and settings is not None:
        differences += spec_differences(stored_settings, settings)
    if differences:
        raise EncoderMismatchError(
            f"embeddings file {path} was made by another encoder ({'; '.join(differences)}); "
            "it is never overwritten: write to another file or delete this one"
        )


def _check_writable(path: str, target: fsspec.AbstractFileSystem, fs_path: str) -> None:
    fix = "write to a file in a folder you can write (--out, or data.embeddings_path)"
    if fs.is_local(path):
        fs.ensure_writable_folder(os.path.dirname(fs_path) or ".", "embeddings folder", fix)
        return
    try:  # a bucket: no folders to create, only a missing bucket or no access to find here
        target.makedirs(os.path.dirname(fs_path), exist_ok=True)
    except OSError as e:
        raise DataError(f"embeddings file {path}: cannot write there ({e}); {fix}") from e


def compute_embeddings(
    metadata_df: pd.DataFrame,
    path: str,
    encoder: TextEncoder,
    *,
    settings: dict[str, Any] | None = None,
    batch_size: int = 32,
    resume: bool = False,
    storage_options: dict | None = None,
    save_every_s: float = 300.0,
    progress: bool = True,
    write: bool = True,
) -> pd.DataFrame:
    """Encodes the text of every image_id of `metadata_df` into the parquet `path`; returns it.

    Batches of `batch_size` texts; the file is written atomically every `save_every_s` seconds
    and at the end, so an interrupted run leaves a valid partial file. `write=False` encodes and
    returns without writing, and without `resume` ignores an existing file (the other processes
    of a multi-process run, whose process 0 writes the shared file and may already have). An existing file is never
    overwritten: without `resume` it raises DataError; with `resume` only the rows it lacks (or
    holds for another text) are encoded and added, after checking that the stored spec and
    settings match (EncoderMismatchError otherwise; also for a file without a dermjax spec
    that lacks rows).
    """
    request = metadata_df.drop_duplicates(IMG_ID_COL)
    spec = canonical_spec(encoder.spec)
    fs.check_credentials(str(path), storage_options)
    target, fs_path = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    if write and target.isdir(fs_path):
        raise DataError(f"embeddings file {path} is a folder; give a file path ending in .parquet")
    kept = None
    if (write or resume) and target.exists(fs_path):
        if not resume:
            raise DataError(
                f"embeddings file {path} already exists and is never overwritten; --resume "
                "encodes only the rows it lacks, --out writes another file"
            )
        kept = read_embeddings(path, storage_options)
        _check_same_encoder(kept, path, spec, settings)
        stale = stale_ids(kept, request, with_text=False)
        if not stale:
            log.info("embeddings: %s already covers all %d rows", path, len(request))
            return kept
        if kept.attrs["encoder_spec"] is None:
            raise EncoderMismatchError(
                f"embeddings file {path} has no dermjax encoder spec (made elsewhere) and lacks "
                f"{len(stale)} row(s), e.g. {stale[:3]}; refusing to extend it with {spec}"
            )
        kept = kept[~kept[IMG_ID_COL].astype(str).isin(stale)]
        request = request[request[IMG_ID_COL].astype(str).isin(stale)]

    if write:  # before any encoding: a place that cannot be written must not cost the work
        _check_writable(str(path), target, fs_path)
    ids, texts = request[IMG_ID_COL].astype(str).tolist(), texts_of(request)
    matrix = np.zeros((len(request), int(spec["dim"])), np.float32)

    def save(rows: int) -> pd.DataFrame:
        done = _frame(ids[:rows], texts[:rows], matrix[:rows])
        result = done if kept is None else pd.concat([kept, done], ignore_index=True)
        if write:
            write_embeddings(
                result, path, encoder_spec=spec, settings=settings, storage_options=storage_options
            )
        return result

    n_texts = sum(t is not None for t in texts)
    log.info("embeddings: encoding %d texts (%d rows) into %s", n_texts, len(ids), path)
    bar = Progress(
        n_texts, desc=f"embedding {os.path.basename(str(path))}", unit="text", enabled=progress
    )
    last_save = time.monotonic()
    for rows in _encode_into(matrix, texts, encoder, batch_size * CHUNK_BATCHES, bar):
        if time.monotonic() - last_save >= save_every_s:
            save(rows)
            last_save = time.monotonic()
    bar.close()
    result = save(len(ids))
    result.attrs.update(
        {SOURCE_ATTR: str(path), "encoder_spec": spec, "encoder_settings": settings}
    )
    return result


def ensure_embeddings(
    metadata_df: pd.DataFrame,
    path: str | None,
    encoder: TextEncoder,
    *,
    storage_options: dict | None = None,
) -> pd.DataFrame:
    """Embeddings covering every image_id of `metadata_df`: `path` read, created or completed.

    `compute_embeddings` with `resume`, quietly; `path=None` computes without saving.
    """
    if path is None:
        return encode_frame(metadata_df.drop_duplicates(IMG_ID_COL), encoder)
    return compute_embeddings(
        metadata_df, path, encoder, resume=True, storage_options=storage_options, progress=False
    )
