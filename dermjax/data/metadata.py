"""Metadata CSV: the original ml_workflow's filters, stratified splits, class list and weights.

Every rule here reproduces the original's metadata loading, stratified splitting and class
handling (classes sorted over the filtered metadata, raw 1/count weights), except the original's
crashes on `datasets=None` / `derm1m_sources=None`, which here mean "all". Splits call sklearn's
`train_test_split` exactly as the original does, so a given seed selects the same rows: over the
whole metadata (`stratified_split`) or per source dataset (`per_dataset_split`, the later
original's `data.per_dataset_split_ratios`); a split of size 0 is None.
Problems the user can fix (missing columns, filters or splits that leave too little data) raise
`DataError` naming the file or config field.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import fsspec
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from dermjax.data import fs
from dermjax.errors import DataError

log = logging.getLogger(__name__)

IMG_ID_COL = "image_id"
IMG_COL = "filename"
LABEL_COL = "label"
TEXT_DESC_COL = "text_desc"
DATASET_COL = "dataset"
ORIG_FILENAME_COL = "orig_filename"

DATA_FRACTION_SEED = 42  # hard-coded in the original, independent of data.seed
DERM1M = "derm1m"
DATASETS = ("fitzpatrick17k", "ddi", "isic", "derm1m", "scin")  # values of the dataset column
# Keys of a data.per_dataset_split_ratios entry; the ratios of a dataset the map lacks
SPLIT_RATIO_KEYS = ("train", "val", "test")
DEFAULT_SPLIT_RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}
DERM1M_SOURCES = ("IIYI", "edu", "note", "public", "pubmed", "reddit", "twitter", "youtube")


# Columns read as text: ids such as DDI's 000001 keep their zeros, labels their exact spelling.
TEXT_COLUMNS = (IMG_ID_COL, IMG_COL, LABEL_COL, TEXT_DESC_COL, DATASET_COL, ORIG_FILENAME_COL)


def read_metadata_csv(path: str, storage_options: dict | None = None) -> pd.DataFrame:
    """Reads the harmonized CSV (or a .gz/.bz2/... of it) from a local path or an fsspec URL."""
    fs.check_credentials(str(path), storage_options)
    try:
        with fsspec.open(str(path), "rb", compression="infer", **(storage_options or {})) as f:
            df = pd.read_csv(f, low_memory=False, dtype=dict.fromkeys(TEXT_COLUMNS, str))
    except FileNotFoundError as e:
        raise DataError(
            f"metadata CSV {path} does not exist; set data.metadata_path (or data.dataset and "
            "data.local_root) to an existing file"
        ) from e
    except IsADirectoryError as e:
        raise DataError(
            f"metadata CSV {path} is a folder; set data.metadata_path to the CSV file itself"
        ) from e
    except UnicodeDecodeError as e:
        raise DataError(f"metadata CSV {path} is not UTF-8 text ({e}); save it as UTF-8") from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"metadata CSV {path} cannot be parsed as CSV ({e}); fix the file") from e
    except OSError as e:  # permissions, a file where a folder should be, ...
        raise DataError(f"metadata CSV {path} cannot be read ({e}); check the path") from e
    if len(df.columns) == 1:
        sep = next((s for s in (";", "\t", "|") if s in str(df.columns[0])), None)
        if sep is not None:
            raise DataError(
                f"metadata CSV {path} looks {sep!r}-separated (one column "
                f"{str(df.columns[0])[:60]!r}...); save it comma-separated"
            )
    return df


def _lines(rows: pd.Index, from_csv: bool) -> str:
    """Up to five rows: as a spreadsheet numbers the CSV's records (the header is row 1), or,
    for a frame, by index label."""
    shown = [str(i + 2) if from_csv else str(i) for i in rows[:5]]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    where = "CSV rows" if from_csv else "rows"
    return f"{where} {', '.join(shown)}{more}{' (header = row 1)' if from_csv else ''}"


def _complete_rows(df: pd.DataFrame, source: str, from_csv: bool) -> pd.DataFrame:
    """Refuses rows without an image id or file; drops rows without a label (the original's
    label counts leave them out too), with a warning."""
    for col in (IMG_ID_COL, IMG_COL):
        empty = df.index[df[col].isna() | (df[col].astype(str).str.strip() == "")]
        if len(empty):
            raise DataError(
                f"{source}: {len(empty)} row(s) without {col} ({_lines(empty, from_csv)}); "
                "fill them in or remove those rows"
            )
    unlabelled = df.index[df[LABEL_COL].isna()]
    if len(unlabelled):
        log.warning(
            "%s: dropping %d row(s) without a label (%s)",
            source,
            len(unlabelled),
            _lines(unlabelled, from_csv),
        )
        df = df[df[LABEL_COL].notna()]
    return df


def _check_selected(df: pd.DataFrame, source: str, from_csv: bool) -> None:
    """Refuses an image id on several selected rows (text embeddings are matched by id); warns
    about one image file on several rows and about labels that differ only in case or spaces
    (separate classes, as in the original)."""
    repeated = df[IMG_ID_COL][df[IMG_ID_COL].duplicated(keep=False)]
    if len(repeated):
        ids = sorted(set(map(str, repeated)))
        raise DataError(
            f"{source}: {len(ids)} image_id value(s) appear on several selected rows (e.g. "
            f"{ids[:5]}; {_lines(repeated.index, from_csv)}); give each row its own id, since "
            "text embeddings are matched by id"
        )
    shared = df[df[IMG_COL].duplicated(keep=False)]
    if len(shared):
        labels = shared.groupby(IMG_COL)[LABEL_COL].nunique()
        conflicting = int((labels > 1).sum())
        log.warning(
            "%s: %d image file(s) appear on several rows (e.g. %s)%s; they may land in "
            "different splits",
            source,
            len(labels),
            sorted(labels.index)[:5],
            f", {conflicting} of them with different labels" if conflicting else "",
        )
    names = pd.Series(df[LABEL_COL].astype(str).unique())
    folded = names.groupby(names.str.strip().str.lower()).agg(list)
    clashes = [sorted(group) for group in folded if len(group) > 1]
    if clashes:
        log.warning(
            "%s: labels that differ only in case or spaces are separate classes: %s",
            source,
            clashes[:5],
        )


def require_columns(
    df: pd.DataFrame, columns: Iterable[str], why: str, source: str = "metadata"
) -> None:
    """Raises DataError naming `source`, the missing columns and the columns it has."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{source} lacks column(s) {missing} needed for {why}; "
            f"columns found: {list(map(str, df.columns))}"
        )


def _as_list(value: str | Sequence[str], name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of strings or None, got {value!r}")
    return list(value)


def text_is_missing(text: pd.Series) -> pd.Series:
    """True where a description is absent: NaN/None or the empty string (both occur upstream)."""
    return text.isna() | (text == "")


def _drop_rare_labels(df: pd.DataFrame, context: str) -> pd.DataFrame:
    """Drops labels with fewer than 2 rows, which stratified splitting cannot place."""
    counts = df[LABEL_COL].value_counts()
    rare = counts[counts < 2]
    if rare.empty:
        return df
    log.warning(
        "%s: dropping %d class(es) with fewer than 2 rows (%d rows): %s",
        context,
        len(rare),
        int(rare.sum()),
        sorted(map(str, rare.index)),
    )
    return df[~df[LABEL_COL].isin(rare.index)]


def load_metadata(
    data: str | pd.DataFrame,
    *,
    min_samples_per_label: int | None = None,
    datasets: Sequence[str] | None = None,
    derm1m_sources: Sequence[str] | None = None,
    has_text: bool | None = None,
    data_fraction: float | None = None,
    storage_options: dict | None = None,
    source: str | None = None,
    min_classes: int = 2,
) -> pd.DataFrame:
    """Loads and filters metadata (a CSV path or a DataFrame) in the original's order.

    1. min_samples_per_label, counted over the whole CSV before any other filter;
    2. datasets (None: all); 3. has_text (True: text present, False: NaN or "", None: all);
    4. derm1m sources, the first path component of orig_filename, when derm1m is selected
       (None: all sources); 5. data_fraction in (0, 1): stratified subsample with seed 42.
    Row order is kept as the original leaves it, since the later splits depend on it.
    `source` names the CSV in errors (default: `data` when it is a path). Raises DataError
    when columns are missing or the filters leave fewer than `min_classes` classes (a
    classifier needs 2).
    """
    from_csv = not isinstance(data, pd.DataFrame)
    if from_csv:
        df, source = read_metadata_csv(data, storage_options), source or str(data)
    else:
        df, source = data.copy(), source or "metadata"
    require_columns(df, [IMG_ID_COL, IMG_COL, LABEL_COL], "every run", source)
    df = _complete_rows(df, source, from_csv)
    log.info("metadata: %d rows, %d labels", len(df), df[LABEL_COL].nunique())

    if min_samples_per_label is not None:
        counts = df[LABEL_COL].value_counts()
        kept = counts.index[counts >= min_samples_per_label]
        df = df[df[LABEL_COL].isin(kept)]
        log.info(
            "min_samples_per_label=%d (counted over the whole CSV): %d rows, %d labels",
            min_samples_per_label,
            len(df),
            len(kept),
        )

    selected = None if datasets is None else _as_list(datasets, "datasets")
    if selected is not None:
        require_columns(df, [DATASET_COL], "the data.datasets filter", source)
        present = df[DATASET_COL]
        df = df[df[DATASET_COL].isin(selected)]
        if df.empty and not present.empty:
            raise DataError(
                f"{source}: no row's dataset is in data.datasets={selected}; the dataset column "
                f"holds {sorted(map(str, present.dropna().unique()))[:10]}"
            )
        log.info("datasets=%s: %d rows", selected, len(df))

    if has_text is not None:
        require_columns(df, [TEXT_DESC_COL], "the data.has_text filter", source)
        missing = text_is_missing(df[TEXT_DESC_COL])
        df = df[~missing] if has_text else df[missing]
        log.info("has_text=%s: %d rows", has_text, len(df))

    if derm1m_sources is not None and (selected is None or DERM1M in selected):
        sources = _as_list(derm1m_sources, "derm1m_sources")
        require_columns(
            df, [DATASET_COL, ORIG_FILENAME_COL], "the data.derm1m_sources filter", source
        )
        source_of_row = df[ORIG_FILENAME_COL].astype("string").str.split("/").str[0]
        df = df[(df[DATASET_COL] != DERM1M) | source_of_row.isin(sources)]
        log.info("derm1m_sources=%s: %d rows", sources, len(df))

    filters = {
        "data.min_samples_per_label": min_samples_per_label,
        "data.datasets": datasets,
        "data.derm1m_sources": derm1m_sources,
        "data.has_text": has_text,
    }
    _check_selected(df, source, from_csv)
    if data_fraction is not None:
        if 0 < data_fraction < 1:
            df = _drop_rare_labels(df, "data_fraction")
            filters["data.data_fraction"] = data_fraction
            check_classes(df, source, filters, min_classes)
            _check_fraction(len(df), df[LABEL_COL].nunique(), data_fraction)
            df, _ = train_test_split(
                df,
                train_size=data_fraction,
                stratify=df[LABEL_COL],
                random_state=DATA_FRACTION_SEED,
            )
            log.info("data_fraction=%g (seed 42): %d rows", data_fraction, len(df))
        elif data_fraction != 1:
            log.warning("data_fraction=%g is outside (0, 1]; ignored", data_fraction)

    check_classes(df, source, filters, min_classes)
    log.info("metadata after filters: %d rows, %d labels", len(df), df[LABEL_COL].nunique())
    return df


def _check_fraction(n: int, k: int, fraction: float) -> None:
    """DataError unless a stratified subsample keeping `fraction` of `n` rows (sklearn keeps
    floor(fraction * n)) leaves both parts at least one row of each of the `k` classes."""
    kept = math.floor(fraction * n)
    if kept >= k and n - kept >= k:
        return
    low, high = _fraction_range(n, k)
    raise DataError(
        f"data.data_fraction={fraction} keeps {kept} of {n} rows, and a stratified subsample "
        f"needs at least {k} (one per class) on each side; use data.data_fraction between "
        f"{low} and {high}, or 1 for all rows"
    )


def check_classes(
    df: pd.DataFrame, source: str, filters: dict[str, object], min_classes: int = 2
) -> None:
    """Raises DataError if `df` has fewer than `min_classes` labels, naming the filters set."""
    classes = df[LABEL_COL].nunique() if len(df) else 0
    if classes >= min_classes:
        return
    applied = ", ".join(f"{k}={v!r}" for k, v in filters.items() if v is not None) or "none"
    raise DataError(
        f"{source}: {len(df)} row(s) and {classes} class(es) left after the filters ({applied}); "
        f"at least {min_classes} classes are needed: relax these filters"
    )


def stratified_split(
    df: pd.DataFrame, *, test_size: float, val_size: float | None, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """Splits into (train, val, test), stratified on label; a split of size 0 or None is None.

    test is taken first; val is then taken from the rest with val_size / (1 - test_size), so
    both fractions refer to the whole. With test_size 0, val is taken from all rows with
    val_size itself. Labels with fewer than 2 rows are dropped before each split (the second
    time from the train part only), as in the original; with no split at all every row stays.
    """
    require_columns(df, [LABEL_COL], "stratified splitting")
    val_size = val_size or 0.0
    if test_size == 0 and val_size == 0:
        log.info("split: train %d (no val, no test)", len(df))
        return df, None, None
    if test_size == 0:
        df = _drop_rare_labels(df, "split (before val)")
        train, val = _take(df, val_size, seed, "data.val_size", "validation")
        log.info("split: train %d, val %d, no test", len(train), len(val))
        return train, val, None
    df = _drop_rare_labels(df, "split (before test)")
    train, test = _take(df, test_size, seed, "data.test_size", "test")
    if val_size == 0:
        log.info("split: train %d, test %d", len(train), len(test))
        return train, None, test
    train = _drop_rare_labels(train, "split (train part, before val)")
    adjusted = val_size / (1 - test_size)
    train, val = _take(train, adjusted, seed, "data.val_size", "validation", 1 - test_size)
    log.info("split: train %d, val %d, test %d", len(train), len(val), len(test))
    return train, val, test


def _take(
    df: pd.DataFrame,
    fraction: float,
    seed: int,
    field: str,
    name: str,
    scale: float = 1.0,
    hint: str = "",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest, taken): sklearn's stratified split of `fraction` of `df`, checked beforehand.

    A fraction of 1 takes every row (sklearn would refuse it). `field`, `scale` and `hint`
    word the DataError (see `_check_split_size`).
    """
    if fraction >= 1:
        return df.iloc[:0], df
    _check_split_size(len(df), df[LABEL_COL].nunique(), fraction, scale, field, name, hint)
    rest, taken = train_test_split(
        df, test_size=fraction, stratify=df[LABEL_COL], random_state=seed
    )
    return rest, taken


def _fraction_range(n: int, k: int, scale: float = 1.0) -> tuple[float, float]:
    """(low, high), to 3 decimals inward and times `scale`, of the fractions of `n` rows that
    leave at least `k` rows on each side."""
    return math.ceil(k / n * scale * 1000) / 1000, math.floor((n - k) / n * scale * 1000) / 1000


def _check_split_size(
    n: int, k: int, fraction: float, scale: float, field: str, name: str, hint: str = ""
) -> None:
    """DataError unless sklearn's stratified split of `n` rows and `k` classes can be made.

    sklearn takes ceil(fraction * n) rows for the split and needs at least one row per class on
    both sides. `fraction * scale` is the config value; the suggestion is in those units. Every
    class has 2 or more rows here (rarer ones are dropped first), so some fraction always works.
    `hint` ends the message (another way out).
    """
    if k == 0:
        raise DataError(
            f"no class has the 2 rows a stratified {name} split needs ({field}); "
            f"use more data, a smaller data.test_size, or {field}=None{hint}"
        )
    taken = math.ceil(fraction * n)
    if taken >= k and n - taken >= k:
        return
    side = f"the {name} split" if taken < k else "the rest"
    low, high = _fraction_range(n, k, scale)
    raise DataError(
        f"{field}={round(fraction * scale, 6)} takes {taken} of {n} rows for the {name} split, "
        f"leaving {side} with fewer rows than the {k} classes; use {field} between {low} and "
        f"{high}{hint}"
    )


def per_dataset_split(
    df: pd.DataFrame, ratios: Mapping[str, Mapping[str, float]], *, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """Splits every dataset on its own `{train, val, test}` ratios and concatenates the parts.

    The original's `data.per_dataset_split_ratios`: datasets in order of first appearance (a
    missing one gets 0.8/0.1/0.1 with a warning; a missing ratio key counts as 0, not as the
    original's 0.8/0.1/0.1); labels with fewer than 2 rows in the dataset are dropped; test is
    taken first with `test`, then val from the rest with val / (train + val) after dropping
    labels with fewer than 2 rows there (with test 0: val itself, from all rows); sklearn's
    stratified split with `random_state=seed` every time. An empty val or test is None.
    """
    require_columns(df, [LABEL_COL, DATASET_COL], "data.per_dataset_split_ratios")
    parts: dict[str, list[pd.DataFrame]] = {"train": [], "val": [], "test": []}
    for dataset in df[DATASET_COL].unique():
        if dataset not in ratios:
            log.warning(
                "data.per_dataset_split_ratios has no entry for %r: using %s",
                dataset,
                DEFAULT_SPLIT_RATIOS,
            )
        r = ratios.get(dataset, DEFAULT_SPLIT_RATIOS)
        train_r, val_r, test_r = (float(r.get(k) or 0.0) for k in SPLIT_RATIO_KEYS)
        if not 0.99 <= train_r + val_r + test_r <= 1.01:
            raise DataError(
                f"data.per_dataset_split_ratios.{dataset}={dict(r)}: train + val + test must be "
                "1 (within 0.01)"
            )
        field = f"data.per_dataset_split_ratios.{dataset}"
        hint = f" (and adjust the other ratios of {dataset}), or drop {dataset} from data.datasets"
        part = _drop_rare_labels(df[df[DATASET_COL] == dataset], f"{field} (before splitting)")
        if part.empty:
            log.warning("%s: no rows left after dropping rare labels; skipped", field)
            continue
        test = part.iloc[:0]
        if test_r > 0:
            part, test = _take(part, test_r, seed, f"{field}.test", f"{dataset} test", 1.0, hint)
        val = part.iloc[:0]
        if val_r > 0 and test_r > 0:
            part = _drop_rare_labels(part, f"{field} (train part, before val)")
        if val_r > 0 and not part.empty:
            fraction, scale = (
                (val_r / (train_r + val_r), train_r + val_r) if test_r > 0 else (val_r, 1)
            )
            part, val = _take(part, fraction, seed, f"{field}.val", f"{dataset} val", scale, hint)
        log.info("%s: train %d, val %d, test %d", field, len(part), len(val), len(test))
        for name, rows in (("train", part), ("val", val), ("test", test)):
            parts[name].append(rows)
    train, val, test = (
        pd.concat(parts[n], ignore_index=True) if parts[n] else df.iloc[:0].reset_index(drop=True)
        for n in ("train", "val", "test")
    )
    if train.empty:
        raise DataError(
            "data.per_dataset_split_ratios leaves no training rows; give some dataset train > 0"
        )
    log.info("per-dataset split: train %d, val %d, test %d", len(train), len(val), len(test))
    return train, (val if len(val) else None), (test if len(test) else None)


def class_list(df: pd.DataFrame) -> list[str]:
    """Sorted unique labels (as str) of the filtered metadata, taken before splitting."""
    return sorted(df[LABEL_COL].astype(str).unique())


def class_weights(train_df: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """Raw inverse frequencies 1/count in class order; 1.0 for classes absent from train."""
    counts = train_df[LABEL_COL].astype(str).value_counts()
    absent = [c for c in classes if c not in counts.index]
    if absent:
        log.warning(
            "%d class(es) have no training rows and will never be trained: %s", len(absent), absent
        )
    return np.array([1.0 / counts[c] if c in counts.index else 1.0 for c in classes], np.float32)
