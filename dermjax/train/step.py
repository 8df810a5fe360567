"""Jitted train and eval steps: pure functions of (state, batch, key).

The train state is a plain pytree so that Orbax saves it as is and `jit` shards it by its inputs:
`params` and `batch_stats` as pure dicts split into `backbone` / `head`, one optimizer state per
group, and the step counter. A batch sharded over the mesh's `data` axis runs unchanged.

Inside a train step: device augmentation (uint8 -> [0, 1]), normalisation, modality masking,
forward, loss, gradients, the optimizer updates. What changes per epoch (auxiliary weights, epoch
masks) arrives as array values (`controls`, see `dermjax.train.schedules`), so it never
recompiles a step. The vision-only pre-training step trains backbone -> vision projection -> aux
vision head and leaves every other head parameter, and its optimizer state, exactly unchanged.
During warm-up only the head is differentiated, so no backward pass runs through the backbone
and its optimizer state is not touched. A step whose loss or any trainable gradient is
non-finite reports `finite=False` and leaves params, batch statistics and both optimizer states
exactly as they were (the loop then stops or skips); the step counter still advances, so it
counts attempted steps.

Both steps also return the batch's confusion matrix over its valid rows (`confusion`), so the
loop accumulates metrics on the devices (`dermjax.train.metrics.accumulate`) instead of
gathering labels and predictions to the host. Given `state_shardings`
(`dermjax.parallel.state_shardings`), the train step lays the new state out like the old one,
so a sharded state stays sharded and its buffers can be donated.

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
# Which samples count as text-less for the head (zeroing, ablation) and the aux text loss:
# "content": always those without text; "aux_weight": only while the epoch's text aux weight is
# > 0 (the original's coupling).
TEXT_GATINGS = ("content", "aux_weight")
# Head modules the vision-only pre-training step trains (the rest of the head stays unchanged).
VISION_ONLY_HEAD = ("vision_projection", "aux_vision_classifier")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the steps compute, fixed for a run."""

    augment: AugmentSpec
    mask: MaskSpec
    loss: LossSpec
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    compute_dtype: str = "float32"  # a name in COMPUTE_DTYPES, or its jnp dtype
    epoch_masking: bool = False  # apply controls["epoch_mask"] (masking.epoch_schedule)
    random_mask_in_eval: bool = False  # the original's random masking in val/test too
    text_gating: str = "content"  # a name in TEXT_GATINGS

    def __post_init__(self) -> None:
        name = jnp.dtype(self.compute_dtype).name
        if name not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype {name!r} is not one of {COMPUTE_DTYPES}")
        object.__setattr__(self, "compute_dtype", name)
        if self.text_gating not in TEXT_GATINGS:
            raise ValueError(f"text gating {self.text_gating!r} is not one of {TEXT_GATINGS}")

    def default_controls(self) -> dict[str, jax.Array]:
        """Per-epoch values when no schedule is given: the fixed aux weights, no epoch mask."""
        return {
            "aux_weights": jnp.asarray(
                [self.loss.aux_vision_weight, self.loss.aux_text_weight], jnp.float32
            ),
            "epoch_mask": jnp.zeros((2,), bool),
            "epoch": jnp.zeros((), jnp.int32),
        }


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


def mask_inputs(
    key: jax.Array,
    images: jax.Array,
    text: jax.Array,
    batch: dict,
    spec: StepSpec,
    controls: dict,
    *,
    training: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Masking with the original's priority: epoch schedule > mask_complete > random.

    An epoch the schedule masks (controls["epoch_mask"], [vision, text]) zeroes that modality for
    every sample and skips complete and random masking. Returns `(images, text, vision_valid,
    text_valid)`; text validity also requires text content (per `spec.text_gating`).
    """
    has_text = batch["has_text"].astype(bool)
    if spec.text_gating == "aux_weight":
        has_text = has_text | ~(controls["aux_weights"][1] > 0)
    random = training or spec.random_mask_in_eval
    masked = apply_masking(key, images, text, has_text, spec.mask, training=random)
    if not spec.epoch_masking:
        return masked
    vision_off, text_off = controls["epoch_mask"][0], controls["epoch_mask"][1]
    scheduled = vision_off | text_off
    ones = jnp.ones(has_text.shape, bool)
    return (
        jnp.where(scheduled, jnp.where(vision_off, jnp.zeros((), images.dtype), images), masked[0]),
        jnp.where(scheduled, jnp.where(text_off, jnp.zeros((), text.dtype), text), masked[1]),
        jnp.where(scheduled, ones & ~vision_off, masked[2]),
        jnp.where(scheduled, has_text & ~text_off, masked[3]),
    )


def _forward(graph, params, stats, rngs, key, images, text, valid=(), *, vision_only=False):
    rngs = jax.tree.map(lambda x: x, rngs)  # fresh Variables at this trace level, for reseed
    model = nnx.merge(graph, params, stats, rngs)
    nnx.reseed(model, dropout=key)
    outputs = model.vision_only(images) if vision_only else model(images, text, *valid)
    return outputs, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def _objective(spec, outputs, label, sample_valid, valid, controls):
    """The loss and its logged terms: the criterion alone without modality masks (`valid` empty:
    the vision-only phase), else the main + auxiliary total."""
    if not valid:
        loss = spec.loss.criterion(outputs["logits"], label, sample_valid)
        return loss, {"loss/main": loss}
    vision_valid, text_valid, _ = valid
    return total_loss(
        outputs, label, spec.loss, sample_valid=sample_valid, vision_valid=vision_valid,
        text_valid=text_valid, aux_weights=controls["aux_weights"],
    )  # fmt: skip


def _keep_untrained(new: Any, old: Any, trained: Any) -> Any:
    """`new` with every per-parameter leaf outside `trained` (a bool tree) taken from `old`.

    Works on parameters and on optimizer states alike: every subtree shaped like the parameters
    (Adam's moments, SGD's trace) is selected leaf by leaf; shared leaves (counts, learning
    rates) are taken from `new`.
    """
    struct = jax.tree.structure(trained)

    def pick(n, o):
        if jax.tree.structure(n) != struct:
            return n
        return jax.tree.map(lambda t, a, b: a if t else b, trained, n, o)

    return jax.tree.map(pick, new, old, is_leaf=lambda x: jax.tree.structure(x) == struct)


def _vision_only_mask(head_params: dict) -> dict:
    """True for the head leaves the vision-only step trains."""

    def fill(tree: Any, value: bool) -> Any:
        return jax.tree.map(lambda _: value, tree)

    return {k: fill(v, k in VISION_ONLY_HEAD) for k, v in head_params.items()}


def batch_confusion(labels: jax.Array, preds: jax.Array, valid: jax.Array, num_classes: int):
    """int32[C, C] counts of (label, prediction) over the valid rows: a one-hot matmul, whose
    sum over a batch split over devices XLA turns into one all-reduce."""
    truth = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * valid[:, None].astype(jnp.int32)
    guess = jax.nn.one_hot(preds, num_classes, dtype=jnp.int32)
    return jnp.einsum("bi,bj->ij", truth, guess, preferred_element_type=jnp.int32)


def _outputs(loss: jax.Array, logits: jax.Array, batch: dict, valid: jax.Array, terms: dict):
    preds = jnp.argmax(logits, -1)
    confusion = batch_confusion(batch["label"], preds, valid, logits.shape[-1])
    return {"loss": loss, "preds": preds, "confusion": confusion, **terms}


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
    vision_only: bool = False,
    state_shardings: Any | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """Builds the jitted train step for the warm-up (head only) or the main phase.

    `vision_only` builds the pre-training step: no masking, loss = criterion of the aux vision
    head on backbone -> vision projection (-> L2); the other head parameters, their optimizer
    state and batch statistics stay exactly as they were (no update, no weight decay). The
    returned `step(state, batch, key, controls=None)` exposes the jitted function as `.jitted`.
    `state_shardings` (a tree of shardings like the state) constrains the new state's layout.
    """
    graph = parts.warmup_graph if warmup else parts.train_graph

    def step(state: TrainState, rngs, batch: dict, key: jax.Array, controls: dict):
        k_aug, k_mask, k_drop = jax.random.split(key, 3)
        images = normalize(augment(k_aug, batch["image"], spec.augment), spec.mean, spec.std)
        text = batch["text"]
        sample_valid = batch["valid"].astype(bool)
        valid = ()
        if not vision_only:
            images, text, vision_valid, text_valid = mask_inputs(
                k_mask, images, text, batch, spec, controls, training=True
            )
            valid = (vision_valid, text_valid, sample_valid)
        images = images.astype(spec.compute_dtype)
        params = state["params"]

        def loss_fn(trainable):
            full = {**params, "head": trainable} if warmup else trainable
            outputs, new_stats = _forward(
                graph, full, state["batch_stats"], rngs, k_drop, images, text, valid,
                vision_only=vision_only,
            )  # fmt: skip
            loss, terms = _objective(spec, outputs, batch["label"], sample_valid, valid, controls)
            return loss, (outputs["logits"], terms, new_stats)

        trainable = params["head"] if warmup else params
        (loss, (logits, terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable
        )
        head_grads = grads if warmup else grads["head"]
        updates = {}
        updates["head"], opt_head = tx_head.update(head_grads, state["opt_head"], params["head"])
        new_params = {**params, "head": optax.apply_updates(params["head"], updates["head"])}
        if vision_only:
            trained = _vision_only_mask(params["head"])
            new_params["head"] = _keep_untrained(new_params["head"], params["head"], trained)
            opt_head = _keep_untrained(opt_head, state["opt_head"], trained)
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
        if state_shardings is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
        return new_state, {"finite": finite, **_outputs(loss, logits, batch, sample_valid, terms)}

    jitted = jax.jit(step, donate_argnums=(0,))
    defaults = spec.default_controls()

    def call(state: TrainState, batch: dict, key: jax.Array, controls: dict | None = None):
        return jitted(state, parts.rngs, batch, key, defaults if controls is None else controls)

    call.jitted = jitted
    return call


def make_eval_step(
    parts: ModelParts, spec: StepSpec, *, vision_only: bool = False
) -> Callable[..., dict[str, jax.Array]]:
    """Builds the jitted eval step: normalisation, masking (no random masking unless
    `spec.random_mask_in_eval`), loss and predictions; `vision_only`: the pre-training path.

    The returned `step(state, batch, controls=None)` exposes the jitted function as `.jitted`.
    """

    def step(state: TrainState, rngs, batch: dict, controls: dict) -> dict[str, jax.Array]:
        images = prepare_eval(batch["image"], spec.mean, spec.std)
        text, sample_valid = batch["text"], batch["valid"].astype(bool)
        valid = ()
        if not vision_only:
            # A different draw per epoch and batch for the original's random eval masking.
            key = jax.random.fold_in(jax.random.key(0), controls["epoch"])
            key = jax.random.fold_in(key, batch["index"][0])
            images, text, vision_valid, text_valid = mask_inputs(
                key, images, text, batch, spec, controls, training=False
            )
            valid = (vision_valid, text_valid, sample_valid)
        outputs, _ = _forward(
            parts.eval_graph,
            state["params"],
            state["batch_stats"],
            rngs,
            jax.random.key(0),
            images.astype(spec.compute_dtype),
            text,
            valid,
            vision_only=vision_only,
        )
        loss, terms = _objective(spec, outputs, batch["label"], sample_valid, valid, controls)
        return _outputs(loss, outputs["logits"], batch, sample_valid, terms)

    jitted = jax.jit(step)
    defaults = spec.default_controls()

    def call(state: TrainState, batch: dict, controls: dict | None = None):
        return jitted(state, parts.rngs, batch, defaults if controls is None else controls)

    call.jitted = jitted
    return call
