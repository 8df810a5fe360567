"""scripts/benchmark.py pipeline: every input path is measured on the same files, and the JSON
holds what the table prints."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))

import bench_pipeline
import benchmark


def test_synthetic_photos_are_photo_sized_jpegs(tmp_path):
    paths = bench_pipeline.write_photos(str(tmp_path), 2)
    assert [pathlib.Path(p).name for p in paths] == ["photo00000.jpg", "photo00001.jpg"]
    first, second = (pathlib.Path(p).read_bytes() for p in paths)
    assert first != second  # distinct images, not one copied
    # Texture and noise keep a 1024x768 quality-90 JPEG far above a flat image's few KB.
    assert len(first) > 100_000


def test_pipeline_subcommand_measures_all_paths_and_writes_json(tmp_path, capsys):
    out = tmp_path / "pipeline.json"
    argv = ["pipeline", "--images", "4", "--workers", "0", "--size", "32", "--batch-size", "2",
            "--repeats", "2", "--out", str(out)]  # fmt: skip
    result = benchmark.main(argv)
    saved = json.loads(out.read_text())
    assert saved["command"] == "pipeline"
    per = saved["per_workers"]
    for kind in ("original_style", "raw", "cached"):
        rate = per[kind]["0"]
        assert rate > 0, kind
        assert len(saved["samples"][kind]["0"]) == 2  # one sample per repeat
    assert saved["ratios_vs_original"]["raw"]["0"] == round(
        per["raw"]["0"] / per["original_style"]["0"], 2
    )
    assert saved["augment_img_s"] > 0 and saved["cache_build_img_s"] > 0
    assert saved["images"]["count"] == 4 and result["settings"]["workers"] == [0]
    table = capsys.readouterr().out
    assert "(a) original-style CPU" in table and "raw / original" in table


def test_missing_output_folder_is_refused_before_measuring(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "out.json"
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["pipeline", "--images", "4", "--out", str(missing)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {missing}" in err and "does not exist" in err
    assert not any(tmp_path.iterdir())  # nothing generated or measured
