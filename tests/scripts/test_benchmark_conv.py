"""scripts/benchmark_conv.py times one shape both ways and reports the auto rule's choice."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark_conv  # noqa: E402


def test_measure_times_xla_and_the_reformulation_and_names_the_auto_choice():
    row = benchmark_conv.measure(("layer4", 2, 8, 8, 3, 1, 1), batch=2, repeats=1)
    assert row["where"] == "layer4"
    assert row["auto"] == "matmul"  # kernel larger than the 2x2 output
    for key in ("xla_fwd_ms", "matmul_fwd_ms", "xla_train_ms", "matmul_train_ms"):
        assert row[key] > 0, key
    depthwise = benchmark_conv.measure(("dw", 4, 3, 3, 3, 1, 3), batch=2, repeats=1)
    assert depthwise["auto"] == "depthwise"
