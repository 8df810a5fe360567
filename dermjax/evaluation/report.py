"""A self-contained HTML report of one evaluation, with its PNG plots.

`write_report` draws the plots with matplotlib's object API (no pyplot, so no global backend or
figure state; rendering is Agg), saves them under `out_dir/plots/` and embeds the same PNGs as
base64 data URIs in `out_dir/report.html`, which therefore opens anywhere on its own. Every table
cell is HTML-escaped. A plot without data (a grouping with fewer than two groups, no epoch
records) is replaced by a sentence, so the report never points at a missing image.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dermjax.tracking import to_jsonable

ABLATION_MODES = ("image_only", "text_only", "both")
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro", "ece")
CURVE_PANELS = (
    ("loss", ("train/loss", "val/loss")),
    ("accuracy and macro-F1", ("train/accuracy", "val/accuracy", "train/macro_f1", "val/macro_f1")),
)
PER_CLASS_KEYS = ("precision", "recall", "f1", "support", "auroc")
PREVIEW_ROWS = 20
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
img { max-width: 100%; }
pre { background: #f7f7f7; padding: 1em; overflow: auto; font-size: 0.85em; }
.note { color: #666; }
"""


def _fmt(value: Any) -> str:
    """A table cell: 3 decimals for floats, '–' for missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _fmt_ci(interval: Sequence[float] | None) -> str:
    return "–" if not interval else f"{interval[0]:.3f}–{interval[1]:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; every cell is formatted with `_fmt` and escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    """Row-normalised confusion matrix (rows = true class), values written in small matrices."""
    cm = np.asarray(matrix, dtype=np.float64)
    support = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)
    size = max(4.5, 0.45 * len(classes) + 2.5)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels=classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalised)")
    if len(classes) <= 20:
        for (i, j), v in np.ndenumerate(norm):
            color = "white" if v > 0.5 else "black"
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
    return _png(fig)


def plot_per_class_recall(per_class: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Horizontal recall bars, one per class, labelled with its support."""
    names = list(per_class)
    recall = [per_class[c]["recall"] or 0.0 for c in names]
    fig = Figure(figsize=(6.5, max(3.0, 0.35 * len(names) + 1.2)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, recall, color="#4c72b0")
    labels = [f"{c} (n={per_class[c]['support']})" for c in names]
    ax.set_yticks(y, labels=labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("recall")
    ax.set_title("Recall per class")
    return _png(fig)


def plot_reliability(reliability: Mapping[str, Sequence[Any]], ece: float | None) -> bytes:
    """Reliability diagram (accuracy per confidence bin against the diagonal) with bin counts."""
    edges = np.asarray(reliability["edges"])
    width = np.diff(edges)
    centres = edges[:-1] + width / 2
    acc = [np.nan if a is None else a for a in reliability["accuracy"]]
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.bar(centres, acc, width=width, edgecolor="#333", color="#4c72b0", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="#c44e52", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability (ECE = {_fmt(ece)})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, reliability["count"], width=width, edgecolor="#333", color="#999")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("samples")
    return _png(fig)


def plot_group_metrics(column: str, result: Mapping[str, Any]) -> bytes | None:
    """Accuracy and macro-F1 per group with bootstrap intervals; None with fewer than 2 groups."""
    groups = {g: m for g, m in result["groups"].items() if m["n"] > 0}
    if len(groups) < 2:
        return None
    x = np.arange(len(groups))
    fig = Figure(figsize=(max(5.0, 1.1 * len(groups) + 2), 4), layout="constrained")
    ax = fig.subplots()
    bars = ((-0.2, "accuracy", "#4c72b0"), (0.2, "macro_f1", "#dd8452"))
    for offset, metric, color in bars:
        points = np.array([np.nan if m[metric] is None else m[metric] for m in groups.values()])
        errors = np.zeros((2, len(groups)))
        for i, m in enumerate(groups.values()):
            if m.get(f"{metric}_ci") and m[metric] is not None:
                lo, hi = m[f"{metric}_ci"]
                errors[:, i] = max(m[metric] - lo, 0.0), max(hi - m[metric], 0.0)
        ax.bar(x + offset, points, width=0.4, yerr=errors, capsize=3, color=color, label=metric)
    ax.set_xticks(x, labels=[f"{g}\n(n={m['n']})" for g, m in groups.items()], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (95% bootstrap interval)")
    ax.set_title(f"Metrics by {column}")
    ax.legend(fontsize=8)
    return _png(fig)


def read_epoch_records(metrics_jsonl: str) -> list[dict[str, Any]]:
    """The `epoch` records of a run's metrics.jsonl (unreadable lines skipped; [] if no file)."""
    try:
        with fsspec.open(metrics_jsonl, "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("event") == "epoch":
            records.append(record)
    return records


def plot_training_curves(records: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Loss and accuracy/macro-F1 per epoch from `epoch` records; None without any."""
    if not records:
        return None
    x = [r.get("epoch", r.get("step")) for r in records]
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, (title, keys) in zip(fig.subplots(1, 2), CURVE_PANELS, strict=True):
        for key in keys:
            points = [
                (xi, r[key])
                for xi, r in zip(x, records, strict=True)
                if isinstance(r.get(key), (int, float))
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if ax.has_data():
            ax.legend(fontsize=8)
    return _png(fig)


def _overall_rows(overall: Mapping[str, Any]) -> list[tuple[str, Any]]:
    rows = [
        ("samples", overall.get("n")),
        ("accuracy", overall.get("accuracy")),
        ("balanced accuracy", overall.get("balanced_accuracy")),
        ("macro-F1 (original: mean over all classes)", overall.get("macro_f1")),
        ("macro-F1 (scikit-learn: classes present)", overall.get("macro_f1_sklearn")),
    ]
    rows += [(f"top-{k} accuracy", v) for k, v in overall.get("top_k_accuracy", {}).items()]
    rows += [
        ("AUROC (one-vs-rest, macro)", overall.get("auroc_macro")),
        ("expected calibration error", overall.get("ece")),
        ("Brier score", overall.get("brier")),
    ]
    return rows


def _group_section(column: str, result: Mapping[str, Any], image: str | None) -> str:
    parts = [f"<h3>{html.escape(column)}</h3>"]
    groups = result.get("groups", {})
    if image is None:
        parts.append(f"<p class='note'>{len(groups)} group(s) with data: no comparison plot.</p>")
    else:
        parts.append(image)
    if groups:
        header = ["group", "n"] + [f"{m} (95% CI)" for m in SUMMARY_METRICS]
        rows = [
            [g, m["n"]] + [f"{_fmt(m[k])} ({_fmt_ci(m.get(f'{k}_ci'))})" for k in SUMMARY_METRICS]
            for g, m in groups.items()
        ]
        rows.append(
            ["gap (max − min)", ""] + [result["worst_group_gap"][k] for k in SUMMARY_METRICS]
        )
        rows.append(["worst group", ""] + [result["worst_group"][k] for k in SUMMARY_METRICS])
        parts.append(_table(header, rows))
    small = result.get("small_groups") or []
    if small:
        names = html.escape(", ".join(map(str, small)))
        parts.append(
            f"<p class='note'>Fewer than {result.get('min_group_size')} samples, so left out of "
            f"the gap and the worst group: {names}.</p>"
        )
    parts.append(
        f"<p class='note'>{result.get('n_missing', 0)} sample(s) without a {html.escape(column)} "
        "value are left out. Macro-F1 within a group averages the classes present in it. "
        "Intervals are 95% percentile bootstrap intervals; resampling biases ECE upward, so its "
        "interval can lie above the point estimate.</p>"
    )
    return "\n".join(parts)


def _describe(checkpoint: Any) -> str:
    """A checkpoint given as a path or as {"directory", "step", ...}."""
    if isinstance(checkpoint, Mapping):
        rest = ", ".join(f"{k} {v}" for k, v in checkpoint.items() if k != "directory")
        return (
            f"{checkpoint.get('directory', '?')} ({rest})"
            if rest
            else str(checkpoint.get("directory"))
        )
    return "?" if checkpoint is None else str(checkpoint)


def _header(evaluation: Mapping[str, Any], num_classes: int) -> str:
    """The line under the title: checkpoint, samples, classes, inputs, unreadable images."""
    parts = [
        f"checkpoint <code>{html.escape(_describe(evaluation.get('checkpoint')))}</code>",
        f"{_fmt(evaluation.get('overall', {}).get('n'))} samples",
        f"{num_classes} classes",
    ]
    if evaluation.get("mode"):
        parts.append(f"inputs: {html.escape(str(evaluation['mode']))}")
    if evaluation.get("bad_images"):
        parts.append(f"{len(evaluation['bad_images'])} unreadable image(s) left out")
    notes = "".join(
        f"<p class='note'><strong>{html.escape(str(n))}</strong></p>"
        for n in evaluation.get("notes") or ()
    )
    return "<p>" + ", ".join(parts) + ".</p>" + notes


def _preview(predictions: pd.DataFrame | None) -> str:
    """The first rows of the predictions, without the per-class probability columns."""
    if predictions is None or predictions.empty:
        return "<p class='note'>No predictions.</p>"
    first = predictions.iloc[0]
    scalar = [c for c in predictions.columns if np.ndim(first[c]) == 0]
    columns = [c for c in scalar if not str(c).startswith("prob_")][:12]
    rows = predictions[columns].head(PREVIEW_ROWS).itertuples(index=False)
    note = f"<p class='note'>{len(predictions)} rows; the first {PREVIEW_ROWS} shown.</p>"
    return note + _table([str(c) for c in columns], [list(r) for r in rows])


def write_report(
    out_dir: str,
    evaluation: Mapping[str, Any],
    predictions: pd.DataFrame | None,
    classes: Sequence[str],
    metrics_jsonl: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> str:
    """Writes `out_dir/plots/*.png` and a self-contained `out_dir/report.html`; returns its path.

    `evaluation` = {"split", "checkpoint", "overall": classification_metrics(...), "groups":
    group_metrics(...), optional "ablation": {"image_only" | "text_only" | "both": overall-like}}.
    """
    out_dir = str(out_dir).rstrip("/")
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(f"{root}/plots", exist_ok=True)

    def figure(name: str, png: bytes | None, caption: str) -> str | None:
        """Saves the plot under plots/ and returns its <figure> (None when there is no plot)."""
        if png is None:
            return None
        with fs.open(f"{root}/plots/{name}.png", "wb") as f:
            f.write(png)
        data = base64.b64encode(png).decode("ascii")
        alt = html.escape(caption, quote=True)
        return f"<figure><img src='data:image/png;base64,{data}' alt='{alt}'></figure>"

    overall = evaluation.get("overall", {})
    split = str(evaluation.get("split", "?"))
    body = [
        f"<h1>dermjax evaluation: {html.escape(split)} split</h1>",
        _header(evaluation, len(classes)),
        "<h2>Overall</h2>",
        _table(["metric", "value"], _overall_rows(overall)),
    ]
    if "confusion_matrix" in overall:
        png = plot_confusion_matrix(overall["confusion_matrix"], classes)
        body.append(figure("confusion_matrix", png, "confusion matrix"))
    per_class = overall.get("per_class", {})
    if per_class:
        png = plot_per_class_recall(per_class)
        body.append(figure("per_class_recall", png, "recall per class"))
    if overall.get("reliability"):
        png = plot_reliability(overall["reliability"], overall.get("ece"))
        body.append(figure("reliability", png, "reliability diagram"))
    body += [
        "<h2>Per class</h2>",
        _table(
            ["class", "precision", "recall", "F1", "support", "AUROC"],
            [[c] + [m[k] for k in PER_CLASS_KEYS] for c, m in per_class.items()],
        ),
    ]
    body.append("<h2>By group</h2>")
    group_results = evaluation.get("groups") or {}
    if not group_results:
        body.append("<p class='note'>No group columns were available for this split.</p>")
    for column, result in group_results.items():
        name = "groups_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(column))
        image = figure(name, plot_group_metrics(str(column), result), f"metrics by {column}")
        body.append(_group_section(str(column), result, image))
    ablation = evaluation.get("ablation")
    if ablation:
        rows = [
            [mode] + [ablation[mode].get(k) for k in ("n", *SUMMARY_METRICS)]
            for mode in ABLATION_MODES
            if ablation.get(mode) is not None
        ]
        body += ["<h2>Modality ablation</h2>", _table(["inputs", "n", *SUMMARY_METRICS], rows)]
    body.append("<h2>Training</h2>")
    records = read_epoch_records(metrics_jsonl) if metrics_jsonl else []
    curves = figure("training_curves", plot_training_curves(records), "training curves")
    body.append(curves or "<p class='note'>No training records (metrics.jsonl) available.</p>")
    body += ["<h2>Predictions</h2>", _preview(predictions)]
    if config is not None:
        text = html.escape(json.dumps(to_jsonable(config), indent=2))
        body.append(f"<h2>Config</h2><details><summary>config</summary><pre>{text}</pre></details>")
    page = (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>dermjax evaluation ({html.escape(split)})</title><style>{_STYLE}</style></head>"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    with fs.open(f"{root}/report.html", "w", encoding="utf-8") as f:
        f.write(page)
    return f"{out_dir}/report.html"
