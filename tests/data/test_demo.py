"""The synthetic demo dataset is deterministic, complete, and shaped like the real metadata."""

import hashlib
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermjax.data import demo
from dermjax.data.embeddings import read_embeddings
from dermjax.data.encoders import HashingTextEncoder
from dermjax.data.metadata import DERM1M_SOURCES, load_metadata

N = 40


def _digest(root: str) -> dict[str, str]:
    """sha256 of every file the generator wrote, by relative path."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("demo"))
    demo.generate(root, seed=3, n=N)
    return root


def test_same_seed_gives_identical_csv_images_and_embeddings(generated, tmp_path):
    demo.generate(str(tmp_path), seed=3, n=N)
    assert _digest(str(tmp_path)) == _digest(generated)
    assert demo.make_metadata(3, N).equals(demo.make_metadata(3, N))
    assert not demo.make_metadata(4, N).equals(demo.make_metadata(3, N))


def test_metadata_has_the_harmonized_columns_and_naming(generated):
    df = pd.read_csv(os.path.join(generated, demo.METADATA_FILENAME))
    base = ["image_id", "dataset", "filename", "orig_filename", "label", "text_desc"]
    assert list(df.columns[:6]) == base
    assert "fitzpatrick_scale" in df.columns
    assert len(df) == N and df["image_id"].is_unique
    assert set(df["dataset"]) == {"fitzpatrick17k", "ddi", "isic", "derm1m"}
    assert set(df["fitzpatrick_scale"]) <= set(range(1, 7))
    stem = df["filename"].str.rsplit(".", n=1).str[0]
    assert (stem == df["dataset"] + "_" + df["image_id"]).all()
    derm = df[df["dataset"] == "derm1m"]
    assert (
        derm["image_id"] == derm["orig_filename"].str.rsplit(".", n=1).str[0].str.replace("/", "_")
    ).all()
    sources = set(derm["orig_filename"].str.split("/").str[0])
    assert sources == set(DERM1M_SOURCES)
    assert derm["orig_filename"].str.match(r"youtube/\w+_frame_\d+\.jpg").any()


def test_labels_are_many_and_imbalanced():
    counts = demo.make_metadata(0, demo.DEFAULT_N)["label"].value_counts()
    assert len(counts) >= 8
    assert 4 <= counts.max() / counts.min() <= 6


def test_missing_text_appears_as_nan_and_empty_string():
    df = demo.make_metadata(0, 200)
    text = df["text_desc"]
    assert text.isna().any() and (text == "").any()
    assert (text.str.len() > 20).mean() > 0.7
    assert len(load_metadata(df, has_text=True)) == int((text.notna() & (text != "")).sum())


def test_images_exist_as_jpeg_and_png_of_varied_sizes(generated):
    df = pd.read_csv(os.path.join(generated, demo.METADATA_FILENAME))
    formats, sizes = set(), set()
    for name in df["filename"]:
        with Image.open(os.path.join(generated, "imgs", name)) as image:
            formats.add(image.format)
            sizes.add(image.size)
            assert image.format == ("PNG" if name.endswith(".png") else "JPEG")
    assert formats == {"JPEG", "PNG"}
    assert len(sizes) > N // 2
    assert len({round(w / h, 2) for w, h in sizes}) >= 3


def test_photo_sized_images_have_photo_dimensions(monkeypatch):
    monkeypatch.setattr(demo, "_PHOTO_FRACTION", 1.0)
    for i, cls in enumerate(demo.CLASSES[:3]):
        image = demo.render_image(cls, 6, np.random.default_rng(i))
        assert image.size in demo._PHOTO_SIZES and image.mode == "RGB"


def test_embeddings_cover_every_row_with_the_hash_encoder(generated):
    df = pd.read_csv(os.path.join(generated, demo.METADATA_FILENAME))
    emb = read_embeddings(os.path.join(generated, "embeddings", demo.EMBEDDING_FILENAME))
    assert emb.attrs["encoder_spec"] == HashingTextEncoder(dim=256).spec
    assert set(emb["image_id"]) == set(df["image_id"])


def test_ensure_demo_data_regenerates_only_incomplete_or_different_data(tmp_path):
    root = str(tmp_path)
    paths = demo.ensure_demo_data(root, seed=1, n=12)
    stamp = os.path.getmtime(paths.metadata)
    assert demo.ensure_demo_data(root, seed=1, n=12) == paths
    assert os.path.getmtime(paths.metadata) == stamp
    os.remove(os.path.join(root, "DONE"))  # as if generation had been interrupted
    stray = os.path.join(paths.img_prefix, "partial.jpg")
    open(stray, "wb").close()
    demo.ensure_demo_data(root, seed=1, n=12)
    assert os.path.exists(os.path.join(root, "DONE")) and not os.path.exists(stray)
    demo.main(["--out", root, "--seed", "2", "--n", "10"])
    assert len(pd.read_csv(paths.metadata)) == 10
    assert len(os.listdir(paths.img_prefix)) == 10
