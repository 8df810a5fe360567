"""gs:// end to end against the in-process emulator: CSV + images read through the loaders."""

import io
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermjax.data import embeddings, fs, metadata, pipeline, stats
from dermjax.errors import DataError

SIZE = (16, 16)


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 36, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def uploaded(gcs_root, tmp_path):
    """Six JPEGs both on gs:// and locally, and a metadata CSV on gs:// naming the gs:// copies."""
    rows = []
    for i in range(6):
        data = jpeg(i)
        fs.filesystem(gcs_root).pipe(f"{gcs_root}/imgs/{i}.jpg", data)
        (tmp_path / f"{i}.jpg").write_bytes(data)
        rows.append({"image_path": f"{gcs_root}/imgs/{i}.jpg", "label": i % 2})
    rows.append({"image_path": f"{gcs_root}/imgs/missing.jpg", "label": 1})
    with fs.open_file(f"{gcs_root}/metadata.csv", "w") as f:
        pd.DataFrame(rows).to_csv(f, index=False)
    return f"{gcs_root}/metadata.csv", [str(tmp_path / f"{i}.jpg") for i in range(6)]


def records_from(paths, labels) -> pipeline.Records:
    n = len(paths)
    return pipeline.Records(paths, labels, np.zeros((n, 2)), np.zeros(n, bool))


def test_loaders_read_a_gcs_csv_and_gcs_images_like_local_files(uploaded):
    csv, local_paths = uploaded
    with fs.open_file(csv, "r") as f:
        meta = pd.read_csv(f)
    remote = records_from(list(meta.image_path), meta.label.to_numpy())
    local = records_from([*local_paths, "/nonexistent/missing.jpg"], meta.label.to_numpy())
    kwargs = {"batch_size": 7, "img_size": SIZE, "split": "test"}
    for a, b in zip(
        pipeline.eval_loader(remote, **kwargs), pipeline.eval_loader(local, **kwargs), strict=True
    ):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["valid"], [True] * 6 + [False])  # missing object masked
    train_kwargs = {"img_size": SIZE, "batch_size": 3, "geometric": True, "seed": 0}
    remote_it = iter(pipeline.train_loader(remote, **train_kwargs))
    local_it = iter(pipeline.train_loader(local, **train_kwargs))
    for _ in range(3):
        np.testing.assert_array_equal(next(remote_it)["image"], next(local_it)["image"])


def test_stats_cache_file_can_live_on_gcs(uploaded, gcs_root):
    _, local_paths = uploaded
    cache_file = f"{gcs_root}/stats.json"
    mean, std = stats.compute_stats(local_paths, SIZE, cache_file=cache_file)
    assert fs.exists(cache_file)
    again = stats.compute_stats(local_paths, SIZE, cache_file=cache_file)
    np.testing.assert_array_equal(again[0], mean)
    np.testing.assert_array_equal(again[1], std)


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """An environment without any Google Cloud credentials (and no emulator, no metadata server)."""
    for name in (
        "FSSPEC_GCS_TOKEN",
        "STORAGE_EMULATOR_HOST",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GCE_METADATA_HOST",
        "GCE_METADATA_IP",
        "K_SERVICE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setattr(fs, "_on_google_cloud", lambda: False)


@pytest.mark.parametrize(
    "read",
    [
        lambda path: fs.read_bytes(f"{path}/img.jpg"),
        lambda path: metadata.read_metadata_csv(f"{path}/metadata.csv"),
        lambda path: embeddings.read_embeddings(f"{path}/emb.parquet"),
    ],
    ids=["image", "metadata", "embeddings"],
)
def test_gs_paths_without_credentials_fail_at_once_with_a_login_hint(no_credentials, read):
    started = time.monotonic()
    with pytest.raises(DataError, match=r"gs://bucket/x.*no Google Cloud credentials.*gcloud auth"):
        read("gs://bucket/x")
    assert time.monotonic() - started < 3


def test_a_missing_google_application_credentials_file_is_named(no_credentials, monkeypatch):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
    with pytest.raises(DataError, match=r"GOOGLE_APPLICATION_CREDENTIALS=/nonexistent/key\.json"):
        fs.check_credentials("gs://bucket/x.csv")


def test_credentials_from_a_key_file_or_gcloud_login_are_accepted(no_credentials, tmp_path):
    (tmp_path / "gcloud").mkdir()
    (tmp_path / "gcloud" / "application_default_credentials.json").write_text("{}")
    fs.check_credentials("gs://bucket/x.csv")  # gcloud's application-default login
    fs.check_credentials("/local/paths/need/nothing.csv")
