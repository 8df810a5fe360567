"""compute_stats: the original's mean of per-image means and of per-image unbiased stds."""

import json

import numpy as np
import pytest
from PIL import Image

from dermjax.data import stats
from dermjax.data.cache import paths_digest
from dermjax.errors import DataError


@pytest.fixture
def paths(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i, hw in enumerate([(20, 30), (30, 20), (12, 12), (40, 25), (18, 60)]):
        path = str(tmp_path / f"img{i}.png")
        scale = rng.uniform(0.2, 1.0, 3)  # channels and images differ, so the definition matters
        Image.fromarray((rng.integers(0, 255, (*hw, 3)) * scale).astype(np.uint8)).save(path)
        out.append(path)
    return out


def direct(paths, size):
    means, stds = [], []
    for path in paths:
        img = Image.open(path).convert("RGB").resize(size[::-1], Image.Resampling.BILINEAR)
        x = np.asarray(img, np.float64).reshape(-1, 3) / 255
        means.append(x.mean(0))
        stds.append(x.std(0, ddof=1))
    return np.mean(means, 0), np.mean(stds, 0)


def test_stats_are_means_of_per_image_means_and_unbiased_stds(paths):
    mean, std = stats.compute_stats(paths, (16, 24))
    ref_mean, ref_std = direct(paths, (16, 24))
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(std, ref_std, rtol=1e-12)
    pooled = (
        np.concatenate(
            [
                np.asarray(Image.open(p).convert("RGB").resize((24, 16))).reshape(-1, 3)
                for p in paths
            ]
        )
        / 255
    )
    assert np.abs(std - pooled.std(0)).max() > 1e-3  # not a pooled std


def test_stats_file_is_reused_for_the_same_key_and_recomputed_for_another(paths, tmp_path):
    stats_json = tmp_path / "stats.json"
    cache_file = str(stats_json)
    first = stats.compute_stats(paths, (16, 16), cache_file=cache_file)
    saved = json.loads(stats_json.read_text())
    saved["mean"] = [9.0, 9.0, 9.0]
    with open(cache_file, "w") as f:
        json.dump(saved, f)
    np.testing.assert_array_equal(
        stats.compute_stats(paths, (16, 16), cache_file=cache_file)[0], 9.0
    )
    recomputed = stats.compute_stats(paths[:3], (16, 16), cache_file=cache_file)
    assert not np.allclose(recomputed[0], 9.0)
    assert not np.allclose(recomputed[0], first[0])
    assert json.loads(stats_json.read_text())["key"]["paths_sha256"] == paths_digest(paths[:3])


def test_no_readable_training_image_is_a_data_error(tmp_path):
    missing = [str(tmp_path / f"gone{i}.png") for i in range(3)]
    with pytest.raises(DataError, match=r"none of the 3 training images could be read"):
        stats.compute_stats(missing, (8, 8))
