"""`python -m dermjax.prepare` builds the caches the loaders of that config then find."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from dermjax import experiment_data
from dermjax.config import load_config
from dermjax.data import cache, images
from dermjax.experiment_data import cache_plan, load_data

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_prepare_builds_the_caches_training_will_use(tmp_path):
    overrides = [
        f"--config.data.local_root={tmp_path / 'data'}",
        "--config.data.demo_size=60",
        "--config.data.min_samples_per_label=2",
        "--config.data.img_size=(32,32)",
        f"--config.data.embeddings_path={tmp_path / 'absent.parquet'}",  # images only: not made
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "dermjax.prepare", "--config=configs/demo.py", "--workers=0", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config("demo")
    cfg.data.local_root = str(tmp_path / "data")
    cfg.data.demo_size = 60
    cfg.data.min_samples_per_label = 2
    cfg.data.img_size = (32, 32)
    assert not (tmp_path / "absent.parquet").exists()
    data = load_data(cfg, str(tmp_path))
    plan = cache_plan(cfg, data.paths.cache_dir, experiment_data.run_splits(data))
    assert plan == cache_plan(cfg, *_cache_dir_and_splits(cfg))  # what prepare built from
    assert set(plan) == {images.SHORTER, images.EXACT}  # demo augmentation is geometric
    for rule, (directory, paths) in plan.items():
        found = cache.open_cache(directory, paths, (32, 32), rule)
        assert found is not None, rule
        assert not found.missing(paths)
    # another image size is a different cache: none is found for it
    directory, paths = plan[images.EXACT]
    assert cache.open_cache(directory, paths, (48, 48), images.EXACT) is None


def test_a_negative_workers_flag_is_one_error_line_naming_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dermjax.prepare", "--config=configs/demo.py", "--workers=-1",
         f"--config.data.local_root={tmp_path / 'data'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr == "error: --workers=-1: must be 0 or more (0 decodes in the main process)\n"
    assert not (tmp_path / "data").exists()  # rejected before any data is made


def test_a_cache_dir_that_is_a_file_is_one_error_line_naming_the_folder(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dermjax.prepare", "--config=configs/demo.py", "--workers=0",
         f"--config.data.local_root={tmp_path / 'data'}", "--config.data.demo_size=60",
         "--config.data.min_samples_per_label=2", "--config.data.img_size=(32,32)",
         f"--config.data.cache_dir={afile}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert re.fullmatch(
        f"error: prepared cache folder {afile}/shorter_32x32_[0-9a-f]{{12}}: cannot write there "
        r"\(a part of the path is a file, not a folder\); set data\.cache_dir to a folder you "
        "can write",
        proc.stderr.splitlines()[-1],
    ), proc.stderr


def _cache_dir_and_splits(cfg) -> tuple[str, tuple]:
    paths, splits = experiment_data.split_paths(cfg)
    return paths.cache_dir, splits


def _prepare(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dermjax.prepare", "--config=configs/demo.py", "--workers=0",
         f"--config.data.local_root={tmp_path / 'data'}", "--config.data.demo_size=60",
         "--config.data.min_samples_per_label=2", "--config.data.img_size=(32,32)", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _caches(tmp_path) -> dict[str, int]:
    folder = tmp_path / "data" / "demo_v1" / "cache"
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_other_splits_get_their_own_cache_and_a_wrong_image_folder_builds_nothing(tmp_path):
    # A rebuilt cache used to replace the one of other paths: hours of decoding on real data,
    # lost to a changed seed or a mistyped data.img_prefix (which then cached only bad images).
    assert _prepare(tmp_path).returncode == 0
    first = _caches(tmp_path)
    assert len(first) == 2
    proc = _prepare(tmp_path, "--config.data.seed=7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = _caches(tmp_path)
    assert len(second) == 4 and {k: second[k] for k in first} == first  # untouched
    assert "other prepared caches of this rule and size" in proc.stderr
    proc = _prepare(tmp_path, f"--config.data.img_prefix={tmp_path / 'nowhere'}")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith("error: none of 16 sampled images exists (e.g.")
    assert "nothing was built" in proc.stderr and _caches(tmp_path) == second


def test_a_cache_folder_of_the_older_naming_is_still_used(tmp_path):
    assert _prepare(tmp_path).returncode == 0
    cfg = load_config("demo")
    cfg.data.update(local_root=str(tmp_path / "data"), demo_size=60, min_samples_per_label=2)
    cfg.data.img_size = (32, 32)
    data = load_data(cfg, str(tmp_path))
    for rule, (directory, _) in cache_plan(cfg, *_cache_dir_and_splits(cfg)).items():
        pathlib.Path(directory).rename(pathlib.Path(directory).parent / f"{rule}_32x32")
    found = experiment_data.open_caches(cfg, data)
    assert {rule: pathlib.Path(c.directory).name for rule, c in found.items()} == {
        images.SHORTER: "shorter_32x32",
        images.EXACT: "exact_32x32",
    }


def test_a_second_prepare_builds_nothing_and_each_build_ends_with_a_summary(tmp_path):
    first = _prepare(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"shorter cache ready: \d+ images at .* \(\d+ s\)", first.stderr)
    second = _prepare(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "building" not in second.stderr
    assert second.stderr.count("images are already prepared at") == 2


def test_ctrl_c_stops_a_build_with_workers_in_one_line(tmp_path):
    assert _prepare(tmp_path).returncode == 0  # the demo data, made once
    cmd = [sys.executable, "-m", "dermjax.prepare", "--config=configs/demo.py", "--workers=2",
           f"--config.data.local_root={tmp_path / 'data'}", "--config.data.demo_size=60",
           "--config.data.min_samples_per_label=2", "--config.data.img_size=(48,48)"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    caches = tmp_path / "data" / "demo_v1" / "cache"
    deadline = time.monotonic() + 300
    while not any(p.name.startswith("shorter_48x48") for p in caches.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(2)  # the workers are starting or decoding
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
    _, err = proc.communicate(timeout=120)  # a worker hit mid-task used to hang the pool
    assert proc.returncode == 130, err[-3000:]
    assert "SpawnPoolWorker" not in err and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1].startswith("error: stopped by Ctrl-C")
