"""Vision-only pre-training: which parameters change in which epoch, per-phase early stopping,
per-epoch values without recompilation, and the test -> validation fallback of a whole run."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dermjax import experiment_data
from dermjax.data.augment import AugmentSpec
from dermjax.models import registry
from dermjax.models.classifier import DermClassifier
from dermjax.models.fusion import MultimodalClassifier
from dermjax.models.losses import LossSpec
from dermjax.runner import run
from dermjax.train import optim
from dermjax.train.checkpoint import CheckpointReader
from dermjax.train.early_stopping import PhasedEarlyStopping
from dermjax.train.loop import Trainer
from dermjax.train.masking import MaskSpec
from dermjax.train.schedules import EpochSchedule, WeightSchedule
from dermjax.train.step import StepSpec, make_eval_step, make_train_step, split_model
from tests.train.test_loop import tiny_demo_config

SIZE, BATCH, CLASSES, TEXT = 8, 4, 3, 6
VISION_ONLY = {"vision_projection", "aux_vision_classifier"}


class _TinyBackbone(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return jnp.mean(jax.nn.relu(self.bn(self.conv(x))), axis=(1, 2))


def _steps():
    rngs = nnx.Rngs(0)
    head = MultimodalClassifier(
        4, TEXT, CLASSES, rngs=rngs, projection_dim=4, image_projection_hidden=(5,),
        text_projection_hidden=(5,), final_hidden_sizes=(5,), use_auxiliary_loss=True,
        use_l2_normalization=True, fusion_strategy="weighted_sum",
    )  # fmt: skip
    parts, params, stats = split_model(
        DermClassifier(_TinyBackbone(rngs), head), [], update_frozen_bn_stats=True
    )
    tx = optim.make_group_tx("adamw", learning_rate=1e-2, weight_decay=0.1)
    state = {
        "params": params,
        "batch_stats": stats,
        "opt_backbone": tx.init(params["backbone"]),
        "opt_head": tx.init(params["head"]),
        "step": jnp.zeros((), jnp.int32),
    }
    spec = StepSpec(
        AugmentSpec(), MaskSpec(), LossSpec(use_auxiliary_loss=True), (0.5,) * 3, (0.25,) * 3,
        epoch_masking=True,
    )  # fmt: skip
    steps = {
        (w, vo): make_train_step(parts, spec, tx, tx, warmup=w, vision_only=vo)
        for w, vo in ((True, True), (False, True), (False, False))
    }
    return state, steps, make_eval_step(parts, spec)


def _batch(seed):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
        "label": (np.arange(BATCH) % CLASSES).astype(np.int32),
        "text": rng.standard_normal((BATCH, TEXT)).astype(np.float32),
        "has_text": np.ones(BATCH, bool),
        "valid": np.ones(BATCH, bool),
        "index": np.arange(BATCH, dtype=np.int32),
    }


def _changed(before, after):
    """Top-level names of the subtrees with any leaf that differs."""
    return {
        k
        for k in before
        if not all(jax.tree.leaves(jax.tree.map(np.array_equal, before[k], after[k])))
    }


def test_vision_only_epochs_change_only_backbone_vision_projection_and_aux_vision_head():
    state, steps, evaluate = _steps()
    schedule = EpochSchedule(
        aux_vision=WeightSchedule("linear", 2, 4, 0.5, 0.1),
        aux_text=WeightSchedule.constant(0.3),
        vision_only_epochs=2,
        epoch_masking=True,
        text_mask_epochs=[[3, 4]],
    )
    host = jax.device_get(state)
    snapshots = [host]
    for epoch, key in ((0, (True, True)), (1, (False, True)), (2, (False, False))):
        for i in range(2):
            state, out = steps[key](state, _batch(i), jax.random.key(i), schedule.controls(epoch))
            assert bool(out["finite"])
        snapshots.append(jax.device_get(state))
    s0, s1, s2, s3 = snapshots
    assert _changed(s0["params"]["head"], s1["params"]["head"]) == VISION_ONLY  # warm-up epoch
    assert _changed(s0["params"], s1["params"]) == {"head"}  # backbone frozen by warm-up
    assert _changed(s1["params"]["head"], s2["params"]["head"]) == VISION_ONLY
    assert _changed(s1["params"], s2["params"]) == {"backbone", "head"}
    # untouched head parameters got no update and no weight decay; their Adam moments stay zero
    assert _changed(s0["batch_stats"]["head"], s2["batch_stats"]["head"]) == {"vision_projection"}
    adam = [n for n in jax.tree.leaves(s2["opt_head"], is_leaf=lambda n: hasattr(n, "mu"))]
    (mu,) = [n.mu for n in adam if hasattr(n, "mu")]
    assert not any(np.any(x) for x in jax.tree.leaves(mu["text_projection"]))
    assert _changed(s2["params"]["head"], s3["params"]["head"]) == set(s0["params"]["head"])
    # a second multimodal epoch with other weights and a text mask reuses the compiled steps
    for epoch in (2, 3):
        state, _ = steps[False, False](
            state, _batch(5), jax.random.key(5), schedule.controls(epoch)
        )
        evaluate(state, _batch(6), schedule.controls(epoch))
    assert steps[False, False].jitted._cache_size() == 1
    assert evaluate.jitted._cache_size() == 1


def test_patience_out_in_the_vision_only_phase_ends_only_that_phase_and_survives_resume():
    stopper = PhasedEarlyStopping("val/loss", "min", 1, vision_only_epochs=5)
    assert stopper.update(1.0, epoch=0) == (True, False)
    assert stopper.update(2.0, epoch=1) == (False, False)  # patience out: phase over, run goes on
    assert [stopper.is_vision_only(e) for e in (1, 2)] == [True, False]
    assert stopper.update(3.0, epoch=2) == (True, False)  # the multimodal phase starts afresh
    assert stopper.best_epoch == 2
    restored = PhasedEarlyStopping("val/loss", "min", 1, vision_only_epochs=5)
    restored.multimodal.load_state_dict(stopper.multimodal.state_dict())
    restored.load_vision_only_state(stopper.vision_only_state())
    assert not restored.is_vision_only(2) and restored.vision_only.best == 1.0
    assert restored.update(4.0, epoch=3) == (False, True)  # multimodal patience stops the run
    original = PhasedEarlyStopping(
        "val/loss", "min", 1, vision_only_epochs=5, patience_ends_run=True
    )
    assert original.update(1.0, epoch=0) == (True, False)
    assert original.update(2.0, epoch=1) == (False, True)  # the original: the whole run stops


@pytest.mark.slow
def test_run_with_vision_only_phase_and_no_test_split(tmp_path, monkeypatch):
    """Tiny ResNet (one block per stage): 2 vision-only epochs, 1 multimodal; no test split."""
    spec = registry._SPECS["resnet50"]
    monkeypatch.setitem(
        registry._SPECS, "resnet50", dataclasses.replace(spec, variant={"depths": (1, 1, 1, 1)})
    )
    real_load = experiment_data.load_data
    monkeypatch.setattr(
        experiment_data, "load_data", lambda *a: dataclasses.replace(real_load(*a), test=None)
    )
    heads, trainers = [], []
    real_epoch = Trainer.train_epoch

    def train_epoch(self, epoch, guard):
        if not heads:
            heads.append(jax.device_get(self.state["params"]["head"]))
        trainers.append(self)
        record = real_epoch(self, epoch, guard)
        heads.append(jax.device_get(self.state["params"]["head"]))
        return record

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    cfg = tiny_demo_config(
        tmp_path / "data",
        **{
            "multimodal_classifier.use_auxiliary_loss": True,
            "training.vision_only_pretraining.enabled": True,
            "training.vision_only_pretraining.epochs": 2,
            "training.n_warmup_epochs": 0,
        },
    )
    text = cfg.training.auxiliary_loss_schedule.text
    text.schedule_type, text.start_epoch, text.end_epoch = "linear", 2, 4
    text.start_weight, text.end_weight = 0.1, 0.3
    summary = run(cfg, str(tmp_path / "run"))

    assert _changed(heads[0], heads[1]) == _changed(heads[1], heads[2]) == VISION_ONLY
    assert _changed(heads[2], heads[3]) == set(heads[0])
    assert summary["test_split"] == "val" and summary["test"] == summary["val"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    epochs = [r for r in map(json.loads, lines) if r["event"] == "epoch"]
    assert [r["stage"] for r in epochs] == ["vision_only_pretraining"] * 2 + ["multimodal"]
    assert [(r["aux/vision_weight"], r["aux/text_weight"]) for r in epochs] == [
        (0.0, 0.0), (0.0, 0.0), (0.3, pytest.approx(0.1)),
    ]  # fmt: skip
    _, meta = CheckpointReader(str(tmp_path / "run" / "checkpoints")).latest_meta()
    assert meta["vision_only_pretraining"]["early_stopping"]["events"] == 2
    assert meta["early_stopping"]["events"] == 1 and meta["vision_only_model"] is False
    for step in trainers[0].train_steps.values():  # per-epoch values never recompile a step
        assert step.jitted._cache_size() <= 1


def test_the_originals_vision_only_l2_switch_reaches_the_model(tmp_path):
    from dermjax.experiment import make_model

    key = "multimodal_classifier.vision_only_l2_normalization"
    for value in (True, False):
        cfg = tiny_demo_config(tmp_path / "data", **{key: value})
        model = make_model(cfg, num_classes=CLASSES, text_dim=TEXT, rngs=nnx.Rngs(0))
        assert model.head.vision_only_l2_normalization is value
