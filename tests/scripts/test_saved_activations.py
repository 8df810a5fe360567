"""scripts/saved_activations.py: per-image saved bytes by dtype, written as JSON."""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import saved_activations  # noqa: E402


def test_bf16_resnet_saves_bf16_activations_and_the_json_says_so(tmp_path):
    out = tmp_path / "saved.json"
    result = saved_activations.main(
        ["--models", "resnet50", "--size", "32", "--dtype", "bfloat16", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == result
    (row,) = result["rows"]
    per_image = row["bytes_per_image"]
    assert per_image.get("float32", 0) == 0  # parameters cancel out; no float32 activations
    # At least the input image and every convolution's bf16 input are kept.
    assert per_image["bfloat16"] > 32 * 32 * 3 * 2 * 50
    assert row["total"] == sum(per_image.values())


def test_float32_model_saves_float32_activations():
    per_image = saved_activations.saved_bytes("resnet50", 32, "float32")
    assert per_image["float32"] > 0 and "bfloat16" not in per_image
