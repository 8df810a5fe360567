"""scripts/convert_torchvision.py end to end, from a saved random torchvision state_dict."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from dermjax.errors import UserError
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


def test_an_existing_out_is_replaced_only_with_force(script, saved_resnet50, tmp_path):
    source, _ = saved_resnet50
    out = tmp_path / "resnet50.safetensors"
    out.write_bytes(b"the user's file")
    with pytest.raises(UserError, match=r"exists: add --force to replace it"):
        script.main(_argv(source, out))
    assert out.read_bytes() == b"the user's file"
    assert script.main([*_argv(source, out), "--force"]) == 0
    assert out.stat().st_size > 1_000_000
    assert out.stat().st_mode & 0o044  # others may read it as the umask allows (not 0600)


@pytest.mark.parametrize(
    "out, named",
    [
        ("notes.json", "name the file NAME.safetensors"),  # its sidecar would overwrite it
        ("folder.safetensors/", "is a folder"),
        ("a_file/x.safetensors", "cannot create its folder"),
    ],
)
def test_outs_that_cannot_be_written_fail_before_any_work(script, tmp_path, out, named):
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=re.escape(named)):
        script.parse_args(
            ["--arch", "resnet50", "--weights", "DEFAULT", "--out", str(tmp_path / out)]
        )
    assert (tmp_path / "notes.json").read_text() == "{}"


def test_wrapped_data_parallel_and_pre_0_4_state_dicts_convert_to_the_same_weights(
    script, saved_resnet50, tmp_path
):
    import torch

    source, state = saved_resnet50
    plain = torch.load(source, weights_only=True)
    wrapped = tmp_path / "wrapped.pth"
    old = {k: v for k, v in plain.items() if not k.endswith("num_batches_tracked")}  # torch<0.4.1
    torch.save({"state_dict": {f"module.{k}": v for k, v in old.items()}, "epoch": 3}, wrapped)
    out = tmp_path / "resnet50.safetensors"
    assert script.main(_argv(wrapped, out)) == 0
    model = tvw.pretrained_backbone("resnet50", out, include_top=True)
    np.testing.assert_array_equal(
        np.asarray(model.layer4[2].bn3.var.get_value()), state["layer4.2.bn3.running_var"]
    )


def test_unusable_state_dict_files_are_one_line_errors(script, saved_resnet50, tmp_path):
    import torch

    tv = parity.import_torchvision()
    whole = tmp_path / "whole.pth"
    torch.save(tv.models.resnet18(), whole)
    other = tmp_path / "resnet18.pth"
    torch.save(tv.models.resnet18().state_dict(), other)
    (tmp_path / "junk.pth").write_bytes(b"junk" * 9)
    out = tmp_path / "x.safetensors"
    for source, named in [
        (tmp_path / "none.pth", "none.pth: no such file"),
        (whole, "holds a pickled object such as a whole model, not a state_dict"),
        (tmp_path / "junk.pth", "junk.pth (is no file torch.save wrote|cannot be read)"),
        (other, r"does not hold resnet50 weights: missing keys \(\d+\): .*, and \d+ more"),
    ]:
        with pytest.raises(UserError, match=named) as error:
            script.main(_argv(source, out))
        assert "\n" not in str(error.value) and "\x1b" not in str(error.value)
    assert not out.exists()


def test_a_failed_download_says_how_to_convert_offline(script, tmp_path, monkeypatch):
    tv = parity.import_torchvision()

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(tv.models, "get_model", offline)
    argv = ["--arch", "resnet50", "--weights", "DEFAULT", "--out", str(tmp_path / "r.safetensors")]
    with pytest.raises(UserError, match=r"cannot download .* then convert here with --state-dict"):
        script.main(argv)
