"""scripts/gpu_wheels.py: which carried wheels the GPU machine installs, and that they install and
import there without any package index."""

import base64
import hashlib
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_wheels  # noqa: E402


def _wheel(folder: pathlib.Path, name: str, version: str, source: str = "") -> pathlib.Path:
    """A minimal valid pure-Python wheel holding module `name`."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for file, text in files.items():
            z.writestr(file, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
            record.append(f"{file},sha256={digest.decode()},{len(text.encode())}")
        z.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    return path


def test_selects_missing_or_older_distributions_and_keeps_newer_installed_ones(tmp_path):
    installed = np.__version__
    names = [
        "numpy-0.1-py3-none-any.whl",  # older than installed: keep numpy
        f"numpy-{int(installed.split('.')[0]) + 100}.0-py3-none-any.whl",  # newer: install
        "array_record-0.0.1-cp312-cp312-manylinux_2_17_x86_64.whl",  # name normalised: keep
        "dermjax_no_such_dist-1.0-py3-none-any.whl",  # missing: install
        "notes.txt",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    install, kept = gpu_wheels.select(str(tmp_path))
    assert [os.path.basename(p) for p in install] == [names[3], names[1]]
    assert len(kept) == 2
    assert kept[0].startswith("array-record ") and kept[1].startswith(f"numpy {installed} ")


def test_pins_name_this_environments_versions_of_every_carried_distribution():
    pins = gpu_wheels.pins()
    assert [p.split("==")[0] for p in pins] == list(gpu_wheels.CARRIED)
    assert "grain==" + str(gpu_wheels.installed_version("grain")) in pins


def test_download_replaces_old_carried_wheels_and_asks_pip_for_cp312_pins(tmp_path, monkeypatch):
    stale, other = "grain-0.0.1-py3-none-any.whl", "unrelated-1.0-py3-none-any.whl"
    for name in (stale, other):
        (tmp_path / name).write_bytes(b"")
    commands = []
    monkeypatch.setattr(gpu_wheels.subprocess, "run", lambda cmd, check: commands.append(cmd))
    gpu_wheels.download(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [other]  # two grain versions would stop the install
    (command,) = commands
    assert command[command.index("--python-version") + 1] == "3.12"
    assert command[-len(gpu_wheels.CARRIED) :] == gpu_wheels.pins()


@pytest.mark.slow
def test_install_puts_selected_wheels_on_a_target_that_imports_offline(tmp_path):
    wheels, target = tmp_path / "whl", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels, "dermjax_carried_probe", "1.0", "VALUE = 42\n")
    (wheels / "numpy-0.1-py3-none-any.whl").write_bytes(b"")  # kept, never opened
    script = ROOT / "scripts" / "gpu_wheels.py"
    proc = subprocess.run(
        [sys.executable, str(script), "install", "--wheels", str(wheels), "--target", str(target)],
        capture_output=True, text=True, env={**os.environ, "PIP_NO_INDEX": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "kept numpy" in proc.stdout
    assert "installed into" in proc.stdout and "dermjax_carried_probe-1.0" in proc.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import dermjax_carried_probe as m; print(m.VALUE)"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(target)},
    )  # fmt: skip
    assert probe.stdout.strip() == "42", probe.stderr


def test_install_without_the_wheel_folder_says_how_to_make_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_wheels.py"), "install", "--wheels",
         str(tmp_path / "absent")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "gpu_wheels.py download" in proc.stderr and "carry" in proc.stderr
