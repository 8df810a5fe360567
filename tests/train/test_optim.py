"""Optimizer groups match torch.optim step for step; the epoch LR matches the original's scheduler."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dermjax.train.optim import (
    OPTIMIZERS,
    epoch_lr,
    get_learning_rate,
    make_group_tx,
    masked_tx,
    set_learning_rate,
    step_lr_schedule,
)

SHAPES = {"kernel": (4, 3), "bias": (3,)}
CASES = {
    "adam": dict(weight_decay=1e-2, betas=(0.8, 0.99), eps=1e-6),
    "adamw": dict(weight_decay=0.1, betas=(0.85, 0.995), eps=1e-7),
    "sgd": dict(weight_decay=1e-2, momentum=0.8),
}


def _torch_optimizer(torch, name, params, lr, kw):
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=kw["momentum"], weight_decay=kw["weight_decay"]
        )
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=kw["betas"], eps=kw["eps"], weight_decay=kw["weight_decay"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_group_tx_matches_torch_optimizer_including_a_learning_rate_change(name):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [
        {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(6)
    ]
    lrs = [1e-2] * 3 + [3e-3] * 3  # the loop changes the rate between epochs

    t_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    t_opt = _torch_optimizer(torch, name, list(t_params.values()), lrs[0], CASES[name])
    tx = make_group_tx(name, learning_rate=lrs[0], **CASES[name])
    params = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)

    for lr, g in zip(lrs, grads, strict=True):
        for group in t_opt.param_groups:
            group["lr"] = lr
        for k, p in t_params.items():
            p.grad = torch.from_numpy(g[k].copy())
        t_opt.step()

        state = set_learning_rate(state, lr)
        updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for k in SHAPES:
            np.testing.assert_allclose(
                params[k], t_params[k].detach().numpy(), rtol=1e-6, atol=1e-6
            )


def test_every_listed_optimizer_has_a_torch_parity_case():
    assert sorted(CASES) == sorted(OPTIMIZERS)


def test_unknown_optimizer_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="adam, adamw, sgd"):
        make_group_tx("rmsprop", learning_rate=1e-3, weight_decay=0.0)


def test_set_learning_rate_changes_the_next_update_inside_multi_transform_without_retrace():
    params = {"w": jnp.ones((2,)), "f": jnp.ones((2,))}
    tx = masked_tx(
        make_group_tx("sgd", learning_rate=0.1, weight_decay=0.0, momentum=0.0),
        {"w": "trainable", "f": "frozen"},
    )
    traces = []

    @jax.jit
    def update(grads, state):
        traces.append(1)
        return tx.update(grads, state, params)

    state = tx.init(params)
    assert get_learning_rate(state) == pytest.approx(0.1)
    updates, state = update(params, state)
    np.testing.assert_allclose(updates["w"], [-0.1, -0.1])
    state = set_learning_rate(state, 0.5)
    assert get_learning_rate(state) == pytest.approx(0.5)
    updates, _ = update(params, state)
    np.testing.assert_allclose(updates["w"], [-0.5, -0.5])
    assert len(traces) == 1  # same dtype and weak type as the initial state: no retrace


def test_set_learning_rate_updates_an_nnx_optimizer_in_place():
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(
        model, make_group_tx("adamw", learning_rate=1e-3, weight_decay=0.0), wrt=nnx.Param
    )
    set_learning_rate(opt.opt_state, 2e-4)
    assert get_learning_rate(opt.opt_state) == pytest.approx(2e-4)


def test_frozen_leaves_keep_their_values_and_get_no_optimizer_state():
    rng = np.random.default_rng(1)
    params = {
        "backbone": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
        "head": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    labels = {"backbone": "frozen", "head": "trainable"}
    tx = masked_tx(make_group_tx("adamw", learning_rate=0.1, weight_decay=0.5), labels)
    state = tx.init(params)
    state_sizes = [x.size for x in jax.tree.leaves(state) if x.ndim > 0]
    assert state_sizes == [3, 3]  # Adam mu and nu of the head only

    new = params
    for _ in range(3):
        grads = jax.tree.map(jnp.ones_like, new)
        updates, state = tx.update(grads, state, new)
        new = optax.apply_updates(new, updates)
    assert np.array_equal(np.asarray(new["backbone"]), np.asarray(params["backbone"]))
    assert not np.allclose(new["head"], params["head"])


def test_epoch_lr_reproduces_the_logged_values_of_exp_arch_017():
    kw = dict(eta_min=1e-7, epoch=24, n_warmup=3, num_epochs=25, cosine=True)
    assert epoch_lr(2e-4, **kw) == pytest.approx(1.2463147e-5, rel=1e-6)
    assert epoch_lr(5e-4, **kw) == pytest.approx(3.1017e-5, rel=1e-4)


def test_epoch_lr_equals_torch_cosine_annealing_stepped_after_warmup_epochs():
    torch = pytest.importorskip("torch")
    base, eta_min, n_warmup, num_epochs = 2e-4, 1e-7, 3, 25
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=num_epochs, eta_min=eta_min)
    for e in range(num_epochs):
        ours = epoch_lr(base, eta_min, e, n_warmup=n_warmup, num_epochs=num_epochs, cosine=True)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), e
        if e <= n_warmup:
            assert ours == base
        opt.step()
        if e >= n_warmup:  # the original steps its schedulers only after warm-up
            sched.step()


def test_epoch_lr_without_cosine_is_the_base_rate():
    rates = [epoch_lr(1e-3, 0.0, e, n_warmup=2, num_epochs=10, cosine=False) for e in range(10)]
    assert rates == [1e-3] * 10


def test_step_lr_schedule_warms_up_linearly_then_decays_to_eta_min():
    sched = step_lr_schedule(1.0, 0.01, warmup_steps=10, total_steps=110)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.01 + 0.99 * (1 + math.cos(math.pi / 2)) / 2)
    assert float(sched(110)) == pytest.approx(0.01)


def test_each_group_gets_its_own_rate_and_floor_from_the_config():
    from dermjax.config import load_config
    from dermjax.experiment import epoch_learning_rates

    cfg = load_config("default")
    cfg.optimizer.vision_model.learning_rate, cfg.training.scheduler.vision_eta_min = 2e-4, 1e-7
    cfg.optimizer.multimodal_classifier.learning_rate = 5e-4
    cfg.training.scheduler.multimodal_classifier_eta_min = 1e-5
    cfg.training.n_warmup_epochs, cfg.training.num_epochs = 1, 5
    # epoch 3: the cosine stepped 3 - 1 = 2 times over T_max = 5 epochs
    cosine = (1 + math.cos(math.pi * 2 / 5)) / 2
    backbone, head = epoch_learning_rates(cfg, 3)
    assert backbone == pytest.approx(1e-7 + (2e-4 - 1e-7) * cosine, rel=1e-12)
    assert head == pytest.approx(1e-5 + (5e-4 - 1e-5) * cosine, rel=1e-12)
    assert epoch_learning_rates(cfg, 1) == (2e-4, 5e-4)  # the warm-up keeps the base rates


def test_each_group_gets_its_own_optimizer_and_weight_decay():
    """Backbone SGD and head AdamW with other rates and decays: with zero gradients, each update
    is that group's decay alone (-lr * wd * p for both), from that group's settings."""
    from dermjax.config import load_config
    from dermjax.experiment import init_training, make_model

    cfg = load_config("demo")
    cfg.vision_model.update(name="efficientnet_b0", unfreeze_layers=-1)
    cfg.optimizer.vision_model.update(name="sgd", learning_rate=0.1, weight_decay=0.2)
    cfg.optimizer.multimodal_classifier.update(name="adamw", learning_rate=0.01, weight_decay=0.5)
    model = make_model(cfg, num_classes=3, text_dim=4, rngs=nnx.Rngs(0))
    _, state, tx_backbone, tx_head = init_training(cfg, model)
    for tx, group, opt, lr, wd in (
        (tx_backbone, "backbone", "opt_backbone", 0.1, 0.2),
        (tx_head, "head", "opt_head", 0.01, 0.5),
    ):
        params = state["params"][group]
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = tx.update(zeros, state[opt], params)
        for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(u, -lr * wd * p, rtol=1e-5, atol=1e-12)

    def has_adam(opt_state) -> bool:
        is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
        return any(map(is_adam, jax.tree.leaves(opt_state, is_leaf=is_adam)))

    assert has_adam(state["opt_head"]) and not has_adam(state["opt_backbone"])
