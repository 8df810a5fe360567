"""Backbone registry: names, feature sizes, and the original's unfreeze_layers rules as labels."""

import logging

import jax
import optax
import pytest
from flax import nnx

from dermjax.models import (
    BACKBONES,
    create_backbone,
    default_image_size,
    feature_dim,
    is_vit,
    param_labels,
    unit_count,
    vit_patch_size,
)
from dermjax.models.vgg import unfreeze_units as vgg_units


def _abstract(name, **kwargs):
    return nnx.eval_shape(lambda: create_backbone(name, rngs=nnx.Rngs(0), **kwargs))


@pytest.fixture(scope="module")
def resnet50():
    return _abstract("resnet50")


def _trainable(model, name, n, rule="children"):
    labels = param_labels(model, name, n, rule=rule)
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    paths = {tuple(k.key for k in path): label for path, label in flat}
    assert set(paths.values()) <= {"trainable", "frozen"}
    return {p for p, label in paths.items() if label == "trainable"}, set(paths)


def test_registry_lists_the_thirteen_backbones_with_the_originals_dimensions():
    assert len(BACKBONES) == 13
    dims = {name: feature_dim(name) for name in BACKBONES}
    assert dims == {
        "resnet50": 2048,
        "resnet101": 2048,
        "densenet121": 1024,
        "efficientnet_b0": 1280,
        "efficientnet_b1": 1280,
        "efficientnet_b2": 1408,
        "efficientnet_b3": 1536,
        "efficientnet_b4": 1792,
        "vgg16": 512,
        "vit_b_16": 768,
        "vit_b_32": 768,
        "vit_l_16": 1024,
        "vit_l_32": 1024,
    }
    assert feature_dim("densenet121", "concat") == 2048
    assert feature_dim("vit_b_16", "concat") == 768  # ViTs ignore pooling_type
    assert [n for n in BACKBONES if is_vit(n)] == ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32"]
    assert default_image_size("efficientnet_b4") == 380
    assert default_image_size("resnet50") == 224


def test_unit_counts_follow_the_originals_top_level_children():
    counts = {n: unit_count(n) for n in ("resnet50", "densenet121", "efficientnet_b0", "vgg16")}
    assert counts == {"resnet50": 8, "densenet121": 12, "efficientnet_b0": 9, "vgg16": 31}
    assert unit_count("vit_l_16") == 24
    assert len(vgg_units(_abstract("vgg16"))) == unit_count("vgg16")


def test_vit_patch_size_is_none_for_cnns():
    patches = {name: vit_patch_size(name) for name in BACKBONES if is_vit(name)}
    assert patches == {"vit_b_16": 16, "vit_b_32": 32, "vit_l_16": 16, "vit_l_32": 32}
    assert {vit_patch_size(name) for name in BACKBONES if not is_vit(name)} == {None}
    with pytest.raises(ValueError, match="unknown backbone"):
        vit_patch_size("vit_h_14")


def test_a_vit_is_built_for_a_square_image_size_a_cnn_for_any():
    vit = _abstract("vit_b_32", image_size=(64, 64))
    assert vit.image_size == 64 and vit.encoder.pos_embedding.shape == (1, 1 + 2 * 2, 768)
    with pytest.raises(ValueError, match="vit_b_32 needs a square image size, got 64x96"):
        _abstract("vit_b_32", image_size=(64, 96))
    assert _abstract("vgg16", image_size=(64, 96)).num_features == 512


def test_unknown_backbone_name_lists_the_choices():
    with pytest.raises(ValueError, match="resnet50"):
        feature_dim("resnet18")
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("resnet18", rngs=nnx.Rngs(0))


def test_minus_one_trains_everything_and_zero_freezes_everything(resnet50):
    trainable, every = _trainable(resnet50, "resnet50", -1)
    assert trainable == every and len(every) == 159  # 161 torch parameters minus fc
    assert _trainable(resnet50, "resnet50", 0)[0] == set()


def test_resnet_units_count_parameterless_relu_and_maxpool(resnet50):
    four, every = _trainable(resnet50, "resnet50", 4)
    assert {p[0] for p in four} == {"layer1", "layer2", "layer3", "layer4"}
    assert _trainable(resnet50, "resnet50", 6)[0] == four  # + relu, maxpool: no parameters
    seven = _trainable(resnet50, "resnet50", 7)[0]
    assert seven - four == {("bn1", "bias"), ("bn1", "scale")}
    assert _trainable(resnet50, "resnet50", 8)[0] == every


def test_more_units_than_the_backbone_has_unfreezes_all_with_a_warning(resnet50, caplog):
    with caplog.at_level(logging.WARNING):
        trainable, every = _trainable(resnet50, "resnet50", 10)
    assert trainable == every
    assert "exceeds the 8 units of resnet50" in caplog.text


def test_densenet_eleven_units_leave_only_conv0_frozen():
    model = _abstract("densenet121")
    trainable, every = _trainable(model, "densenet121", 11)
    assert every - trainable == {("features", "conv0", "kernel")}


def test_vgg_units_are_conv_relu_and_pool_modules():
    model = _abstract("vgg16")
    assert _trainable(model, "vgg16", 2)[0] == set()  # features.30 pool, features.29 relu
    assert _trainable(model, "vgg16", 3)[0] == {
        ("features", 28, "kernel"),
        ("features", 28, "bias"),
    }


def test_torchvision_head_is_trainable_unless_everything_is_frozen():
    model = _abstract("resnet50", include_top=True, num_classes=7)
    assert _trainable(model, "resnet50", 1)[0] >= {("fc", "kernel"), ("fc", "bias")}
    assert _trainable(model, "resnet50", 0)[0] == set()


def test_labels_drive_optax_multi_transform_over_nnx_params(resnet50):
    params = nnx.state(resnet50, nnx.Param)
    labels = param_labels(resnet50, "resnet50", 2)
    tx = optax.multi_transform(
        {"trainable": optax.adamw(1e-3), "frozen": optax.set_to_zero()}, labels
    )
    updates, _ = jax.eval_shape(lambda p: tx.update(p, tx.init(p), p), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_conv_count_ten_on_resnet50_unfreezes_exactly_layer4(resnet50):
    trainable, every = _trainable(resnet50, "resnet50", 10, "conv_count")
    assert trainable == {p for p in every if p[0] == "layer4"}
    assert len([p for p in trainable if p[-1] == "kernel"]) == 10  # the last 10 convs


def test_conv_count_thirty_five_on_resnet101_starts_at_layer3_14_conv3():
    model = _abstract("resnet101")
    trainable, every = _trainable(model, "resnet101", 35, "conv_count")
    layer3 = {p for p in trainable if p[0] == "layer3"}
    assert {p[:3] for p in layer3 if p[1] == 14} == {("layer3", 14, "conv3"), ("layer3", 14, "bn3")}
    assert {p[1] for p in layer3} == set(range(14, 23))
    assert trainable == layer3 | {p for p in every if p[0] == "layer4"}


def test_conv_count_beyond_the_conv_count_unfreezes_all_and_minus_one_zero_are_unchanged(
    resnet50, caplog
):
    with caplog.at_level(logging.WARNING):
        trainable, every = _trainable(resnet50, "resnet50", 54, "conv_count")
    assert trainable == every
    assert "exceeds the 53 Conv2d layers of resnet50" in caplog.text
    assert _trainable(resnet50, "resnet50", 53, "conv_count")[0] == every
    assert _trainable(resnet50, "resnet50", -1, "conv_count")[0] == every
    assert _trainable(resnet50, "resnet50", 0, "conv_count")[0] == set()


def test_conv_count_leaves_other_backbones_on_the_children_rule():
    model = _abstract("efficientnet_b0")
    assert _trainable(model, "efficientnet_b0", 2, "conv_count") == _trainable(
        model, "efficientnet_b0", 2
    )
    with pytest.raises(ValueError, match="conv_count"):
        param_labels(model, "efficientnet_b0", 2, rule="convs")


@pytest.mark.parametrize("n", [1, 4, 17, 52])
def test_conv_count_matches_the_originals_leaf_walk_over_torchvision_resnet50(resnet50, n):
    """Parameterised leaf modules of torchvision's resnet50 in registration order, from the
    n-th-from-last Conv2d on, as the later original unfreezes them."""
    torch = pytest.importorskip("torch")
    from tests.models.parity import import_torchvision

    with torch.device("meta"):
        model = import_torchvision().models.resnet50()
    leaves = [
        (name, m)
        for name, m in model.named_modules()
        if not list(m.children()) and list(m.parameters()) and not name.startswith("fc")
    ]
    convs = [i for i, (_, m) in enumerate(leaves) if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 53
    expected = {
        tuple(int(k) if k.isdigit() else k for k in name.split("."))
        for name, _ in leaves[convs[-n] :]
    }
    trainable, _ = _trainable(resnet50, "resnet50", n, "conv_count")
    assert {p[:-1] for p in trainable} == expected
