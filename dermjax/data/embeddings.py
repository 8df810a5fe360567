"""Text embeddings: the original's parquet layout, checking a file, the join to rows.

The parquet file has the original's columns `image_id` (str), `text_desc` (str or null) and
`embedding` (list<float>), one row per image. dermjax also stores in the schema metadata the
encoder's full spec (`dermjax.encoder`) and the settings that chose it (`dermjax.settings`), so
that a file made by another encoder is never silently mixed or overwritten. Missing text (NaN,
"" or no embedding row) becomes the zero vector with `has_text` False; it is never encoded.
A file that cannot be used (unreadable, missing columns, mixed dimensions, NaN or inf values)
raises `DataError` naming the file and some of the image_ids concerned. Which encoder a file
needs, and its derived name, come from `dermjax.data.encoders`; `dermjax.data.encoding` fills
a file.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermjax.data import fs
from dermjax.data.metadata import (
    IMG_COL,
    IMG_ID_COL,
    LABEL_COL,
    TEXT_DESC_COL,
    require_columns,
    text_is_missing,
)
from dermjax.errors import DataError

if TYPE_CHECKING:
    from dermjax.data.pipeline import Records

log = logging.getLogger(__name__)

EMBEDDING_COL = "embedding"
SOURCE_ATTR = "source"  # df.attrs key: the file an embeddings frame was read from
SPEC_KEY = b"dermjax.encoder"
SETTINGS_KEY = b"dermjax.settings"


class EncoderMismatchError(DataError):
    """An embeddings file was made by a different encoder than the one configured."""


def canonical_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(spec, sort_keys=True))


def _as_vector(value: Any) -> np.ndarray | None:
    """One embedding cell (array, list, or the legacy string form) as float32, None if absent."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        value = ast.literal_eval(value)
    return np.asarray(value, np.float32)


def _stack(values: Sequence[Any]) -> np.ndarray:
    vectors = [_as_vector(v) for v in values]
    if any(v is None for v in vectors):
        raise ValueError("every row written to an embeddings file needs an embedding")
    if len({v.shape for v in vectors}) > 1:
        raise ValueError(f"embeddings differ in shape: {sorted({v.shape for v in vectors})}")
    return np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)


def texts_of(df: pd.DataFrame) -> list[str | None]:
    """text_desc as str, None where missing (NaN, "" or no such column)."""
    if TEXT_DESC_COL not in df:
        return [None] * len(df)
    series = df[TEXT_DESC_COL]
    return [
        None if gone else str(t) for t, gone in zip(series, text_is_missing(series), strict=True)
    ]


def write_embeddings(
    df: pd.DataFrame,
    path: str,
    *,
    encoder_spec: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    storage_options: dict | None = None,
) -> None:
    """Writes image_id / text_desc / embedding to parquet (local or fsspec URL), atomically.

    The table goes to a temporary file next to `path`, renamed onto `path` once complete, so a
    reader never sees a partial file. `encoder_spec` and `settings` go into the schema metadata.
    """
    require_columns(df, [IMG_ID_COL, EMBEDDING_COL], "an embeddings file")
    matrix = _stack(df[EMBEDDING_COL].tolist())
    offsets = np.arange(len(df) + 1, dtype=np.int32) * matrix.shape[1]
    table = pa.table(
        {
            IMG_ID_COL: pa.array(df[IMG_ID_COL].astype(str).tolist(), pa.string()),
            TEXT_DESC_COL: pa.array(texts_of(df), pa.string()),
            EMBEDDING_COL: pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1))),
        }
    )
    stored = {SPEC_KEY: encoder_spec, SETTINGS_KEY: settings}
    table = table.replace_schema_metadata(
        {k: json.dumps(v, sort_keys=True) for k, v in stored.items() if v is not None}
    )
    target, fs_path = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    target.makedirs(os.path.dirname(fs_path) or ".", exist_ok=True)
    tmp = f"{fs_path}.tmp-{uuid.uuid4().hex}"  # unique across hosts, whose pids may repeat
    try:
        with target.open(tmp, "wb") as f:
            pq.write_table(table, f)
        target.mv(tmp, fs_path)
    finally:
        if target.exists(tmp):
            target.rm(tmp)


def read_embeddings(path: str, storage_options: dict | None = None) -> pd.DataFrame:
    """Reads an embeddings parquet; `embedding` cells become float32 arrays (None if null).

    The encoder spec and settings stored by dermjax (None for files made elsewhere) are in
    `df.attrs["encoder_spec"]` and `df.attrs["encoder_settings"]`, the path in
    `df.attrs["source"]`. A missing file raises
    FileNotFoundError; one that is not parquet or lacks a column raises DataError.
    """
    fs.check_credentials(str(path), storage_options)
    try:
        with fsspec.open(str(path), "rb", **(storage_options or {})) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise
    except (PermissionError, IsADirectoryError, NotADirectoryError) as e:  # the path, not the file
        raise DataError(
            f"embeddings file {path} cannot be opened ({type(e).__name__}: {e}); check its "
            "permissions and path (data.embeddings_path)"
        ) from e
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"embeddings file {path} cannot be read as parquet ({type(e).__name__}: {e}); "
            "regenerate it or point data.embeddings_path at another file"
        ) from e
    missing = [c for c in (IMG_ID_COL, EMBEDDING_COL) if c not in table.column_names]
    if missing:
        raise DataError(
            f"embeddings file {path} lacks column(s) {missing}; columns found: {table.column_names}"
        )
    df = table.drop_columns([EMBEDDING_COL]).to_pandas()
    column = table.column(EMBEDDING_COL).combine_chunks()
    if pa.types.is_string(column.type):
        df[EMBEDDING_COL] = [_as_vector(v) for v in column.to_pylist()]
    else:
        cells = column.to_numpy(zero_copy_only=False)
        df[EMBEDDING_COL] = [None if c is None else c.astype(np.float32) for c in cells]
    if TEXT_DESC_COL not in df:
        df[TEXT_DESC_COL] = None
    stored = table.schema.metadata or {}
    for attr, key in (("encoder_spec", SPEC_KEY), ("encoder_settings", SETTINGS_KEY)):
        df.attrs[attr] = json.loads(stored[key]) if key in stored else None
    df.attrs[SOURCE_ATTR] = str(path)
    return df


# Where an encoder's weights were loaded from; not compared when both specs name the same weights.
_LOCATION_KEYS = frozenset({"model", "model_id", "revision"})


def spec_differences(
    stored: dict[str, Any], expected: dict[str, Any], names: tuple[str, str] = ("file", "config")
) -> list[str]:
    """One 'key: <names[0]> X, <names[1]> Y' line per key whose value differs (long values
    shortened). Specs with the same `weights_sha256` are the same encoder wherever its folder
    is (moved, copied, re-installed): their model paths and hub revisions are not compared."""

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    stored, expected = canonical_spec(stored), canonical_spec(expected)
    keys = set(stored) | set(expected)
    if stored.get("weights_sha256") and stored.get("weights_sha256") == expected.get(
        "weights_sha256"
    ):
        keys -= _LOCATION_KEYS
    return [
        f"{k}: {names[0]} {short(stored.get(k))}, {names[1]} {short(expected.get(k))}"
        for k in sorted(keys)
        if stored.get(k) != expected.get(k)
    ]


def stale_ids(emb_df: pd.DataFrame, metadata_df: pd.DataFrame, *, with_text: bool) -> list[str]:
    """image_ids of `metadata_df` that `emb_df` lacks, holds without a vector or for another text.

    With `with_text`, only rows that have text count (the ones training needs); otherwise rows
    without text that the file lacks count too.
    """
    vectors = [_as_vector(v) is not None for v in emb_df[EMBEDDING_COL]]
    known = dict(
        zip(
            emb_df[IMG_ID_COL].astype(str),
            zip(texts_of(emb_df), vectors, strict=True),
            strict=True,
        )
    )
    out = []
    for image_id, text in zip(
        metadata_df[IMG_ID_COL].astype(str), texts_of(metadata_df), strict=True
    ):
        stored = known.get(image_id)
        if stored is None:
            if text is not None or not with_text:
                out.append(image_id)
        elif text is not None and (not stored[1] or stored[0] != text):
            out.append(image_id)
    return out


def join_text(
    metadata_df: pd.DataFrame, emb_df: pd.DataFrame, *, dim: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Text vectors for each metadata row, joined 1:1 on image_id -> (float32[N, D], bool[N]).

    Rows whose text is NaN or "" or that have no embedding get zeros and has_text False.
    D is `dim` or the length of the first non-null embedding. Embeddings of another length, or
    with NaN or inf values, raise DataError naming the file (`emb_df.attrs["source"]`).
    """
    require_columns(metadata_df, [IMG_ID_COL, TEXT_DESC_COL], "joining text embeddings")
    source = emb_df.attrs.get(SOURCE_ATTR) or "the text embeddings"
    for name, frame in (("metadata", metadata_df), (source, emb_df)):
        duplicated = frame[IMG_ID_COL][frame[IMG_ID_COL].duplicated()]
        if not duplicated.empty:
            raise DataError(
                f"{name}: image_id must be unique for the 1:1 join; repeated: "
                f"{duplicated.unique()[:5].tolist()}"
            )
    vectors = [_as_vector(v) for v in emb_df[EMBEDDING_COL]]
    emb_ids = emb_df[IMG_ID_COL].astype(str).tolist()
    if dim is None:
        dim = next((len(v) for v in vectors if v is not None), None)
        if dim is None:
            raise DataError(f"{source} holds no embedding to take the text dimension from")
    odd = [i for i, v in zip(emb_ids, vectors, strict=True) if v is not None and v.shape != (dim,)]
    if odd:
        shapes = sorted({v.shape for v in vectors if v is not None})
        raise DataError(
            f"{source}: embeddings of mixed dimensions {shapes}; {len(odd)} differ from {dim}, "
            f"e.g. image_id(s) {odd[:5]}; recompute the file with one encoder"
        )
    ids = metadata_df[IMG_ID_COL].astype(str)
    position = pd.Index(emb_ids).get_indexer(ids)
    texted = ~text_is_missing(metadata_df[TEXT_DESC_COL]).to_numpy()
    has_text = texted & (position >= 0)
    has_text[has_text] = [vectors[p] is not None for p in position[has_text]]
    if (lost := int((texted & ~has_text).sum())) > 0:
        log.warning("%d row(s) with text have no embedding; they are treated as text-less", lost)
    text = np.zeros((len(metadata_df), dim), np.float32)
    if has_text.any():
        text[has_text] = np.stack([vectors[p] for p in position[has_text]])
    bad = ~np.isfinite(text).all(axis=1)
    if bad.any():
        raise DataError(
            f"{source}: NaN or inf text embeddings for image_id(s) {ids[bad].tolist()[:5]} "
            f"({int(bad.sum())} rows); recompute them or drop those rows"
        )
    return text, has_text


def image_paths(split_df: pd.DataFrame, img_prefix: str) -> list[str]:
    """The image path of each row: `img_prefix` joined with its `filename`."""
    prefix = str(img_prefix).rstrip("/")
    return [f"{prefix}/{str(name).lstrip('/')}" for name in split_df[IMG_COL]]


def build_records(
    split_df: pd.DataFrame, *, img_prefix: str, class_to_idx: dict[str, int], emb_df: pd.DataFrame
) -> Records:
    """Per-split arrays for the input pipeline: image paths, label indices, text, has_text."""
    from dermjax.data.pipeline import Records  # lazy: importing grain here is not needed

    paths = image_paths(split_df, img_prefix)
    labels = split_df[LABEL_COL].astype(str)
    unknown = sorted(set(labels) - set(class_to_idx))
    if unknown:
        raise ValueError(f"labels not in class_to_idx: {unknown[:10]}")
    text, has_text = join_text(split_df, emb_df)
    return Records(
        paths=paths,
        labels=labels.map(class_to_idx).to_numpy(np.int32),
        text=text,
        has_text=has_text,
    )
