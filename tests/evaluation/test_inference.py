"""Evaluation reads the prepared cache that serves its images, and says which one."""

import logging
import types

import numpy as np
from PIL import Image

from dermjax.config import data_paths, load_config
from dermjax.data import cache, images
from dermjax.evaluation import inference


def test_evaluation_names_the_prepared_cache_it_reads(tmp_path, caplog):
    cfg = load_config("demo")
    cfg.data.local_root = str(tmp_path)
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(paths[-1])
    cache_dir = data_paths(cfg).cache_dir
    built = cache.folder_name(images.EXACT, (16, 16), paths)  # all four: not the split's own
    cache.build_cache(
        paths, f"{cache_dir}/{built}", img_size=(16, 16), rule=images.EXACT, progress=False
    )
    model = types.SimpleNamespace(cfg=cfg, img_size=(16, 16))
    records = types.SimpleNamespace(paths=paths[:3])
    with caplog.at_level(logging.INFO):
        found = inference._exact_cache(model, records)
    assert found is not None and found.directory == f"{cache_dir}/{built}"
    assert f"using prepared cache at {cache_dir}/{built}" in caplog.text
