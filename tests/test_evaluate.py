"""python -m dermjax.evaluate on a tiny trained demo checkpoint: the run's own metrics, the files."""

import contextlib
import io
import json
import logging
import sys

import numpy as np
import pandas as pd
import pytest
from absl import flags

from dermjax import evaluate
from dermjax.config import encoder_settings
from dermjax.data import metadata
from dermjax.data.encoders import HashingTextEncoder
from dermjax.data.encoding import compute_embeddings
from dermjax.errors import DataError
from dermjax.evaluation import run as evaluation_run
from dermjax.evaluation.run import evaluate_checkpoint
from dermjax.experiment_data import selected_metadata
from dermjax.runner import run
from tests.train.test_loop import tiny_demo_config


def tiny_run(base):
    """A 2-epoch tiny demo run under `base` (trained once: a finished run is not trained again)."""
    cfg = tiny_demo_config(base / "data", **{"training.num_epochs": 2})
    workdir = base / "run"
    run(cfg, str(workdir))
    return workdir


def run_cli(entry, args: list[str]) -> tuple[int, str, str]:
    """Runs a `python -m dermjax.X` entry in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved_argv, root, absl_logger = sys.argv, logging.getLogger(), logging.getLogger("absl")
    saved_logging = (root.level, list(root.handlers), absl_logger.level)
    sys.argv = ["dermjax", *args]
    flags.FLAGS.unparse_flags()
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            pytest.raises(SystemExit) as exit_info,
        ):
            entry()
    finally:
        sys.argv = saved_argv
        root.setLevel(saved_logging[0])
        root.handlers[:] = saved_logging[1]
        absl_logger.setLevel(saved_logging[2])  # the entry quiets absl process-wide
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    return exit_info.value.code or 0, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    workdir = tiny_run(tmp_path_factory.getbasetemp() / "tiny_eval_run")
    args = [f"--checkpoint={workdir}", "--config.evaluation.n_boot=50"]
    status, out, err = run_cli(evaluate.run, args)
    assert status == 0, err
    summary = json.loads((workdir / "summary.json").read_text())
    return workdir, workdir / "evaluation" / "test", out, summary


@pytest.mark.slow
def test_evaluate_reproduces_the_runs_own_test_metrics(evaluated):
    _, out_dir, _, summary = evaluated
    overall = json.loads((out_dir / "evaluation.json").read_text())["overall"]
    for key in ("accuracy", "macro_f1", "balanced_accuracy"):
        assert overall[key] == pytest.approx(summary["test"][key], abs=1e-6)


@pytest.mark.slow
def test_evaluate_uses_the_best_checkpoint_and_says_so(evaluated):
    _, out_dir, out, summary = evaluated
    checkpoint = json.loads((out_dir / "evaluation.json").read_text())["checkpoint"]
    assert checkpoint["kind"] == "best" and checkpoint["step"] == summary["best_step"]
    assert f"best checkpoint, step {summary['best_step']}" in out
    assert str(out_dir) in out


@pytest.mark.slow
def test_predictions_cover_the_training_test_split_with_topk_probabilities_and_groups(evaluated):
    workdir, out_dir, _, summary = evaluated
    pred = pd.read_parquet(out_dir / "predictions.parquet")
    cfg = tiny_demo_config(workdir.parent / "data", **{"training.num_epochs": 2})
    d = cfg.data
    _, selected = selected_metadata(cfg)
    _, _, test = metadata.stratified_split(
        selected, test_size=d.test_size, val_size=d.val_size, seed=d.seed
    )
    assert pred["image_id"].tolist() == test["image_id"].astype(str).tolist()
    assert pred["label"].tolist() == test["label"].astype(str).tolist()
    probs = pred[[f"prob_{c}" for c in summary["classes"]]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert (pred["predicted"] == pred["top1_label"]).all()
    assert (np.diff(pred[["top1_prob", "top2_prob", "top3_prob"]].to_numpy(), axis=1) <= 0).all()
    assert {"group_dataset", "group_skin_type_group"} <= set(pred.columns)


@pytest.mark.slow
def test_evaluation_json_has_groups_and_the_modality_ablation(evaluated):
    _, out_dir, out, _ = evaluated
    ev = json.loads((out_dir / "evaluation.json").read_text())
    assert ev["split"] == "test" and ev["mode"] == "both" and ev["bad_images"] == []
    assert set(ev["groups"]) == {"dataset", "skin_type_group"}
    assert set(ev["ablation"]) == {"image_only", "text_only", "both"}
    assert ev["ablation"]["both"] == ev["overall"]
    assert ev["ablation"]["image_only"] != ev["ablation"]["text_only"]
    has_text = pd.read_parquet(out_dir / "predictions.parquet")["has_text"]
    assert 0 < has_text.sum() < len(has_text)  # the tiny demo has rows without text
    assert ev["ablation"]["text_only"]["n"] == has_text.sum()  # not scored on all-zero inputs
    assert ev["ablation"]["image_only"]["n"] == len(has_text)
    assert f"text only covers the {has_text.sum()} of {len(has_text)}" in ev["notes"][0]
    assert "image only" in out and "text only" in out
    assert (out_dir / "report.html").stat().st_size > 0


def test_a_missing_checkpoint_is_one_error_line(tmp_path):
    status, _, err = run_cli(evaluate.run, [f"--checkpoint={tmp_path / 'nothing'}"])
    assert status == 1
    assert err.strip().splitlines() == [
        f"error: --checkpoint={tmp_path / 'nothing'}: no such folder; give a run folder, its "
        "checkpoints/ folder or a step folder (RUN/checkpoints/best/120)"
    ]


def test_a_folder_without_checkpoints_is_one_error_line(tmp_path):
    status, _, err = run_cli(evaluate.run, [f"--checkpoint={tmp_path}"])
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --checkpoint={tmp_path}: no checkpoint")


@pytest.mark.slow
def test_missing_data_is_one_error_line_before_the_model_is_built(evaluated, tmp_path):
    workdir = evaluated[0]
    missing = tmp_path / "gone.csv"
    args = [f"--checkpoint={workdir}", f"--config.data.metadata_path={missing}"]
    status, _, err = run_cli(evaluate.run, args)
    assert status == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: metadata CSV {missing} does not exist; set data.metadata_path (or "
        "data.dataset and data.local_root) to an existing file"
    ]


def test_evaluation_never_makes_or_replaces_demo_data(evaluated, tmp_path):
    # From another folder the run's relative data.local_root pointed at no data, and evaluate
    # generated a new demo dataset there; another data.seed regenerated the run's own.
    workdir = evaluated[0]
    elsewhere = tmp_path / "elsewhere"
    args = [f"--checkpoint={workdir}", f"--config.data.local_root={elsewhere}"]
    status, _, err = run_cli(evaluate.run, args)
    assert status == 1 and not elsewhere.exists()
    assert _errors(err) == [
        f"error: no demo data of seed 42 and size 160 at {elsewhere}/demo_v1: run from the "
        "folder the run was trained in, or pass --config.data.local_root=DIR (the folder that "
        "holds demo_v1/)"
    ]
    done = next((workdir.parent / "data").rglob("DONE"))
    before = done.read_text()
    args = [f"--checkpoint={workdir}", "--config.data.seed=7", f"--out={tmp_path / 'out'}"]
    status, _, err = run_cli(evaluate.run, args)
    assert status == 1 and done.read_text() == before
    assert "no demo data of seed 7 and size 160" in err and "(it holds {'seed': 42" in err


def test_a_group_table_matching_no_test_row_is_refused_by_the_cli_but_warned_after_training(
    evaluated, tmp_path, caplog
):
    # After training, the runner has already checked the table against every row; a table of
    # other rows than the test split's must not cost the run its report.
    workdir, out_dir = evaluated[0], evaluated[1]
    tested = set(pd.read_parquet(out_dir / "predictions.parquet")["image_id"])
    cfg = tiny_demo_config(workdir.parent / "data", **{"training.num_epochs": 2})
    meta = selected_metadata(cfg)[1]
    others = [i for i in meta["image_id"] if i not in tested][:5]
    table = tmp_path / "tones.csv"
    pd.DataFrame({"image_id": others, "skin_tone": [12] * len(others)}).to_csv(table, index=False)
    overrides = [("evaluation.groups_path", str(table)), ("evaluation.n_boot", "0")]
    with pytest.raises(DataError, match="matches none of the"):
        evaluate_checkpoint(str(workdir), out_dir=str(tmp_path / "cli"), overrides=overrides)
    _, ev = evaluate_checkpoint(
        str(workdir), out_dir=str(tmp_path / "after"), overrides=overrides, strict_groups=False
    )
    assert "matches none of the" in caplog.text and (tmp_path / "after" / "report.html").exists()
    assert set(ev["groups"]) == {"dataset", "skin_type_group"}  # from the metadata alone


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_overriding_a_trained_field_needs_out_and_keeps_the_runs_evaluation(evaluated):
    workdir, out_dir = evaluated[0], evaluated[1]
    before = (out_dir / "evaluation.json").read_bytes()
    status, _, err = run_cli(evaluate.run, [f"--checkpoint={workdir}", "--config.data.seed=7"])
    assert status == 1
    [line] = _errors(err)
    assert "(data.seed: 42 -> 7)" in line and "not the run's: pass --out=DIR" in line
    assert f"the run's own evaluation in {out_dir} is kept" in line
    assert "done," not in err  # refused before any inference
    assert (out_dir / "evaluation.json").read_bytes() == before


@pytest.mark.slow
def test_embeddings_that_do_not_fit_the_model_are_one_line_with_evaluations_fix(
    evaluated, tmp_path, monkeypatch
):
    workdir = evaluated[0]
    fix = (
        "the model reads embeddings of the encoder it was trained with (the built-in hashing "
        "encoder): drop the --config.encoder.* / --config.data.embeddings_path override, or "
        "point data.embeddings_path at a file that encoder made"
    )
    cfg = tiny_demo_config(workdir.parent / "data", **{"training.num_epochs": 2})
    other = tmp_path / "hash128.parquet"
    settings = encoder_settings(cfg).as_dict()
    meta = selected_metadata(cfg)[1]
    compute_embeddings(meta, str(other), HashingTextEncoder(dim=128), settings=settings)
    out = f"--out={tmp_path / 'out'}"
    args = [f"--checkpoint={workdir}", f"--config.data.embeddings_path={other}", out]
    status, _, err = run_cli(evaluate.run, args)
    assert status == 1
    [line] = _errors(err)
    assert f"embeddings file {other} was made by another encoder" in line
    assert "dim: file 128, config 256" in line and line.endswith(fix)
    assert "dermjax.embed" not in line  # training's fix (compute another file) is not this one
    # The model's text input is checked too (a file the config check cannot tell apart, such
    # as one without a dermjax spec, crashed inside the model).
    monkeypatch.setattr(evaluation_run, "text_input_size", lambda ckpt: 384)
    status, _, err = run_cli(evaluate.run, [f"--checkpoint={workdir}", out])
    assert status == 1
    [line] = _errors(err)
    assert "has 256 values per row, the checkpoint's model takes 384;" in line
    assert line.endswith(fix) and "Traceback" not in err


@pytest.mark.slow
def test_an_out_folder_that_cannot_be_written_is_one_error_line_before_inference(
    evaluated, tmp_path
):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "eval"
    status, _, err = run_cli(evaluate.run, [f"--checkpoint={evaluated[0]}", f"--out={out}"])
    assert status == 1
    assert _errors(err) == [
        f"error: --out folder {out}: cannot write there (a part of the path is a file, not a "
        "folder); give --out a folder you can write"
    ]
    assert "done," not in err


@pytest.mark.slow
def test_a_missing_group_table_is_one_error_line_before_inference(evaluated, tmp_path):
    table = tmp_path / "skin_tones.csv"
    args = [
        f"--checkpoint={evaluated[0]}",
        f"--config.evaluation.groups_path={table}",
        f"--out={tmp_path / 'out'}",
    ]
    status, _, err = run_cli(evaluate.run, args)
    assert status == 1
    [line] = _errors(err)
    assert f"group table {table} does not exist" in line
    assert "done," not in err


@pytest.mark.slow
def test_a_run_without_a_test_split_is_evaluated_on_validation_and_says_so(evaluated, tmp_path):
    workdir, out = evaluated[0], tmp_path / "out"
    args = [
        f"--checkpoint={workdir}",
        "--config.data.test_size=0.0",  # as the original's final configs: no test split
        "--config.evaluation.n_boot=20",
        f"--out={out}",
    ]
    status, _, err = run_cli(evaluate.run, args)
    assert status == 0, err
    assert "evaluating its validation split instead" in err
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["split"] == "val"
    assert ev["notes"][0] == "The run has no test split: this is its val split."
    assert "val split" in (out / "report.html").read_text()
    assert ev["notes"][0] in (out / "report.html").read_text()
