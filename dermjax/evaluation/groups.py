"""Metrics by group (source dataset, Fitzpatrick skin type) with bootstrap intervals and gaps.

Skin type comes in two codings: Fitzpatrick17k's `fitzpatrick_scale` (1-6, -1 = unknown) and DDI's
`skin_tone` (12, 34, 56 = types I-II, III-IV, V-VI). Both are normalised into `skin_type` ("I" ..
"VI", or "I-II" / "III-IV" / "V-VI" for DDI) and the coarse `skin_type_group` (I-II, III-IV, V-VI)
that the two datasets share. Unknown values are missing: left out of that grouping and counted.

Point estimates per group come from fairlearn's `MetricFrame`; intervals are percentile bootstrap
intervals over each group's rows, computed for all resamples at once from per-row multiplicities.
ECE is biased upward under resampling, so its interval can lie above the point estimate. Groups
smaller than `min_group_size` are reported but left out of the worst-group gap and worst group,
so that a handful of images cannot decide the headline.
Within a group, macro-F1 uses scikit-learn's definition (classes present in the group's labels or
predictions), since a dataset such as DDI covers only some classes and the original's definition
would penalise it for the classes it lacks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame

from dermjax.errors import ConfigError, DataError
from dermjax.evaluation.metrics import check_inputs, expected_calibration_error, macro_auroc
from dermjax.train import metrics as train_metrics

log = logging.getLogger(__name__)

IMAGE_ID = "image_id"
FITZPATRICK_TYPES = ("I", "II", "III", "IV", "V", "VI")
SKIN_TYPE_GROUPS = ("I-II", "III-IV", "V-VI")
DDI_SKIN_TONES = {12: "I-II", 34: "III-IV", 56: "V-VI"}
SKIN_TYPE_SOURCES = ("skin_type", "fitzpatrick_scale", "skin_tone")  # first non-missing wins
CODINGS = {
    "skin_type": "I..VI, I-II, III-IV, V-VI, or either numeric coding",
    "fitzpatrick_scale": "1..6, -1 = unknown",
    "skin_tone": "DDI's 12, 34, 56",
}
MIN_GROUP_SIZE = 10  # evaluation.min_group_size's default
GROUP_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro", "ece")
HIGHER_IS_WORSE = ("ece",)
ECE_BINS = 15
_BOOT_CELLS = 2_000_000  # resamples x rows evaluated per chunk (bounds memory)


def _integers(values: pd.Series) -> pd.Series:
    """Whole numbers as float (NaN elsewhere), accepting "3", 3 and 3.0 (not True/False)."""
    boolean = values.map(lambda v: isinstance(v, bool | np.bool_)).astype(bool)
    numbers = pd.to_numeric(values.where(~boolean), errors="coerce")
    return numbers.where(numbers == np.floor(numbers))


def _named(values: pd.Series, names: Sequence[str]) -> pd.Series:
    """Values that are one of `names` as text (any case, spaces around), None elsewhere."""
    text = values.astype("string").str.strip().str.upper()
    named = text.where(text.isin(names))
    return named.astype(object).where(named.notna(), None)


def fitzpatrick_skin_type(values: pd.Series) -> pd.Series:
    """Fitzpatrick17k `fitzpatrick_scale` 1..6 (or "I".."VI") -> "I".."VI"; -1 and anything
    else -> None."""
    names = dict(enumerate(FITZPATRICK_TYPES, start=1))
    numbers = _integers(values).map(names).astype(object).where(lambda s: s.notna(), None)
    return numbers.combine_first(_named(values, FITZPATRICK_TYPES))


def ddi_skin_type(values: pd.Series) -> pd.Series:
    """DDI `skin_tone` 12 / 34 / 56 (or "I-II".."V-VI") -> "I-II" / "III-IV" / "V-VI"; anything
    else -> None."""
    numbers = _integers(values).map(DDI_SKIN_TONES).astype(object)
    return numbers.where(numbers.notna(), None).combine_first(_named(values, SKIN_TYPE_GROUPS))


def _skin_type_strings(values: pd.Series) -> pd.Series:
    """A `skin_type` column: "I".."VI" or "I-II".. as text (any case), or either numeric coding."""
    return fitzpatrick_skin_type(values).combine_first(ddi_skin_type(values))


def skin_type_group(skin_type: pd.Series) -> pd.Series:
    """Normalised skin type -> its coarse group ("II" -> "I-II"; "III-IV" stays); None stays."""
    coarse = {t: SKIN_TYPE_GROUPS[i // 2] for i, t in enumerate(FITZPATRICK_TYPES)}
    coarse.update({g: g for g in SKIN_TYPE_GROUPS})
    return skin_type.map(coarse).astype(object).where(lambda s: s.notna(), None)


_PARSERS = {
    "skin_type": _skin_type_strings,
    "fitzpatrick_scale": fitzpatrick_skin_type,
    "skin_tone": ddi_skin_type,
}


def add_skin_type(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with `skin_type` and `skin_type_group` from whichever skin-type columns exist."""
    out = frame.copy()
    skin = pd.Series(None, index=frame.index, dtype=object)
    for column in SKIN_TYPE_SOURCES:
        if column in frame.columns:
            parsed = _PARSERS[column](frame[column])
            _warn_outside_coding(column, frame[column], parsed)
            skin = skin.combine_first(parsed)
    out["skin_type"] = skin.astype(object).where(skin.notna(), None)
    out["skin_type_group"] = skin_type_group(out["skin_type"])
    return out


def _warn_outside_coding(column: str, raw: pd.Series, parsed: pd.Series) -> None:
    """Warns about values of a skin-type column that its coding does not know (not -1/empty)."""
    unknown = _group_values(raw).str.strip()
    minus_one = _integers(raw) == -1
    unknown = unknown[unknown.notna() & (unknown != "") & parsed.isna() & ~minus_one]
    if len(unknown):
        examples = sorted(set(unknown))[:5]
        log.warning(
            "%d value(s) of the column %r are outside its skin-type coding (%s), e.g. %s: they "
            "count as unknown skin type",
            len(unknown),
            column,
            CODINGS[column],
            examples,
        )


def load_group_table(path: str) -> pd.DataFrame:
    """Reads a side table (CSV, or parquet by extension) with an `image_id` column, unique ids."""
    is_parquet = str(path).lower().endswith((".parquet", ".pq"))
    try:
        with fsspec.open(str(path), "rb") as f:
            table = pd.read_parquet(f) if is_parquet else pd.read_csv(f, dtype={IMAGE_ID: str})
    except FileNotFoundError as e:
        raise DataError(
            f"group table {path} does not exist; fix evaluation.groups_path or set it to None"
        ) from e
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"group table {path} cannot be read ({e}); fix the file") from e
    if IMAGE_ID not in table.columns:
        raise DataError(
            f"group table {path} lacks the column {IMAGE_ID!r} to join on; "
            f"columns found: {list(map(str, table.columns))}"
        )
    duplicated = table[IMAGE_ID][table[IMAGE_ID].duplicated()]
    if len(duplicated):
        raise DataError(
            f"group table {path} lists {len(duplicated)} image_id(s) more than once, e.g. "
            f"{duplicated.iloc[0]!r}; keep one row per image"
        )
    return table


def _group_values(values: pd.Series) -> pd.Series:
    """Group labels as strings (3.0 -> "3"), None where missing."""

    def label(v: Any) -> str | None:
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            return None
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)

    return pd.Series([label(v) for v in values], index=values.index, dtype=object)


def _join_side_table(
    table: pd.DataFrame, side_table: pd.DataFrame, source: str, strict: bool
) -> pd.DataFrame:
    """`table` with the side table's columns joined on `image_id` (side values win).

    Ids are compared as text, with whole numbers written without ".0". A table that matches
    none of the rows is a DataError when `strict` (the up-front check), else a warning.
    """
    if IMAGE_ID not in table.columns:
        raise DataError(
            f"metadata lacks the column {IMAGE_ID!r} needed to join evaluation.groups_path"
        )
    ids = _group_values(table[IMAGE_ID])
    side = side_table.assign(**{IMAGE_ID: _group_values(side_table[IMAGE_ID])})
    side = side.set_index(IMAGE_ID)
    matched = int(ids.isin(side.index).sum())
    if matched == 0 and len(ids) and len(side):
        numeric = pd.api.types.is_numeric_dtype(side_table[IMAGE_ID])
        unpadded = ids.dropna().map(lambda i: i.lstrip("0") or "0")
        lost = unpadded[unpadded.isin(side.index)]  # ids the table holds without their zeros
        theirs, ours = (
            (lost.iloc[0], ids[lost.index[0]]) if len(lost) else (side.index[0], ids.iloc[0])
        )
        message = (
            f"evaluation.groups_path: {source} matches none of the {len(ids)} rows' image_id "
            f"values (the table has e.g. {theirs!r}, the metadata {ours!r})"
            + (
                "; its image_id column holds numbers, so ids such as '000001' lost their "
                "leading zeros: store image_id as text"
                if numeric
                else "; its ids lost their leading zeros (e.g. written by a spreadsheet): "
                "write image_id with them, as in the metadata"
                if len(lost)
                else "; fix the table's image_id column"
            )
        )
        if strict:
            raise DataError(message)
        log.warning("%s", message)
    else:
        log.info("group table %s: values for %d of %d rows", source, matched, len(ids))
    out = table.copy()
    for column in side.columns:
        joined = ids.map(side[column])
        out[column] = joined.where(joined.notna(), table.get(column))
    return out


def group_frame(
    meta: pd.DataFrame,
    group_columns: Sequence[str] | None = None,
    side_table: pd.DataFrame | None = None,
    *,
    side_source: str = "the group table",
    strict: bool = True,
) -> pd.DataFrame:
    """One string column per grouping, aligned to `meta`'s rows (None = no group for that row).

    The side table is joined on `image_id` and its columns win where both have a value; one
    that matches no row is refused (`strict`) or warned about. Without `group_columns`:
    `dataset` when present, plus `skin_type_group` when any skin-type source (`skin_type`,
    `fitzpatrick_scale`, `skin_tone`) is present. A skin-type source named in `group_columns`
    is given in its normalised names ("III", "III-IV"), its unknown values missing.
    """
    table = meta
    if side_table is not None:
        table = _join_side_table(meta, side_table, side_source, strict)
    wanted = {"skin_type_group"} if group_columns is None else set(group_columns)
    if wanted & {"skin_type_group", *SKIN_TYPE_SOURCES} and set(SKIN_TYPE_SOURCES) & set(table):
        table = add_skin_type(table)  # its `skin_type` replaces a raw one
        for column in set(SKIN_TYPE_SOURCES) & set(group_columns or ()) & set(table.columns):
            table[column] = _PARSERS[column](table[column])
    if group_columns is None:
        columns = [c for c in ("dataset", "skin_type_group") if c in table.columns]
    else:
        columns = list(group_columns)
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise ConfigError(
                f"evaluation.group_columns: {missing} not found in the metadata or side table; "
                f"available: {list(map(str, table.columns))}"
            )
    return pd.DataFrame({c: _group_values(table[c]) for c in columns}, index=meta.index)


def _sort_key(value: str) -> tuple[int, str]:
    order = FITZPATRICK_TYPES + SKIN_TYPE_GROUPS
    return (order.index(value), "") if value in order else (len(order), value)


def _point_metrics(probs: np.ndarray) -> dict[str, Callable]:
    """The per-group metrics as MetricFrame callables.

    MetricFrame passes per-sample parameters as 1-D columns, so the score metrics receive the row
    numbers (`rows`) of their group and look the probabilities up here.
    """
    num_classes = probs.shape[1]

    def balanced(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        cm = train_metrics.confusion_matrix(y_true, y_pred, num_classes)
        return train_metrics.balanced_accuracy(cm)

    def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        cm = train_metrics.confusion_matrix(y_true, y_pred, num_classes)
        return float(_resample_f1(cm[None])[0])

    def auroc(y_true: np.ndarray, y_pred: np.ndarray, rows: np.ndarray) -> float:
        value = macro_auroc(y_true, probs[rows])
        return np.nan if value is None else value

    def ece(y_true: np.ndarray, y_pred: np.ndarray, rows: np.ndarray) -> float:
        return expected_calibration_error(y_true, probs[rows], ECE_BINS)

    return {
        "n": lambda y_true, y_pred: len(y_true),
        "accuracy": lambda y_true, y_pred: float(np.mean(y_true == y_pred)),
        "balanced_accuracy": balanced,
        "macro_f1": macro_f1,
        "auroc_macro": auroc,
        "ece": ece,
    }


def _resample_f1(cm: np.ndarray) -> np.ndarray:
    """scikit-learn macro-F1 of each [C, C] matrix in cm [B, C, C]: classes seen in row or column."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    seen = cm.sum(axis=2) + cm.sum(axis=1)
    f1 = np.divide(2 * tp, seen, out=np.zeros(tp.shape), where=seen > 0)
    return f1.sum(axis=1) / np.maximum((seen > 0).sum(axis=1), 1)


def _weighted_auroc(weights: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUROC [B] for rows weighted by multiplicities weights [m, B] (float32).

    AUROC = (sum over positives of the negative weight ranked below them, ties counting half) /
    (positives x negatives). With rows sorted by score and `cum` the running negative weight, a
    positive in the tie block [s, e) contributes (cum[s] + cum[e]) / 2. Classes without positives
    or negatives in a resample are left out of its mean (NaN if none remain).
    """
    m, b = weights.shape
    total, count = np.zeros(b), np.zeros(b)
    cum = np.zeros((m + 1, b), dtype=weights.dtype)  # whole numbers <= m: exact in float32
    for c in range(probs.shape[1]):
        positive = labels == c
        if positive.all() or not positive.any():
            continue
        order = np.argsort(probs[:, c], kind="stable")
        scores = probs[order, c]
        new_block = np.r_[True, scores[1:] != scores[:-1]]
        block_starts = np.flatnonzero(new_block)
        block = np.cumsum(new_block) - 1
        pos = np.flatnonzero(positive[order])
        start, end = block_starts[block[pos]], np.r_[block_starts[1:], m][block[pos]]
        w = weights[order]
        np.cumsum(np.where(positive[order, None], 0, w), axis=0, out=cum[1:])
        w_pos = w[pos]
        twice_u = (w_pos * (cum[start] + cum[end])).sum(axis=0, dtype=np.float64)
        n_pos = w_pos.sum(axis=0, dtype=np.float64)
        den = 2.0 * n_pos * (m - n_pos)
        ok = den > 0
        total[ok] += twice_u[ok] / den[ok]
        count[ok] += 1
    return np.divide(total, count, out=np.full(b, np.nan), where=count > 0)


def _resample_metrics(
    weights: np.ndarray, labels: np.ndarray, probs: np.ndarray
) -> dict[str, np.ndarray]:
    """GROUP_METRICS [B] of B resamples given as row multiplicities weights [m, B]."""
    num_classes = probs.shape[1]
    m = labels.size
    preds = probs.argmax(axis=1)
    correct = (preds == labels).astype(weights.dtype)
    codes = labels * num_classes + preds
    order = np.argsort(codes, kind="stable")
    unique, starts = np.unique(codes[order], return_index=True)
    cm = np.zeros((num_classes * num_classes, weights.shape[1]))
    cm[unique] = np.add.reduceat(weights[order], starts, axis=0)
    cm = cm.T.reshape(-1, num_classes, num_classes)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    recall = np.divide(tp, support, out=np.zeros(tp.shape), where=support > 0)
    confidence = probs.max(axis=1)
    bins = np.clip(np.ceil(confidence * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
    by_bin = np.argsort(bins, kind="stable")
    _, bin_starts = np.unique(bins[by_bin], return_index=True)
    gaps = weights[by_bin] * (correct - confidence)[by_bin, None]  # no BLAS: fast on busy CPUs
    return {
        "accuracy": np.einsum("i,ib->b", correct, weights) / m,
        "balanced_accuracy": recall.sum(axis=1) / (support > 0).sum(axis=1),
        "macro_f1": _resample_f1(cm),
        "auroc_macro": _weighted_auroc(weights, labels, probs),
        "ece": np.abs(np.add.reduceat(gaps, bin_starts, axis=0)).sum(axis=0) / m,
    }


def _resample_weights(rng: np.random.Generator, m: int, b: int) -> np.ndarray:
    """Multiplicities [m, b] (float32: exact, half the traffic) of each row in b bootstrap resamples of m rows."""
    flat = (rng.integers(0, m, size=(b, m)) * b + np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=m * b).reshape(m, b).astype(np.float32)


def bootstrap_intervals(
    labels: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals [lo, hi] of GROUP_METRICS over these rows (fixed seed).

    None for a metric that no resample defines (e.g. AUROC with a single class).
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    rng = np.random.default_rng(seed)
    m = labels.size
    chunk = max(1, _BOOT_CELLS // m)
    samples: dict[str, list[np.ndarray]] = {k: [] for k in GROUP_METRICS}
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        for name, values in _resample_metrics(_resample_weights(rng, m, b), labels, probs).items():
            samples[name].append(values)
    out: dict[str, list[float] | None] = {}
    for name, parts in samples.items():
        values = np.concatenate(parts) if parts else np.zeros(0)
        values = values[~np.isnan(values)]
        tail = (1 - ci) / 2 * 100
        out[name] = np.percentile(values, [tail, 100 - tail]).tolist() if values.size else None
    return out


def _worst(by_group: dict[str, dict[str, Any]], min_size: int) -> tuple[dict, dict]:
    """(max - min over groups, the worst group) per metric, over groups of `min_size` or more
    rows; None where fewer than two such groups have a value (nothing to compare)."""
    gaps: dict[str, float | None] = {}
    worst: dict[str, str | None] = {}
    for name in GROUP_METRICS:
        values = {
            g: m[name] for g, m in by_group.items() if m[name] is not None and m["n"] >= min_size
        }
        if len(values) < 2:
            gaps[name], worst[name] = None, None
            continue
        gaps[name] = float(max(values.values()) - min(values.values()))
        pick = max if name in HIGHER_IS_WORSE else min
        worst[name] = pick(values, key=values.get)
    return gaps, worst


def group_metrics(
    labels: Any,
    probs: Any,
    groups: pd.DataFrame,
    classes: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    min_group_size: int = MIN_GROUP_SIZE,
) -> dict[str, Any]:
    """Per grouping column: metrics of each group with bootstrap intervals, gaps, missing count.

    Returns {column: {"groups": {value: {"n", metric, "<metric>_ci": [lo, hi] or None, ...}},
    "worst_group_gap": {metric: max - min}, "worst_group": {metric: value}, "n_missing": int,
    "min_group_size": int, "small_groups": [value, ...]}} with metrics accuracy,
    balanced_accuracy, macro_f1, auroc_macro and ece (lower is better; its worst group is the
    highest). Rows whose group is missing are left out of that column; groups of fewer than
    `min_group_size` rows (`small_groups`) are left out of the gap and the worst group.
    `n_boot=0` skips the intervals (None).
    """
    labels, probs = check_inputs(labels, probs, len(classes))
    if len(groups) != labels.size:
        raise ValueError(f"groups has {len(groups)} rows for {labels.size} samples")
    preds = probs.argmax(axis=1)
    out: dict[str, Any] = {}
    for column in groups.columns:
        values = _group_values(groups[column]).to_numpy(dtype=object)
        present = pd.notna(values)
        by_group: dict[str, dict[str, Any]] = {}
        if present.any():
            rows = np.flatnonzero(present)
            frame = MetricFrame(
                metrics=_point_metrics(probs),
                y_true=labels[present],
                y_pred=preds[present],
                sensitive_features=pd.Series(values[present], name=str(column)),
                sample_params={name: {"rows": rows} for name in ("auroc_macro", "ece")},
            )
            table = frame.by_group
            for value in sorted(table.index, key=_sort_key):
                row = table.loc[value]
                members = present & (values == value)
                stats: dict[str, Any] = {"n": int(row["n"])}
                intervals = (
                    bootstrap_intervals(labels[members], probs[members], n_boot, seed, ci)
                    if n_boot > 0
                    else dict.fromkeys(GROUP_METRICS)
                )
                for name in GROUP_METRICS:
                    point = float(row[name])
                    stats[name] = point if np.isfinite(point) else None
                    stats[f"{name}_ci"] = intervals[name]
                by_group[str(value)] = stats
        gaps, worst = _worst(by_group, min_group_size)
        out[str(column)] = {
            "groups": by_group,
            "worst_group_gap": gaps,
            "worst_group": worst,
            "n_missing": int((~present).sum()),
            "min_group_size": min_group_size,
            "small_groups": [g for g, m in by_group.items() if m["n"] < min_group_size],
        }
    return out
