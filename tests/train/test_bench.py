"""train/bench.py: a profile that fails (no CUPTI on a GPU host, say) keeps the measured step
figures; the profile summary groups ops by kind."""

import contextlib

import pytest

from dermjax.train import bench


def test_op_kinds_drop_the_instance_suffix_and_sum_their_time():
    events = [("fusion.1", 3_000_000), ("fusion.12", 1_000_000), ("convolution.3", 4_000_000)]
    by_op = bench._largest(events, 2)
    by_kind = bench._largest([(bench.op_kind(n), ns) for n, ns in events], 5)
    assert [o["op"] for o in by_op] == ["convolution.3", "fusion.1"]
    assert by_kind == [
        {"op": "fusion", "ms": 4.0, "share": 0.5, "count": 2},
        {"op": "convolution", "ms": 4.0, "share": 0.5, "count": 1},
    ]


@pytest.mark.slow
def test_a_failed_jax_profile_keeps_the_step_figures(monkeypatch, tmp_path):
    @contextlib.contextmanager
    def no_profiler(_):
        raise RuntimeError("CUPTI could not be loaded")
        yield

    monkeypatch.setattr(bench.jax.profiler, "trace", no_profiler)
    result = bench.step_rate(
        "resnet50", 32, 2, "float32", 1, 1, ("main",), augment=False, profile_dir=str(tmp_path)
    )
    assert result["main_img_s"] > 0 and result["gflop_per_image"] > 0
    assert result["profile"] == {"error": "RuntimeError: CUPTI could not be loaded"}
