"""The prepared cache on gs:// (emulator): round trip, per-process slices, resume, staleness."""

import logging
import re

import numpy as np
import pytest
from PIL import Image

from dermjax.data import cache, fs, images, pipeline

SIZE = (16, 16)


@pytest.fixture(autouse=True)
def suffix_ranges(gcs_emulator, monkeypatch):
    """Serve `Range: bytes=-N` (the last N bytes) as real GCS does; the emulator ignores it.

    array_record's reader opens a shard by fetching its footer with such a suffix range.
    """
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    def with_suffix_ranges(handler):
        def handle(request, response, storage, *args, **kwargs):
            asked = re.fullmatch(r"\s*bytes=-(\d+)", request.get_header("range", "") or "")
            if asked:
                params = request.params
                size = int(storage.get_file_obj(params["bucket_name"], params["object_id"])["size"])
                headers = request._request_handler.headers
                del headers["range"]
                headers["range"] = f"bytes={max(0, size - int(asked[1]))}-"
            handler(request, response, storage, *args, **kwargs)

        return handle

    media = (objects.download, objects.get)
    wrapped = tuple(
        (regex, {m: with_suffix_ranges(h) if h in media else h for m, h in handlers.items()})
        for regex, handlers in server.HANDLERS
    )
    monkeypatch.setattr(server, "HANDLERS", wrapped)


@pytest.fixture
def paths(tmp_path):
    """Eight JPEGs of various shapes; the sixth is not an image."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(8):
        path = str(tmp_path / f"img{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 40 - 2 * i, 3), np.uint8)).save(path)
        out.append(path)
    with open(out[5], "wb") as f:
        f.write(b"not a jpeg")
    return out


def build(paths, directory, rule="exact", **kwargs):
    kwargs = {"img_size": SIZE, "rule": rule, "shard_size": 3, "progress": False, **kwargs}
    return cache.build_cache(paths, directory, **kwargs)


def read_all(c: cache.Cache, paths) -> list:
    return c.reader().read(c.locate(paths))


@pytest.mark.parametrize("rule", images.RULES)
def test_a_cache_built_on_gcs_reads_back_the_pixels_of_a_local_build(
    paths, tmp_path, gcs_root, rule
):
    local = build(paths, str(tmp_path / "local"), rule)
    build(paths, f"{gcs_root}/c", rule)
    names = {p.rsplit("/", 1)[-1] for p in fs.filesystem(gcs_root).ls(f"{gcs_root}/c")}
    assert {"manifest.json", "paths.json", "shard-00002-of-00003.done.json"} <= names
    remote = cache.open_cache(f"{gcs_root}/c", paths, SIZE, rule)
    assert remote is not None and remote.shard_files[0].startswith("gs://")
    got, want = read_all(remote, paths), read_all(local, paths)
    assert got[5] is None and want[5] is None  # the bad image stays a bad record
    for a, b in zip(got, want, strict=True):
        if b is not None:
            np.testing.assert_array_equal(a, b)


def one_epoch(loader: pipeline.Loader) -> list[dict]:
    it = iter(loader)
    batches = [next(it) for _ in range(loader.steps_per_epoch)]
    it.close()
    return batches


@pytest.mark.parametrize("split", ["train", "test"])
def test_two_processes_read_disjoint_complete_slices_of_a_gcs_cache(
    paths, gcs_root, monkeypatch, split
):
    build(paths, f"{gcs_root}/c")
    remote = cache.open_cache(f"{gcs_root}/c", paths, SIZE, "exact")
    n = len(paths)
    records = pipeline.Records(paths, np.arange(n) % 2, np.zeros((n, 2)), np.ones(n, bool))
    asked = []  # record ids requested from the cache
    real_read = cache.CacheReader.read
    monkeypatch.setattr(
        cache.CacheReader, "read", lambda self, ids: asked.extend(ids) or real_read(self, ids)
    )
    seen = []
    for shard_index in (0, 1):
        asked.clear()
        kwargs = {"batch_size": 4, "img_size": SIZE, "cache": remote, "shard_count": 2}
        if split == "train":
            loader = pipeline.train_loader(
                records, geometric=False, seed=0, shard_index=shard_index, **kwargs
            )
        else:
            loader = pipeline.eval_loader(records, split=split, shard_index=shard_index, **kwargs)
        batches = one_epoch(loader)
        assert all(b["image"].shape[0] == 2 for b in batches)  # half of each global batch
        index = np.concatenate([b["index"] for b in batches])
        for b in batches:
            for i, image, valid in zip(b["index"], b["image"], b["valid"], strict=True):
                assert valid == (i != 5)
                if valid:
                    with open(paths[i], "rb") as f:
                        want = images.decode(f.read(), paths[i], SIZE, "exact")
                    np.testing.assert_array_equal(image, want)
        seen.append(set(index.tolist()))
        if split != "train":  # (a train loader also prefetches the next epoch's first batch)
            assert set(asked) == seen[-1]  # the cache was asked for this process's records only
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(n))


def test_a_worker_process_reads_the_gcs_cache(paths, gcs_root):
    build(paths, f"{gcs_root}/c")
    remote = cache.open_cache(f"{gcs_root}/c", paths, SIZE, "exact")
    n = len(paths)
    records = pipeline.Records(paths, np.zeros(n), np.zeros((n, 1)), np.zeros(n, bool))
    kwargs = {"batch_size": 8, "img_size": SIZE, "split": "test", "cache": remote}
    with pipeline.eval_loader(records, num_workers=1, **kwargs) as loader:
        (batch,) = list(loader)
    (expected,) = list(pipeline.eval_loader(records, **kwargs))
    np.testing.assert_array_equal(batch["image"], expected["image"])
    np.testing.assert_array_equal(batch["valid"], np.arange(n) != 5)


def test_an_interrupted_gcs_build_resumes_with_only_the_unfinished_shards(
    paths, gcs_root, monkeypatch
):
    directory = f"{gcs_root}/c"
    real_decode, calls, interrupt_at = images.decode, [], [5]

    def counting_decode(data, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt
        return real_decode(data, path, *args, **kwargs)

    monkeypatch.setattr(images, "decode", counting_decode)
    with pytest.raises(KeyboardInterrupt):
        build(paths, directory)
    assert cache.open_cache(directory, paths, SIZE, "exact") is None  # incomplete
    calls.clear()
    interrupt_at[0] = 0
    build(paths, directory)
    assert calls == paths[3:]  # shard 0 (3 images) was kept
    opened = cache.open_cache(directory, paths, SIZE, "exact")
    assert opened is not None and len(read_all(opened, paths)) == 8


def test_a_stale_gcs_cache_is_refused_and_a_rebuild_replaces_it(paths, gcs_root, caplog):
    directory = f"{gcs_root}/c"
    build(paths[:6], directory)
    with caplog.at_level(logging.WARNING):
        assert cache.open_cache(directory, paths[:6], (32, 32), "exact") is None
        assert cache.open_cache(directory, paths, SIZE, "exact") is None
    assert "img_size=[16, 16] (need [32, 32])" in caplog.text
    assert "2 of 8 paths are not cached" in caplog.text and "dermjax.prepare" in caplog.text
    build(paths[6:], directory)
    assert cache.open_cache(directory, paths[:6], SIZE, "exact") is None
    assert cache.open_cache(directory, paths[6:], SIZE, "exact") is not None
    shards = [p for p in fs.filesystem(gcs_root).ls(directory) if p.endswith(".array_record")]
    assert len(shards) == 1
