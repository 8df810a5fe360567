"""Prepared ArrayRecord cache: round trip, resume, staleness, and loaders reading from it."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from dermjax.data import cache, images, pipeline
from dermjax.errors import DataError, RunFolderError
from dermjax.train.runlock import RunLock

SIZE = (16, 16)


@pytest.fixture
def paths(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i, hw in enumerate([(20, 30), (30, 20), (24, 24), (40, 25), (18, 60), (22, 33), (50, 40)]):
        path = str(tmp_path / f"img{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


def read_back(c: cache.Cache, paths) -> list:
    return c.reader().read(c.locate(paths))


@pytest.mark.parametrize("rule", images.RULES)
def test_cache_round_trip_returns_the_decoded_images(paths, tmp_path, rule):
    built = cache.build_cache(paths, str(tmp_path / "c"), img_size=SIZE, rule=rule, progress=False)
    opened = cache.open_cache(str(tmp_path / "c"), paths, SIZE, rule)
    assert opened is not None
    for c in (built, opened):
        for path, image in zip(paths, read_back(c, paths), strict=True):
            with open(path, "rb") as f:
                np.testing.assert_array_equal(image, images.decode(f.read(), path, SIZE, rule))
    if rule == images.SHORTER:  # variable long side kept, so random crops stay possible
        assert {a.shape for a in read_back(built, paths)} > {(17, 25, 3), (25, 17, 3)}


def test_interrupted_build_resumes_with_only_the_unfinished_shards(paths, tmp_path, monkeypatch):
    directory = str(tmp_path / "c")
    real_decode, calls, interrupt_at = images.decode, [], [5]

    def counting_decode(data, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt
        return real_decode(data, path, *args, **kwargs)

    monkeypatch.setattr(images, "decode", counting_decode)
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(
            paths, directory, img_size=SIZE, rule="exact", shard_size=3, progress=False
        )
    assert cache.open_cache(directory, paths, SIZE, "exact") is None  # incomplete
    calls.clear()
    interrupt_at[0] = 0
    cache.build_cache(paths, directory, img_size=SIZE, rule="exact", shard_size=3, progress=False)
    assert calls == paths[3:]  # shard 0 (3 images) was kept
    opened = cache.open_cache(directory, paths, SIZE, "exact")
    assert opened is not None and len(read_back(opened, paths)) == 7


def test_stale_or_absent_cache_is_refused_with_the_reason_logged(paths, tmp_path, caplog):
    directory = str(tmp_path / "c")
    assert cache.open_cache(directory, paths, SIZE, "exact") is None
    cache.build_cache(paths[:5], directory, img_size=SIZE, rule="exact", progress=False)
    assert cache.open_cache(directory, paths[:3], SIZE, "exact") is not None  # a subset is served
    with caplog.at_level(logging.WARNING):
        assert cache.open_cache(directory, paths, SIZE, "exact") is None
        assert cache.open_cache(directory, paths[:5], (32, 32), "exact") is None
        assert cache.open_cache(directory, paths[:5], SIZE, "shorter") is None
    text = caplog.text
    assert "2 of 7 paths are not cached" in text and "img_size" in text and "rule" in text


def test_a_paths_list_that_no_longer_matches_its_manifest_is_refused(paths, tmp_path, caplog):
    """paths.json maps paths to records: an edited or swapped list would serve wrong images."""
    directory = tmp_path / "c"
    cache.build_cache(paths[:4], str(directory), img_size=SIZE, rule="exact", progress=False)
    listed = json.loads((directory / cache.PATHS_FILE).read_text())
    (directory / cache.PATHS_FILE).write_text(json.dumps(listed[::-1]))
    with caplog.at_level(logging.WARNING):
        assert cache.open_cache(str(directory), paths[:4], SIZE, "exact") is None
    assert "paths.json does not match the manifest" in caplog.text


def test_building_over_a_cache_of_other_paths_replaces_it(paths, tmp_path):
    directory = str(tmp_path / "c")
    cache.build_cache(
        paths[:5], directory, img_size=SIZE, rule="exact", shard_size=2, progress=False
    )
    cache.build_cache(
        paths[5:], directory, img_size=SIZE, rule="exact", shard_size=2, progress=False
    )
    assert cache.open_cache(directory, paths[:5], SIZE, "exact") is None
    assert cache.open_cache(directory, paths[5:], SIZE, "exact") is not None
    assert len([n for n in os.listdir(directory) if n.endswith(".array_record")]) == 1


@pytest.mark.parametrize("geometric", [True, False])
def test_loaders_give_the_same_batches_from_cache_and_from_files(paths, tmp_path, geometric):
    os.remove(paths[2])  # a bad image is bad in both
    n = len(paths)
    records = pipeline.Records(paths, np.arange(n) % 2, np.zeros((n, 2)), np.ones(n, bool))
    rule = images.train_rule(geometric)
    train_cache = cache.build_cache(
        paths, str(tmp_path / rule), img_size=SIZE, rule=rule, progress=False
    )
    kwargs = {"batch_size": 3, "img_size": SIZE, "geometric": geometric, "seed": 3}
    raw_it = iter(pipeline.train_loader(records, **kwargs))
    cached_it = iter(pipeline.train_loader(records, cache=train_cache, **kwargs))
    for _ in range(4):
        raw, cached = next(raw_it), next(cached_it)
        for key in raw:
            np.testing.assert_array_equal(raw[key], cached[key])
    if not geometric:  # the exact-rule cache also serves evaluation
        eval_kwargs = {"batch_size": 4, "img_size": SIZE, "split": "test"}
        raw = list(pipeline.eval_loader(records, **eval_kwargs))
        cached = list(pipeline.eval_loader(records, cache=train_cache, **eval_kwargs))
        for a, b in zip(raw, cached, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["valid"], b["valid"])


def test_loader_refuses_a_cache_built_for_another_rule(paths, tmp_path):
    n = len(paths)
    records = pipeline.Records(paths, np.zeros(n), np.zeros((n, 1)), np.zeros(n, bool))
    exact = cache.build_cache(
        paths, str(tmp_path / "c"), img_size=SIZE, rule="exact", progress=False
    )
    with pytest.raises(ValueError, match="rule='shorter'"):
        pipeline.train_loader(
            records, batch_size=2, img_size=SIZE, geometric=True, seed=0, cache=exact
        )


def test_cli_main_builds_from_a_paths_file(paths, tmp_path):
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(paths) + "\n")
    argv = ["--paths", str(listing), "--out", str(tmp_path / "c"), "--img-size", "16", "16"]
    built = cache.main([*argv, "--rule", "exact", "--workers", "1"])  # a process pool
    assert built.paths == paths and built.rule == "exact"
    with open(paths[0], "rb") as f:
        expected = images.decode(f.read(), paths[0], SIZE, "exact")
    np.testing.assert_array_equal(read_back(built, paths[:1])[0], expected)


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("afile/cache", "a part of the path is a file, not a folder"),
        ("afile", "it is a file, not a folder"),
    ],
)
def test_an_uncreatable_cache_folder_is_a_data_error_naming_it(paths, tmp_path, where, reason):
    (tmp_path / "afile").write_text("not a folder\n")
    out = str(tmp_path / where)
    with pytest.raises(DataError) as info:
        cache.build_cache(paths, out, img_size=SIZE, rule="exact", progress=False)
    assert str(info.value) == (
        f"prepared cache folder {out}: cannot write there ({reason}); "
        "set data.cache_dir to a folder you can write"
    )


def test_a_cache_is_found_for_its_images_in_any_order_or_a_subset_of_them(paths, tmp_path, caplog):
    # Another seed orders the same images differently; a run on fewer rows (data_fraction,
    # datasets) reads a cache of all of them; evaluation looks the same way (evaluation.inference).
    root = str(tmp_path / "caches")
    own = cache.folder_name("exact", SIZE, paths)
    assert own == cache.folder_name("exact", SIZE, paths[::-1]) and own.startswith("exact_16x16_")
    cache.build_cache(paths, f"{root}/{own}", img_size=SIZE, rule="exact", progress=False)
    few = f"{root}/exact_16x16_0"  # sorts before any digest: tried first
    cache.build_cache(paths[:2], few, img_size=SIZE, rule="exact", progress=False)
    with caplog.at_level(logging.INFO):
        found = cache.find_cache(root, "exact", SIZE, [paths[3], paths[0]])
    assert found is not None and found.directory == f"{root}/{own}"
    assert "stale" not in caplog.text  # the cache of other images is no fault to warn about
    assert cache.find_cache(root, "exact", (8, 8), paths) is None  # another size
    assert cache.find_cache(root, "shorter", SIZE, paths) is None  # another rule
    os.rename(f"{root}/{own}", f"{root}/exact_16x16")  # the older naming
    assert cache.find_cache(root, "exact", SIZE, paths).directory == f"{root}/exact_16x16"


def _replace_image(path: str, color: int) -> None:
    before = os.stat(path).st_mtime_ns
    Image.new("RGB", (26, 21), (color, 0, 0)).save(path, format="JPEG")
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a later time, even on coarse clocks


def test_an_image_changed_after_the_build_is_never_served_stale(paths, tmp_path, caplog):
    directory = str(tmp_path / "c")
    cache.build_cache(paths, directory, img_size=SIZE, rule="exact", shard_size=3, progress=False)
    kept = os.path.join(directory, "shard-00002-of-00003.done.json")
    kept_stamp = os.stat(kept).st_mtime_ns
    _replace_image(paths[1], 255)
    with caplog.at_level(logging.WARNING):
        assert cache.open_cache(directory, paths, SIZE, "exact") is None
    assert f"1 images changed since it was built (e.g. {paths[1]})" in caplog.text
    assert cache.open_cache(directory, paths[3:], SIZE, "exact") is not None  # others unaffected
    rebuilt = cache.build_cache(
        paths, directory, img_size=SIZE, rule="exact", shard_size=3, progress=False
    )
    assert os.stat(kept).st_mtime_ns == kept_stamp  # only the changed image's shard was rebuilt
    assert read_back(rebuilt, [paths[1]])[0][..., 0].min() > 200  # the new, red pixels
    assert cache.open_cache(directory, paths, SIZE, "exact") is not None


def test_an_image_missing_at_build_time_is_read_once_it_exists(paths, tmp_path):
    directory = str(tmp_path / "c")
    os.rename(paths[0], paths[0] + ".away")
    cache.build_cache(paths, directory, img_size=SIZE, rule="exact", progress=False)
    assert list(cache.bad_paths(directory)) == [paths[0]]
    assert cache.open_cache(directory, paths, SIZE, "exact") is not None  # still missing: sound
    os.rename(paths[0] + ".away", paths[0])
    assert cache.open_cache(directory, paths, SIZE, "exact") is None
    rebuilt = cache.build_cache(paths, directory, img_size=SIZE, rule="exact", progress=False)
    assert cache.bad_paths(directory) == {}
    assert read_back(rebuilt, [paths[0]])[0] is not None


def test_a_shard_cut_short_is_refused_and_rebuilt(paths, tmp_path, caplog):
    directory = str(tmp_path / "c")
    cache.build_cache(paths, directory, img_size=SIZE, rule="exact", shard_size=3, progress=False)
    shard = os.path.join(directory, "shard-00001-of-00003.array_record")
    os.truncate(shard, os.path.getsize(shard) // 2)
    with caplog.at_level(logging.WARNING):
        assert cache.open_cache(directory, paths, SIZE, "exact") is None
    assert "shard-00001-of-00003.array_record is missing or cut short" in caplog.text
    rebuilt = cache.build_cache(
        paths, directory, img_size=SIZE, rule="exact", shard_size=3, progress=False
    )
    assert all(image is not None for image in read_back(rebuilt, paths))


def test_a_folder_another_build_holds_is_refused(paths, tmp_path):
    directory = str(tmp_path / "c")
    with (
        RunLock(directory),
        pytest.raises(RunFolderError, match=r"prepared cache folder .* in use"),
    ):
        cache.build_cache(paths, directory, img_size=SIZE, rule="exact", progress=False)
    assert not os.path.exists(os.path.join(directory, cache.MANIFEST))


def test_a_failed_shard_write_is_one_error_that_keeps_finished_shards(paths, tmp_path, monkeypatch):
    directory = str(tmp_path / "c")
    real = cache.array_record_module.ArrayRecordWriter
    opened = []

    def full_disk(path, options):
        opened.append(path)
        if len(opened) == 2:
            raise RuntimeError(f"write() failed: No space left on device; writing {path}")
        return real(path, options)

    monkeypatch.setattr(cache.array_record_module, "ArrayRecordWriter", full_disk)
    with pytest.raises(DataError, match=r"cannot write shard-00001-of-00003.array_record \("):
        cache.build_cache(
            paths, directory, img_size=SIZE, rule="exact", shard_size=3, progress=False
        )
    names = sorted(os.listdir(directory))
    assert "shard-00000-of-00003.done.json" in names
    assert not [n for n in names if n.endswith(".tmp")]


def test_images_copied_with_new_times_keep_their_cache(paths, tmp_path):
    directory = str(tmp_path / "c")
    cache.build_cache(paths, directory, img_size=SIZE, rule="exact", progress=False)
    for path in paths:  # as `cp` without -p leaves them: same bytes, another time
        os.utime(path, ns=(10**18, 10**18))
    assert cache.open_cache(directory, paths, SIZE, "exact") is not None


def test_an_unreadable_shard_record_is_refused_and_rebuilt(paths, tmp_path, caplog):
    directory = str(tmp_path / "c")
    cache.build_cache(paths, directory, img_size=SIZE, rule="exact", shard_size=3, progress=False)
    done = os.path.join(directory, "shard-00001-of-00003.done.json")
    with open(done, "w") as f:
        f.write('{"records": 3, "ba')  # cut short by a full disk in an older build
    with caplog.at_level(logging.WARNING):
        assert cache.open_cache(directory, paths, SIZE, "exact") is None
    assert "shard-00001-of-00003.done.json is unreadable" in caplog.text
    cache.build_cache(paths, directory, img_size=SIZE, rule="exact", shard_size=3, progress=False)
    assert cache.open_cache(directory, paths, SIZE, "exact") is not None
