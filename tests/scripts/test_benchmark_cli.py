"""scripts/benchmark.py step's table: a failing torch.compile is reported, not hidden; a row the
time box cut off before dermjax's step still prints. (The CLI run itself: test_gpu_session.py.)"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402


def test_failed_torch_compile_is_reported_in_row_and_table(capsys):
    import torch

    from dermjax.train import bench_torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch_rows = bench_torch.torch_step_rates(
            "efficientnet_b0", 32, 2, "float32", 1, 1, compile_backend="no_such_backend"
        )
    finally:
        torch.set_num_threads(threads)
    assert torch_rows["eager"]["img_s"] > 0
    error = torch_rows["compile"]["error"]
    assert error.startswith("compile failed: ") and "no_such_backend" in error
    row = {
        "model": "efficientnet_b0",
        "dermjax": {"main_img_s": 1.0, "peak_bytes": None},
        "torch_eager": torch_rows["eager"],
        "torch_compile": torch_rows["compile"],
        "ratio_to_torch_eager": 1.0,
        "ratio_to_torch_compile": None,
    }
    settings = {"batch": 2, "size": 32, "dtype": "float32", "steps": 1, "windows": 1}
    settings |= {"compile_mode": "default", "compile_backend": "no_such_backend"}
    benchmark.print_step_table({"device": "cpu", "settings": settings, "work": "w", "rows": [row]})
    printed = capsys.readouterr().out
    assert "failed*" in printed and f"efficientnet_b0 torch.compile: {error}" in printed


def test_row_cut_off_before_dermjax_prints_torch_figures(capsys):
    settings = {"batch": 2, "size": 32, "dtype": "float32", "steps": 1, "windows": 1}
    settings |= {"compile_mode": "default", "compile_backend": "inductor"}
    row = {"model": "vit_b_16", "torch_eager": {"img_s": 7.5}, "torch_compile": {"img_s": 9.25}}
    benchmark.print_step_table({"device": "cpu", "settings": settings, "work": "w", "rows": [row]})
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| vit_b_16"))
    assert line.split(" | ")[1:4] == ["-", "7.5", "9.25"]


def _fake_sides(monkeypatch, out, calls, torch_raises=None):
    """Replaces both measured sides; each records its turn and what the JSON held by then."""
    import json

    from dermjax.train import bench, bench_torch

    def written() -> list:
        return json.loads(out.read_text())["rows"] if out.exists() else []

    def dermjax_side(name, *args, **kwargs):
        calls.append(("dermjax", written()))
        return {"main_img_s": 10.0, "peak_bytes": None}

    def torch_side(name, *args, **kwargs):
        calls.append(("torch", written()))
        if torch_raises:
            raise torch_raises
        return {"eager": {"img_s": 5.0}, "compile": {"img_s": 8.0}, "torch": "x"}

    monkeypatch.setattr(bench, "step_rate", dermjax_side)
    monkeypatch.setattr(bench_torch, "torch_step_rates", torch_side)


def test_first_side_is_written_before_the_second_starts_in_either_order(monkeypatch, tmp_path):
    for first, second in (("torch", "dermjax"), ("dermjax", "torch")):
        out, calls = tmp_path / f"{first}.json", []
        _fake_sides(monkeypatch, out, calls)
        result = benchmark.main(["step", "--torch", "--models", "resnet50", "--first", first,
                                 "--steps", "1", "--windows", "1", "--out", str(out)])  # fmt: skip
        assert [side for side, _ in calls] == [first, second]
        (row_then,) = calls[1][1]  # the first side's figures were on disk already
        assert ("dermjax" in row_then) == (first == "dermjax")
        assert ("torch_eager" in row_then) == (first == "torch")
        (row,) = result["rows"]
        assert row["ratio_to_torch_eager"] == 2.0 and row["ratio_to_torch_compile"] == 1.25
        assert result["settings"]["first"] == first


def test_a_failing_torch_side_is_reported_and_keeps_dermjax(monkeypatch, tmp_path, capsys):
    out, calls = tmp_path / "step.json", []
    _fake_sides(monkeypatch, out, calls, torch_raises=RuntimeError("CUDA out of memory.\nmore"))
    result = benchmark.main(["step", "--torch", "--models", "vit_l_16", "--first", "dermjax",
                             "--steps", "1", "--windows", "1", "--out", str(out)])  # fmt: skip
    (row,) = result["rows"]
    assert row["dermjax"]["main_img_s"] == 10.0
    assert row["torch_error"] == "RuntimeError: CUDA out of memory."
    assert row["ratio_to_torch_eager"] is None
    assert "* vit_l_16 torch: RuntimeError: CUDA out of memory." in capsys.readouterr().out


def test_eager_figures_outlive_a_compile_the_time_box_cuts_off(monkeypatch, tmp_path):
    import json

    import pytest

    from dermjax.train import bench, bench_torch

    out = tmp_path / "step.json"
    monkeypatch.setattr(bench, "step_rate", lambda *a, **k: {"main_img_s": 10.0})

    def torch_side(name, *args, report, **kwargs):
        report({"eager": {"img_s": 5.0}})
        raise KeyboardInterrupt  # gpu_session.sh's `timeout --signal=INT` during the compile

    monkeypatch.setattr(bench_torch, "torch_step_rates", torch_side)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["step", "--torch", "--models", "resnet50", "--first", "dermjax",
                        "--steps", "1", "--windows", "1", "--out", str(out)])  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert row["dermjax"]["main_img_s"] == 10.0 and row["torch_eager"]["img_s"] == 5.0


def test_arguments_that_would_fail_after_minutes_are_one_error_at_once(tmp_path, capsys):
    import pytest

    out = str(tmp_path / "s.json")
    for argv, named in [
        (["--models", "resnet5"], "--models resnet5: not a backbone"),
        (["--models", "vit_b_16", "--size", "60"], "--size 60: vit_b_16 needs a multiple of"),
        (["--out", str(tmp_path / "no" / "s.json")], "does not exist"),
    ]:
        with pytest.raises(SystemExit) as stop:
            benchmark.main(["step", "--out", out, *argv])
        assert stop.value.code == 2 and named in capsys.readouterr().err


def test_mfu_uses_the_exact_card_and_the_model_flops():
    from dermjax.train import bench

    assert bench.mfu(1000.0, 24.0, "NVIDIA H200", "bfloat16") == round(24e12 / 989.4e12, 3)
    assert bench.mfu(1000.0, 24.0, "NVIDIA H200 NVL", "bfloat16") == round(24e12 / 835e12, 3)
    assert bench.mfu(1000.0, 24.0, "NVIDIA H200", "float32") is None
    assert bench.mfu(1000.0, None, "NVIDIA H200", "bfloat16") is None


def test_torch_vits_are_built_for_the_benchmark_size():
    import torch

    from dermjax.train import bench_torch
    from dermjax.weights.torchvision import import_torchvision

    net = bench_torch._torch_net(torch, import_torchvision(), "vit_b_16", 64)
    with torch.no_grad():
        feats = net["backbone"].eval()(torch.zeros(1, 3, 64, 64))
    assert feats.shape == (1, 768)  # it raised "Wrong image height! Expected 224 but got 64"
