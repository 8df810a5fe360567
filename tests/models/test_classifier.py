"""The full model: backbone + fusion head, pretrained weights loaded when asked."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dermjax.errors import UserError
from dermjax.models.classifier import build_model
from dermjax.weights import torchvision as tvw


def model(**kwargs):
    args = {
        "backbone": "resnet50",
        "pretrained": False,
        "weights_path": None,
        "pooling_type": "avg",
        "img_size": (32, 32),
        "dtype": jnp.float32,
        "head": {"projection_dim": 4},
        "num_classes": 5,
        "text_dim": 8,
        "rngs": nnx.Rngs(0),
    }
    return build_model(**{**args, **kwargs})


def test_pretrained_backbone_comes_from_the_converted_file_without_its_head(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = tvw.import_torchvision()
    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in torchvision.models.resnet50().state_dict().items()}
    path = tmp_path / "resnet50.safetensors"
    tvw.save_converted(state, path)
    built = model(pretrained=True, weights_path=str(path))
    np.testing.assert_array_equal(
        np.asarray(built.backbone.conv1.kernel.get_value()),
        state["conv1.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        np.asarray(built.backbone.layer4[2].bn3.mean.get_value()),
        state["layer4.2.bn3.running_mean"],
    )
    assert "fc" not in nnx.state(built.backbone)
    out = built(np.zeros((2, 32, 32, 3), np.float32), np.zeros((2, 8), np.float32))
    assert out["logits"].shape == (2, 5)


def test_missing_pretrained_weights_name_the_conversion_command(tmp_path):
    with pytest.raises(UserError, match=r"convert_torchvision\.py --arch resnet50"):
        model(pretrained=True, weights_path=str(tmp_path / "absent.safetensors"))


def test_head_takes_the_backbone_features_and_its_keyword_arguments():
    def build():
        return model(
            backbone="vgg16",
            pooling_type="concat",
            dtype=jnp.bfloat16,
            head={"projection_dim": 6, "fusion_strategy": "weighted_sum"},
        )

    built = nnx.eval_shape(build)
    assert built.head.vision_projection.out.in_features == 2 * 512  # concat doubles VGG's 512
    assert built.head.vision_projection.out.out_features == 6
    assert built.head.text_projection.out.in_features == 8
    assert built.head.fusion_strategy == "weighted_sum"
    assert built.backbone.features[0].dtype == jnp.bfloat16
    assert built.head.final_classifier.out.kernel.dtype == jnp.float32


def test_vit_needs_a_square_image_size():
    with pytest.raises(ValueError, match="square"):
        nnx.eval_shape(lambda: model(backbone="vit_b_32", img_size=(64, 96)))
