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
