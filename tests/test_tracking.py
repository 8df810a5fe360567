"""Tracker writes JSONL/summary (local and fsspec URLs), mirrors to wandb offline, degrades safely."""

import io
import json
import logging
import re
import sys
import time
import uuid

import fsspec
import jax.numpy as jnp
import numpy as np
import pytest

from dermjax.tracking import Progress, Tracker

CONFIG = {"optimizer": {"vision_model": {"name": "adamw", "learning_rate": 1e-4}}}


def _read_jsonl(path):
    with fsspec.open(path, "r") as f:
        return [json.loads(line) for line in f.read().splitlines()]


def test_log_writes_one_json_object_per_line_with_converted_scalars(tmp_path):
    tracker = Tracker(str(tmp_path / "run"), experiment_name="exp", config_dict=CONFIG)
    tracker.log("train", 0, {"train/loss": np.float32(1.5), "train/acc": jnp.asarray(0.25)})
    tracker.log("val", 0, {"val/loss": float("nan"), "val/per_class_recall": np.array([1.0, 0.5])})
    tracker.close()
    lines = _read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(r["event"], r["step"]) for r in lines] == [("train", 0), ("val", 0)]
    assert lines[0]["train/loss"] == 1.5 and lines[0]["train/acc"] == 0.25
    assert lines[1]["val/loss"] is None  # NaN is not valid JSON
    assert lines[1]["val/per_class_recall"] == [1.0, 0.5]
    assert {"time", "elapsed_s"} <= set(lines[0])


def test_summary_and_confusion_matrix_are_written(tmp_path):
    tracker = Tracker(str(tmp_path), experiment_name="exp", config_dict=CONFIG)
    tracker.log_confusion_matrix("val", np.array([[2, 1], [0, 3]]), ["acne", "eczema"], step=4)
    tracker.summary({"best/val_accuracy": np.float64(0.8), "best_epoch": np.int64(4)})
    tracker.log("epoch", 5, {"val/loss": 0.5})
    tracker.log_confusion_matrix("test", np.eye(2, dtype=int), ["acne", "eczema"])
    record, _, test_record = _read_jsonl(tmp_path / "metrics.jsonl")
    assert record["event"] == "val/confusion_matrix" and record["step"] == 4
    assert test_record["step"] == 5  # no step given: the last logged one
    assert record["confusion_matrix"] == [[2, 1], [0, 3]]
    assert record["class_names"] == ["acne", "eczema"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"best/val_accuracy": 0.8, "best_epoch": 4}


@pytest.mark.parametrize("remote", [False, True])
def test_a_resumed_tracker_keeps_records_up_to_its_checkpoint_and_drops_later_ones(
    tmp_path, remote
):
    workdir = f"memory://tracking-{uuid.uuid4().hex}/run" if remote else str(tmp_path / "run")
    first = Tracker(workdir, experiment_name="exp", config_dict=CONFIG)
    for step, loss in ((10, 1.0), (20, 0.5), (30, 0.4)):  # epoch 3 logged, its save was lost
        first.log("epoch", step, {"loss": loss})
        first.log_confusion_matrix("val", np.eye(2, dtype=int) * step, ["a", "b"], step=step)
    first.log("final", 30, {"test/accuracy": 0.5})
    resumed = Tracker(workdir, experiment_name="exp", config_dict=CONFIG, resume_step=20)
    resumed.log("epoch", 30, {"loss": 0.25})
    records = _read_jsonl(f"{workdir}/metrics.jsonl")
    assert [(r["event"], r["step"], r.get("loss")) for r in records] == [
        ("epoch", 10, 1.0),
        ("val/confusion_matrix", 10, None),
        ("epoch", 20, 0.5),
        ("val/confusion_matrix", 20, None),  # kept with its epoch
        ("epoch", 30, 0.25),
    ]


@pytest.mark.parametrize("remote", [False, True])
def test_rewind_drops_the_records_after_an_older_checkpoint_the_run_fell_back_to(tmp_path, remote):
    # The resume started from step 30's metadata, but its arrays were damaged: step 10 restored.
    workdir = f"memory://tracking-{uuid.uuid4().hex}/run" if remote else str(tmp_path / "run")
    first = Tracker(workdir, experiment_name="exp", config_dict=CONFIG)
    for step in (10, 20, 30):
        first.log("epoch", step, {"loss": 1 / step})
    resumed = Tracker(workdir, experiment_name="exp", config_dict=CONFIG, resume_step=30)
    resumed.rewind(10)
    resumed.log("epoch", 20, {"loss": 0.0})
    records = _read_jsonl(f"{workdir}/metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(10, 0.1), (20, 0.0)]


def test_summary_is_replaced_whole(tmp_path, monkeypatch):
    tracker = Tracker(str(tmp_path), experiment_name="exp", config_dict=CONFIG)
    tracker.summary({"test": {"accuracy": 0.5}})
    monkeypatch.setattr(json, "dumps", lambda *a, **k: 1 / 0)  # fails before anything is written
    with pytest.raises(ZeroDivisionError):
        tracker.summary({"test": {"accuracy": 0.7}})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"test": {"accuracy": 0.5}}


def test_a_fresh_tracker_moves_an_earlier_runs_records_aside(tmp_path, caplog):
    Tracker(str(tmp_path), experiment_name="exp", config_dict=CONFIG).log("epoch", 5, {"a": 1})
    with caplog.at_level(logging.WARNING):  # a log line: it reaches train.log
        fresh = Tracker(str(tmp_path), experiment_name="exp", config_dict=CONFIG)
    assert "of an earlier run that saved no checkpoint moved to metrics.jsonl." in caplog.text
    fresh.log("epoch", 1, {"a": 2})
    assert [r["a"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [2]
    (aside,) = tmp_path.glob("metrics.jsonl.*")
    assert [r["a"] for r in _read_jsonl(aside)] == [1]


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = Tracker(str(tmp_path / "run"), experiment_name="e", config_dict={}, enabled=False)
    tracker.log("train", 0, {"loss": 1.0})
    tracker.summary({"a": 1})
    assert not (tmp_path / "run").exists()


def test_missing_wandb_warns_once_and_keeps_logging(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with caplog.at_level(logging.WARNING):
        tracker = Tracker(str(tmp_path), experiment_name="e", config_dict={}, wandb_project="p")
        tracker.log("train", 0, {"loss": 1.0})
        tracker.log_confusion_matrix("val", np.eye(2), ["a", "b"])
        tracker.close()
    assert caplog.text.count("wandb could not start") == 1
    assert len(_read_jsonl(tmp_path / "metrics.jsonl")) == 2


def test_wandb_offline_run_leaves_run_files_with_config_and_name(tmp_path, monkeypatch, caplog):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_root"))
    sentinel = f"sentinel-{uuid.uuid4().hex[:8]}"
    config = {**CONFIG, "output": {"wandb_project": "dermjax-test", "tag": sentinel}}
    with Tracker(
        str(tmp_path / "run"),
        experiment_name="exp_arch_009",
        config_dict=config,
        wandb_project="dermjax-test",
    ) as tracker:
        tracker.log("train", 0, {"train/loss": 1.0, "train/acc": 50.0})
        tracker.log_confusion_matrix("val", np.array([[1, 0], [1, 1]]), ["a", "b"], step=0)
        tracker.summary({"best_epoch": 0})
    (run_dir,) = (tmp_path / "wandb_root" / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("*.wandb")
    deadline = time.monotonic() + 20  # wandb-core writes the file asynchronously after finish()
    while sentinel.encode() not in run_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    content = run_file.read_bytes()
    assert sentinel.encode() in content and b"exp_arch_009" in content
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    assert "metrics.jsonl only" not in caplog.text


def test_progress_without_tty_prints_rate_and_eta_lines():
    stream = io.StringIO()
    progress = Progress(64, desc="train epoch 1", every_s=0.0, stream=stream)
    for _ in range(4):
        progress.update(16, loss=0.5)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("train epoch 1: 16/64 img, -- img/s")  # first step: compile time
    assert re.search(r"\d img/s, ETA \d+:\d\d:\d\d, loss=0.5$", lines[2])
    assert lines[-1].startswith("train epoch 1: done, 64 img in")


def test_progress_prints_a_line_every_n_steps_when_asked():
    stream = io.StringIO()
    progress = Progress(160, desc="epoch 1/3", every_s=1e9, every_updates=3, stream=stream)
    for _ in range(10):
        progress.update(16)
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["48/160", "96/160", "144/160"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_tty_draws_a_tqdm_bar_in_images():
    stream = _Terminal()
    progress = Progress(32, desc="val", stream=stream)
    progress.update(16, loss=0.25)
    progress.update(16)
    progress.close()
    assert "val: 100%" in stream.getvalue() and "img/s, loss=0.25]" in stream.getvalue()
