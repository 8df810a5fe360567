"""A regular (non-editable) install runs the documented command from any folder."""

import os
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

from dermjax import compile_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
_NOT_SOURCE_TOP = {".git", ".venv", "build", "workdirs", "data", "weights", "wandb", "bench_out"}
_NOT_SOURCE = shutil.ignore_patterns("*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")
_MODULE_FILES = (
    "import sys, dermjax.main, dermjax.configs.demo; "
    "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith('dermjax')))"
)


def _ignore(folder: str, names: list[str]) -> set[str]:
    """What a build does not need: run outputs at the top, caches everywhere."""
    top = _NOT_SOURCE_TOP.intersection(names) if pathlib.Path(folder) == ROOT else set()
    return top | _NOT_SOURCE(folder, names)


def _site_dirs() -> list[str]:
    """This interpreter's package folders (a .pth line adds a folder but runs no .pth in it, so
    an editable dermjax here stays out of the venv)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([*site.getsitepackages(), paths["purelib"], paths["platlib"]]))


def _site_packages(python: str) -> pathlib.Path:
    """The venv's own site-packages folder."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True)
    return pathlib.Path(out.stdout.strip())


@pytest.mark.slow
def test_non_editable_install_runs_the_demo_from_another_folder_caching_its_compiles(tmp_path):
    # Build from a copy so the build leaves nothing in the source tree.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_ignore)
    venv = tmp_path / "venv"
    # The venv gets no pip or packages of its own: this environment's site-packages (pip,
    # setuptools, dependencies) follow its own through a .pth file. `--system-site-packages`
    # would give the base interpreter's instead when the tests run in a venv, as in CI.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = str(venv / "bin" / "python")
    (_site_packages(python) / "parent-env.pth").write_text("\n".join(_site_dirs()) + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
        check=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # No test-wide compilation cache: the default ("auto") must pick the user cache folder.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", compile_cache.ENV)}
    env["XDG_CACHE_HOME"] = str(tmp_path / "user-cache")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [python, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600
        )

    # This environment holds an editable dermjax: the venv's copy must be the one used.
    where = run("-c", _MODULE_FILES)
    assert where.returncode == 0, where.stderr
    files = [pathlib.Path(line).resolve() for line in where.stdout.split()]
    assert len(files) > 10 and any(f.name == "demo.py" for f in files)
    outside = [f for f in files if not f.is_relative_to(venv.resolve())]
    assert not outside, outside

    proc = run(
        "-m", "dermjax.main", "--config=configs/demo.py",
        f"--config.data.local_root={tmp_path / 'data'}", "--config.data.demo_size=96",
        "--config.data.min_samples_per_label=5", "--config.data.img_size=(32, 32)",
        "--config.training.batch_size=16", "--config.training.num_workers=0",
        "--config.training.num_epochs=1", "--config.training.n_warmup_epochs=1",
        f"--workdir={tmp_path / 'run'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()
    assert list(elsewhere.iterdir()) == []  # nothing written relative to the current folder
    cached = tmp_path / "user-cache" / "dermjax" / "jax"
    assert f"compilation cache: {cached}" in proc.stderr
    assert any(cached.iterdir())  # the compiled train/eval steps, for the next run
