"""Optimizer groups and learning-rate schedules with the original's (PyTorch) semantics.

Each parameter group (backbone, head) gets its own optax transformation built by `make_group_tx`.
The learning rate is an injected hyper-parameter, so it lives in the optimizer state and the loop
sets it once per epoch (`set_learning_rate`) without recompiling the step, exactly as the original
steps `CosineAnnealingLR` once per epoch. Frozen leaves go through `masked_tx`, which gives them no
update, no optimizer state and no weight decay.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

OPTIMIZERS = ("adam", "adamw", "sgd")
TRAINABLE, FROZEN = "trainable", "frozen"


def make_group_tx(
    name: str,
    *,
    learning_rate: float | optax.Schedule,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.9,
) -> optax.GradientTransformation:
    """Returns the torch-equivalent optimizer `name` with `learning_rate` injected into its state.

    * ``adam``: torch.optim.Adam; L2 decay (``wd * p``) is added to the gradient before the moments.
    * ``adamw``: torch.optim.AdamW; decoupled decay, ``p -= lr * wd * p``.
    * ``sgd``: torch.optim.SGD with momentum (dampening 0, no Nesterov, first buffer = gradient)
      and L2 decay added to the gradient.
    """
    b1, b2 = (float(b) for b in betas)
    if name == "adam":

        def factory(learning_rate: float) -> optax.GradientTransformation:
            return optax.chain(
                optax.add_decayed_weights(weight_decay),
                optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
            )

    elif name == "adamw":

        def factory(learning_rate: float) -> optax.GradientTransformation:
            return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

    elif name == "sgd":

        def factory(learning_rate: float) -> optax.GradientTransformation:
            return optax.chain(
                optax.add_decayed_weights(weight_decay),
                optax.sgd(learning_rate, momentum=momentum),
            )

    else:
        raise ValueError(
            f"optimizer name {name!r} is not supported; allowed: {', '.join(OPTIMIZERS)}"
        )
    return optax.inject_hyperparams(factory)(learning_rate=learning_rate)


def masked_tx(tx: optax.GradientTransformation, labels: Any) -> optax.GradientTransformation:
    """Applies `tx` to leaves labelled "trainable"; "frozen" leaves get a zero update and no state.

    `labels` is a pytree of "trainable"/"frozen" strings shaped like the params (or a function of
    the params returning one). Unlike `optax.freeze` chained before AdamW, frozen leaves are not
    decayed either.
    """
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def _is_lr_path(path: tuple[Any, ...]) -> bool:
    """True for the path ``....hyperparams['learning_rate']`` of an injected hyper-parameter."""
    return (
        len(path) >= 2
        and getattr(path[-2], "name", None) == "hyperparams"
        and getattr(path[-1], "key", None) == "learning_rate"
    )


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _like(value: float, ref: Any) -> jax.Array:
    """`value` as a scalar with the dtype (and, for jax arrays, the sharding) of `ref`."""
    if isinstance(ref, jax.Array):
        return jax.device_put(np.asarray(value, ref.dtype), ref.sharding)
    return jnp.asarray(value, dtype=np.asarray(ref).dtype)


def set_learning_rate(opt_state: Any, learning_rate: float) -> Any:
    """Returns `opt_state` with every injected learning rate set to `learning_rate`.

    Works for states of `make_group_tx`, of `masked_tx(make_group_tx(...))`, and for the NNX
    `OptState`-wrapped state of an `nnx.Optimizer` (whose variables are also updated in place).
    The value keeps the dtype and sharding of the stored one, so a jitted step does not recompile.
    """
    found = False

    def replace(path: tuple[Any, ...], leaf: Any) -> Any:
        nonlocal found
        if not _is_lr_path(path):
            return leaf
        found = True
        if _is_variable(leaf):
            leaf[...] = _like(learning_rate, leaf[...])
            return leaf
        return _like(learning_rate, leaf)

    new_state = jax.tree_util.tree_map_with_path(replace, opt_state, is_leaf=_is_variable)
    if not found:
        raise ValueError("no injected learning_rate found in this optimizer state")
    return new_state


def get_learning_rate(opt_state: Any) -> float:
    """Returns the injected learning rate of `opt_state` (the one `set_learning_rate` sets)."""
    values = [
        float(leaf[...] if _is_variable(leaf) else leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state, is_leaf=_is_variable)
        if _is_lr_path(path)
    ]
    if not values:
        raise ValueError("no injected learning_rate found in this optimizer state")
    if len(set(values)) > 1:
        raise ValueError(f"optimizer state holds several different learning rates: {values}")
    return values[0]


def epoch_lr(
    base: float, eta_min: float, epoch: int, *, n_warmup: int, num_epochs: int, cosine: bool
) -> float:
    """Learning rate used during 0-based `epoch`, as the original's epoch-stepped cosine gives it.

    The original steps `CosineAnnealingLR(T_max=num_epochs)` at the end of each epoch from
    `n_warmup` on, so the rate stays at `base` through warm-up and never reaches `eta_min`.
    """
    if not cosine:
        return float(base)
    t = max(0, epoch - n_warmup)
    return eta_min + (base - eta_min) * (1.0 + math.cos(math.pi * t / num_epochs)) / 2.0


def step_lr_schedule(
    base: float, eta_min: float, *, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    """Optional extra (not the original's): per-step linear warm-up from 0, then cosine to eta_min.

    Pass it as `learning_rate` to `make_group_tx`; its state then shows the rate of the last step.
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=base,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=eta_min,
    )
