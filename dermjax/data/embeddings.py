"""Text embeddings: the original's parquet layout, a hashing text encoder, and the join to rows.

The parquet file has the original's columns `image_id` (str), `text_desc` (str or null) and
`embedding` (list<float>), one row per image. dermjax also stores the encoder's spec in the
schema metadata so that a file made by another encoder is never silently mixed or overwritten.
Missing text (NaN, "" or no embedding row) becomes the zero vector with `has_text` False.
A file that cannot be used (unreadable, missing columns, mixed dimensions, NaN or inf values)
raises `DataError` naming the file and some of the image_ids concerned.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

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
TEXT_POOLING = ("cls", "mean", "last_token")  # encoder.pooling_type of transformer encoders
SPEC_KEY = b"dermjax.encoder"
_TOKEN = re.compile(r"\w+")


class EncoderMismatchError(DataError):
    """An embeddings file was made by a different encoder than the one configured."""


class TextEncoder(Protocol):
    """What `ensure_embeddings` needs: `encode` and a JSON-able `spec` that includes "dim"."""

    @property
    def spec(self) -> dict[str, Any]: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


@lru_cache(maxsize=1 << 18)
def _hash64(gram: str, seed: int) -> int:
    digest = hashlib.blake2b(gram.encode(), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little")


@dataclasses.dataclass(frozen=True)
class HashingTextEncoder:
    """Deterministic, dependency-free text encoder: signed hashing of word n-grams.

    Each lower-cased word n-gram (n in `ngram`, inclusive) adds +1 or -1 to one of `dim` buckets,
    both chosen by a keyed BLAKE2 hash, so results do not depend on the process or platform.
    Vectors are raw counts, not normalised, like the original's transformer embeddings.
    """

    dim: int = 256
    ngram: tuple[int, int] = (1, 2)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ngram", tuple(self.ngram))
        low, high = self.ngram
        if self.dim < 1 or not 1 <= low <= high:
            raise ValueError(
                f"HashingTextEncoder needs dim >= 1 and 1 <= ngram[0] <= ngram[1], got dim={self.dim}, ngram={self.ngram}"
            )

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "hashing", "dim": self.dim, "ngram": list(self.ngram), "seed": self.seed}

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        low, high = self.ngram
        for row, text in enumerate(texts):
            words = _TOKEN.findall(str(text).lower())
            for n in range(low, high + 1):
                for start in range(len(words) - n + 1):
                    h = _hash64(" ".join(words[start : start + n]), self.seed)
                    out[row, h % self.dim] += 1.0 if h >> 63 else -1.0
        return out


def _canonical_spec(spec: dict[str, Any]) -> dict[str, Any]:
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


def _texts_of(df: pd.DataFrame) -> list[str | None]:
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
    storage_options: dict | None = None,
) -> None:
    """Writes image_id / text_desc / embedding to parquet (local or fsspec URL), atomically."""
    require_columns(df, [IMG_ID_COL, EMBEDDING_COL], "an embeddings file")
    matrix = _stack(df[EMBEDDING_COL].tolist())
    offsets = np.arange(len(df) + 1, dtype=np.int32) * matrix.shape[1]
    table = pa.table(
        {
            IMG_ID_COL: pa.array(df[IMG_ID_COL].astype(str).tolist(), pa.string()),
            TEXT_DESC_COL: pa.array(_texts_of(df), pa.string()),
            EMBEDDING_COL: pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1))),
        }
    )
    if encoder_spec is not None:
        table = table.replace_schema_metadata({SPEC_KEY: json.dumps(encoder_spec, sort_keys=True)})
    target, fs_path = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    target.makedirs(os.path.dirname(fs_path) or ".", exist_ok=True)
    tmp = f"{fs_path}.tmp-{os.getpid()}"
    with target.open(tmp, "wb") as f:
        pq.write_table(table, f)
    target.mv(tmp, fs_path)


def read_embeddings(path: str, storage_options: dict | None = None) -> pd.DataFrame:
    """Reads an embeddings parquet; `embedding` cells become float32 arrays (None if null).

    The encoder spec stored by dermjax (None for files made elsewhere) is in
    `df.attrs["encoder_spec"]`, the path in `df.attrs["source"]`. A missing file raises
    FileNotFoundError; one that is not parquet or lacks a column raises DataError.
    """
    fs.check_credentials(str(path), storage_options)
    try:
        with fsspec.open(str(path), "rb", **(storage_options or {})) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise
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
    spec = (table.schema.metadata or {}).get(SPEC_KEY)
    df.attrs["encoder_spec"] = None if spec is None else json.loads(spec)
    df.attrs[SOURCE_ATTR] = str(path)
    return df


def encode_frame(df: pd.DataFrame, encoder: TextEncoder) -> pd.DataFrame:
    """Embeds each row's text_desc; rows without text get the zero vector (not encoded)."""
    texts = _texts_of(df)
    present = [i for i, t in enumerate(texts) if t is not None]
    encoded = np.asarray(encoder.encode([texts[i] for i in present]), np.float32)
    dim = int(encoder.spec["dim"])
    if encoded.shape != (len(present), dim):
        raise ValueError(
            f"encoder returned shape {encoded.shape}, expected ({len(present)}, {dim})"
        )
    matrix = np.zeros((len(df), dim), np.float32)
    matrix[present] = encoded
    return pd.DataFrame(
        {
            IMG_ID_COL: df[IMG_ID_COL].astype(str).to_numpy(),
            TEXT_DESC_COL: texts,
            EMBEDDING_COL: list(matrix),
        }
    )


def ensure_embeddings(
    metadata_df: pd.DataFrame,
    path: str | None,
    encoder: TextEncoder,
    *,
    storage_options: dict | None = None,
) -> pd.DataFrame:
    """Returns embeddings covering every image_id of `metadata_df`, reading or extending `path`.

    A file that already holds every requested image_id with the same text is used as is. Rows
    that are absent or whose text changed are encoded and merged into the file. A file whose
    stored encoder spec differs from `encoder.spec` raises EncoderMismatchError; so does
    extending a file without a spec. `path=None` computes without saving, as in the original.
    """
    request = metadata_df.drop_duplicates(IMG_ID_COL)
    if path is None:
        return encode_frame(request, encoder)
    fs.check_credentials(str(path), storage_options)
    spec = _canonical_spec(encoder.spec)
    target, fs_path = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    if not target.exists(fs_path):
        log.info("embeddings: encoding %d rows into new file %s", len(request), path)
        result = encode_frame(request, encoder)
        write_embeddings(result, path, encoder_spec=spec, storage_options=storage_options)
        result.attrs[SOURCE_ATTR] = str(path)
        return result

    existing = read_embeddings(path, storage_options)
    stored = existing.attrs["encoder_spec"]
    if stored is not None and stored != spec:
        raise EncoderMismatchError(
            f"embeddings file {path} was made by encoder {stored}, but the config asks for "
            f"{spec}; point encoder.embedding_filename at another file or delete this one"
        )
    known = dict(zip(existing[IMG_ID_COL].astype(str), _texts_of(existing), strict=True))
    wanted = zip(request[IMG_ID_COL].astype(str), _texts_of(request), strict=True)
    stale = [i for i, text in wanted if i not in known or known[i] != text]
    if not stale:
        log.info("embeddings: %s covers all %d requested rows", path, len(request))
        return existing
    if stored is None:
        raise EncoderMismatchError(
            f"embeddings file {path} has no dermjax encoder spec (made elsewhere) and lacks "
            f"{len(stale)} requested row(s), e.g. {stale[:3]}; refusing to extend it with {spec}"
        )
    log.info("embeddings: encoding %d new or changed rows into %s", len(stale), path)
    fresh = encode_frame(request[request[IMG_ID_COL].astype(str).isin(stale)], encoder)
    kept = existing[~existing[IMG_ID_COL].astype(str).isin(stale)]
    result = pd.concat([kept, fresh], ignore_index=True)
    write_embeddings(result, path, encoder_spec=spec, storage_options=storage_options)
    result.attrs[SOURCE_ATTR] = str(path)
    return result


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


def build_records(
    split_df: pd.DataFrame, *, img_prefix: str, class_to_idx: dict[str, int], emb_df: pd.DataFrame
) -> Records:
    """Per-split arrays for the input pipeline: image paths, label indices, text, has_text."""
    from dermjax.data.pipeline import Records  # lazy: importing grain here is not needed

    prefix = str(img_prefix).rstrip("/")
    paths = [f"{prefix}/{str(name).lstrip('/')}" for name in split_df[IMG_COL]]
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
