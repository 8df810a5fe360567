"""Run integrity: own folders per run, resume rules, finished runs, read-only sources, the lock."""

import copy
import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from dermjax import runner
from dermjax.errors import DataError, RunFolderError
from dermjax.experiment import rng_streams
from dermjax.experiment_data import load_data
from dermjax.runner import config_changes, run, run_folders
from dermjax.train.checkpoint import CheckpointError
from dermjax.train.runlock import RunLock
from dermjax.weights.torchvision import WeightsNotFoundError
from tests.train.test_loop import tiny_demo_config


def listing(folder) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime (to prove nothing was written)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def test_explicit_workdir_holds_everything_of_the_run(tmp_path):
    cfg = tiny_demo_config(tmp_path / "data")
    cfg.output.save_dir, cfg.output.log_dir = "/checkpoints", "./logs"
    folders = run_folders(cfg, str(tmp_path / "run"))
    assert folders.run_dir == str(tmp_path / "run")
    assert folders.checkpoint_dir == str(tmp_path / "run" / "checkpoints")


def test_runs_sharing_save_and_log_dirs_get_their_own_folders(tmp_path):
    a = tiny_demo_config(tmp_path / "data")
    a.output.save_dir, a.output.log_dir = str(tmp_path / "ckpt"), str(tmp_path / "logs")
    b = a.copy_and_resolve_references()
    b.output.experiment_name = "other"
    fa, fb = run_folders(a, None), run_folders(b, None)
    assert fa.run_dir == str(tmp_path / "logs" / "demo")
    assert fa.checkpoint_dir == str(tmp_path / "ckpt" / "demo")
    assert fb.run_dir == str(tmp_path / "logs" / "other")
    assert fb.checkpoint_dir == str(tmp_path / "ckpt" / "other")
    a.output.save_dir = None  # checkpoints then live in the run's log folder
    assert run_folders(a, None).checkpoint_dir == str(tmp_path / "logs" / "demo" / "checkpoints")


@pytest.mark.parametrize(
    "monitor, mode",
    [("val/loss", "min"), ("val/accuracy", "max"), ("val/macro_f1", "max"),
     ("val/balanced_accuracy", "max")],
)  # fmt: skip
def test_val_loss_is_minimised_and_the_other_monitors_maximised(tmp_path, monitor, mode):
    cfg = tiny_demo_config(tmp_path / "data", **{"training.monitor": monitor})
    ckpt = runner.open_checkpoints(cfg, run_folders(cfg, str(tmp_path / "run")))
    try:
        assert ckpt.monitor_mode == mode
    finally:
        ckpt.close()


def test_an_init_from_that_is_no_checkpoint_is_named_before_the_data_is_read(tmp_path):
    cfg = tiny_demo_config(tmp_path / "data", **{"checkpoint.init_from": str(tmp_path)})
    with pytest.raises(CheckpointError, match=r"^checkpoint\.init_from=.* is not a workdir"):
        run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "data").exists()  # the demo data was not even generated


def test_config_changes_separate_trained_fields_from_resumable_ones():
    old = {"training": {"batch_size": 16, "num_epochs": 3}, "data": {"img_size": (32, 32)}}
    new = {"training": {"batch_size": 32, "num_epochs": 5}, "data": {"img_size": [32, 32]}}
    blocking, allowed = config_changes(old, new)
    assert blocking == ["training.batch_size: 16 -> 32"]
    assert allowed == ["training.num_epochs: 3 -> 5"]


def test_a_dict_valued_field_is_compared_whole():
    ratios = "data.per_dataset_split_ratios"
    none = {"data": {"per_dataset_split_ratios": None}, "encoder": {"batch_size": 32}}
    one = {"data": {"per_dataset_split_ratios": {"ddi": [0.7, 0.3]}}, "encoder": {"batch_size": 8}}
    two = {"data": {"per_dataset_split_ratios": {"ddi": [0.7, 0.3], "isic": [0.8, 0.2]}}}
    blocking, allowed = config_changes(none, one)
    assert blocking == [f"{ratios}: None -> {{'ddi': [0.7, 0.3]}}"]
    assert allowed == ["encoder.batch_size: 32 -> 8"]  # how many texts per encoder call only
    assert config_changes(one, two)[0] == [
        f"{ratios}: {{'ddi': [0.7, 0.3]}} -> {{'ddi': [0.7, 0.3], 'isic': [0.8, 0.2]}}"
    ]


def test_rng_streams_are_independent_of_each_other_and_of_step_keys():
    keys = rng_streams(42)
    step_keys = [jax.random.fold_in(keys["steps"], s) for s in range(100)]
    data = [tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in (*keys.values(), *step_keys)]
    assert len(set(data)) == len(data)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    cfg = tiny_demo_config(root / "data", **{"training.num_epochs": 2})
    workdir = root / "run"
    summary = run(cfg, str(workdir))
    return root, cfg, workdir, summary


def test_a_finished_run_is_not_trained_again(finished_run):
    _, cfg, workdir, summary = finished_run
    before = listing(workdir)
    again = run(cfg, str(workdir))
    assert again["already_finished"]
    assert again["test"] == summary["test"]
    touched = ("train.log", ".dermjax.lock")  # the re-run's log lines and its lock
    after = listing(workdir)
    assert {k: v for k, v in after.items() if k not in touched} == {
        k: v for k, v in before.items() if k not in touched
    }


@pytest.mark.parametrize(
    "field, value",
    [("training.batch_size", 8), ("multimodal_classifier.final_dropout", 0.5)],
)
def test_resuming_with_a_trained_field_changed_is_refused(finished_run, field, value):
    root, _, workdir, _ = finished_run
    cfg = tiny_demo_config(root / "data", **{"training.num_epochs": 2, field: value})
    with pytest.raises(RunFolderError, match=field.replace(".", r"\.")):
        run(cfg, str(workdir))


def test_checkpoints_with_unreadable_metadata_are_never_overwritten_by_a_fresh_run(
    finished_run, tmp_path
):
    _, cfg, source, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    for meta in (copy / "checkpoints").glob("*/*/meta/metadata"):
        meta.write_text("{not json")
    before = listing(copy / "checkpoints")
    with pytest.raises(RunFolderError, match="metadata cannot be read"):
        run(cfg, str(copy))
    assert listing(copy / "checkpoints") == before


def test_a_second_process_on_the_run_folder_is_refused(finished_run):
    _, cfg, workdir, _ = finished_run
    with RunLock(str(workdir)), pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
        run(cfg, str(workdir))


def test_a_second_run_on_a_shared_checkpoint_folder_is_refused(tmp_path):
    # Two log folders, one output.save_dir/experiment_name: both would write the same checkpoints.
    cfg = tiny_demo_config(tmp_path / "data")
    cfg.output.save_dir, cfg.output.experiment_name = str(tmp_path / "ckpts"), "x"
    cfg.output.log_dir = str(tmp_path / "logs_a")
    first = run_folders(cfg, None)
    cfg.output.log_dir = str(tmp_path / "logs_b")
    with runner._locks(first), pytest.raises(RunFolderError) as info:
        run(cfg, None)
    assert str(info.value).startswith(f"checkpoint folder {tmp_path / 'ckpts' / 'x'} is in use")
    assert str(info.value).endswith("give this run another output.experiment_name (or --workdir)")


def test_a_finished_run_with_a_damaged_summary_is_evaluated_again(finished_run, tmp_path, caplog):
    # A kill or a full disk while summary.json was written used to wedge the run for good.
    _, cfg, source, summary = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    (copy / "summary.json").write_text('{"val": {"accur')
    again = run(cfg, str(copy))
    assert "cannot be read" in caplog.text and "evaluating the finished run again" in caplog.text
    assert again["test"] == summary["test"] and not again.get("already_finished")
    assert json.loads((copy / "summary.json").read_text())["test"] == summary["test"]


def test_load_from_is_said_to_be_unused_when_the_run_has_its_own_checkpoints(finished_run, caplog):
    _, cfg, workdir, _ = finished_run
    cfg = copy.deepcopy(cfg)
    cfg.checkpoint.load_from = "/somewhere/else"
    assert run(cfg, str(workdir))["already_finished"]
    assert "checkpoint.load_from=/somewhere/else is not used: this run folder has its own" in (
        caplog.text
    )


def test_init_from_a_finished_run_trains_and_leaves_the_source_untouched(finished_run, tmp_path):
    root, _, source, _ = finished_run
    before = listing(source)
    cfg = tiny_demo_config(
        root / "data",
        **{
            "training.num_epochs": 1,
            "training.n_warmup_epochs": 0,
            "checkpoint.init_from": str(source),
        },
    )
    summary = run(cfg, str(tmp_path / "finetune"))
    assert summary["test"]["accuracy"] > 0
    assert listing(source) == before


def test_load_from_continues_another_run_read_only(finished_run, tmp_path):
    root, _, source, _ = finished_run
    before = listing(source)
    cfg = tiny_demo_config(
        root / "data", **{"training.num_epochs": 3, "checkpoint.load_from": str(source)}
    )
    run(cfg, str(tmp_path / "continued"))
    epochs = [
        json.loads(line)["epoch"]
        for line in (tmp_path / "continued" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "epoch"
    ]
    assert epochs == [2]  # epochs 0-1 came from the source run
    assert listing(source) == before


def test_unreadable_eval_images_are_counted_and_every_metric_uses_the_same_samples(tmp_path):
    cfg = tiny_demo_config(tmp_path / "data", **{"training.num_epochs": 1})
    data = load_data(cfg, str(tmp_path))  # generates the demo data
    for path in data.test.paths[:2]:
        with open(path, "wb") as f:
            f.write(b"not an image")
    summary = run(cfg, str(tmp_path / "run"))
    assert summary["bad_images"] == {"train": 0, "val": 0, "test": 2}
    readable = data.test.labels[2:]
    assert summary["baseline"]["majority_accuracy"] == pytest.approx(
        np.mean(readable == data.majority_class)
    )
    lines = (tmp_path / "run" / "bad_images.txt").read_text().splitlines()
    assert len(lines) == 2 and all("test" in line for line in lines)


def test_no_readable_training_image_stops_the_run_unfinished_with_one_error(tmp_path):
    cfg = tiny_demo_config(tmp_path / "data", **{"training.num_epochs": 1})
    data = load_data(cfg, str(tmp_path))  # generates the demo data
    for path in data.train.paths:
        os.remove(path)
    with pytest.raises(DataError, match=r"epoch 1: none of the training images could be read"):
        run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "summary.json").exists()  # a re-run trains, not "finished"


def test_a_missing_group_table_for_the_report_stops_the_run_before_training(tmp_path):
    table = tmp_path / "skin_tones.csv"
    cfg = tiny_demo_config(
        tmp_path / "data",
        **{"evaluation.after_training": True, "evaluation.groups_path": str(table)},
    )
    with pytest.raises(DataError, match=f"group table {table} does not exist"):
        run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no epoch ran


def test_missing_pretrained_weights_stop_the_run_before_any_data_is_read(tmp_path):
    weights = tmp_path / "none.safetensors"
    cfg = tiny_demo_config(
        tmp_path / "data",
        **{"vision_model.pretrained": True, "vision_model.weights_path": str(weights)},
    )
    with pytest.raises(WeightsNotFoundError, match=f"weights for 'resnet50' at {weights}"):
        run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "data").exists()  # the demo data was not even generated


def test_a_run_folder_that_cannot_be_written_is_one_error(tmp_path):
    (tmp_path / "afile").write_text("")
    cfg = tiny_demo_config(tmp_path / "data")
    with pytest.raises(DataError, match=r"run folder .*/afile: cannot write there \(it is a file"):
        run(cfg, str(tmp_path / "afile"))


def test_val_size_none_trains_without_validation_and_keeps_the_last_epoch(tmp_path):
    cfg = tiny_demo_config(tmp_path / "data", **{"training.num_epochs": 2, "data.val_size": None})
    summary = run(cfg, str(tmp_path / "run"))
    assert "val" not in summary and summary["best_step"] is None
    assert summary["test"]["accuracy"] > 0
    records = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n") if x
    ]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert not any(key.startswith("val/") for r in epochs for key in r)


def test_a_continued_run_reuses_its_wandb_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # wandb files then live in the run folder
    overrides = {"training.num_epochs": 1, "output.wandb_project": "dermjax-test"}
    run(tiny_demo_config(tmp_path / "data", **overrides), str(tmp_path / "run"))
    overrides["training.num_epochs"] = 2  # a resumable change: the run continues
    run(tiny_demo_config(tmp_path / "data", **overrides), str(tmp_path / "run"))
    metas = [
        json.loads(p.read_text()) for p in (tmp_path / "run").glob("checkpoints/*/*/meta/metadata")
    ]
    ids = {m["wandb_run_id"] for m in metas}
    assert len(ids) == 1 and None not in ids
    (run_id,) = ids
    runs = sorted(p.name for p in (tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs)


def test_sigterm_at_the_last_save_stops_before_the_final_evaluation(tmp_path, monkeypatch):
    # It used to be noted ("saving a checkpoint at the next step") and then ignored while the
    # whole final evaluation ran: a preempted machine overran its grace period.
    from dermjax.train.loop import Trainer

    save = Trainer._save

    def terminated_at_the_end(self, kind, meta):
        if self.finished:  # the last epoch's save
            os.kill(os.getpid(), signal.SIGTERM)  # the guard notes it; the save goes on
        save(self, kind, meta)

    cfg = tiny_demo_config(tmp_path / "data", **{"training.num_epochs": 1})
    monkeypatch.setattr(Trainer, "_save", terminated_at_the_end)
    result = run(cfg, str(tmp_path / "run"))
    assert result["preempted"] and not (tmp_path / "run" / "summary.json").exists()
    monkeypatch.setattr(Trainer, "_save", save)
    summary = run(cfg, str(tmp_path / "run"))  # evaluates the saved run, trains nothing
    assert summary["trained_steps"] == result["step"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test"] == summary["test"]


def test_an_epoch_budget_below_the_epochs_begun_is_refused(tmp_path, monkeypatch):
    # It trained nothing and wrote the summary of a half-trained epoch, again at every re-run.
    from dermjax.train.preemption import PreemptionGuard

    monkeypatch.setattr(PreemptionGuard, "should_stop", lambda self, done: done == 9)
    cfg = tiny_demo_config(tmp_path / "data")
    assert run(cfg, str(tmp_path / "run"))["preempted"]  # in epoch 3 (4 steps an epoch)
    cfg.training.num_epochs = 1
    with pytest.raises(RunFolderError, match=r"training.num_epochs=1 is below the 3 epochs "
                       r"already begun in .* \(saved at epoch 3, step 1\): set it to 3 or more"):  # fmt: skip
        run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "summary.json").exists()
    # Without the mid-epoch copy, the newest is the end of epoch 2: a budget of 2 ends the run.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "last")
    cfg.training.num_epochs = 2
    summary = run(cfg, str(tmp_path / "run"))
    assert (summary["finished"], summary["epochs_trained"], summary["trained_steps"]) == (
        "completed",
        2,
        8,
    )
    assert run(cfg, str(tmp_path / "run"))["already_finished"]  # not evaluated again


def test_a_report_of_another_checkpoint_is_made_again_when_the_run_is_rerun(tmp_path):
    # A run extended with more epochs (the report off) kept the old best model's report.
    cfg = tiny_demo_config(
        tmp_path / "data", **{"training.num_epochs": 1, "evaluation.after_training": True}
    )
    summary = run(cfg, str(tmp_path / "run"))
    report = tmp_path / "run" / "evaluation" / "test" / "evaluation.json"
    evaluation = json.loads(report.read_text())
    assert evaluation["checkpoint"]["step"] == summary["best_step"]
    evaluation["checkpoint"]["step"] = 1  # as the report of an earlier best
    report.write_text(json.dumps(evaluation))
    assert run(cfg, str(tmp_path / "run"))["already_finished"]
    assert json.loads(report.read_text())["checkpoint"]["step"] == summary["best_step"]


def test_a_resumed_run_counts_unreadable_images_and_time_like_an_uninterrupted_one(
    tmp_path, monkeypatch
):
    from dermjax.train.preemption import PreemptionGuard

    cfg = tiny_demo_config(tmp_path / "data", **{"training.num_epochs": 2})
    data = load_data(cfg, str(tmp_path))  # generates the demo data
    for path in data.train.paths[::10]:
        os.remove(path)
    whole = run(cfg, str(tmp_path / "whole"))
    monkeypatch.setattr(PreemptionGuard, "should_stop", lambda self, done: done == 2)
    assert run(cfg, str(tmp_path / "resumed"))["preempted"]
    monkeypatch.undo()
    resumed = run(cfg, str(tmp_path / "resumed"))
    assert whole["bad_images"]["train"] > 0
    assert resumed["bad_images"] == whole["bad_images"]
    assert resumed["run_time_s"] > resumed["wall_time_s"]  # the first launch counts too
    first = (tmp_path / "resumed" / "train.log").read_text().splitlines()[0]
    assert re.match(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} [A-Z]+ ", first), first  # dated
    assert whole["run_time_s"] == pytest.approx(whole["wall_time_s"], abs=0.2)
