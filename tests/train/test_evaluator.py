"""Evaluation passes: device-side counts, one long-lived stream per split, the baseline."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dermjax import parallel
from dermjax.data import pipeline
from dermjax.train import evaluator
from dermjax.train.metrics import ClassificationMetrics, accumulate
from tests.data.test_pipeline import SIZE, make_records


def test_device_totals_carry_start_counts_there_and_back():
    start = ClassificationMetrics(3)
    start.update_confusion(np.array([[2, 1, 0], [0, 3, 0], [0, 0, 1]]), loss=1.5, batches=2)
    mesh = parallel.make_mesh()
    totals = evaluator.device_totals(3, mesh, start)
    out = {"confusion": jnp.eye(3, dtype=jnp.int32), "loss": jnp.float32(0.5)}
    back = evaluator.fetch_totals(3, accumulate(totals, out))
    np.testing.assert_array_equal(back.matrix, start.matrix + np.eye(3, dtype=np.int64))
    assert back.loss_sum == pytest.approx(2.0) and back.loss_batches == 3


def _predicts_class_zero(parts, spec, *, vision_only):
    """An eval step whose model always says class 0; counts only valid rows, like the real one."""

    def step(state, batch, controls):
        label = jnp.where(batch["valid"], batch["label"], -1)
        true = label[:, None] == jnp.arange(3)  # [B, 3], no row for padding
        predicted = jnp.arange(3) == 0  # [3]
        confusion = true[:, :, None] & predicted[None, None, :]
        return {"confusion": confusion.sum(0).astype(jnp.int32), "loss": jnp.float32(1.0)}

    return step


@pytest.fixture
def components(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluator, "make_eval_step", _predicts_class_zero)
    built = []

    def eval_loader(records, split, repeat):
        built.append(split)
        return pipeline.eval_loader(
            records, batch_size=4, img_size=SIZE, split=split, repeat=repeat
        )

    data = types.SimpleNamespace(classes=["a", "b", "c"], majority_class=1)
    c = types.SimpleNamespace(
        data=data, mesh=parallel.make_mesh(), parts=None, spec=None, eval_loader=eval_loader
    )
    return c, built, str(tmp_path)


def test_passes_count_every_sample_once_and_reuse_the_splits_stream(components):
    c, built, folder = components
    records = make_records(folder, 10)  # labels 0,1,2,0,...: four of class 0, three of class 1
    ev = evaluator.Evaluator(c, show_progress=False)
    try:
        first = ev.evaluate(None, records, "val", {})
        second = ev.evaluate(None, records, "val", {})
        assert first["accuracy"] == second["accuracy"] == pytest.approx(0.4)
        # 10 rows in 3 batches of 4: the 2 padding rows are not counted, none twice
        expected = [[4, 0, 0], [3, 0, 0], [3, 0, 0]]
        np.testing.assert_array_equal(first["confusion_matrix"], expected)
        np.testing.assert_array_equal(second["confusion_matrix"], expected)
        assert first["majority_accuracy"] == pytest.approx(0.3)  # class 1, on the same 10 rows
        assert first["bad_images"] == 0
        assert built == ["val"]  # the second pass reused the stream and its workers
        ev.evaluate(None, make_records(folder, 6), "val", {})
        assert built == ["val", "val"]  # other records: a new stream
    finally:
        ev.close()
    assert ev.streams == {}


def test_shown_samples_scales_this_processes_valid_rows_to_the_global_batch(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    assert evaluator.shown_samples({"valid": np.array([True, True, False])}) == 8
