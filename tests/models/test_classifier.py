"""The full model from config: backbone + fusion head, pretrained weights loaded when asked."""

import numpy as np
import pytest
from flax import nnx

from dermjax.config import load_config
from dermjax.models.classifier import build_model
from dermjax.weights import torchvision as tvw


def config(**vision):
    cfg = load_config("demo")
    cfg.data.img_size = (32, 32)
    for key, value in vision.items():
        cfg.vision_model[key] = value
    return cfg


def test_pretrained_backbone_comes_from_the_converted_file_without_its_head(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = tvw.import_torchvision()
    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in torchvision.models.resnet50().state_dict().items()}
    path = tmp_path / "resnet50.safetensors"
    tvw.save_converted(state, path)
    cfg = config(pretrained=True, weights_path=str(path))
    model = build_model(cfg, num_classes=5, text_dim=8, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(
        np.asarray(model.backbone.conv1.kernel.get_value()),
        state["conv1.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        np.asarray(model.backbone.layer4[2].bn3.mean.get_value()),
        state["layer4.2.bn3.running_mean"],
    )
    assert "fc" not in nnx.state(model.backbone)
    out = model(np.zeros((2, 32, 32, 3), np.float32), np.zeros((2, 8), np.float32))
    assert out["logits"].shape == (2, 5)


def test_missing_pretrained_weights_name_the_conversion_command(tmp_path):
    cfg = config(pretrained=True, weights_path=str(tmp_path / "absent.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"convert_torchvision\.py --arch resnet50"):
        build_model(cfg, num_classes=5, text_dim=8, rngs=nnx.Rngs(0))
