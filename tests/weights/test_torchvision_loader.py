"""Strict torchvision state_dict loading, legacy keys, safetensors files, weight resolution."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from dermjax.errors import UserError
from dermjax.models import create_backbone
from dermjax.weights import torchvision as tvw


def _abstract(name, **kwargs):
    return nnx.eval_shape(lambda: create_backbone(name, rngs=nnx.Rngs(0), **kwargs))


def torch_layout_state_dict(module, seed=0):
    """A random state_dict keyed and shaped as torchvision would hold `module`'s variables."""
    rng = np.random.default_rng(seed)
    state = {}
    for path, var in nnx.to_flat_state(nnx.state(module, (nnx.Param, nnx.BatchStat))):
        value = rng.standard_normal(var.get_value().shape)  # float64, cast on load
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        key = tvw.torch_key(path).replace("self_attention.in_proj.", "self_attention.in_proj_")
        state[key] = value
        if path[-1] == "mean":
            state[key.replace("running_mean", "num_batches_tracked")] = np.array(7)
    return state


@pytest.fixture(scope="module")
def densenet_state():
    return torch_layout_state_dict(_abstract("densenet121", include_top=True))


def _value(module, *path):
    for name in path:
        module = module[name] if isinstance(name, int) else getattr(module, name)
    return np.asarray(module.get_value())


def test_every_tensor_lands_at_its_torchvision_path_in_flax_layout(densenet_state):
    model = tvw.backbone_from_state_dict("densenet121", densenet_state, include_top=True)
    sd = densenet_state
    np.testing.assert_allclose(
        _value(model, "features", "conv0", "kernel"),
        sd["features.conv0.weight"].transpose(2, 3, 1, 0),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        _value(model, "classifier", "kernel"), sd["classifier.weight"].T, rtol=1e-6
    )
    layer = ("features", "denseblock3", "denselayer7", "norm2")
    prefix = "features.denseblock3.denselayer7.norm2"
    np.testing.assert_allclose(_value(model, *layer, "scale"), sd[f"{prefix}.weight"], rtol=1e-6)
    np.testing.assert_allclose(
        _value(model, *layer, "mean"), sd[f"{prefix}.running_mean"], rtol=1e-6
    )
    np.testing.assert_allclose(_value(model, *layer, "var"), sd[f"{prefix}.running_var"], rtol=1e-6)
    leaves = jax.tree.leaves(nnx.state(model))
    assert all(isinstance(x, jax.Array) and x.dtype != np.float64 for x in leaves)


def test_strict_loading_names_all_missing_unexpected_and_misshaped_keys(densenet_state):
    model = tvw.backbone_from_state_dict("densenet121", densenet_state, include_top=True)
    before = _value(model, "features", "conv0", "kernel").copy()
    broken = dict(densenet_state)
    del broken["features.norm5.running_var"]
    del broken["features.transition2.conv.weight"]
    broken["features.norm6.weight"] = np.ones(3)
    broken["classifier.bias"] = np.ones(999)
    broken["features.conv0.weight"] = densenet_state["features.conv0.weight"] + 1
    broken["features.denseblock1.denselayer1.conv1.weight"] = np.ones((128, 64))  # not 4-D
    with pytest.raises(tvw.WeightsMismatchError) as error:
        tvw.load_state_dict(model, broken)
    message = str(error.value)
    assert re.search(r"missing keys \(2\):.*features\.norm5\.running_var", message)
    assert "features.transition2.conv.weight" in message
    assert re.search(r"unexpected keys \(1\): features\.norm6\.weight", message)
    assert re.search(r"shape mismatches \(2\): .*classifier\.bias: got \(999,\)", message)
    assert "denselayer1.conv1.weight: got (128, 64) (2-D), model has (1, 1, 64, 128)" in message
    np.testing.assert_array_equal(_value(model, "features", "conv0", "kernel"), before)


def test_legacy_densenet_keys_load_like_current_ones(densenet_state):
    legacy = {
        re.sub(r"(denselayer\d+)\.(norm|conv)([12])\.", r"\1.\2.\3.", k): v
        for k, v in densenet_state.items()
    }
    assert "features.denseblock1.denselayer1.norm.1.running_mean" in legacy
    assert list(tvw.fix_legacy_keys(legacy)) == list(densenet_state)
    model = tvw.backbone_from_state_dict("densenet121", legacy, include_top=True)
    np.testing.assert_allclose(
        _value(model, "features", "denseblock1", "denselayer1", "conv2", "kernel"),
        densenet_state["features.denseblock1.denselayer1.conv2.weight"].transpose(2, 3, 1, 0),
        rtol=1e-6,
    )


def test_legacy_vit_mlp_keys_are_renamed_and_in_proj_stays_torch_loadable():
    block = "encoder.layers.encoder_layer_3"
    fixed = tvw.fix_legacy_keys(
        {
            f"{block}.mlp.linear_1.weight": 1,
            f"{block}.mlp.linear_2.bias": 2,
            f"{block}.self_attention.in_proj_weight": 3,
        }
    )
    assert fixed == {
        f"{block}.mlp.0.weight": 1,
        f"{block}.mlp.3.bias": 2,
        f"{block}.self_attention.in_proj_weight": 3,
    }


def test_vit_in_proj_and_resized_position_embedding_load():
    from dermjax.models.vit import resize_pos_embedding

    state = torch_layout_state_dict(_abstract("vit_b_32", image_size=224))
    assert state["encoder.pos_embedding"].shape == (1, 50, 768)
    model = tvw.backbone_from_state_dict("vit_b_32", state, image_size=256)
    np.testing.assert_allclose(
        _value(model, "encoder", "pos_embedding"),
        resize_pos_embedding(state["encoder.pos_embedding"], 65),
        rtol=1e-6,
    )
    key = "encoder.layers.encoder_layer_11.self_attention.in_proj_weight"
    np.testing.assert_allclose(
        _value(
            model, "encoder", "layers", "encoder_layer_11", "self_attention", "in_proj", "kernel"
        ),
        state[key].T,
        rtol=1e-6,
    )


def test_drop_head_ignores_the_classifier_only_when_asked(densenet_state):
    model = _abstract("densenet121")
    with pytest.raises(
        ValueError, match=r"unexpected keys \(2\): classifier\.bias, classifier\.weight"
    ):
        tvw.load_state_dict(model, densenet_state)
    tvw.load_state_dict(model, densenet_state, drop_head=True)
    assert isinstance(nnx.state(model)["features"]["norm5"]["var"].get_value(), jax.Array)


def test_torch_tensors_are_accepted_bfloat16_included():
    torch = pytest.importorskip("torch")
    array = tvw.to_numpy(torch.arange(4, dtype=torch.bfloat16).reshape(2, 2))
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, [[0, 1], [2, 3]])


def test_converted_file_round_trips_through_safetensors(densenet_state, tmp_path):
    path = tmp_path / "densenet121.safetensors"
    tvw.save_converted(densenet_state, path, metadata={"arch": "densenet121"})
    features = tvw.pretrained_backbone("densenet121", path)
    np.testing.assert_allclose(
        _value(features, "features", "norm5", "scale"),
        densenet_state["features.norm5.weight"],
        rtol=1e-6,
    )
    model = _abstract("densenet121", include_top=True)
    tvw.load_state_dict(model, tvw.read_converted(path, "densenet121")[0])
    np.testing.assert_allclose(
        _value(model, "classifier", "bias"), densenet_state["classifier.bias"], rtol=1e-6
    )


def test_weights_resolve_from_explicit_path_then_weights_dir(tmp_path, monkeypatch):
    explicit = tmp_path / "mine.safetensors"
    explicit.write_bytes(b"x")
    assert tvw.resolve_weights_path("resnet50", explicit) == explicit
    monkeypatch.setenv("DERMJAX_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "vgg16.safetensors").write_bytes(b"x")
    assert tvw.resolve_weights_path("vgg16") == tmp_path / "vgg16.safetensors"


def test_missing_weights_error_prints_the_conversion_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMJAX_WEIGHTS_DIR", str(tmp_path / "w"))
    with pytest.raises(UserError) as error:
        tvw.resolve_weights_path("resnet101")
    expected = (
        "python scripts/convert_torchvision.py --arch resnet101 --weights DEFAULT "
        f"--out {tmp_path / 'w' / 'resnet101.safetensors'}"
    )
    assert expected in str(error.value)
    assert "\n" not in str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    with pytest.raises(UserError, match=f"--out {tmp_path / 'resnet101.safetensors'}$"):
        tvw.resolve_weights_path("resnet101", tmp_path)  # a folder: the command names a file


def test_weights_of_another_backbone_name_the_file_as_a_user_error(densenet_state, tmp_path):
    path = tmp_path / "densenet.safetensors"
    tvw.save_converted(densenet_state, path)
    with pytest.raises(UserError, match=r"densenet\.safetensors does not hold vgg16 weights"):
        tvw.pretrained_backbone("vgg16", path)


def test_a_file_of_another_arch_is_named_and_the_fix_never_overwrites_it(
    densenet_state, tmp_path, monkeypatch
):
    monkeypatch.setenv("DERMJAX_WEIGHTS_DIR", str(tmp_path / "w"))
    path = tmp_path / "mine.safetensors"
    tvw.save_converted(densenet_state, path, metadata={"arch": "densenet121"})
    with pytest.raises(UserError) as error:
        tvw.pretrained_backbone("vgg16", path)
    message = str(error.value)
    assert message.startswith(f"{path} holds densenet121 weights, not vgg16;")
    assert message.endswith(f"--out {tmp_path / 'w' / 'vgg16.safetensors'}")  # not over mine
    default = tmp_path / "w" / "densenet121.safetensors"
    default.parent.mkdir()
    tvw.save_converted(densenet_state, default)  # no metadata: the keys tell
    with pytest.raises(UserError) as error:
        tvw.pretrained_backbone("vgg16", default)
    message = str(error.value)
    assert re.search(r"unexpected keys \(\d+\): (\S+, ){6}and \d+ more\)", message), message
    assert len(message) < 1200


def test_integer_weights_are_refused_not_cast(densenet_state, tmp_path):
    ints = {k: np.asarray(v * 1000).astype(np.int32) for k, v in densenet_state.items()}
    path = tmp_path / "densenet121.safetensors"
    tvw.save_converted(ints, path)
    with pytest.raises(
        UserError, match=r"not floating-point \(\d+\): features\.conv0\.weight: int32"
    ):
        tvw.pretrained_backbone("densenet121", path)


@pytest.mark.parametrize("name", ["densenet121.pth", "densenet121.safetensors"])
def test_a_file_that_is_no_safetensors_is_one_error_with_the_command_that_fixes_it(
    densenet_state, tmp_path, monkeypatch, name
):
    monkeypatch.setenv("DERMJAX_WEIGHTS_DIR", str(tmp_path))
    path = tmp_path / name
    tvw.save_converted(densenet_state, tmp_path / "whole.safetensors")
    content = (tmp_path / "whole.safetensors").read_bytes()[:5000]  # cut short
    path.write_bytes(b"PK\x03\x04 a torch .pth zip" if name.endswith(".pth") else content)
    with pytest.raises(UserError) as error:
        tvw.pretrained_backbone("densenet121", path)
    message = str(error.value)
    assert message.startswith(f"{path} is not a readable safetensors file (SafetensorError: ")
    if name.endswith(".pth"):
        assert f"--arch densenet121 --state-dict {path} --out " in message
    else:  # the weights folder's own file, damaged: converted again over it
        assert message.endswith(f"--weights DEFAULT --out {path} --force")
    assert "\n" not in message
