"""Data parallelism on 8 simulated CPU devices equals one device on the same global batch.

The pytest process already runs JAX on one device, so the 8-device measurements run in a child
process (this file executed as a script, XLA_FLAGS set before JAX starts) that prints JSON. The
child trains a tiny image + text model (BatchNorm in backbone and head, dropout, augmentation,
random masking, AdamW and SGD) two steps on one device and on the 8-device `data` mesh, with
parameters replicated and sharded (`training.shard_params`), and compares loss, parameters,
batch statistics and optimizer states; it also accumulates an evaluation's confusion matrix on
the devices and restores a sharded state from a checkpoint.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEVICES = 8
# float32: the per-device partial sums (BatchNorm statistics, gradients) are added in another
# order than on one device. Measured largest differences after two steps, replicated / sharded:
# params 1.6e-7 / 2.5e-7, batch statistics 1.2e-7, SGD momentum 1.3e-7 / 1.2e-7, Adam moments
# 2.7e-9; losses within 1 ulp. That is at most 0.25 of the tolerance below.
RTOL, ATOL = 1e-5, 1e-6
SIZE, BATCH, CLASSES, TEXT = 16, 16, 5, 8
GROUPS = ("params", "batch_stats", "opt_backbone", "opt_head")


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
    }


@pytest.fixture(scope="module")
def child():
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, __file__, tmp],
            env=_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shard", ["replicated", "sharded"])
def test_data_parallel_train_steps_equal_the_single_device_steps(child, shard):
    result = child[shard]
    assert result["devices"] == DEVICES
    np.testing.assert_allclose(result["loss"], child["single"]["loss"], rtol=RTOL, atol=ATOL)
    for group in GROUPS:  # worst |dp - single| / (ATOL + RTOL * |single|) over the group
        assert result["worst"][group] <= 1.0, (group, result["worst"], result["max_abs"])
    assert result["layout_kept"] and result["compiled"] == 1  # donated state, no recompile


def test_batch_statistics_are_those_of_the_global_batch(child):
    """BatchNorm under jit with a sharded batch reduces over all devices: the running statistics
    equal the single-device step's on the whole batch (and the steps really moved them)."""
    assert child["stats_moved"] > 1e-2
    for shard in ("replicated", "sharded"):
        assert child[shard]["worst"]["batch_stats"] <= 1.0


def test_shard_params_splits_the_big_kernels_and_their_moments(child):
    sharded = child["sharded"]["specs"]
    assert sharded["params/backbone/conv2/kernel"] == [None, None, None, "data"]
    assert sharded["params/head/final_classifier/hidden/0/linear/kernel"] == ["data"]
    assert sharded["params/head/vision_projection/out/kernel"] == [None, "data"]
    assert sharded["opt_backbone/inner_state/0/mu/conv2/kernel"] == [None, None, None, "data"]
    assert sharded["batch_stats/backbone/bn2/mean"] == []  # batch statistics: replicated
    assert sharded["params/backbone/conv1/kernel"] == []  # small: replicated
    assert all(spec == [] for spec in child["replicated"]["specs"].values())


def test_eval_confusion_accumulated_on_devices_equals_the_host_computation(child):
    ev = child["eval"]
    assert ev["device_matrix"] == ev["host_matrix"]
    assert sum(map(sum, ev["device_matrix"])) == ev["valid_rows"]
    assert ev["device_batches"] == ev["host_batches"] == 2  # the all-padding batch adds nothing
    assert ev["device_loss"] == pytest.approx(ev["host_loss"], rel=1e-6)
    assert ev["random_batch_equal"]  # varied predictions over a batch split 8 ways


def test_a_sharded_state_resumes_from_its_checkpoint(child):
    resume = child["resume"]
    assert resume["values_equal"] and resume["specs_equal"]
    assert resume["replicated_values_equal"]  # also readable without shard_params
    assert resume["next_step_equal"]


def test_an_indivisible_batch_fails_before_any_data_is_read(tmp_path):
    """`validate_for_run` reports it (tests/test_config.py covers the message's forms); here the
    real command line on 8 devices stops before the demo data is even generated."""
    data, workdir = tmp_path / "data", tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable, "-m", "dermjax.main", "--config=configs/demo.py",
            f"--workdir={workdir}", f"--config.data.local_root={data}",
            "--config.training.batch_size=12",
        ],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "training.batch_size=12: must be divisible by 8 (8 device(s)); use 8 or 16" in (
        done.stderr
    )
    assert not data.exists() and not workdir.exists()


# ---- The child process ------------------------------------------------------------------------
def _measure(tmp: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dermjax import parallel
    from dermjax.data.augment import AugmentSpec
    from dermjax.models.classifier import DermClassifier
    from dermjax.models.fusion import MultimodalClassifier
    from dermjax.models.layers import BatchNorm
    from dermjax.models.losses import LossSpec
    from dermjax.train import optim
    from dermjax.train.checkpoint import Checkpointer
    from dermjax.train.masking import MaskSpec
    from dermjax.train.metrics import (
        ClassificationMetrics,
        accumulate,
        confusion_matrix,
        host_metrics,
        totals_of,
    )
    from dermjax.train.step import (
        StepSpec,
        batch_confusion,
        make_eval_step,
        make_train_step,
        split_model,
    )

    class Backbone(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(3, 16, (3, 3), use_bias=False, rngs=rngs)
            self.bn1 = BatchNorm(16, rngs=rngs)
            self.conv2 = nnx.Conv(16, 32, (3, 3), use_bias=False, rngs=rngs)  # 4608: sharded
            self.bn2 = BatchNorm(32, rngs=rngs)

        def __call__(self, x):
            x = jax.nn.relu(self.bn1(self.conv1(x)))
            return jnp.mean(jax.nn.relu(self.bn2(self.conv2(x))), axis=(1, 2))

    rngs = nnx.Rngs(0)
    head = MultimodalClassifier(
        32, TEXT, CLASSES, rngs=rngs, projection_dim=128, text_projection_hidden=(16,),
        final_hidden_sizes=(16,), projection_dropout=0.2, final_dropout=0.2,
    )  # fmt: skip
    parts, params, stats = split_model(
        DermClassifier(Backbone(rngs), head), [], update_frozen_bn_stats=True
    )
    # AdamW for the backbone, SGD with momentum for the head: the head's Linear biases before
    # BatchNorm have an exactly-zero gradient in exact arithmetic, whose float noise (~1e-9,
    # different for any summation order) Adam would scale to +-lr in either run.
    tx = optim.make_group_tx("adamw", learning_rate=1e-3, weight_decay=0.01)
    tx_head = optim.make_group_tx("sgd", learning_rate=1e-2, weight_decay=0.01, momentum=0.9)
    host_state = jax.device_get(
        {
            "params": params,
            "batch_stats": stats,
            "opt_backbone": tx.init(params["backbone"]),
            "opt_head": tx_head.init(params["head"]),
            "step": jnp.zeros((), jnp.int32),
        }
    )
    spec = StepSpec(
        AugmentSpec(horizontal_flip_prob=0.5, brightness=0.2),
        MaskSpec(random_enabled=True, image_prob=0.2, text_prob=0.3),
        LossSpec(),
        (0.5,) * 3,
        (0.25,) * 3,
    )

    def batch(seed, valid_rows=BATCH):
        rng = np.random.default_rng(seed)
        return {
            "image": rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
            "label": rng.integers(0, CLASSES, BATCH).astype(np.int32),
            "text": rng.standard_normal((BATCH, TEXT)).astype(np.float32),
            "has_text": rng.random(BATCH) < 0.8,
            "valid": np.arange(BATCH) < valid_rows,
            "index": np.arange(BATCH, dtype=np.int32) + seed * BATCH,
        }

    def fresh():
        return jax.tree.map(np.array, host_state)

    def flat(tree):
        return {
            jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        }

    def train(step, state, place):
        losses = []
        for i in range(2):
            state, out = step(state, place(batch(i)), jax.random.key(10 + i))
            losses.append(float(out["loss"]))
        return state, losses

    mesh = parallel.make_mesh()
    single = make_train_step(parts, spec, tx, tx_head, warmup=False)
    ref, ref_loss = train(single, jax.device_put(fresh(), jax.devices()[0]), lambda b: b)
    ref = jax.device_get(ref)
    results = {"single": {"loss": ref_loss}}
    for name, shard in (("replicated", False), ("sharded", True)):
        shardings = parallel.state_shardings(host_state, mesh, shard_params=shard)
        step = make_train_step(parts, spec, tx, tx_head, warmup=False, state_shardings=shardings)
        state = parallel.place_state(fresh(), mesh, shard_params=shard)
        state, losses = train(step, state, lambda b: parallel.shard_batch(b, mesh))
        got, want = flat(jax.device_get(state)), flat(ref)
        worst, max_abs = {}, {}
        for group in GROUPS:
            keys = [k for k in want if k.startswith(group + "/")]
            err = [np.abs(got[k] - want[k]) for k in keys]
            max_abs[group] = max(float(e.max(initial=0)) for e in err)
            worst[group] = max(
                float((e / (ATOL + RTOL * np.abs(want[k]))).max(initial=0))
                for e, k in zip(err, keys, strict=True)
            )
        placed = flat(jax.tree.map(lambda x: x.sharding, state))
        results[name] = {
            "devices": int(mesh.size),
            "loss": losses,
            "worst": worst,
            "max_abs": max_abs,
            "specs": {k: list(s.spec) for k, s in placed.items()},
            "layout_kept": all(placed[k] == s for k, s in flat(shardings).items()),
            "compiled": step.jitted._cache_size(),
        }
        if shard:
            sharded_step, sharded_state = step, state

    moved = [
        np.abs(a - b).max()
        for a, b in zip(
            jax.tree.leaves(ref["batch_stats"]),
            jax.tree.leaves(host_state["batch_stats"]),
            strict=True,
        )
    ]
    results["stats_moved"] = float(max(moved))  # the compared statistics did change

    # Evaluation: confusion matrices summed on the devices vs. the host's own counts.
    evaluate = make_eval_step(parts, spec)
    totals = parallel.replicate(totals_of(ClassificationMetrics(CLASSES)), mesh)
    host = ClassificationMetrics(CLASSES)
    valid_rows = 0
    for seed, rows in ((5, BATCH), (6, 11), (7, 0)):
        b = batch(seed, rows)
        out = evaluate(sharded_state, parallel.shard_batch(b, mesh))
        totals = accumulate(totals, out)
        host.update(b["label"], parallel.to_host(out["preds"]), valid=b["valid"], loss=out["loss"])
        valid_rows += rows
    device = host_metrics(CLASSES, jax.tree.map(parallel.to_host, totals))
    results["eval"] = {
        "device_matrix": device.matrix.tolist(),
        "host_matrix": host.matrix.tolist(),
        "valid_rows": valid_rows,
        "device_batches": device.loss_batches,
        "host_batches": host.loss_batches,
        "device_loss": device.compute()["loss"],
        "host_loss": host.compute()["loss"],
    }
    rng = np.random.default_rng(8)
    labels, preds = rng.integers(0, CLASSES, (2, 64)).astype(np.int32)
    valid = rng.random(64) < 0.7
    counts = jax.jit(batch_confusion, static_argnums=3)(
        *(parallel.shard_batch({"x": x}, mesh)["x"] for x in (labels, preds, valid)), CLASSES
    )
    results["eval"]["random_batch_equal"] = bool(
        np.array_equal(parallel.to_host(counts), confusion_matrix(labels, preds, CLASSES, valid))
    )

    # Resume: a sharded state saved and restored into the sharded (and replicated) layout.
    abstract = {
        shard: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            sharded_state,
            parallel.state_shardings(sharded_state, mesh, shard_params=shard),
        )
        for shard in (False, True)
    }
    saved = jax.device_get(sharded_state)
    with Checkpointer(tmp, save_frequency=1, keep_last=1, async_save=False) as ckpt:
        ckpt.save(2, state=sharded_state, meta={}, kind="periodic")
        restored, _ = ckpt.restore(2, abstract_state=abstract[True])
        replicated, _ = ckpt.restore(2, abstract_state=abstract[False])

    def same(a, b):
        return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))

    results["resume"] = {
        "values_equal": same(jax.device_get(restored), saved),
        "specs_equal": all(
            jax.tree.leaves(
                jax.tree.map(lambda x, a: x.sharding == a.sharding, restored, abstract[True])
            )
        ),
        "replicated_values_equal": same(jax.device_get(replicated), saved),
    }
    nxt = parallel.shard_batch(batch(9), mesh)
    after_restore, _ = sharded_step(restored, nxt, jax.random.key(9))  # donates `restored`
    uninterrupted = parallel.place_state(saved, mesh, shard_params=True)
    continued, _ = sharded_step(uninterrupted, nxt, jax.random.key(9))
    results["resume"]["next_step_equal"] = same(
        jax.device_get(after_restore), jax.device_get(continued)
    )
    return results


if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1])))
