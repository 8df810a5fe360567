"""`python -m dermjax.prepare` builds the caches the loaders of that config then find."""

import pathlib
import subprocess
import sys

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
    plan = cache_plan(cfg, load_data(cfg, str(tmp_path)))
    assert set(plan) == {images.SHORTER, images.EXACT}  # demo augmentation is geometric
    for rule, (directory, paths) in plan.items():
        found = cache.open_cache(directory, paths, (32, 32), rule)
        assert found is not None, rule
        assert not found.missing(paths)
    # another image size is a different cache: none is found for it
    directory, paths = plan[images.EXACT]
    assert cache.open_cache(directory, paths, (48, 48), images.EXACT) is None
