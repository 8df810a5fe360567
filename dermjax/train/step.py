"""Jitted train and eval steps: pure functions of (state, batch, key).

The train state is a plain pytree so that Orbax saves it as is and `jit` shards it by its inputs:
`params` and `batch_stats` as pure dicts split into `backbone` / `head`, one optimizer state per
group, and the step counter. A batch sharded over the mesh's `data` axis runs unchanged.

Inside a train step: device augmentation (uint8 -> [0, 1]), normalisation, modality masking,
forward, loss, gradients, the optimizer updates. During warm-up only the head is differentiated,
so no backward pass runs through the backbone and its optimizer state is not touched.
A step whose loss or any trainable gradient is non-finite reports `finite=False` and leaves params, batch
statistics and both optimizer states exactly as they were (the loop then stops or skips); the
step counter still advances, so it counts attempted steps.

With compute dtype bfloat16 the images and the backbone's activations are bfloat16, while
parameters, optimizer states, the head, the logits and the loss stay float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dermjax.data.augment import AugmentSpec, augment, normalize, prepare_eval
from dermjax.models.losses import LossSpec, total_loss
from dermjax.train.masking import MaskSpec, apply_masking

TrainState = dict[str, Any]
# Names of the supported compute dtypes (parameters are float32 in both).
COMPUTE_DTYPES = ("float32", "bfloat16")
# What the loop does after a non-finite step: stop with an error, or skip the batch.
NONFINITE_POLICIES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the steps compute, fixed for a run."""

    augment: AugmentSpec
    mask: MaskSpec
    loss: LossSpec
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    compute_dtype: str = "float32"  # a name in COMPUTE_DTYPES, or its jnp dtype

    def __post_init__(self) -> None:
        name = jnp.dtype(self.compute_dtype).name
        if name not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype {name!r} is not one of {COMPUTE_DTYPES}")
        object.__setattr__(self, "compute_dtype", name)


@dataclasses.dataclass
class ModelParts:
    """A model split for functional use: graph definitions per mode and the RNG state."""

    train_graph: Any  # backbone units trainable; frozen BN layers per update_frozen_bn_stats
    warmup_graph: Any  # whole backbone frozen
    eval_graph: Any
    rngs: nnx.State  # dropout / stochastic-depth streams, reseeded from the step key


def _set_bn_eval(model: nnx.Module, frozen_prefixes: list[tuple]) -> None:
    """Puts BatchNorm layers under a frozen prefix in inference mode (running statistics)."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm) and any(
            tuple(path[: len(p)]) == p for p in frozen_prefixes
        ):
            module.use_running_average = True


def split_model(
    model: nnx.Module, frozen_prefixes: list[tuple], *, update_frozen_bn_stats: bool
) -> tuple[ModelParts, dict, dict]:
    """Returns (parts, params, batch_stats) with params/stats as pure dicts.

    `frozen_prefixes` are the model paths (starting with 'backbone') frozen after warm-up.
    """
    graphs = {}
    for mode, frozen in (
        ("train", frozen_prefixes),
        ("warmup", [("backbone",)]),
        ("eval", None),
    ):
        if frozen is None:
            model.eval()
        else:
            model.train()
            if not update_frozen_bn_stats:
                _set_bn_eval(model, frozen)
        graphs[mode], params, stats, rngs = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.train()
    parts = ModelParts(graphs["train"], graphs["warmup"], graphs["eval"], rngs)
    return parts, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def _forward(graph, params, stats, rngs, key, images, text):
    rngs = jax.tree.map(lambda x: x, rngs)  # fresh Variables at this trace level, for reseed
    model = nnx.merge(graph, params, stats, rngs)
    nnx.reseed(model, dropout=key)
    outputs = model(images, text)
    return outputs, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _all_finite(tree: Any) -> jax.Array:
    """True when every element of every leaf is finite: one fused reduction per leaf."""
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


def make_train_step(
    parts: ModelParts,
    spec: StepSpec,
    tx_backbone: optax.GradientTransformation,
    tx_head: optax.GradientTransformation,
    *,
    warmup: bool,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Builds the jitted train step for the warm-up (head only) or the main phase."""
    graph = parts.warmup_graph if warmup else parts.train_graph

    def step(state: TrainState, rngs, batch: dict, key: jax.Array) -> tuple[TrainState, dict]:
        k_aug, k_mask, k_drop = jax.random.split(key, 3)
        images = normalize(augment(k_aug, batch["image"], spec.augment), spec.mean, spec.std)
        images, text, vision_valid, text_valid = apply_masking(
            k_mask, images, batch["text"], batch["has_text"], spec.mask, training=True
        )
        images = images.astype(spec.compute_dtype)
        params = state["params"]

        def loss_fn(trainable):
            full = {**params, "head": trainable} if warmup else trainable
            outputs, new_stats = _forward(
                graph, full, state["batch_stats"], rngs, k_drop, images, text
            )
            loss, terms = total_loss(
                outputs,
                batch["label"],
                spec.loss,
                sample_valid=batch["valid"],
                vision_valid=vision_valid,
                text_valid=text_valid,
            )
            return loss, (outputs["logits"], terms, new_stats)

        trainable = params["head"] if warmup else params
        (loss, (logits, terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable
        )
        head_grads = grads if warmup else grads["head"]
        updates = {}
        updates["head"], opt_head = tx_head.update(head_grads, state["opt_head"], params["head"])
        new_params = {**params, "head": optax.apply_updates(params["head"], updates["head"])}
        opt_backbone = state["opt_backbone"]
        if not warmup:
            updates["backbone"], opt_backbone = tx_backbone.update(
                grads["backbone"], opt_backbone, params["backbone"]
            )
            new_params["backbone"] = optax.apply_updates(params["backbone"], updates["backbone"])
        candidate = {
            "params": new_params,
            "batch_stats": new_stats,
            "opt_backbone": opt_backbone,
            "opt_head": opt_head,
        }
        # A finite loss can still have NaN/inf gradients (e.g. a bfloat16 overflow in backward).
        # The updates carry every trainable leaf's gradient (Adam, AdamW and SGD turn a NaN/inf
        # gradient into a NaN/inf update); checking them rather than all gradients keeps the
        # gradients of frozen layers unused, so XLA never computes them.
        finite = jnp.isfinite(loss) & _all_finite(updates)
        old = {k: state[k] for k in candidate}
        new_state = {**_select(finite, candidate, old), "step": state["step"] + 1}
        out = {"loss": loss, "finite": finite, "preds": jnp.argmax(logits, -1), **terms}
        return new_state, out

    jitted = jax.jit(step, donate_argnums=(0,))
    return lambda state, batch, key: jitted(state, parts.rngs, batch, key)


def make_eval_step(
    parts: ModelParts, spec: StepSpec
) -> Callable[[TrainState, dict], dict[str, jax.Array]]:
    """Builds the jitted eval step: normalisation, complete masking only, loss and predictions."""

    def step(state: TrainState, rngs, batch: dict) -> dict[str, jax.Array]:
        images = prepare_eval(batch["image"], spec.mean, spec.std)
        images, text, vision_valid, text_valid = apply_masking(
            jax.random.key(0), images, batch["text"], batch["has_text"], spec.mask, training=False
        )
        outputs, _ = _forward(
            parts.eval_graph,
            state["params"],
            state["batch_stats"],
            rngs,
            jax.random.key(0),
            images.astype(spec.compute_dtype),
            text,
        )
        loss, terms = total_loss(
            outputs,
            batch["label"],
            spec.loss,
            sample_valid=batch["valid"],
            vision_valid=vision_valid,
            text_valid=text_valid,
        )
        return {"loss": loss, "preds": jnp.argmax(outputs["logits"], -1), **terms}

    jitted = jax.jit(step)
    return lambda state, batch: jitted(state, parts.rngs, batch)
