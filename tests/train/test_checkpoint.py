"""Checkpoints: bitwise round trip, retention, damage fallback, read-only reading, model checks."""

import gc
import logging
import os
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dermjax.errors import UserError
from dermjax.train import checkpoint_restore
from dermjax.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointReader,
    resolve_load_from,
    restore_weights_only,
)


class TinyNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, classes: int = 3) -> None:
        self.backbone = nnx.Sequential(nnx.Linear(4, 6, rngs=rngs), nnx.BatchNorm(6, rngs=rngs))
        self.head = nnx.Linear(6, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.backbone(x))


def make_state(seed: int = 0, classes: int = 3) -> dict:
    """The trainer's state layout, trained-looking: moved batch stats, non-zero Adam moments."""
    model = TinyNet(nnx.Rngs(seed), classes=classes)
    model(jnp.linspace(-1.0, 1.0 + seed, 8 * 4).reshape(8, 4))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = optax.adamw(1e-2)
    opts = {}
    for part in ("backbone", "head"):
        opt = tx.init(params[part])
        _, opts[part] = tx.update(jax.tree.map(jnp.ones_like, params[part]), opt, params[part])
    return {
        "params": params,
        "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
        "opt_backbone": opts["backbone"],
        "opt_head": opts["head"],
        "step": jnp.int32(7 + seed),
    }


def abstract_of(state: dict):
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )


def weights_of(state: dict) -> dict:
    return {k: state[k] for k in ("params", "batch_stats")}


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
        for x, y in zip(la, lb, strict=True)
    )


def snapshot(root: pathlib.Path) -> list[tuple[str, int, int]]:
    """Every path under `root` with its size and modification time."""
    found = [root, *root.rglob("*")]
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in found)


def test_round_trip_restores_state_and_meta_bitwise(tmp_path):
    state = make_state()
    meta = {"epoch": 2, "best_metric": 0.25, "classes": ["a", "b", "c"]}
    with Checkpointer(str(tmp_path), save_frequency=1, keep_last=2) as ckpt:
        ckpt.save(7, state=state, meta=meta, kind="periodic")
        restored, got_meta = ckpt.restore(None, abstract_state=abstract_of(make_state(seed=5)))
    assert leaves_equal(restored, state)
    assert got_meta["epoch"] == 2 and got_meta["classes"] == ["a", "b", "c"]
    assert got_meta["kind"] == "periodic" and got_meta["timestamp"]


def test_should_save_periodic_follows_one_based_epoch_frequency(tmp_path):
    ckpt = Checkpointer(str(tmp_path), save_frequency=3, keep_last=1)
    assert [e for e in range(9) if ckpt.should_save_periodic(e)] == [2, 5, 8]
    ckpt.close()


def test_retention_keeps_last_periodic_plus_early_best_and_preempt(tmp_path):
    state = make_state()
    with Checkpointer(str(tmp_path), save_frequency=1, keep_last=2) as ckpt:
        for epoch in range(5):
            step = 10 * (epoch + 1)
            if epoch == 1:
                ckpt.save(step, state=state, meta={}, kind="best")
            ckpt.save(step, state=state, meta={}, kind="periodic")
        ckpt.save(55, state=state, meta={}, kind="preempt")
        assert ckpt.best() == 20 and ckpt.latest() == 55
        _, meta = ckpt.restore(20, abstract_state=abstract_of(state))
    kept = {d.name: sorted(int(s.name) for s in d.iterdir()) for d in tmp_path.iterdir()}
    assert kept == {"periodic": [40, 50], "best": [20], "last": [55]}
    assert meta["kind"] == "best"


def damage(step_dir: pathlib.Path) -> None:
    """Truncate every array chunk of a saved step, as a torn write would."""
    chunks = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert chunks
    for p in chunks:
        p.write_bytes(p.read_bytes()[:5])


def test_damaged_latest_raises_when_explicit_and_falls_back_when_auto(tmp_path, caplog):
    old, new = make_state(0), make_state(1)
    ckpt = Checkpointer(str(tmp_path), save_frequency=1, keep_last=3, async_save=False)
    ckpt.save(10, state=old, meta={"epoch": 0}, kind="periodic")
    ckpt.save(20, state=new, meta={"epoch": 1}, kind="periodic")
    damage(tmp_path / "periodic" / "20")
    abstract = abstract_of(old)
    with pytest.raises(CheckpointError, match=r"step 20 .*\(saved steps: \[10, 20\]\)") as info:
        ckpt.restore(20, abstract_state=abstract)
    # The reason is TensorStore's, naming the damaged file, not orbax's wrapper with its repr.
    assert "OUT_OF_RANGE" in str(info.value) and "pybind11" not in str(info.value)
    with caplog.at_level(logging.WARNING):
        restored, meta = ckpt.restore(None, abstract_state=abstract)
    assert meta["epoch"] == 0 and leaves_equal(restored, old)
    mine = [r.getMessage() for r in caplog.records if r.name.startswith("dermjax")]
    [warning] = [m for m in mine if "periodic/20" in m]
    assert warning.startswith("Restored step 10")  # one warning names the damaged copy
    # Re-running epoch 1 replaces the damaged step instead of being refused or shadowed by it.
    ckpt.save(20, state=new, meta={"epoch": 1}, kind="periodic")
    restored, meta = ckpt.restore(None, abstract_state=abstract)
    assert meta["epoch"] == 1 and leaves_equal(restored, new)
    ckpt.close()


def damage_largest_file(step_dir: pathlib.Path) -> None:
    """Truncate only the largest data file of a saved step: some reads succeed, others fail."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:1000])


@pytest.mark.parametrize("damaged", [damage, damage_largest_file])
def test_falling_back_past_a_damaged_copy_leaves_no_abandoned_read_tracebacks(
    tmp_path, monkeypatch, damaged
):
    # Each abandoned read of the damaged copy used to reach sys.unraisablehook: "Event loop is
    # closed" (all chunks truncated: 279 tracebacks, 1,664 stderr lines, for these 300 arrays),
    # or orbax's read coroutine raising as it is collected (one file truncated: 30 tracebacks,
    # 3,577 lines, each printing a TensorStore spec; whether any read is left unfinished depends
    # on timing, so the filter itself is tested deterministically below).
    def state(seed: int) -> dict:
        key = jax.random.key(seed)  # random: compressed chunks would hide a truncation
        weights = {
            f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (64, 64)) for i in range(300)
        }
        return {"params": weights, "step": jnp.int32(seed)}

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    with Checkpointer(str(tmp_path), save_frequency=1, keep_last=3, async_save=False) as ckpt:
        ckpt.save(10, state=state(0), meta={"epoch": 0}, kind="periodic")
        ckpt.save(20, state=state(1), meta={"epoch": 1}, kind="periodic")
        damaged(tmp_path / "periodic" / "20")
        restored, meta = ckpt.restore(None, abstract_state=abstract_of(state(0)))
    assert meta["epoch"] == 0 and leaves_equal(restored, state(0))
    gc.collect()  # unfinished read coroutines raise as they are collected
    assert seen == []


_READ = """
import asyncio
async def _read_array_index_and_device_put():
    try:
        await asyncio.sleep(0)
    except BaseException as e:  # as orbax's read does: closing it unfinished raises
        raise Exception("Encountered error while reading array index: (slice(0, 8, 1),)") from e
"""


def _abandon_read(filename: str) -> None:
    """Starts a read coroutine defined in `filename` and drops it unfinished: Python closes it
    and reports what it raises to sys.unraisablehook."""
    namespace: dict = {}
    exec(compile(_READ, filename, "exec"), namespace)
    read = namespace["_read_array_index_and_device_put"]()
    read.send(None)
    del read
    gc.collect()


def test_only_abandoned_read_errors_are_dropped_also_after_the_restore(monkeypatch):
    class Unraisable:
        def __init__(self, e: Exception) -> None:
            self.exc_value, self.object = e, None

    orbax_file = "/site-packages/orbax/checkpoint/_src/serialization/serialization.py"
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    _abandon_read(orbax_file)
    assert len(seen) == 1 and seen.pop().startswith("Encountered error while reading array")
    with checkpoint_restore._quiet_leftover_reads():
        sys.unraisablehook(Unraisable(RuntimeError("Event loop is closed")))
        _abandon_read(orbax_file)
        sys.unraisablehook(Unraisable(RuntimeError("something else")))
    with checkpoint_restore._quiet_leftover_reads():  # wrapped once, not twice
        pass
    sys.unraisablehook(Unraisable(RuntimeError("Event loop is closed")))  # a late callback
    _abandon_read(orbax_file)  # a late collection
    sys.unraisablehook(Unraisable(ValueError("another")))
    _abandon_read("/elsewhere/reader.py")  # not orbax's: kept
    assert seen[:2] == ["something else", "another"] and len(seen) == 3
    assert seen[2].startswith("Encountered error while reading array")


def test_an_abandoned_write_collected_at_shutdown_is_dropped(monkeypatch):
    # A failed save's unfinished write coroutines raise ImportError when Python shuts down.
    class Unraisable:
        def __init__(self, e: Exception, source) -> None:
            self.exc_value, self.object = e, source

    async def write_fragment():
        pass

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    checkpoint_restore.drop_abandoned_reads()
    elsewhere = write_fragment()  # a coroutine of this file
    shutdown = ImportError("sys.meta_path is None, Python is likely shutting down")
    code = elsewhere.cr_code.replace(co_filename="/site-packages/orbax/serialization.py")
    sys.unraisablehook(Unraisable(shutdown, types.SimpleNamespace(cr_code=code)))  # dropped
    sys.unraisablehook(Unraisable(shutdown, elsewhere))  # not orbax's: kept
    elsewhere.close()
    assert seen == [str(shutdown)]


TENSORSTORE_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file '
    '"/ckpt/periodic/20.orbax-checkpoint-tmp/state/": Failed to write 1650688 bytes to file 6: '
    "No space left on device [os_error_code='28']"
)


def test_a_write_the_storage_refuses_is_one_checkpoint_error(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path), save_frequency=1, keep_last=3, async_save=False)
    ckpt.save(10, state=make_state(), meta={"epoch": 0}, kind="periodic")

    def full(*args, **kwargs):
        try:
            raise ValueError(TENSORSTORE_FULL)
        except ValueError as e:  # orbax re-raises it from its background thread
            raise RuntimeError("Save Finalize thread failed") from e

    monkeypatch.setattr(ckpt._managers["periodic"], "save", full)
    with pytest.raises(CheckpointError) as info:
        ckpt.save(20, state=make_state(), meta={"epoch": 1}, kind="periodic")
    assert str(info.value) == (
        f"cannot write a checkpoint under {tmp_path}: no space left on device; make room (or "
        "fix the folder) and re-run the same command: it resumes from the newest complete "
        "checkpoint"
    )
    ckpt.close()  # the error was reported: closing does not raise it again
    with CheckpointReader(str(tmp_path)) as reader:
        assert reader.latest() == 10
    ckpt = Checkpointer(str(tmp_path), save_frequency=1, keep_last=3, async_save=False)
    monkeypatch.setattr(ckpt._managers["best"], "save", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # anything else is a bug: its traceback stays
        ckpt.save(20, state=make_state(), meta={"epoch": 1}, kind="best")
    ckpt.close()


def test_saving_an_earlier_step_removes_newer_checkpoints_of_abandoned_run(tmp_path):
    state = make_state()
    with Checkpointer(str(tmp_path), save_frequency=1, keep_last=5) as ckpt:
        for step in (10, 20, 30):
            ckpt.save(step, state=state, meta={}, kind="periodic")
        ckpt.save(30, state=state, meta={}, kind="best")
        ckpt.save(20, state=state, meta={"rerun": True}, kind="periodic")
        assert ckpt.latest() == 20 and ckpt.best() is None
        _, meta = ckpt.restore(None, abstract_state=abstract_of(state))
    assert meta["rerun"] is True


def test_restore_without_checkpoints_or_unknown_step_raises(tmp_path):
    state = make_state()
    with Checkpointer(str(tmp_path), save_frequency=1, keep_last=1) as ckpt:
        with pytest.raises(CheckpointError, match="No checkpoint under"):
            ckpt.restore(None, abstract_state=abstract_of(state))
        ckpt.save(10, state=state, meta={}, kind="final")
        with pytest.raises(CheckpointError, match=r"step 11 .*saved: \[10\]"):
            ckpt.restore(11, abstract_state=abstract_of(state))


def test_non_json_meta_is_rejected_at_save_time(tmp_path):
    with (
        Checkpointer(str(tmp_path), save_frequency=1, keep_last=1) as ckpt,
        pytest.raises(TypeError),
    ):
        ckpt.save(1, state=make_state(), meta={"x": object()}, kind="final")


def test_async_saves_become_visible_in_order_and_complete_after_wait(tmp_path):
    state = {"w": jnp.arange(4_000_000, dtype=jnp.float32), "step": jnp.int32(3)}
    ckpt = Checkpointer(str(tmp_path), save_frequency=1, keep_last=1, async_save=True)
    ckpt.save(3, state=state, meta={}, kind="best")
    ckpt.save(3, state=state, meta={}, kind="periodic")
    # The periodic save started only once the best one was finalised (a crash now keeps both).
    assert (tmp_path / "best" / "3" / "commit_success.txt").exists()
    ckpt.wait()
    # A second process (here: a second Checkpointer) sees and reads the finished step.
    reader = Checkpointer(str(tmp_path), save_frequency=1, keep_last=1)
    assert (reader.latest(), reader.best()) == (3, 3)
    restored, _ = reader.restore(3, abstract_state=abstract_of(state))
    assert leaves_equal(restored, state)
    reader.close()
    ckpt.close()


def test_an_end_of_epoch_save_replaces_a_preemption_copy_of_the_same_step(tmp_path):
    # Preempted on the epoch's last step, resumed, then the epoch ends at that same step.
    state = make_state()
    with Checkpointer(str(tmp_path), save_frequency=1, keep_last=2) as ckpt:
        ckpt.save(40, state=state, meta={"finished": None}, kind="preempt")
        ckpt.save(40, state=state, meta={"finished": "completed"}, kind="periodic")
        assert ckpt.latest_meta()[1]["finished"] == "completed"
    assert not (tmp_path / "last" / "40").exists()


def test_resolve_load_from_makes_relative_paths_absolute(tmp_path, monkeypatch):
    ckdir = tmp_path / "run" / "checkpoints"
    with Checkpointer(str(ckdir), save_frequency=1, keep_last=2) as ckpt:
        ckpt.save(10, state=make_state(), meta={}, kind="periodic")
    monkeypatch.chdir(tmp_path)
    assert resolve_load_from("run") == (str(ckdir), None)


def test_resolve_load_from_accepts_workdir_checkpoint_dirs_and_step_dirs(tmp_path):
    ckdir = tmp_path / "run" / "checkpoints"
    with Checkpointer(str(ckdir), save_frequency=1, keep_last=2) as ckpt:
        for step, kind in ((10, "periodic"), (20, "best"), (30, "periodic")):
            ckpt.save(step, state=make_state(), meta={}, kind=kind)
    assert resolve_load_from(str(tmp_path / "run")) == (str(ckdir), None)
    assert resolve_load_from(str(ckdir)) == (str(ckdir), None)
    assert resolve_load_from(str(ckdir / "best")) == (str(ckdir), 20)
    assert resolve_load_from(str(ckdir / "periodic")) == (str(ckdir), 30)  # its newest step
    assert resolve_load_from(str(ckdir / "periodic" / "10")) == (str(ckdir), 10)
    with pytest.raises(CheckpointError, match=r"checkpoint\.load_from=.* not a workdir"):
        resolve_load_from(str(tmp_path))


def test_a_folder_of_original_pth_files_names_the_field_and_the_converter(tmp_path):
    (tmp_path / "exp_best.pth").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        resolve_load_from(str(tmp_path), "checkpoint.init_from")
    message = str(info.value)
    assert message.startswith(f"checkpoint.init_from={tmp_path} is not a workdir")
    assert "PyTorch checkpoints of the original (exp_best.pth)" in message
    assert f"convert_original_checkpoint.py --pth {tmp_path / 'exp_best.pth'}" in message


def test_restore_weights_only_returns_saved_arrays_placed_like_the_abstract(tmp_path):
    state = make_state()
    with Checkpointer(str(tmp_path / "checkpoints"), save_frequency=1, keep_last=1) as ckpt:
        ckpt.save(7, state=state, meta={"classes": ["a", "b", "c"]}, kind="final")
    abstract = weights_of(abstract_of(make_state(seed=5)))
    abstract["params"]["head"]["bias"] = jax.ShapeDtypeStruct(
        (3,), jnp.bfloat16, sharding=abstract["params"]["head"]["bias"].sharding
    )
    weights, meta = restore_weights_only(str(tmp_path), abstract)
    assert meta["classes"] == ["a", "b", "c"]
    assert jax.tree.structure(weights) == jax.tree.structure(abstract)
    for got, want in zip(jax.tree.leaves(weights), jax.tree.leaves(abstract), strict=True):
        assert isinstance(got, jax.Array)
        assert (got.dtype, got.sharding) == (want.dtype, want.sharding)
    expected = weights_of(state)
    expected["params"]["head"]["bias"] = expected["params"]["head"]["bias"].astype(jnp.bfloat16)
    assert leaves_equal(weights, expected)
    total = jax.jit(lambda t: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(t)))
    assert np.isclose(total(weights), total(expected))


def test_restore_weights_only_into_other_class_count_raises_one_clear_line(tmp_path):
    with Checkpointer(str(tmp_path / "checkpoints"), save_frequency=1, keep_last=1) as ckpt:
        ckpt.save(7, state=make_state(), meta={}, kind="final")
    other = weights_of(abstract_of(make_state(classes=5)))
    other["params"]["backbone"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
    with pytest.raises(CheckpointError) as raised:
        restore_weights_only(str(tmp_path), other)
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and "\n" not in message
    assert "was saved by a different model" in message
    assert "params.head.kernel: checkpoint (6, 3), model (6, 5)" in message
    assert "params.backbone.extra: not in checkpoint" in message
    assert "opt_head" not in message  # optimizer state is not part of a weights-only restore


def test_restore_into_another_model_raises_at_once_without_falling_back(tmp_path, caplog):
    ckdir = tmp_path / "checkpoints"
    with Checkpointer(str(ckdir), save_frequency=1, keep_last=3) as ckpt:
        for step in (10, 20):
            ckpt.save(step, state=make_state(), meta={}, kind="periodic")
    other = abstract_of(make_state(classes=5))  # 6 differing arrays: head and its Adam moments
    with (
        caplog.at_level(logging.WARNING),
        CheckpointReader(str(ckdir)) as reader,
        pytest.raises(CheckpointError) as raised,
    ):
        reader.restore(None, abstract_state=other)
    message = str(raised.value)
    assert message.startswith(f"checkpoint under {ckdir} (periodic/20) was saved by a different")
    assert "params.head.bias: checkpoint (3,), model (5,)" in message
    assert "... and 1 more" in message and "\n" not in message
    assert "cannot be read" not in caplog.text and "Restored step" not in caplog.text


def test_reading_another_run_leaves_its_folder_untouched(tmp_path):
    run = tmp_path / "run"
    state = make_state()
    with Checkpointer(str(run / "checkpoints"), save_frequency=1, keep_last=2) as ckpt:
        ckpt.save(10, state=state, meta={"epoch": 0}, kind="best")
        ckpt.save(10, state=state, meta={"epoch": 0}, kind="periodic")
        ckpt.save(12, state=state, meta={"epoch": 1}, kind="final")
    before = snapshot(run)
    directory, step = resolve_load_from(str(run))
    with CheckpointReader(directory, monitor_mode="min") as reader:
        assert (reader.latest(), reader.best()) == (12, 10)
        assert reader.latest_meta()[0] == 12 and reader.read_meta(10)["epoch"] == 0
        restored, meta = reader.restore(step, abstract_state=abstract_of(state))
    weights, _ = restore_weights_only(str(run), weights_of(abstract_of(state)))
    assert meta["epoch"] == 1 and leaves_equal(restored, state)
    assert leaves_equal(weights, weights_of(state))
    assert snapshot(run) == before


def test_folder_with_only_periodic_restores_without_creating_other_kinds(tmp_path):
    ckdir = tmp_path / "checkpoints"
    state = make_state()
    with Checkpointer(str(ckdir), save_frequency=1, keep_last=1) as ckpt:
        ckpt.save(10, state=state, meta={}, kind="periodic")
    (ckdir / "best").rmdir()
    (ckdir / "last").rmdir()
    assert resolve_load_from(str(ckdir)) == (str(ckdir), None)
    with CheckpointReader(str(ckdir)) as reader:
        restored, _ = reader.restore(None, abstract_state=abstract_of(state))
    assert leaves_equal(restored, state)
    assert sorted(os.listdir(ckdir)) == ["periodic"]


def test_latest_meta_skips_unreadable_meta_and_read_meta_reads_one_step(tmp_path, caplog):
    state = make_state()
    with Checkpointer(str(tmp_path), save_frequency=1, keep_last=3) as ckpt:
        assert ckpt.latest_meta() is None
        ckpt.save(10, state=state, meta={"epoch": 0}, kind="periodic")
        ckpt.save(20, state=state, meta={"epoch": 1}, kind="periodic")
        assert ckpt.latest_meta()[0] == 20
    (tmp_path / "periodic" / "20" / "meta" / "metadata").write_text("{not json")
    with caplog.at_level(logging.INFO), CheckpointReader(str(tmp_path)) as reader:
        step, meta = reader.latest_meta()
        assert (step, meta["epoch"], meta["kind"]) == (10, 0, "periodic")
        # Named at INFO: the restore that follows tries that copy again and warns once for it.
        mine = [r for r in caplog.records if r.name.startswith("dermjax")]
        [record] = [r for r in mine if "periodic/20" in r.getMessage()]
        assert record.levelno == logging.INFO
        assert reader.read_meta(10)["epoch"] == 0
        with pytest.raises(CheckpointError, match="metadata of step 20"):
            reader.read_meta(20)
        with pytest.raises(CheckpointError, match=r"step 30 .*saved: \[10, 20\]"):
            reader.read_meta(30)


def test_gcs_save_prune_and_restore_against_emulator(gcs_root):
    gcsfs = pytest.importorskip("gcsfs")
    state = make_state()
    workdir = f"{gcs_root}/run"
    with Checkpointer(
        f"{workdir}/checkpoints", save_frequency=1, keep_last=1, async_save=False
    ) as ckpt:
        ckpt.save(10, state=make_state(1), meta={"epoch": 0}, kind="best")
        ckpt.save(10, state=make_state(1), meta={"epoch": 0}, kind="periodic")
        ckpt.save(20, state=state, meta={"epoch": 1}, kind="periodic")
        assert (ckpt.latest(), ckpt.best()) == (20, 10)
    directory, step = resolve_load_from(workdir)
    with CheckpointReader(directory) as reader:
        restored, meta = reader.restore(step, abstract_state=abstract_of(state))
    assert meta["epoch"] == 1 and leaves_equal(restored, state)
    fs = gcsfs.GCSFileSystem()
    kept = {
        "/".join(p.split("/")[-2:])
        for sub in ("periodic", "best")
        for p in fs.ls(f"{directory}/{sub}")
    }
    assert kept == {"periodic/20", "best/10"}


def test_a_writing_checkpointer_removes_torn_saves_and_a_reader_leaves_them(tmp_path):
    with Checkpointer(str(tmp_path), save_frequency=1, keep_last=3, async_save=False) as ckpt:
        ckpt.save(10, state=make_state(), meta={"epoch": 0}, kind="periodic")
    torn = tmp_path / "periodic" / "20.orbax-checkpoint-tmp"  # a save killed mid-write
    (torn / "state").mkdir(parents=True)
    (torn / "state" / "chunk").write_bytes(b"\0" * 100)
    with CheckpointReader(str(tmp_path)) as reader:
        assert reader.latest() == 10
    assert torn.exists()
    with Checkpointer(str(tmp_path), save_frequency=1, keep_last=3) as ckpt:
        assert ckpt.latest() == 10
        ckpt.save(20, state=make_state(), meta={"epoch": 1}, kind="periodic")
    assert not torn.exists()  # removed in the background, done by the first save
    assert sorted(p.name for p in (tmp_path / "periodic").iterdir()) == ["10", "20"]
