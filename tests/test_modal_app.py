"""scripts/modal_app.py offline (no Modal account): its declarations, the sync and the training.

The Modal objects are inspected through modal 1.6's private attributes (`_spec`, the loader's
closure, the image layers); no network call is made. Volume commits are counted by fakes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import stat
import time
import uuid

import pytest

from dermjax import modal_support as ms
from dermjax.data import fs
from dermjax.errors import ConfigError, DataError, UserError

modal = pytest.importorskip("modal")
from modal._utils.async_utils import synchronizer  # noqa: E402

APP_FILE = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "modal_app.py"
CUSTOM = {
    "DERMJAX_MODAL_GPU": "H200, H100",
    "DERMJAX_MODAL_TIMEOUT_S": "7200",
    "DERMJAX_MODAL_RETRIES": "2",
    "DERMJAX_MODAL_DATA_VOLUME": "my-data",
    "DERMJAX_MODAL_RUNS_VOLUME": "my-runs",
    "DERMJAX_MODAL_WANDB_SECRET": "my-wandb",
    "DERMJAX_MODAL_GCS_SECRET": "my-gcs",
}


def load_app(monkeypatch, env: dict[str, str]):
    for name in ms.ModalSettings().as_env():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location(f"modal_app_{uuid.uuid4().hex}", APP_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def closure(load) -> dict:
    """The variables a Modal object's loader closes over (its declared options)."""
    cells = [c.cell_contents for c in load.__closure__]
    return dict(zip(load.__code__.co_freevars, cells, strict=True))


def options(function) -> dict:
    """GPU, timeout, retries, Volumes and Secrets a Modal Function was declared with."""
    raw = synchronizer._translate_in(function)
    cells = closure(raw._load)
    return {
        "gpu": raw._spec.gpus,
        "timeout": cells["timeout"],
        "retries": cells["retry_policy"].retries if cells["retry_policy"] else 0,
        "volumes": {p: synchronizer._translate_in(v)._name for p, v in raw._spec.volumes.items()},
        "secrets": [synchronizer._translate_in(s)._name for s in raw._spec.secrets],
    }


def image_layers(image) -> tuple[list[str], set[str]]:
    """(Dockerfile commands, paths of added local files) of every layer of a Modal Image."""
    commands, files = [], set()
    todo = [synchronizer._translate_in(image)]
    while todo:
        layer = todo.pop()
        cells = closure(layer._load)
        if cells["dockerfile_function"] is not None:
            commands += cells["dockerfile_function"]("2025.06").commands
        if cells["context_mount_function"] is not None:
            mount = cells["context_mount_function"]("2025.06")
            files |= {str(remote) for e in mount.entries for _, remote in e.get_files_to_upload()}
        todo += cells["base_images"].values()
    return commands, files


def test_functions_carry_the_settings_from_the_environment(monkeypatch):
    app = load_app(monkeypatch, CUSTOM)
    train = options(app.train_volume)
    assert train["gpu"] == ["H200", "H100"]
    assert (train["timeout"], train["retries"]) == (7200, 2)
    assert train["volumes"] == {ms.DATA_MOUNT: "my-data", ms.RUNS_MOUNT: "my-runs"}
    assert train["secrets"] == ["my-wandb"]
    gcs = options(app.train_gcs)
    assert (gcs["gpu"], gcs["timeout"], gcs["retries"]) == (["H200", "H100"], 7200, 2)
    assert gcs["volumes"] == {ms.RUNS_MOUNT: "my-runs"}
    assert gcs["secrets"] == ["my-wandb", "my-gcs"]
    sync = options(app.sync_data)
    assert sync["gpu"] is None and sync["retries"] == 2
    assert (sync["volumes"], sync["secrets"]) == ({ms.DATA_MOUNT: "my-data"}, ["my-gcs"])
    assert options(app.embed)["volumes"] == {ms.DATA_MOUNT: "my-data"}
    assert isinstance(app.main, modal.app.LocalEntrypoint)


def test_defaults_are_the_documented_ones_and_empty_secret_names_drop_secrets(monkeypatch):
    app = load_app(monkeypatch, {"DERMJAX_MODAL_WANDB_SECRET": "", "DERMJAX_MODAL_RETRIES": "0"})
    train = options(app.train_volume)
    assert train["gpu"] == ["H100", "A100-80GB"] and train["timeout"] == 24 * 3600
    assert train["volumes"] == {
        ms.DATA_MOUNT: "training-data",
        ms.RUNS_MOUNT: "training-checkpoints",
    }
    assert (train["secrets"], train["retries"]) == ([], 0)
    assert options(app.train_gcs)["secrets"] == ["gcs-secret"]
    assert ms.settings_from_env({}) == ms.ModalSettings()


@pytest.mark.parametrize(
    "env",
    [
        {"DERMJAX_MODAL_TIMEOUT_S": "1h"},
        {"DERMJAX_MODAL_GPU": " , "},
        {"DERMJAX_MODAL_GPU": "A100:80GB"},
        {"DERMJAX_MODAL_RETRIES": "11"},
        {"DERMJAX_MODAL_CPU": "nan"},
        {"DERMJAX_MODAL_CPU": "0"},
        {"DERMJAX_MODAL_RUNS_VOLUME": "my runs"},
        {"DERMJAX_MODAL_GPUS": "H100"},  # misspelled: was ignored, leaving the default GPUs
    ],
)
def test_bad_settings_name_the_variable(env):
    with pytest.raises(UserError, match=f"^Modal settings: {next(iter(env))}") as info:
        ms.settings_from_env(env)
    assert "\n" not in str(info.value)


def test_every_bad_setting_is_named_at_once_and_the_app_exits_with_one_line(monkeypatch):
    env = {"DERMJAX_MODAL_TIMEOUT_S": "1h", "DERMJAX_MODAL_RETRIES": "11"}
    with pytest.raises(UserError, match=r"TIMEOUT_S='1h'.*; DERMJAX_MODAL_RETRIES=11"):
        ms.settings_from_env(env)
    with pytest.raises(SystemExit, match=r"^error: Modal settings: DERMJAX_MODAL_RETRIES=11"):
        load_app(monkeypatch, {"DERMJAX_MODAL_RETRIES": "11"})


def test_the_image_installs_dermjax_with_its_configs_and_cuda_jax(monkeypatch):
    app = load_app(monkeypatch, {})
    commands, files = image_layers(app.image)
    src = app.SOURCE_IN_IMAGE
    install = [c for c in commands if "pip install" in c and src in c]
    assert len(install) == 1 and "-e " not in install[0] and "[gcs,wandb,text]" in install[0]
    assert any("jax[cuda13]" in c for c in commands)
    for name in (
        "pyproject.toml",
        "dermjax/configs/default.py",
        "dermjax/configs/demo.py",
        "dermjax/configs/from_yaml.py",
        "dermjax/modal_support.py",
        "dermjax/data/fs.py",
    ):
        assert f"{src}/{name}" in files
    assert not [f for f in files if "/.git/" in f or "__pycache__" in f or "/workdirs/" in f]


def test_gcs_credentials_secret_becomes_a_private_key_file(tmp_path):
    env = {ms.GCS_CREDENTIALS_JSON: '{"type": "service_account"}'}
    ms.install_gcs_credentials(env, folder=str(tmp_path))
    key = pathlib.Path(env["GOOGLE_APPLICATION_CREDENTIALS"])
    assert key.read_text() == '{"type": "service_account"}'
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_sync_copies_skips_same_size_and_reports_failures(gcs_root, tmp_path):
    src = f"{gcs_root}/dataset_v1"
    content = {
        "metadata_all_harmonized.csv": b"image_id,label\n1,a\n",
        "imgs/1.jpg": b"x" * 100,
        "imgs/2.jpg": b"y" * 50,
        "embeddings/e.parquet": b"z" * 10,
    }
    for name, data in content.items():
        fs.filesystem(src).pipe(f"{src}/{name}", data)
    dest = tmp_path / "volume" / "dataset_v1"
    (dest / "imgs").mkdir(parents=True)
    (dest / "imgs" / "1.jpg").write_bytes(b"x" * 100)  # same size: skipped
    (dest / "imgs" / "2.jpg").write_bytes(b"old")  # other size: copied again
    (dest / "embeddings" / "e.parquet").mkdir(parents=True)  # a folder in the way: fails
    commits = []
    result = ms.sync_folder(
        src, str(dest), workers=4, commit=lambda: commits.append(1), commit_every=1
    )
    assert (result.copied, result.skipped) == (2, 1)
    assert [p.rsplit("/", 2)[-2:] for p, _ in result.failed] == [["embeddings", "e.parquet"]]
    assert result.bytes_copied == 50 + len(content["metadata_all_harmonized.csv"])
    assert len(commits) == 3  # after each copied file (commit_every=1) and at the end
    assert (dest / "imgs" / "2.jpg").read_bytes() == b"y" * 50
    with pytest.raises(DataError, match=r"1 file\(s\) could not be copied.*e\.parquet"):
        ms.sync_dataset(src, str(dest), workers=4)
    os.rmdir(dest / "embeddings" / "e.parquet")
    again = ms.sync_dataset(src, str(dest), workers=4)
    assert (again.copied, again.skipped, again.failed) == (1, 3, [])
    assert (dest / "embeddings" / "e.parquet").read_bytes() == b"z" * 10
    assert not list(dest.rglob("*.part"))
    with pytest.raises(DataError, match="holds no files"):
        ms.sync_dataset(f"{gcs_root}/no_such_dataset", str(tmp_path / "empty"))


class FakeVolume:
    def __init__(self):
        self.commits = 0

    def commit(self):
        self.commits += 1


def test_commit_watcher_commits_on_new_checkpoints_and_at_exit(tmp_path):
    volume = FakeVolume()
    with ms.CommitWatcher(str(tmp_path), volume.commit, interval_s=0.05):
        (tmp_path / "checkpoints" / "5").mkdir(parents=True)
        for _ in range(100):
            if volume.commits:
                break
            time.sleep(0.05)
        assert volume.commits == 1
    assert volume.commits == 2


TINY_CONFIG = """
from dermjax.configs import demo


def get_config():
    cfg = demo.get_config()
    cfg.output.experiment_name = "modal-tiny"
    cfg.data.demo_size = 160
    cfg.data.img_size = (32, 32)
    cfg.training.batch_size = 16
    cfg.training.eval_batch_size = 32
    cfg.training.num_workers = 0
    cfg.checkpoint.keep_last = 1
    return cfg
"""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The train_volume function is executing locally")
def test_train_volume_trains_into_the_volume_and_a_relaunch_resumes(monkeypatch, tmp_path):
    app = load_app(monkeypatch, {})
    volume = FakeVolume()
    monkeypatch.setattr(app, "runs_volume", volume)
    monkeypatch.setattr(ms, "DATA_MOUNT", str(tmp_path / "data_volume"))
    monkeypatch.setattr(ms, "RUNS_MOUNT", str(tmp_path / "runs_volume"))
    local = tmp_path / "laptop" / "tiny.py"
    local.parent.mkdir()
    local.write_text(TINY_CONFIG)
    inputs = json.dumps(ms.local_inputs(str(local)))
    local.unlink()  # the container sees only the shipped text

    def launch(epochs: int) -> dict:
        overrides = shlex.join([f"--config.training.num_epochs={epochs}"])
        return app.train_volume.local(str(local), overrides, "", inputs)

    first = launch(1)
    run_dir = tmp_path / "runs_volume" / "modal-tiny"
    assert first["run_dir"] == str(run_dir) and "test" in first
    assert (tmp_path / "data_volume" / "demo_v1").is_dir()  # data read from the data Volume
    assert (run_dir / "summary.json").exists() and list((run_dir / "checkpoints").iterdir())
    assert volume.commits >= 1

    def epochs() -> list[int]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [r["epoch"] for r in map(json.loads, lines) if r["event"] == "epoch"]

    second = launch(2)  # a larger epoch budget continues the same run
    assert epochs() == [0, 1] and not second.get("already_finished")
    assert "resumed from" in (run_dir / "train.log").read_text()
    third = launch(2)
    assert third["already_finished"] and epochs() == [0, 1]
    assert volume.commits >= 3


def test_a_signal_stopped_run_raises_so_modal_retries_after_a_commit(monkeypatch, tmp_path):
    from dermjax import runner

    monkeypatch.setattr(runner, "run", lambda cfg, workdir: {"preempted": True, "step": 7})
    volume = FakeVolume()
    with pytest.raises(ms.RunInterrupted, match="step 7"):
        ms.train("configs/demo.py", runs_root=str(tmp_path), commit=volume.commit)
    assert volume.commits == 1


def test_bad_overrides_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="no_such_field"):
        ms.train("configs/demo.py", ["--config.training.no_such_field=1"], runs_root=str(tmp_path))
    with pytest.raises(ConfigError, match="unexpected argument"):
        ms.read_config("configs/demo.py", ["--workdir=x"])
    assert not list(tmp_path.iterdir())


def test_embed_runs_the_dermjax_embed_module_resumably():
    cmd = ms.embed_command("configs/default.py", "/data/v1/embeddings/x.parquet", ["--config.a=1"])
    assert cmd[1:] == [
        "-m",
        "dermjax.embed",
        "--config=configs/default.py",
        "--out=/data/v1/embeddings/x.parquet",
        "--resume",
        "--config.a=1",
    ]
    assert "--out" not in " ".join(ms.embed_command("configs/default.py"))
