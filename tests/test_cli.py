"""Command line: user errors as one line, every bad --config override at once, packaged configs."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

from dermjax.cli import apply_overrides, resolve_config_arg, split_overrides
from dermjax.config import ConfigError, load_config, packaged_config_path

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_split_overrides_reads_every_absl_form():
    argv = ["prog", "--config=c.py", "--config.a.b=1", "--config.c", "7", "--noconfig.d",
            "--config.e", "--workdir=w", "--config.f", "-1", "--config.g=x=y"]  # fmt: skip
    rest, overrides = split_overrides(argv)
    assert rest == ["prog", "--config=c.py", "--workdir=w"]
    assert overrides == [
        ("a.b", "1"), ("c", "7"), ("d", "false"), ("e", "true"), ("f", "-1"), ("g", "x=y"),
    ]  # fmt: skip


def test_overrides_parse_as_the_field_type_and_none_clears():
    cfg = load_config("default")
    apply_overrides(
        cfg,
        [
            ("data.val_size", "None"),
            ("data.img_size", "(32, 32)"),
            ("data.img_size", "(48,48)"),  # a size is replaced, not extended
            ("augmentation.scale", "None"),
            ("training.batch_size", "8"),
            ("training.scheduler.vision_eta_min", "0"),
            ("data.demo", "true"),
            ("multimodal_classifier.alpha", "[0.5, 2]"),
            ("data.datasets", "ddi"),
            ("data.datasets", "isic"),
        ],
    )
    assert cfg.data.val_size is None
    assert cfg.data.img_size == (48, 48)
    assert cfg.augmentation.scale is None
    assert cfg.training.batch_size == 8
    assert cfg.training.scheduler.vision_eta_min == 0.0
    assert cfg.data.demo is True
    assert cfg.multimodal_classifier.alpha == [0.5, 2]
    assert cfg.data.datasets == ("ddi", "isic")


def test_every_bad_override_and_every_invalid_value_in_one_error():
    cfg = load_config("default")
    with pytest.raises(ConfigError) as info:
        apply_overrides(
            cfg,
            [
                ("training.bach_size", "3"),
                ("training.num_epochs", "abc"),
                ("traning.patience", "2"),
                ("training", "3"),
                ("training.batch_size.x", "3"),
                ("multimodal_classifier.final_dropout", "1.0"),  # parses; validate rejects it
                ("training.patience", "4"),  # good: applied
            ],
        )
    problems = info.value.problems
    assert problems == [
        "--config.training.bach_size: no such config field (did you mean training.batch_size?)",
        "--config.training.num_epochs='abc': expected a value of type int or None",
        "--config.traning.patience: no such config field (did you mean training?)",
        "--config.training: is a section: set its fields (--config.SECTION.FIELD=V)",
        "--config.training.batch_size.x: training.batch_size is a field, not a section",
        "multimodal_classifier.final_dropout=1.0: expected a number in [0.0, 1.0)",
    ]
    assert info.value.exit_code == 2
    assert cfg.training.patience == 4


def test_missing_configs_path_falls_back_to_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo, yaml_loader = packaged_config_path("demo"), packaged_config_path("from_yaml")
    argv = ["p", "--config=configs/demo.py", "--config", "configs/from_yaml.py:x.yaml"]
    assert resolve_config_arg(argv) == [
        "p",
        f"--config={demo}",
        "--config",
        f"{yaml_loader}:x.yaml",
    ]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.py").write_text("def get_config(): ...\n")
    assert resolve_config_arg(["p", "--config=configs/demo.py"]) == [
        "p",
        "--config=configs/demo.py",
    ]
    for missing in ("configs/nope.py", "elsewhere/demo.py"):
        with pytest.raises(ConfigError, match=f"config file '{missing}' not found"):
            resolve_config_arg(["p", f"--config={missing}"])


def test_cli_names_every_bad_override_with_exit_status_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dermjax.main", "--config=configs/demo.py",
         "--config.training.bach_size=3", "--config.training.num_epochs=x",
         "--config.data.val_size=None", "--config.multimodal_classifier.final_dropout=1.0",
         f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: 3 invalid config field(s):"), proc.stderr
    for text in ("training.bach_size", "training.num_epochs='x'", "final_dropout=1.0"):
        assert text in proc.stderr
    assert "Traceback" not in proc.stderr and "FATAL" not in proc.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_user_error_is_one_line_and_its_exit_code_unless_verbose(tmp_path, verbose):
    script = tmp_path / "entry.py"
    script.write_text(
        textwrap.dedent(
            """
            from dermjax.cli import run_main
            from dermjax.errors import DataError

            def main(argv):
                raise DataError("metadata file 'x.csv' not found: set data.metadata_path")

            run_main(main)
            """
        )
    )
    args = [sys.executable, str(script)] + (["--verbose"] if verbose else [])
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = "error: metadata file 'x.csv' not found: set data.metadata_path\n"
    assert proc.stderr.endswith(last)
    assert ("Traceback" in proc.stderr) is verbose
    if not verbose:
        assert proc.stderr == last


@pytest.mark.parametrize("how, status", [("sigterm", 143), ("ctrl_c", 130)])
def test_a_stop_outside_the_training_loop_is_one_line_after_cleanup(tmp_path, how, status):
    script = tmp_path / "entry.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal, sys, time
            from dermjax.cli import run_main

            def main(argv):
                try:
                    if sys.argv[-1] == "sigterm":
                        os.kill(os.getpid(), signal.SIGTERM)
                        time.sleep(30)
                    raise KeyboardInterrupt
                finally:
                    print("cleaned up", flush=True)  # finally blocks run: files are closed

            run_main(main)
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script), how], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "cleaned up\n"
    name = {"sigterm": "SIGTERM", "ctrl_c": "Ctrl-C"}[how]
    assert proc.stderr.startswith(f"error: stopped by {name}: "), proc.stderr
    assert proc.stderr.endswith("run the same command again to continue\n")
    assert proc.stderr.count("\n") == 1


def test_dry_run_prints_the_config_and_every_path_without_reading_data(tmp_path):
    data_root = tmp_path / "no_such_data"
    proc = subprocess.run(
        [sys.executable, "-m", "dermjax.main", "--config=configs/default.py", "--dry_run",
         f"--config.data.local_root={data_root}", "--config.vision_model.pretrained=true",
         f"--config.vision_model.weights_path={tmp_path}/none.safetensors",
         "--config.output.save_dir=gs://bucket/ckpt", "--config.output.experiment_name=exp1",
         "--config.training.batch_size=16"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"metadata: {data_root}/dataset_v1/metadata_all_harmonized.csv" in out
    assert f"embeddings: {data_root}/dataset_v1/embeddings/sapbert_256_cls.parquet" in out
    assert f"run folder (logs, metrics, summary): {tmp_path}/workdirs/exp1" in out
    assert "checkpoints: gs://bucket/ckpt/exp1" in out
    weights = (
        f"pretrained weights: no converted torchvision weights for 'efficientnet_b0' at {tmp_path}/"
    )
    assert weights in out  # said, not an error: a resuming run does not read them
    assert "batch_size: 16" in out
    assert "img_size:\n  - 224\n  - 224\n" in out and "!!python" not in out  # plain YAML
    assert list(tmp_path.iterdir()) == []  # no data read, no run folder made


def test_a_multi_process_dry_run_checks_alone_for_the_whole_launch(tmp_path):
    # It started the distributed runtime and waited (5 min) for processes that never came.
    launch = ["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=1"]
    run = [sys.executable, "-m", "dermjax.main", "--config=configs/demo.py", "--dry_run", *launch]
    proc = subprocess.run(
        [*run, "--config.training.batch_size=16"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "devices: 2 (cpu); config is valid"
    proc = subprocess.run(
        [*run, "--config.training.batch_size=15"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "training.batch_size=15: must be divisible by 2" in proc.stderr
