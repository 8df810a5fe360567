"""A checkpoint's config on today's schema, and the one-line errors for paths without one.

Opening real checkpoints (best before latest, kind folders, step folders) runs through the
evaluate and predict command lines in tests/test_evaluate.py and tests/test_predict.py.
"""

import logging

import pytest

from dermjax.data import fs
from dermjax.errors import DataError
from dermjax.evaluation.checkpoint_source import (
    config_from_checkpoint,
    locate_checkpoint,
    trained_changes,
)
from dermjax.train.checkpoint import CheckpointError


def test_a_stored_config_fills_the_current_schema_and_fields_it_lacks_keep_defaults(caplog):
    stored = {
        "training": {"batch_size": 48, "retired_field": 1},
        "vision_model": {"name": "resnet18"},
    }
    with caplog.at_level(logging.WARNING):
        cfg = config_from_checkpoint(stored)
    assert cfg.training.batch_size == 48
    assert cfg.vision_model.name == "resnet18"
    assert (
        cfg.training.eval_batch_size is None and cfg.multimodal_classifier.final_dropout == 0.3
    )  # defaults
    assert "training.retired_field" in caplog.text


def test_a_stored_config_of_the_wrong_shape_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="does not fit this dermjax"):
        config_from_checkpoint({"training": {"batch_size": "many"}})


def test_a_missing_folder_and_a_folder_without_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"--checkpoint=.*/nope: no such folder"):
        locate_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no checkpoint there; give a run folder"):
        locate_checkpoint(str(tmp_path))


def test_only_fields_the_run_was_trained_or_split_with_count_as_trained_changes():
    stored = config_from_checkpoint({}).to_dict()
    cfg = config_from_checkpoint(stored)
    cfg.data.local_root, cfg.training.num_workers, cfg.evaluation.n_boot = "/mnt", 8, 10
    assert trained_changes(stored, cfg) == []
    cfg.multimodal_classifier.final_dropout = 0.5
    cfg.data.per_dataset_split_ratios = {"ddi": (0.7, 0.3)}
    assert trained_changes(stored, cfg) == [
        "data.per_dataset_split_ratios: None -> {'ddi': [0.7, 0.3]}",
        "multimodal_classifier.final_dropout: 0.3 -> 0.5",
    ]


def test_an_existing_file_is_named_as_a_file_not_a_missing_folder(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError) as info:
        locate_checkpoint(str(afile))
    assert str(info.value) == (
        f"--checkpoint={afile} is a file; give a run folder, its checkpoints/ folder "
        "or a step folder (RUN/checkpoints/best/120)"
    )
    assert "no such folder" not in str(info.value)


@pytest.mark.parametrize("path", ["runs/exp_best.pth", "gs://bucket/test_best.pth"])
def test_an_original_pth_names_the_converter_without_reading_it(path):
    with pytest.raises(CheckpointError) as info:
        locate_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"--checkpoint={path}: a PyTorch checkpoint of the original")
    assert "scripts/convert_original_checkpoint.py --pth" in message


def test_a_bucket_without_credentials_is_one_line_at_once(monkeypatch, tmp_path):
    for name in ("STORAGE_EMULATOR_HOST", "FSSPEC_GCS_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setattr(fs, "_on_google_cloud", lambda: False)
    with pytest.raises(
        DataError, match=r"cannot read gs://bucket/run: no Google Cloud credentials"
    ):
        locate_checkpoint("gs://bucket/run")
