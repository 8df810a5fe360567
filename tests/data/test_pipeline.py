"""grain loaders: batch contract, epochs, weighted sampling, padding, workers, checkpoints, bad images."""

import os

import numpy as np
import pytest
from PIL import Image

from dermjax.data import pipeline
from dermjax.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZE = (8, 8)


def make_records(directory, n: int, labels=None, text_dim: int = 3) -> pipeline.Records:
    """n small PNGs whose pixels encode their row, so a batch shows which files it read."""
    paths = []
    for i in range(n):
        path = os.path.join(directory, f"img{i:03d}.png")
        if not os.path.exists(path):
            pixels = np.full((10, 12, 3), i % 256, np.uint8)
            pixels[..., 2] = np.arange(12, dtype=np.uint8)[None, :] * 20
            Image.fromarray(pixels).save(path)
        paths.append(path)
    labels = np.arange(n) % 3 if labels is None else labels
    text = np.arange(n * text_dim, dtype=np.float32).reshape(n, text_dim)
    has_text = np.arange(n) % 2 == 0
    return pipeline.Records(paths, labels, np.where(has_text[:, None], text, 0), has_text)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return make_records(str(tmp_path_factory.mktemp("imgs")), 10)


def take(loader, count: int) -> list[dict[str, np.ndarray]]:
    it = iter(loader)
    try:
        return [next(it) for _ in range(count)]
    finally:
        it.close()


def train(records, **kwargs):
    defaults = {"batch_size": 2, "img_size": SIZE, "geometric": True, "seed": 0}
    return pipeline.train_loader(records, **{**defaults, **kwargs})


def test_train_batches_follow_the_batch_contract(records):
    (batch,) = take(train(records), 1)
    assert batch["image"].shape == (2, 8, 8, 3) and batch["image"].dtype == np.uint8
    expected = {"label": np.int32, "text": np.float32, "has_text": bool, "valid": bool}
    assert {k: batch[k].dtype for k in expected} == expected
    assert batch["index"].dtype == np.int32 and batch["text"].shape == (2, 3)
    idx = batch["index"]
    np.testing.assert_array_equal(batch["label"], records.labels[idx])
    np.testing.assert_array_equal(batch["text"], records.text[idx])
    np.testing.assert_array_equal(batch["has_text"], records.has_text[idx])
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], idx)  # the image of that row


def epoch_indices(loader, epochs: int) -> list[np.ndarray]:
    batches = take(loader, epochs * loader.steps_per_epoch)
    flat = np.concatenate([b["index"] for b in batches])
    return np.split(flat, epochs)


def test_shuffle_visits_every_sample_once_per_epoch_and_reshuffles_each_epoch(records):
    loader = train(records)
    assert loader.steps_per_epoch == 5
    first, second, third = epoch_indices(loader, 3)
    for epoch in (first, second, third):
        assert sorted(epoch) == list(range(10))
    assert not np.array_equal(first, second) and not np.array_equal(second, third)
    np.testing.assert_array_equal(np.concatenate(epoch_indices(loader, 2)), np.r_[first, second])
    assert not np.array_equal(epoch_indices(train(records, seed=1), 1)[0], first)


def test_train_drops_the_last_partial_batch_of_each_epoch(records):
    loader = train(records, batch_size=4)
    assert loader.steps_per_epoch == 2
    for epoch in epoch_indices(loader, 3):
        assert len(set(epoch)) == 8  # 8 distinct samples per epoch; the other 2 are dropped


def test_weighted_sampling_draws_each_label_equally_with_replacement(tmp_path):
    labels = np.r_[np.zeros(18, int), np.ones(2, int)]
    records = make_records(str(tmp_path), 20, labels=labels)
    loader = train(records, batch_size=5, weighted_sampling=True, geometric=False)
    epochs = epoch_indices(loader, 30)
    drawn = np.concatenate(epochs)
    counts = np.bincount(drawn, minlength=20)
    expected = np.where(labels == 1, 0.25, 0.5 / 18) * len(drawn)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 19 + 6 * np.sqrt(2 * 19)  # 19 degrees of freedom, ~6 sigma tolerance
    assert any(len(set(e)) < len(e) for e in epochs)  # with replacement
    again = epoch_indices(train(records, batch_size=5, weighted_sampling=True, geometric=False), 2)
    np.testing.assert_array_equal(np.r_[epochs[0], epochs[1]], np.r_[again[0], again[1]])
    assert not np.array_equal(epochs[0], epochs[1])


def test_random_crop_depends_on_seed_and_sample_not_on_batch_composition(records):
    by_two = take(train(records, batch_size=2), 5)
    by_five = take(train(records, batch_size=5), 2)
    crops_two = {int(i): img for b in by_two for i, img in zip(b["index"], b["image"], strict=True)}
    crops_five = {
        int(i): img for b in by_five for i, img in zip(b["index"], b["image"], strict=True)
    }
    # crops are seeded by (seed, epoch, position in the epoch's order), not by batch or worker
    for i, img in crops_five.items():
        np.testing.assert_array_equal(img, crops_two[i])
    offsets = {int(img[0, 0, 2]) for img in crops_two.values()}
    assert len(offsets) > 1  # crops start at different columns


def test_random_crops_change_with_the_seed_and_the_epoch(records):
    """Crop windows by stream position (channel 2 encodes the source column): another seed, or
    the same positions an epoch later, give other windows."""

    def windows(seed: int) -> list[int]:  # two epochs of 5 batches of 2
        loader = train(records, img_size=(40, 40), seed=seed)  # room: 44 x 52 before the crop
        return [int(img[0, 0, 2]) for b in take(loader, 10) for img in b["image"]]

    seed0, seed1 = windows(0), windows(1)
    assert len(set(seed0)) > 3
    assert seed0[:10] != seed0[10:]  # epoch 0 and epoch 1
    assert seed0[:10] != seed1[:10]  # seed 0 and seed 1
    assert seed0 == windows(0)


def test_eval_sees_every_sample_once_and_masks_the_padding(records):
    loader = pipeline.eval_loader(records, batch_size=4, img_size=SIZE, split="val")
    assert loader.steps_per_epoch == 3
    batches = list(loader)
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, [*range(10), -1, -1])
    last = batches[-1]
    np.testing.assert_array_equal(last["valid"], [True, True, False, False])
    assert (
        not last["image"][2:].any()
        and not last["text"][2:].any()
        and not last["has_text"][2:].any()
    )
    assert len(list(loader)) == 3  # a second pass starts over


def _stream(records, **kwargs):
    kwargs = {"batch_size": 4, "img_size": SIZE, "split": "val", "repeat": True, **kwargs}
    return pipeline.EvalStream(pipeline.eval_loader(records, **kwargs), records)


def test_eval_stream_gives_identical_passes_from_one_worker_iterator(records):
    stream = _stream(records, num_workers=1)
    try:
        passes, iterators = [], []
        for _ in range(3):
            passes.append(list(stream.next_pass()))
            iterators.append(set(stream.loader.iterators))
        assert iterators[0] == iterators[1] == iterators[2] and len(iterators[0]) == 1
        for batches in passes:
            assert len(batches) == 3
            index = np.concatenate([b["index"] for b in batches])
            np.testing.assert_array_equal(index, [*range(10), -1, -1])
            for a, b in zip(batches, passes[0], strict=True):
                np.testing.assert_array_equal(a["image"], b["image"])
    finally:
        stream.close()
    (it,) = iterators[0]
    with pytest.raises(ValueError, match="closed"):
        it.get_state()  # close() stopped the workers


def test_an_unfinished_eval_pass_restarts_the_stream_at_the_first_batch(records):
    stream = _stream(records)
    batches = stream.next_pass()
    first = next(batches)
    (old,) = stream.loader.iterators
    batches.close()  # the consumer stops early (a break, an error)
    with pytest.raises(ValueError, match="closed"):
        old.get_state()
    again = list(stream.next_pass())
    np.testing.assert_array_equal(again[0]["index"], first["index"])
    assert len(again) == 3
    stream.close()
    stream.close()  # safe twice


def test_eval_stream_counts_bad_images_per_pass_and_logs_them_once(with_bad_files, tmp_path):
    log = tmp_path / "bad_images.txt"
    stream = _stream(with_bad_files, bad_image_log=str(log))
    for _ in range(2):
        valid = np.concatenate([b["valid"] for b in stream.next_pass()])
        np.testing.assert_array_equal(valid, [True, False, True, True, False, True, False, False])
        assert stream.bad_images == 2
    stream.close()
    assert len(log.read_text().splitlines()) == 2


def test_processes_split_each_global_batch_into_contiguous_slices(records):
    whole = take(train(records, batch_size=4), 4)
    parts = [take(train(records, batch_size=4, shard_index=p, shard_count=2), 4) for p in (0, 1)]
    for k, batch in enumerate(whole):
        joined = np.concatenate([parts[0][k]["index"], parts[1][k]["index"]])
        np.testing.assert_array_equal(joined, batch["index"])
    evals = [
        pipeline.eval_loader(
            records, batch_size=4, img_size=SIZE, split="val", shard_index=p, shard_count=2
        )
        for p in (0, 1)
    ]
    seen = np.concatenate([b["index"] for loader in evals for b in loader])
    assert sorted(seen[seen >= 0]) == list(range(10))
    with pytest.raises(ValueError, match=r"batch_size \(5\) must be divisible"):
        train(records, batch_size=5, shard_count=2)


@pytest.mark.slow
def test_two_worker_processes_give_the_same_batches_as_in_process_loading(records):
    local = take(train(records), 7)
    spawned = take(train(records, num_workers=2, prefetch_factor=1), 7)
    for a, b in zip(local, spawned, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_started_at_batch_k_gives_batch_k_on_with_any_worker_count(records, workers):
    # A resumed run starts its loader at the number of batches it trained on; no iterator
    # state is saved, so another training.num_workers resumes on the same batches.
    expected = take(train(records), 11)[7:]  # into the second epoch
    resumed = take(train(records, start_batch=7, num_workers=workers, prefetch_factor=1), 4)
    for a, b in zip(expected, resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.fixture
def with_bad_files(tmp_path):
    records = make_records(str(tmp_path), 6, labels=np.arange(6))
    with open(records.paths[1], "wb") as f:
        f.write(b"garbage")
    os.remove(records.paths[4])
    return records


def test_skipped_bad_images_are_masked_keep_their_own_label_and_are_logged_once(
    with_bad_files, tmp_path
):
    log = tmp_path / "bad_images.txt"
    loader = train(with_bad_files, batch_size=3, bad_image_log=str(log))
    batches = take(loader, 6)  # three epochs: each bad file is met three times
    for batch in batches:
        bad = np.isin(batch["index"], [1, 4])
        np.testing.assert_array_equal(batch["valid"], ~bad)
        np.testing.assert_array_equal(batch["label"], batch["index"])  # no neighbour's label
        assert not batch["image"][bad].any()
    assert loader.bad_images == 6
    logged = [line.split("\t")[:2] for line in log.read_text().splitlines()]
    assert sorted(logged) == [["train", with_bad_files.paths[i]] for i in (1, 4)]


def test_eval_loaders_count_their_own_bad_images_and_log_their_split(with_bad_files, tmp_path):
    log = tmp_path / "bad_images.txt"
    kwargs = {"batch_size": 4, "img_size": SIZE, "bad_image_log": str(log)}
    val = pipeline.eval_loader(with_bad_files, split="val", **kwargs)
    test = pipeline.eval_loader(with_bad_files, split="test", **kwargs)
    train_loader = train(with_bad_files, batch_size=3, bad_image_log=str(log))
    valid = np.concatenate([b["valid"] for b in test])
    assert (val.bad_images, test.bad_images, train_loader.bad_images) == (0, 2, 0)
    np.testing.assert_array_equal(valid, [True, False, True, True, False, True, False, False])
    list(val)
    assert val.bad_images == 2 and test.bad_images == 2
    lines = sorted(line.split("\t")[:2] for line in log.read_text().splitlines())
    paths = with_bad_files.paths
    assert lines == sorted([[s, paths[i]] for s in ("test", "val") for i in (1, 4)])


def test_a_train_split_smaller_than_one_batch_is_a_data_error_naming_the_field(records):
    with pytest.raises(DataError, match=r"train split has 10 samples.*training\.batch_size=16"):
        train(records, batch_size=16)


def test_error_policy_raises_naming_the_bad_file(with_bad_files):
    loader = pipeline.eval_loader(
        with_bad_files, batch_size=3, img_size=SIZE, split="test", on_bad_image="error"
    )
    with pytest.raises(DataError, match=r"img001.*\(data\.on_bad_image=skip leaves it out\)"):
        list(loader)
