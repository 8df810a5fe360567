"""scripts/convert_torchvision.py end to end, from a saved random torchvision state_dict."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dermjax.weights import torchvision as tvw
from tests.models import parity

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_torchvision.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("convert_torchvision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved_resnet50(tmp_path_factory):
    tv = parity.import_torchvision()
    import torch

    model = parity.seeded_torch_model(tv, "resnet50", image_size=32)
    path = tmp_path_factory.mktemp("torch") / "resnet50.pth"
    torch.save(model.state_dict(), path)
    return path, parity.torch_state_dict(model)


def _argv(source, out):
    return [
        "--arch",
        "resnet50",
        "--state-dict",
        str(source),
        "--out",
        str(out),
        "--image-size",
        "32",
    ]


def test_converts_verifies_and_writes_weights_with_sidecar(script, saved_resnet50, tmp_path):
    source, state = saved_resnet50
    out = tmp_path / "weights" / "resnet50.safetensors"
    assert script.main(_argv(source, out)) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["arch"] == "resnet50"
    assert sidecar["num_params"] == 25_557_032
    assert sidecar["num_categories"] == 1000
    assert sidecar["weights"] is None and sidecar["transforms"] is None
    check = sidecar["verification"]
    assert check["max_abs_diff"] <= check["tolerance"] and check["image_size"] == 32
    model = tvw.pretrained_backbone("resnet50", out, include_top=True)
    np.testing.assert_array_equal(
        np.asarray(model.layer4[2].bn3.var.get_value()), state["layer4.2.bn3.running_var"]
    )


def test_refuses_to_write_when_the_converted_model_disagrees(
    script, saved_resnet50, tmp_path, monkeypatch, capsys
):
    source, _ = saved_resnet50
    build = script.backbone_from_state_dict

    def corrupted(*args, **kwargs):
        model = build(*args, **kwargs)
        model.fc.bias.set_value(model.fc.bias.get_value() + 0.5)
        return model

    monkeypatch.setattr(script, "backbone_from_state_dict", corrupted)
    out = tmp_path / "resnet50.safetensors"
    assert script.main(_argv(source, out)) == 1
    assert "verification failed" in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".json").exists()
