"""Prepared cache: every image decoded and resized once, stored raw in ArrayRecord shards.

Each record is the output of `images.decode(..., rule)` for one path: for the `"shorter"` rule the
shorter-side-resized image with its own shape (the random crop still happens per epoch), for
`"exact"` the H x W image. A record is an 8-byte header (uint32 height, width) followed by the raw
uint8 pixels; an empty record marks a bad image. Reading one is a memory copy, so the loader only
crops.

Layout of a cache directory (local disk or gs://):
  manifest.json                         identity: version, rule, img_size, paths digest, shard size
  paths.json                            the cached paths, in record order
  shard-SSSSS-of-KKKKK.array_record     records [S * shard_size, (S + 1) * shard_size)
  shard-SSSSS-of-KKKKK.done.json        written after its shard is complete: bad paths with
                                        their reasons, the shard's size in bytes and, for local
                                        images, each image's size (None: missing)
A rebuild skips shards whose `.done.json` exists, so an interrupted build resumes; it rebuilds a
shard whose file is missing or cut short, or one of whose local images has another size now
(replaced, edited, deleted, or created after a build that found it missing; an image replaced by
one of exactly the same size is not noticed). Training checks the same before
it uses a cache, and reads the images instead of a stale one. Only one build at a time writes a
local cache folder (a lock file in it).

On gs:// a shard is written to a local temporary file and uploaded (array_record writes local
files only), then its `.done.json`. Reading downloads no shard whole: array_record's reader (its
bundled Google Cloud C++ client, Application Default Credentials) opens a shard on its first
record with ranged reads of its last MiB (footer and index), then reads each record from its
offset. A process thus transfers only the records of its own batch slices (and the indexes of
the shards they lie in).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
from array_record.python import array_record_module
from array_record.python.array_record_data_source import ArrayRecordDataSource
from tqdm import tqdm

from dermjax.data import fs, images
from dermjax.errors import DataError, first_line
from dermjax.train.runlock import RunLock

VERSION = 1
MANIFEST = "manifest.json"
PATHS_FILE = "paths.json"
WRITER_OPTIONS = "group_size:1,uncompressed"  # random access; raw pixels barely compress
_HEADER = np.dtype("<u4")


def paths_digest(paths: Sequence[str]) -> str:
    """sha256 of the newline-joined path list: the dataset identity."""
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def folder_name(rule: str, img_size: Sequence[int], paths: Sequence[str]) -> str:
    """`<rule>_<H>x<W>_<digest>`: 12 hex digits of the digest of the sorted, distinct paths, so
    the same images in another order (another seed) name the same folder."""
    digest = paths_digest(sorted({str(p) for p in paths}))
    return f"{_size_prefix(rule, img_size)}_{digest[:12]}"


def _size_prefix(rule: str, img_size: Sequence[int]) -> str:
    return f"{rule}_{int(img_size[0])}x{int(img_size[1])}"


def same_kind(cache_dir: str, rule: str, img_size) -> list[str]:
    """Names of the cache folders under `cache_dir` of this rule and size (any image set, and
    the older `<rule>_<H>x<W>` naming), sorted."""
    prefix = _size_prefix(rule, img_size)
    return sorted(n for n in listing(cache_dir) if n == prefix or n.startswith(prefix + "_"))


def find_cache(cache_dir: str, rule: str, img_size, paths: Sequence[str]) -> Cache | None:
    """A complete cache under `cache_dir` that serves `paths` at this rule and size: the folder
    named after `paths` first, then any other of the same rule and size (a cache of more
    images, or of the older `<rule>_<H>x<W>` naming); None if there is none."""
    own = folder_name(rule, img_size, paths)
    others = same_kind(cache_dir, rule, img_size)
    for name in [own, *(n for n in others if n != own)]:  # only the own folder's faults logged
        found = open_cache(os.path.join(cache_dir, name), paths, img_size, rule, quiet=name != own)
        if found is not None:
            return found
    return None


def encode_record(image: np.ndarray) -> bytes:
    h, w = image.shape[:2]
    return np.array([h, w], _HEADER).tobytes() + np.ascontiguousarray(image, np.uint8).tobytes()


def decode_record(record: bytes) -> np.ndarray | None:
    """The image of a record, or None for a bad-image record."""
    if not record:
        return None
    h, w = np.frombuffer(record, _HEADER, count=2)
    return np.frombuffer(record, np.uint8, offset=8).reshape(int(h), int(w), 3)


def _shard_file(directory: str, shard: int, num_shards: int, suffix: str) -> str:
    return os.path.join(directory, f"shard-{shard:05d}-of-{num_shards:05d}.{suffix}")


def listing(directory: str) -> set[str]:
    """Names of the files in `directory` (fresh, not gcsfs's cached listing); empty if it is no
    folder."""
    fsys = fs.filesystem(directory)
    fsys.invalidate_cache(directory)
    try:
        if not fsys.isdir(directory):
            return set()
        return {name.rstrip("/").rsplit("/", 1)[-1] for name in fsys.ls(directory, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _write_json(path: str, obj: object, indent: int | None = 1) -> None:
    """Writes `obj` to `path`, whole or not at all (a local file is written aside and renamed;
    an object store's upload is atomic)."""
    written = path + ".tmp" if fs.is_local(path) else path
    try:
        with fs.open_file(written, "w") as f:
            json.dump(obj, f, indent=indent)
        if written != path:
            os.replace(written, path)
    except BaseException:
        if written != path and os.path.exists(written):
            os.remove(written)
        raise


@contextlib.contextmanager
def _writing(out_dir: str, what: str) -> Iterator[None]:
    """Turns a write the storage refuses (full disk, no permission) into one DataError."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # array_record reports I/O errors as RuntimeError
        raise DataError(
            f"prepared cache {out_dir}: cannot write {what} ({first_line(e)}); free space or set "
            "data.cache_dir elsewhere, then run again: finished shards are kept"
        ) from e


def file_size(path: str) -> int | None:
    """The size in bytes of a local image file, None when it does not exist.

    The size, not the modification time: a copy of the images (`cp`, a download) changes every
    time but no size, and a replaced or edited image almost always has another size.
    """
    try:
        return os.stat(path.removeprefix("file://")).st_size
    except OSError:
        return None


def _done_records(directory: str, present: set[str]) -> dict[str, dict | None]:
    """{`.done.json` name: its content, None when unreadable} of the finished shards among the
    names `present` (`fs.read_many`: fetched concurrently where the folder is remote)."""
    names = sorted(n for n in present if n.startswith("shard-") and n.endswith(".done.json"))
    records: dict[str, dict | None] = {}
    contents = fs.read_many([os.path.join(directory, n) for n in names])
    for name, data in zip(names, contents, strict=True):
        try:
            records[name] = json.loads(data) if isinstance(data, bytes) else None
        except ValueError:  # cut short by a full disk in a build before writes were atomic
            records[name] = None
    return records


def _shard_faults(
    done_name: str, record: dict | None, sizes: dict[str, int], wanted: set[str] | None = None
) -> tuple[str | None, list[str]]:
    """(damage, changed): whether a finished shard is damaged (its `.done.json` unreadable, its
    file missing or of another size than written), and its local images (of `wanted`, default
    all) changed since it was built."""
    if record is None:
        return f"{done_name} is unreadable", []
    shard = done_name.removesuffix(".done.json") + ".array_record"
    if shard not in sizes or sizes[shard] != record.get("bytes", sizes[shard]):
        return f"{shard} is missing or cut short", []
    image_sizes = record.get("image_sizes", {})
    paths = image_sizes if wanted is None else [p for p in image_sizes if p in wanted]
    return None, [p for p in paths if file_size(p) != image_sizes[p]]


def _file_sizes(directory: str) -> dict[str, int]:
    """{name: size in bytes} of the files in `directory` (fresh listing)."""
    fsys = fs.filesystem(directory)
    fsys.invalidate_cache(directory)
    try:
        entries = fsys.ls(directory, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries}


def _read_json(path: str) -> object:
    with fs.open_file(path, "r") as f:
        return json.load(f)


def _use_storage_emulator() -> None:
    """Points array_record's GCS client at the emulator gcsfs uses, when there is one.

    gcsfs reads `STORAGE_EMULATOR_HOST`; the Google Cloud C++ client inside array_record reads
    `CLOUD_STORAGE_EMULATOR_ENDPOINT`. Set here, it also reaches grain workers started later.
    """
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host and not os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = host if "://" in host else f"http://{host}"


class CacheReader:
    """Random access to cache records; picklable (file readers are reopened in each process)."""

    def __init__(self, shard_files: list[str], shard_counts: list[int]):
        self.instructions = [f"{f}[0:{n}]" for f, n in zip(shard_files, shard_counts, strict=True)]
        self._source: ArrayRecordDataSource | None = None

    def __getstate__(self) -> dict:
        return {"instructions": self.instructions, "_source": None}

    def read(self, ids: np.ndarray) -> list[np.ndarray | None]:
        if self._source is None:
            _use_storage_emulator()
            self._source = ArrayRecordDataSource(self.instructions)
        return [decode_record(r) for r in self._source.__getitems__([int(i) for i in ids])]


class Cache:
    """An opened, complete cache directory."""

    def __init__(self, directory: str, manifest: dict, paths: list[str]):
        self.directory = directory
        self.rule: str = manifest["rule"]
        self.img_size: tuple[int, int] = tuple(manifest["img_size"])
        self.paths = paths
        self.shard_size: int = manifest["shard_size"]
        num_shards = -(-len(paths) // self.shard_size)
        self.shard_files = [
            _shard_file(directory, s, num_shards, "array_record") for s in range(num_shards)
        ]
        self._ids = {p: i for i, p in enumerate(paths)}

    def __repr__(self) -> str:
        return f"Cache({self.directory!r}, rule={self.rule!r}, img_size={self.img_size}, n={len(self.paths)})"

    def missing(self, paths: Sequence[str]) -> list[str]:
        return [p for p in paths if p not in self._ids]

    def locate(self, paths: Sequence[str]) -> np.ndarray:
        """Record ids of `paths` (KeyError naming the first path not in the cache)."""
        return np.array([self._ids[p] for p in paths], dtype=np.int64)

    def reader(self) -> CacheReader:
        n = len(self.paths)
        counts = [
            min(self.shard_size, n - s * self.shard_size) for s in range(len(self.shard_files))
        ]
        return CacheReader(self.shard_files, counts)


def _identity(paths: Sequence[str], img_size, rule: str, shard_size: int) -> dict:
    return {
        "version": VERSION,
        "rule": rule,
        "img_size": [int(img_size[0]), int(img_size[1])],
        "paths_sha256": paths_digest(paths),
        "num_paths": len(paths),
        "shard_size": shard_size,
    }


class _Prepare:
    """path -> (record bytes, bad reason or None); runs in the build's worker processes."""

    def __init__(self, img_size, rule: str, draft: bool):
        self.img_size, self.rule, self.draft = tuple(img_size), rule, draft

    def __call__(self, path: str) -> tuple[bytes, str | None, int | bool | None]:
        """(record, bad reason or None, `file_size` taken before reading; False if remote)."""
        size_now = file_size(path) if fs.is_local(path) else False
        try:
            data = fs.read_bytes(path)
            return (
                encode_record(
                    images.decode(data, path, self.img_size, self.rule, draft=self.draft)
                ),
                None,
                size_now,
            )
        except images.BadImageError as e:
            return b"", e.reason, size_now
        except OSError as e:
            return b"", f"{type(e).__name__}: {e}", size_now


def _ignore_interrupts() -> None:
    """Build workers leave Ctrl-C to the main process, which stops them (a worker interrupted
    mid-task could leave the pool unable to shut down)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_cache(
    records_paths: Sequence[str],
    out_dir: str,
    *,
    img_size: tuple[int, int],
    rule: str,
    num_workers: int = 0,
    progress: bool = True,
    shard_size: int = 1024,
    draft: bool = True,
) -> Cache:
    """Build (or finish building) the cache of `records_paths` under `out_dir` (local or gs://).

    Paths are stored once each, sorted. A directory holding a cache of other paths/size/rule is
    cleared first. Bad images are stored as bad records and listed in the shard's `.done.json`.
    """
    if rule not in images.RULES:
        raise ValueError(f"unknown resize rule {rule!r}; expected one of {images.RULES}")
    out_dir = out_dir.removeprefix("file://")  # a local folder, as the lock and renames need
    build = functools.partial(
        _build, records_paths, out_dir, img_size, rule, num_workers, progress, shard_size, draft
    )
    if not fs.is_local(out_dir):  # an object store has no lock: build it from one machine
        return build()
    fs.ensure_writable_folder(
        out_dir, "prepared cache folder", "set data.cache_dir to a folder you can write"
    )
    fix = "wait for that build to finish (or stop it), then run again"
    with RunLock(out_dir, what="prepared cache folder", fix=fix):
        return build()


def _build(
    records_paths: Sequence[str],
    out_dir: str,
    img_size: tuple[int, int],
    rule: str,
    num_workers: int,
    progress: bool,
    shard_size: int,
    draft: bool,
) -> Cache:
    """`build_cache` once the folder is this process's."""
    paths = sorted({str(p) for p in records_paths})  # the same images: the same cache
    identity = _identity(paths, img_size, rule, shard_size)
    local = fs.is_local(out_dir)
    fsys = fs.filesystem(out_dir)
    manifest_file = os.path.join(out_dir, MANIFEST)
    present = listing(out_dir)
    if MANIFEST in present:
        try:
            old = _read_json(manifest_file)
        except ValueError:
            old = {}
        if {k: old.get(k) for k in identity} != identity:
            logging.warning("cache at %s holds another dataset or size; rebuilding it", out_dir)
            stale = [n for n in present if n.startswith("shard-") or n in (MANIFEST, PATHS_FILE)]
            if stale:
                fsys.rm([os.path.join(out_dir, n) for n in stale])
            present = set()
    sizes = _file_sizes(out_dir) if present else {}
    for name, record in _done_records(out_dir, present).items():
        damage, changed = _shard_faults(name, record, sizes)
        if damage or changed:
            why = damage or f"{len(changed)} of its images changed since (e.g. {changed[0]})"
            logging.warning("rebuilding %s: %s", name.removesuffix(".done.json"), why)
            present.discard(name)
    with _writing(out_dir, PATHS_FILE):
        _write_json(os.path.join(out_dir, PATHS_FILE), paths, indent=None)
        _write_json(manifest_file, {**identity, "complete": False})

    num_shards = -(-len(paths) // shard_size)
    shards = {  # the unfinished ones
        s: paths[s * shard_size : (s + 1) * shard_size]
        for s in range(num_shards)
        if os.path.basename(_shard_file(out_dir, s, num_shards, "done.json")) not in present
    }
    todo = [p for shard_paths in shards.values() for p in shard_paths]
    prepare = _Prepare(img_size, rule, draft)
    pool = None
    if num_workers > 0:  # started while Ctrl-C is ignored: they inherit that from the start
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            pool = multiprocessing.get_context("spawn").Pool(
                num_workers, initializer=_ignore_interrupts
            )
        finally:
            signal.signal(signal.SIGINT, previous)
    bar = tqdm(
        total=len(paths), initial=len(paths) - len(todo), disable=not progress, desc="prepare cache"
    )
    results = pool.imap(prepare, todo, chunksize=4) if pool else map(prepare, todo)
    scratch = None if local else tempfile.TemporaryDirectory(prefix="dermjax-cache-")
    written = None
    try:
        for s, shard_paths in shards.items():
            final = _shard_file(out_dir, s, num_shards, "array_record")
            written = final + ".tmp" if local else os.path.join(scratch.name, "shard")
            bad, image_sizes = {}, {}
            name = os.path.basename(final)
            with _writing(out_dir, name):
                writer = array_record_module.ArrayRecordWriter(written, WRITER_OPTIONS)
            for path in shard_paths:
                record, reason, size_now = next(results)
                with _writing(out_dir, name):
                    writer.write(record)
                if reason is not None:
                    bad[path] = reason
                if size_now is not False:
                    image_sizes[path] = size_now
                bar.update(1)
            with _writing(out_dir, name):
                writer.close()
                size = os.path.getsize(written)
                if local:
                    os.replace(written, final)
                else:
                    fsys.put_file(written, final)
                done = {"records": len(shard_paths), "bad": bad, "bytes": size}
                _write_json(
                    _shard_file(out_dir, s, num_shards, "done.json"),
                    {**done, "image_sizes": image_sizes},
                )
            if bad:
                tqdm.write(
                    f"{len(bad)} bad images in cache shard {s}, e.g. {next(iter(bad.items()))}",
                    file=sys.stderr,
                )
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        if scratch is not None:
            scratch.cleanup()
        elif written is not None and os.path.exists(written):
            os.remove(written)  # a shard cut short by an error or a stop
    with _writing(out_dir, MANIFEST):
        _write_json(manifest_file, {**identity, "complete": True})
    return Cache(out_dir, identity, paths)


def bad_paths(directory: str) -> dict[str, str]:
    """{path: reason} of the images a cache stored as bad (from its shards' `.done.json`)."""
    bad: dict[str, str] = {}
    for name in sorted(listing(directory)):
        if name.startswith("shard-") and name.endswith(".done.json"):
            bad.update(_read_json(os.path.join(directory, name))["bad"])
    return bad


def open_cache(
    directory: str, paths: Sequence[str], img_size, rule: str, *, quiet: bool = False
) -> Cache | None:
    """The cache at `directory` (local or gs://) if it is complete and serves `paths` as asked.

    Returns None and logs why otherwise (absent, incomplete, built for another size/rule/version,
    or missing some of `paths`), unless `quiet`. Raises DataError for gs:// without Google Cloud
    credentials.
    """
    say = logging.debug if quiet else logging.info
    warn = logging.debug if quiet else logging.warning
    manifest_file = os.path.join(directory, MANIFEST)
    if MANIFEST not in listing(directory):
        say("no prepared cache at %s", directory)
        return None
    try:
        manifest = _read_json(manifest_file)
        cached_paths = _read_json(os.path.join(directory, PATHS_FILE))
    except (OSError, ValueError) as e:
        warn("prepared cache at %s is unreadable: %s", directory, e)
        return None
    want = {"version": VERSION, "rule": rule, "img_size": [int(img_size[0]), int(img_size[1])]}
    problems = [
        f"{k}={manifest.get(k)!r} (need {v!r})" for k, v in want.items() if manifest.get(k) != v
    ]
    if not manifest.get("complete"):
        problems.append("its build did not finish")
    if manifest.get("paths_sha256") != paths_digest(cached_paths):
        problems.append("paths.json does not match the manifest")
    if not problems:
        cache = Cache(directory, manifest, cached_paths)
        if missing := cache.missing(paths):
            problems.append(
                f"{len(missing)} of {len(paths)} paths are not cached (e.g. {missing[0]})"
            )
    if not problems:
        problems += _faults(directory, set(paths))
    if problems:
        warn(
            "prepared cache at %s is stale, reading the images instead: %s; rebuild it with "
            "`python -m dermjax.prepare` and this run's config",
            directory,
            "; ".join(problems),
        )
        return None
    _use_storage_emulator()  # before any grain worker starts, so that workers inherit it
    return cache


def _faults(directory: str, wanted: set[str]) -> list[str]:
    """Damaged shards, and `wanted` local images changed since the build, as problems."""
    sizes = _file_sizes(directory)
    damaged, changed = [], []
    for name, record in _done_records(directory, set(sizes)).items():
        damage, shard_changed = _shard_faults(name, record, sizes, wanted)
        damaged += [damage] if damage else []
        changed += shard_changed
    problems = damaged[:1]
    if changed:
        problems.append(f"{len(changed)} images changed since it was built (e.g. {changed[0]})")
    return problems


def main(argv: Sequence[str] | None = None) -> Cache:
    """CLI: `python -m dermjax.data.cache --paths FILE --out DIR --img-size 224 224 --rule shorter`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", required=True, help="text file, one image path per line")
    parser.add_argument("--out", required=True, help="cache directory (local or gs://)")
    parser.add_argument("--img-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--rule", choices=images.RULES, default=images.SHORTER)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard-size", type=int, default=1024)
    args = parser.parse_args(argv)
    with fs.open_file(args.paths, "r") as f:
        paths = [line.strip() for line in f if line.strip()]
    return build_cache(
        paths,
        args.out,
        img_size=tuple(args.img_size),
        rule=args.rule,
        num_workers=args.workers,
        shard_size=args.shard_size,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
