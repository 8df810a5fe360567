"""Checkpointer: bitwise round trip, retention, damaged-checkpoint fallback, gs://, async."""

import logging
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dermjax.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    resolve_load_from,
    restore_weights_only,
)


class TinyNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, classes: int = 3) -> None:
        self.lin = nnx.Linear(4, classes, rngs=rngs)
        self.bn = nnx.BatchNorm(classes, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.bn(self.lin(x)))


def make_state(seed: int = 0) -> dict:
    """A trained-looking state: moved batch stats, advanced rng, non-zero Adam moments."""
    model = TinyNet(nnx.Rngs(seed, dropout=seed + 1))
    model(jnp.linspace(-1.0, 1.0, 8 * 4).reshape(8, 4))
    params = nnx.state(model, nnx.Param)
    tx = optax.adamw(1e-2)
    opt = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt = tx.update(grads, opt, params)
    return {"model": nnx.state(model), "opt_head": opt, "step": jnp.int32(7 + seed)}


def abstract_of(state: dict):
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )


def leaves_equal(a, b) -> bool:
    def raw(x):
        x = jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        return np.asarray(x)

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        raw(x).dtype == raw(y).dtype and np.array_equal(raw(x), raw(y))
        for x, y in zip(la, lb, strict=True)
    )


def data_iter():
    return iter(grain.MapDataset.range(40).shuffle(seed=3).batch(4).to_iter_dataset())


def test_round_trip_restores_state_meta_and_iterator_bitwise(tmp_path):
    state, it = make_state(), data_iter()
    next(it), next(it)
    meta = {"epoch": 2, "best_metric": 0.25, "classes": ["a", "b", "c"]}
    with Checkpointer(str(tmp_path), save_frequency=1, keep_last=2) as ckpt:
        ckpt.save(7, state=state, data_iter=it, meta=meta, kind="periodic")
        expected_next = next(it)  # the saved position is the one at save(), not at write time
        next(it)
        fresh_it = data_iter()
        restored, got_meta = ckpt.restore(
            None, abstract_state=abstract_of(make_state(seed=5)), data_iter=fresh_it
        )
    assert leaves_equal(restored, state)
    assert got_meta["epoch"] == 2 and got_meta["classes"] == ["a", "b", "c"]
    assert got_meta["kind"] == "periodic" and got_meta["timestamp"]
    np.testing.assert_array_equal(next(fresh_it), expected_next)


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
                ckpt.save(step, state=state, data_iter=None, meta={}, kind="best")
            ckpt.save(step, state=state, data_iter=None, meta={}, kind="periodic")
        ckpt.save(55, state=state, data_iter=None, meta={}, kind="preempt")
        assert ckpt.best() == 20 and ckpt.latest() == 55
        _, meta = ckpt.restore(20, abstract_state=abstract_of(state), data_iter=None)
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
    ckpt.save(10, state=old, data_iter=None, meta={"epoch": 0}, kind="periodic")
    ckpt.save(20, state=new, data_iter=None, meta={"epoch": 1}, kind="periodic")
    damage(tmp_path / "periodic" / "20")
    abstract = abstract_of(old)
    with pytest.raises(CheckpointError, match="step 20"):
        ckpt.restore(20, abstract_state=abstract, data_iter=None)
    with caplog.at_level(logging.WARNING):
        restored, meta = ckpt.restore(None, abstract_state=abstract, data_iter=None)
    assert meta["epoch"] == 0 and leaves_equal(restored, old)
    assert "periodic/20" in caplog.text and "Restored step 10" in caplog.text
    # Re-running epoch 1 replaces the damaged step instead of being refused or shadowed by it.
    ckpt.save(20, state=new, data_iter=None, meta={"epoch": 1}, kind="periodic")
    restored, meta = ckpt.restore(None, abstract_state=abstract, data_iter=None)
    assert meta["epoch"] == 1 and leaves_equal(restored, new)
    ckpt.close()


def test_saving_an_earlier_step_removes_newer_checkpoints_of_abandoned_run(tmp_path):
    state = make_state()
    with Checkpointer(str(tmp_path), save_frequency=1, keep_last=5) as ckpt:
        for step in (10, 20, 30):
            ckpt.save(step, state=state, data_iter=None, meta={}, kind="periodic")
        ckpt.save(30, state=state, data_iter=None, meta={}, kind="best")
        ckpt.save(20, state=state, data_iter=None, meta={"rerun": True}, kind="periodic")
        assert ckpt.latest() == 20 and ckpt.best() is None
        _, meta = ckpt.restore(None, abstract_state=abstract_of(state), data_iter=None)
    assert meta["rerun"] is True


def test_restore_without_checkpoints_or_unknown_step_raises(tmp_path):
    state = make_state()
    with Checkpointer(str(tmp_path), save_frequency=1, keep_last=1) as ckpt:
        with pytest.raises(CheckpointError, match="No checkpoint under"):
            ckpt.restore(None, abstract_state=abstract_of(state), data_iter=None)
        ckpt.save(10, state=state, data_iter=None, meta={}, kind="final")
        with pytest.raises(CheckpointError, match=r"step 11 .*saved: \[10\]"):
            ckpt.restore(11, abstract_state=abstract_of(state), data_iter=None)


def test_non_json_meta_is_rejected_at_save_time(tmp_path):
    with (
        Checkpointer(str(tmp_path), save_frequency=1, keep_last=1) as ckpt,
        pytest.raises(TypeError),
    ):
        ckpt.save(1, state=make_state(), data_iter=None, meta={"x": object()}, kind="final")


def test_async_saves_become_visible_in_order_and_complete_after_wait(tmp_path):
    state = {"w": jnp.arange(4_000_000, dtype=jnp.float32), "step": jnp.int32(3)}
    ckpt = Checkpointer(str(tmp_path), save_frequency=1, keep_last=1, async_save=True)
    ckpt.save(3, state=state, data_iter=None, meta={}, kind="best")
    ckpt.save(3, state=state, data_iter=None, meta={}, kind="periodic")
    # The periodic save started only once the best one was finalised (a crash now keeps both).
    assert (tmp_path / "best" / "3" / "commit_success.txt").exists()
    ckpt.wait()
    # A second process (here: a second Checkpointer) sees and reads the finished step.
    reader = Checkpointer(str(tmp_path), save_frequency=1, keep_last=1)
    assert (reader.latest(), reader.best()) == (3, 3)
    restored, _ = reader.restore(3, abstract_state=abstract_of(state), data_iter=None)
    assert leaves_equal(restored, state)
    reader.close()
    ckpt.close()


def test_resolve_load_from_accepts_workdir_checkpoint_dirs_and_step_dirs(tmp_path):
    ckdir = tmp_path / "run" / "checkpoints"
    with Checkpointer(str(ckdir), save_frequency=1, keep_last=2) as ckpt:
        for step, kind in ((10, "periodic"), (20, "best"), (30, "periodic")):
            ckpt.save(step, state=make_state(), data_iter=None, meta={}, kind=kind)
    assert resolve_load_from(str(tmp_path / "run")) == (str(ckdir), None)
    assert resolve_load_from(str(ckdir)) == (str(ckdir), None)
    assert resolve_load_from(str(ckdir / "best")) == (str(ckdir), 20)
    assert resolve_load_from(str(ckdir / "periodic" / "10")) == (str(ckdir), 10)
    with pytest.raises(CheckpointError, match="not a workdir"):
        resolve_load_from(str(tmp_path))


def test_restore_weights_only_reads_params_and_batch_stats_and_rejects_other_shapes(tmp_path):
    state = make_state()
    with Checkpointer(str(tmp_path / "checkpoints"), save_frequency=1, keep_last=1) as ckpt:
        ckpt.save(7, state=state, data_iter=None, meta={"classes": ["a", "b", "c"]}, kind="final")
    wanted = (nnx.Param, nnx.BatchStat)  # one filter: params or batch stats
    abstract = nnx.state(nnx.eval_shape(lambda: TinyNet(nnx.Rngs(9))), wanted)
    model_state, meta = restore_weights_only(str(tmp_path), abstract)
    assert meta["classes"] == ["a", "b", "c"]
    assert leaves_equal(model_state, nnx.filter_state(state["model"], wanted))
    other = nnx.state(nnx.eval_shape(lambda: TinyNet(nnx.Rngs(9), classes=5)), wanted)
    with pytest.raises(
        CheckpointError, match=r"(?s)do not fit.*checkpoint \(4, 3\), model \(4, 5\)"
    ):
        restore_weights_only(str(tmp_path), other)


def test_gcs_save_prune_and_restore_against_emulator(gcs_root):
    gcsfs = pytest.importorskip("gcsfs")
    state, it = make_state(), data_iter()
    next(it)
    workdir = f"{gcs_root}/run"
    with Checkpointer(
        f"{workdir}/checkpoints", save_frequency=1, keep_last=1, async_save=False
    ) as ckpt:
        ckpt.save(10, state=make_state(1), data_iter=it, meta={"epoch": 0}, kind="best")
        ckpt.save(10, state=make_state(1), data_iter=it, meta={"epoch": 0}, kind="periodic")
        next(it)
        ckpt.save(20, state=state, data_iter=it, meta={"epoch": 1}, kind="periodic")
        expected_next = next(it)
        assert (ckpt.latest(), ckpt.best()) == (20, 10)
    directory, step = resolve_load_from(workdir)
    fresh_it = data_iter()
    with Checkpointer(directory, save_frequency=1, keep_last=1) as ckpt:
        restored, meta = ckpt.restore(step, abstract_state=abstract_of(state), data_iter=fresh_it)
    assert meta["epoch"] == 1 and leaves_equal(restored, state)
    np.testing.assert_array_equal(next(fresh_it), expected_next)
    fs = gcsfs.GCSFileSystem()
    kept = {
        "/".join(p.split("/")[-2:])
        for sub in ("periodic", "best")
        for p in fs.ls(f"{directory}/{sub}")
    }
    assert kept == {"periodic/20", "best/10"}
