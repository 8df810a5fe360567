"""Evaluate a checkpoint on a split and write evaluation.json, predictions.parquet, report.html.

`evaluate_checkpoint` is what `python -m dermjax.evaluate` does; `evaluate_run` is the call the
runner makes after training (the test split into `<run>/evaluation/test/`). The split is read
as training read it (same config, seed and filters, so the same rows); metrics cover the rows
whose image is readable, and the unreadable ones are listed in evaluation.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import pandas as pd
from ml_collections import config_dict

from dermjax import experiment_data
from dermjax.data import embeddings, metadata, pipeline
from dermjax.data.metadata import IMG_ID_COL
from dermjax.embedding_file import text_embeddings
from dermjax.errors import DataError, UserError
from dermjax.evaluation import groups, metrics
from dermjax.evaluation.checkpoint_source import Checkpoint, open_checkpoint, text_input_size
from dermjax.evaluation.inference import LoadedModel, load_model, predict_records, softmax64

log = logging.getLogger(__name__)

SPLITS = ("test", "val")


def split_rows(model: Checkpoint, split: str) -> tuple[str, pd.DataFrame, pipeline.Records]:
    """(split used, metadata rows, Records) of `split` ("test" or "val"), split as training did.

    A run without a test split is evaluated on its validation split, as training's final
    evaluation is; the split used is returned so that every output names it.
    """
    if split not in SPLITS:
        raise UserError(f"--split={split}: use one of {list(SPLITS)}")
    cfg = model.cfg
    paths, meta = experiment_data.selected_metadata(cfg, make_demo=False)
    found = metadata.class_list(meta)
    if found != model.classes:
        raise DataError(
            f"the data at {paths.metadata} gives classes {found}, the checkpoint was trained on "
            f"{model.classes}: point --config.data.* at the run's data"
        )
    train, val, test = experiment_data.split_metadata(cfg, meta)
    frame = {"test": test, "val": val}[split]
    if frame is None and split == "test" and val is not None:
        log.warning("the run has no test split: evaluating its validation split instead")
        frame, split = val, "val"
    stored = model.meta.get("train_rows")
    if stored is not None and stored != len(train):
        log.warning(
            "the data and split settings give %d training rows, the run had %d: the metadata "
            "or a data.* override changed the split, so the %s split may not be the run's",
            len(train),
            stored,
            split,
        )
    if frame is None:
        raise DataError(
            f"--split={split}: the run has no such split (see data.val_size, "
            "data.test_size, data.per_dataset_split_ratios)"
        )
    trained_with = _encoder_name(model.meta.get("encoder") or {})
    fix = (
        f"the model reads embeddings of the encoder it was trained with ({trained_with}): drop "
        "the --config.encoder.* / --config.data.embeddings_path override, or point "
        "data.embeddings_path at a file that encoder made"
    )
    try:
        emb = text_embeddings(cfg, meta, paths.embeddings)
    except embeddings.EncoderMismatchError as e:
        reason = str(e).partition("; it is never overwritten")[0]
        raise DataError(f"{reason}; {fix}") from e
    class_to_idx = {c: i for i, c in enumerate(model.classes)}
    records = embeddings.build_records(
        frame, img_prefix=paths.img_prefix, class_to_idx=class_to_idx, emb_df=emb
    )
    if records.text.shape[1] != (wanted := text_input_size(model)):
        raise DataError(
            f"embeddings file {paths.embeddings} has {records.text.shape[1]} values per row, the "
            f"checkpoint's model takes {wanted}; {fix}"
        )
    return split, frame.reset_index(drop=True), records


def _encoder_name(spec: dict) -> str:
    if spec.get("name") == "hashing":
        return "the built-in hashing encoder"
    return f"encoder.model_name={spec.get('model') or spec.get('model_name')!r}"


def predictions_frame(
    rows: pd.DataFrame,
    labels: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    top_k: int,
    group_columns: pd.DataFrame,
) -> pd.DataFrame:
    """One row per evaluated image: ids, true and predicted label, top-k, probabilities, groups."""
    names = np.asarray(classes, dtype=object)
    k = min(top_k, len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = {
        "image_id": rows[IMG_ID_COL].astype(str).to_numpy(),
        "label": names[labels],
        "predicted": names[order[:, 0]],
        "correct": labels == order[:, 0],
    }
    for i in range(k):
        out[f"top{i + 1}_label"] = names[order[:, i]]
        out[f"top{i + 1}_prob"] = np.take_along_axis(probs, order[:, i : i + 1], axis=1)[:, 0]
    for c, name in enumerate(classes):
        out[f"prob_{name}"] = probs[:, c]
    frame = pd.DataFrame(out)
    for column in group_columns.columns:
        frame[f"group_{column}"] = group_columns[column].to_numpy()
    return frame


def _jsonable(value: Any) -> Any:
    """JSON-ready copy: numpy scalars and arrays as Python values, NaN and inf as None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def group_frame(
    cfg: config_dict.ConfigDict, rows: pd.DataFrame, *, strict: bool = True
) -> pd.DataFrame:
    """The group columns (evaluation.group_columns, evaluation.groups_path) of `rows`.

    Also the up-front check of those settings: training and `evaluate_checkpoint` call it on
    the selected rows before any work, so a missing table or column, or a side table that
    matches no row (`strict`; a warning otherwise), is not found only after.
    """
    ev = cfg.evaluation
    side = groups.load_group_table(ev.groups_path) if ev.groups_path else None
    columns = None if ev.group_columns is None else list(ev.group_columns)
    return groups.group_frame(rows, columns, side, side_source=ev.groups_path, strict=strict)


def _ablation(
    labels: np.ndarray,
    probs: dict[str, np.ndarray],
    has_text: np.ndarray,
    overall: dict[str, Any],
    top_k: Sequence[int],
    classes: Sequence[str],
) -> dict[str, Any]:
    """Image only, text only and both. Text only covers the samples that have text (None when
    none has): the others would be scored on all-zero inputs, a constant guess."""
    image_only = metrics.classification_metrics(labels, probs["image_only"], classes, top_k)
    text_only = (
        metrics.classification_metrics(
            labels[has_text], probs["text_only"][has_text], classes, top_k
        )
        if has_text.any()
        else None
    )
    return {"image_only": image_only, "text_only": text_only, "both": overall}


def evaluate_model(
    model: LoadedModel,
    split: str,
    rows: pd.DataFrame,
    records: pipeline.Records,
    by: pd.DataFrame,
    notes: Sequence[str] = (),
) -> tuple[dict[str, Any], pd.DataFrame]:
    """(evaluation dict, predictions frame) of `model` on the `split_rows` of `split`.

    `by` is `group_frame` of `rows`. `notes` (and the notes this adds) go into evaluation.json
    and the report's header.
    """
    ev, classes = model.cfg.evaluation, model.classes
    modes = [model.default_mode, *(("image_only", "text_only") if model.multimodal else ())]
    logits, readable = predict_records(model, records, split=split, modes=modes)
    if not readable.any():
        raise UserError(f"no image of the {split} split could be read (see the warnings above)")
    labels = records.labels[readable]
    probs = {mode: softmax64(values[readable]) for mode, values in logits.items()}
    broken = ~np.isfinite(probs[model.default_mode]).all(axis=1)
    if broken.any():
        raise UserError(
            f"the model's outputs are NaN or infinite for {int(broken.sum())} of {len(broken)} "
            f"{split} samples: its weights are not finite, so there is nothing to evaluate"
        )
    rows_ok = rows[readable].reset_index(drop=True)
    by = by[readable].reset_index(drop=True)
    has_text = records.has_text[readable]
    overall = metrics.classification_metrics(labels, probs[model.default_mode], classes, ev.top_k)
    ref = model.ref
    evaluation: dict[str, Any] = {
        "split": split,
        "checkpoint": {"directory": ref.directory, "step": ref.step, "kind": ref.kind},
        "mode": model.default_mode,
        "overall": overall,
        "groups": groups.group_metrics(
            labels,
            probs[model.default_mode],
            by,
            classes,
            n_boot=ev.n_boot,
            seed=model.cfg.data.seed,
            min_group_size=ev.min_group_size,
        ),
        "bad_images": rows.loc[~readable, IMG_ID_COL].astype(str).tolist(),
        "notes": list(notes),
    }
    if model.multimodal:
        evaluation["ablation"] = _ablation(labels, probs, has_text, overall, ev.top_k, classes)
        evaluation["notes"].append(
            f"Modality ablation: text only covers the {int(has_text.sum())} of {labels.size} "
            "samples that have text; image only and both cover all."
            if has_text.any()
            else "Modality ablation: no sample has text, so there is no text-only result."
        )
    predictions = predictions_frame(
        rows_ok, labels, probs[model.default_mode], classes, max(ev.top_k), by
    )
    predictions.insert(3, "has_text", has_text)
    return _jsonable(evaluation), predictions


def write_evaluation(
    out_dir: str,
    model: LoadedModel,
    evaluation: dict[str, Any],
    predictions: pd.DataFrame,
    metrics_jsonl: str | None,
) -> str:
    """Writes the three files into `out_dir`; returns the report's path."""
    from dermjax.evaluation import report  # matplotlib: only when writing

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "evaluation.json"), "w") as f:
        json.dump(evaluation, f, indent=1)
    predictions.to_parquet(os.path.join(out_dir, "predictions.parquet"), index=False)
    jsonl = metrics_jsonl if metrics_jsonl and os.path.exists(metrics_jsonl) else None
    return report.write_report(
        out_dir, evaluation, predictions, model.classes, jsonl, model.cfg.to_dict()
    )


def _keep_the_runs_own_evaluation(ckpt: Checkpoint, out_dir: str) -> None:
    """UserError when overrides change what the run was trained or split with: such results
    are not the run's, so they never replace its evaluation in `out_dir`."""
    if ckpt.trained_changes:
        raise UserError(
            f"the overrides change what the run was trained or split with "
            f"({'; '.join(ckpt.trained_changes)}), so the results are not the run's: pass "
            f"--out=DIR for them (the run's own evaluation in {out_dir} is kept)"
        )


def default_out_dir(model: Checkpoint, split: str) -> str:
    """`<run>/evaluation/<split>`; UserError when the checkpoint's run folder is not known."""
    run_dir = model.ref.run_dir
    if run_dir is None or "://" in run_dir:
        raise UserError(
            f"cannot tell the local run folder of {model.ref.directory}: pass --out=DIR"
        )
    return os.path.join(run_dir, "evaluation", split)


def evaluate_checkpoint(
    checkpoint: str | Checkpoint,
    *,
    split: str = "test",
    out_dir: str | None = None,
    overrides: Sequence[tuple[str, str]] = (),
    metrics_jsonl: str | None = None,
    strict_groups: bool = True,
) -> tuple[str, dict[str, Any]]:
    """Evaluates the checkpoint `checkpoint` (run folder, checkpoints folder or step folder, or
    `open_checkpoint`'s result, which already carries its overrides).

    Writes into `out_dir` (default `<run>/evaluation/<split>`) on process 0; returns (out_dir,
    evaluation). `metrics_jsonl` defaults to the run folder's, for the training curves. A group
    table that matches none of the split's rows is an error with `strict_groups`, else a warning
    (after training: the runner checked the table against all rows before it).
    """
    ckpt = checkpoint
    if isinstance(ckpt, str):
        ckpt = open_checkpoint(ckpt, overrides=overrides)
    if metrics_jsonl is None and ckpt.ref.run_dir is not None:
        metrics_jsonl = os.path.join(ckpt.ref.run_dir, "metrics.jsonl")
    if out_dir is None:  # before any data is read or embedded
        _keep_the_runs_own_evaluation(ckpt, default_out_dir(ckpt, split))
    asked = split
    split, rows, records = split_rows(ckpt, split)  # data problems show before the model
    by = group_frame(ckpt.cfg, rows, strict=strict_groups)
    out_dir = out_dir or default_out_dir(ckpt, split)
    model = load_model(ckpt)
    notes = [] if split == asked else [f"The run has no {asked} split: this is its {split} split."]
    evaluation, predictions = evaluate_model(model, split, rows, records, by, notes)
    if jax.process_index() == 0:
        path = write_evaluation(out_dir, model, evaluation, predictions, metrics_jsonl)
        log.info("evaluation of the %s split written to %s", split, path)
    return out_dir, evaluation


def evaluate_run(run_dir: str, checkpoint_dir: str, *, split: str = "test") -> str:
    """The evaluation a finished training run gets: `split` into `<run_dir>/evaluation/<split>`.

    Call it on every process after `Trainer.test` (checkpoint writes finished); the best
    checkpoint (else the latest) under `checkpoint_dir` is evaluated. Returns the output folder.
    """
    out_dir, _ = evaluate_checkpoint(
        checkpoint_dir,
        split=split,
        out_dir=os.path.join(run_dir, "evaluation", split),
        metrics_jsonl=os.path.join(run_dir, "metrics.jsonl"),
        strict_groups=False,
    )
    return out_dir
