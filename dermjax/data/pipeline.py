"""grain input pipelines: the train loader (shuffled or weighted, drops the last partial batch) and
the eval loader (every sample once, padded and masked), both emitting the batch contract of
docs/architecture.md.

How a batch is made. The pipeline is a `MapDataset` of *batches*: element `i` is the i-th local batch,
computed by a picklable function of `i` alone (epoch order from `(seed, epoch)`, random crop from
`(seed, epoch, position)`). Batches are therefore identical for any worker count, the iterator
state is a counter that grain checkpoints, and each worker emits whole batches (one shared-memory
transfer per field). Text embeddings never travel to the workers: they are gathered by `index` in
the main process after `mp_prefetch`.

Multi-host: `batch_size` is the global batch; process `shard_index` of `shard_count` loads its
contiguous `batch_size // shard_count` slice of every global batch, so the global batches are the
same as on one host.

Closing: see loader.py (`Loader`, `LoaderIterator`, `close_iterator`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterator

import grain
import numpy as np

from dermjax.data import fs, images
from dermjax.data.cache import Cache, CacheReader
from dermjax.data.loader import (
    BadImageCounter,
    Loader,
    LoaderIterator,
    close_iterator,
    worker_init,
)
from dermjax.errors import DataError

_SHUFFLE_STREAM, _CROP_STREAM = 0, 1


@dataclasses.dataclass
class Records:
    """One split: image paths, integer labels, text embeddings and whether each sample has text."""

    paths: list[str]
    labels: np.ndarray  # int32[N]
    text: np.ndarray  # float32[N, D]; zeros where has_text is False
    has_text: np.ndarray  # bool[N]

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.labels = np.asarray(self.labels, dtype=np.int32)
        self.text = np.asarray(self.text, dtype=np.float32)
        self.has_text = np.asarray(self.has_text, dtype=bool)
        n = len(self.paths)
        shapes = {"labels": self.labels.shape[:1], "text": self.text.shape[:1]}
        shapes["has_text"] = self.has_text.shape[:1]
        bad = {k: v for k, v in shapes.items() if v != (n,)}
        if bad or self.text.ndim != 2:
            raise ValueError(f"Records fields must have {n} rows (text 2-D); got {bad or shapes}")

    def __len__(self) -> int:
        return len(self.paths)


class _BadImageLog:
    """Warns once per bad file and appends `split<TAB>path<TAB>reason` lines to a local file."""

    def __init__(self, path: str | None, split: str):
        self.path, self.split = path, split
        self.seen: set[str] = set()

    def __getstate__(self) -> dict:
        return {"path": self.path, "split": self.split, "seen": set()}

    def report(self, err: images.BadImageError) -> None:
        if err.path in self.seen:
            return
        if self.path and os.path.exists(self.path):  # other workers may have logged it already
            with open(self.path) as f:
                for line in f.read().splitlines():
                    split, path = [*line.split("\t"), "", ""][:2]
                    if split == self.split:
                        self.seen.add(path)
            if err.path in self.seen:
                return
        self.seen.add(err.path)
        logging.warning("skipping %s (%s split)", err, self.split)
        if self.path:
            with open(self.path, "a") as f:
                f.write(f"{self.split}\t{err.path}\t{err.reason}\n")


class _BatchMaker:
    """Loads the images of one batch of record indices (runs in grain workers; no jax)."""

    def __init__(
        self, records: Records, img_size, rule, crop, seed, on_bad_image, log, cache, draft
    ):
        if on_bad_image not in images.BAD_IMAGE_POLICIES:
            raise ValueError(
                f"on_bad_image must be one of {images.BAD_IMAGE_POLICIES}, got {on_bad_image!r}"
            )
        self.paths, self.labels = records.paths, records.labels
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.rule, self.crop, self.seed = rule, crop, seed
        self.on_bad_image, self.log, self.draft = on_bad_image, log, draft
        self.cache_reader: CacheReader | None = None
        self.cache_ids: np.ndarray | None = None
        self.cache_dir = None if cache is None else cache.directory
        if cache is not None:
            if cache.rule != rule or tuple(cache.img_size) != self.img_size:
                raise ValueError(
                    f"cache at {cache.directory} holds rule={cache.rule!r} size={cache.img_size}, "
                    f"this loader needs rule={rule!r} size={self.img_size}"
                )
            self.cache_reader, self.cache_ids = cache.reader(), cache.locate(self.paths)

    def _read(self, rows: np.ndarray) -> list[np.ndarray | images.BadImageError]:
        paths = [self.paths[r] for r in rows]
        if self.cache_reader is not None:
            arrays = self.cache_reader.read(self.cache_ids[rows])
            return [
                a
                if a is not None
                else images.BadImageError(
                    p,
                    f"marked bad when the cache {self.cache_dir} was built (to read it again, "
                    "delete that folder and run python -m dermjax.prepare)",
                )
                for p, a in zip(paths, arrays, strict=True)
            ]
        out = []
        for path, data in zip(paths, fs.read_many(paths), strict=True):
            if isinstance(data, Exception):
                out.append(images.BadImageError(path, f"{type(data).__name__}: {data}"))
                continue
            try:
                out.append(images.decode(data, path, self.img_size, self.rule, draft=self.draft))
            except images.BadImageError as e:
                out.append(e)
        return out

    def __call__(
        self, rows: np.ndarray, epoch: int, positions: np.ndarray
    ) -> dict[str, np.ndarray]:
        n = len(rows)
        image = np.zeros((n, *self.img_size, 3), np.uint8)
        valid = rows >= 0
        live = np.flatnonzero(valid)
        for k, loaded in zip(live, self._read(rows[live]), strict=True):
            if isinstance(loaded, images.BadImageError):
                if self.on_bad_image == "error":
                    raise images.BadImageError(
                        loaded.path, f"{loaded.reason} (data.on_bad_image=skip leaves it out)"
                    )
                self.log.report(loaded)
                valid[k] = False
                continue
            if self.crop:
                rng = np.random.default_rng([self.seed, _CROP_STREAM, epoch, int(positions[k])])
                loaded = images.random_crop(loaded, self.img_size, rng)
            image[k] = loaded
        label = np.where(rows >= 0, self.labels[np.maximum(rows, 0)], 0).astype(np.int32)
        return {"image": image, "label": label, "valid": valid, "index": rows.astype(np.int32)}


_ENDLESS = 2**53  # batches a train loader can deliver: more than any run takes


class _TrainBatch:
    """Global batch number -> local batch: per-epoch order from (seed, epoch), then load."""

    def __init__(self, maker, labels, steps, batch_size, local, shard_index, weighted):
        self.maker, self.steps, self.batch_size = maker, steps, batch_size
        self.offset = shard_index * local + np.arange(local)
        self.n, self.weighted = len(labels), weighted
        counts = np.bincount(labels)
        weights = 1.0 / counts[labels]
        self.probs = weights / weights.sum()
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Record indices of one epoch: a permutation, or weighted draws with replacement."""
        cached = self._order  # one read: reader threads may replace it concurrently
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.maker.seed, _SHUFFLE_STREAM, epoch])
            if self.weighted:
                cached = (epoch, rng.choice(self.n, size=self.n, replace=True, p=self.probs))
            else:
                cached = (epoch, rng.permutation(self.n))
            self._order = cached
        return cached[1]

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        epoch, step = divmod(int(i), self.steps)
        positions = step * self.batch_size + self.offset
        return self.maker(self.order(epoch)[positions], epoch, positions)


class _EvalBatch:
    """Batch number -> local batch in record order; numbers past one pass wrap around."""

    def __init__(self, maker, n, batch_size, steps, local, shard_index):
        self.maker, self.n, self.batch_size, self.steps = maker, n, batch_size, steps
        self.offset = shard_index * local + np.arange(local)

    def __call__(self, i: int, _: int) -> dict[str, np.ndarray]:
        positions = (i % self.steps) * self.batch_size + self.offset
        return self.maker(np.where(positions < self.n, positions, -1), 0, positions)


class _AddText:
    """Main process: gather text by index (zeros for padding) and count bad images.

    Fields that arrive in grain's shared memory are copied into ordinary arrays, so that a batch
    kept by the caller never holds shared memory (which only grain's own cleanup can free).
    """

    def __init__(self, records: Records, counter: BadImageCounter):
        self.text, self.has_text, self.counter = records.text, records.has_text, counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = {k: np.array(v) if type(v) is not np.ndarray else v for k, v in batch.items()}
        index = batch["index"]
        real = index >= 0
        rows = np.maximum(index, 0)
        self.counter.count += int(np.sum(real & ~batch["valid"]))
        text = np.where(real[:, None], self.text[rows], 0).astype(np.float32)
        return {**batch, "text": text, "has_text": self.has_text[rows] & real}


def _local_batch(batch_size: int, shard_index: int, shard_count: int) -> int:
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is outside [0, shard_count={shard_count})")
    if batch_size % shard_count:
        raise ValueError(
            f"batch_size ({batch_size}) must be divisible by the number of processes ({shard_count})"
        )
    return batch_size // shard_count


def _finish(ds, records, split, steps, local, num_workers, prefetch_factor, read_threads) -> Loader:
    counter = BadImageCounter()
    buffer = max(1, prefetch_factor)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer)
    )
    if num_workers > 0:
        options = grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=buffer
        )
        init = functools.partial(worker_init, parent_pid=os.getpid())
        it_ds = it_ds.mp_prefetch(options, worker_init_fn=init)
    return Loader(it_ds.map(_AddText(records, counter)), steps, local, split, counter)


def train_loader(
    records: Records,
    *,
    batch_size: int,
    img_size: tuple[int, int],
    geometric: bool,
    seed: int,
    weighted_sampling: bool = False,
    split: str = "train",
    num_workers: int = 0,
    prefetch_factor: int = 2,
    on_bad_image: str = "skip",
    bad_image_log: str | None = None,
    cache: Cache | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    read_threads: int = 1,
    draft: bool = True,
    start_batch: int = 0,
) -> Loader:
    """Infinite training batches, epoch after epoch (the original's train DataLoader), from
    global batch number `start_batch` on.

    Each epoch is a fresh permutation of the records seeded by `(seed, epoch)`, or, with
    `weighted_sampling`, `len(records)` draws with replacement with probability proportional to
    1 / count(label). The last partial batch of every epoch is dropped. `geometric` selects the
    shorter-side resize + random crop (see images.py). `read_threads` batches are loaded
    concurrently per process; `draft=False` decodes JPEGs at full size. `split` names the
    records in warnings and in the `bad_image_log` lines (`split<TAB>path<TAB>reason`).

    Batch number k is a pure function of k (and the seed): epoch k // steps, its positions
    k % steps, its crops. A resumed run starts at the number of batches it trained on, which
    needs no saved iterator state, so it may resume with another `num_workers`.
    """
    local = _local_batch(batch_size, shard_index, shard_count)
    steps = len(records) // batch_size
    if steps == 0:
        raise DataError(
            f"the {split} split has {len(records)} samples, fewer than one batch "
            f"(training.batch_size={batch_size}); lower training.batch_size or use more data"
        )
    rule = images.train_rule(geometric)
    log = _BadImageLog(bad_image_log, split)
    maker = _BatchMaker(records, img_size, rule, geometric, seed, on_bad_image, log, cache, draft)
    fn = _TrainBatch(
        maker, records.labels, steps, batch_size, local, shard_index, weighted_sampling
    )
    ds = grain.MapDataset.range(start_batch, start_batch + _ENDLESS).map(fn)
    return _finish(ds, records, split, steps, local, num_workers, prefetch_factor, read_threads)


def eval_loader(
    records: Records,
    *,
    batch_size: int,
    img_size: tuple[int, int],
    split: str,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    on_bad_image: str = "skip",
    bad_image_log: str | None = None,
    cache: Cache | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    read_threads: int = 1,
    draft: bool = True,
    repeat: bool = False,
) -> Loader:
    """One pass over `records` in order, exact H x W resize; each `iter()` starts a new pass.

    The last batch is padded to full size with zero images, `valid=False` and `index=-1`.
    `split` ("val", "test", ...) names the records in warnings and `bad_image_log` lines.
    `repeat=True`: the iterator runs pass after pass (read it through `EvalStream`).
    """
    local = _local_batch(batch_size, shard_index, shard_count)
    steps = -(-len(records) // batch_size)
    log = _BadImageLog(bad_image_log, split)
    maker = _BatchMaker(records, img_size, images.EXACT, False, 0, on_bad_image, log, cache, draft)
    fn = _EvalBatch(maker, len(records), batch_size, steps, local, shard_index)
    ds = grain.MapDataset.range(steps)
    ds = (ds.repeat(None) if repeat else ds).map_with_index(fn)
    return _finish(ds, records, split, steps, local, num_workers, prefetch_factor, read_threads)


class EvalStream:
    """Pass after pass over one eval split from one long-lived iterator of a `repeat=True` eval
    loader, so its worker processes start once per run, not once per epoch (seconds each time).

    `next_pass()` yields exactly one pass. A pass left unfinished (an error, a `break`) closes
    the iterator, and the next pass starts a fresh one at the first batch. `bad_images` is the
    count of the last finished pass. Bad files are warned about and logged once per stream.
    """

    def __init__(self, loader: Loader, records: Records):
        self.loader, self.records = loader, records
        self.bad_images = 0
        self._it: LoaderIterator | None = None

    def next_pass(self) -> Iterator[dict[str, np.ndarray]]:
        if self._it is None:
            self._it = iter(self.loader)
        before, finished = self.loader.bad_images, False
        try:
            for _ in range(self.loader.steps_per_epoch):
                yield next(self._it)
            finished = True
        finally:
            if not finished:
                self.close()
        self.bad_images = self.loader.bad_images - before

    def close(self) -> None:
        """Stops the workers; a later `next_pass()` starts new ones. Safe to call again."""
        close_iterator(self._it)
        self._it = None
