"""The HTML report embeds exactly the PNGs it writes, and shows what cannot be plotted as text."""

import base64
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermjax.evaluation.groups import group_metrics
from dermjax.evaluation.metrics import classification_metrics
from dermjax.evaluation.report import write_report
from dermjax.tracking import Tracker

CLASSES = ["acne", "<b>nevus</b>", "psoriasis", "vitiligo"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def evaluation():
    rng = np.random.default_rng(0)
    n = 120
    labels = np.arange(n) % 4
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), labels] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    table = pd.DataFrame(
        {
            "dataset": np.where(np.arange(n) < 70, "fitzpatrick17k", "ddi"),
            "skin_type_group": ["V-VI"] * 30 + [None] * 90,  # one group only: no plot
        }
    )
    overall = classification_metrics(labels, probs, CLASSES)
    predictions = pd.DataFrame(
        {"image_id": [f"img{i}" for i in range(n)], "label": np.array(CLASSES)[labels]}
        | {f"prob_{c}": probs[:, i] for i, c in enumerate(CLASSES)}
    )
    return {
        "split": "test",
        "checkpoint": "/runs/demo/checkpoints/130",
        "overall": overall,
        "groups": group_metrics(labels, probs, table, CLASSES, n_boot=50),
        "ablation": {"image_only": overall, "text_only": overall, "both": overall},
    }, predictions


@pytest.fixture
def metrics_jsonl(tmp_path):
    tracker = Tracker(str(tmp_path / "run"), experiment_name="t", config_dict={})
    for epoch in range(3):
        record = {"epoch": epoch, "train/loss": 1.5 - 0.3 * epoch, "val/loss": 1.6 - 0.2 * epoch}
        record |= {"train/accuracy": 0.4 + 0.1 * epoch, "val/accuracy": 0.35 + 0.1 * epoch}
        tracker.log("epoch", 10 * (epoch + 1), record)
    tracker.log("final", 30, {"test/accuracy": 0.6})
    return tracker.metrics_path


def _embedded_pngs(page: str) -> list[bytes]:
    sources = re.findall(r"<img src='([^']*)'", page)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    return [base64.b64decode(s.split(",", 1)[1]) for s in sources]


def test_report_images_are_nonempty_pngs_and_exactly_the_files_under_plots(
    tmp_path, evaluation, metrics_jsonl
):
    ev, predictions = evaluation
    path = write_report(str(tmp_path / "out"), ev, predictions, CLASSES, metrics_jsonl, {"x": 1})
    assert path == f"{tmp_path}/out/report.html"
    embedded = _embedded_pngs(Path(path).read_text(encoding="utf-8"))
    files = sorted((tmp_path / "out" / "plots").glob("*.png"))
    assert [f.name for f in files] == [
        "confusion_matrix.png",
        "groups_dataset.png",
        "per_class_recall.png",
        "reliability.png",
        "training_curves.png",
    ]
    assert sorted(embedded) == sorted(f.read_bytes() for f in files)
    for png in embedded:
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1024
        with Image.open(io.BytesIO(png)) as image:
            image.verify()
            assert min(image.size) > 100


@pytest.fixture(scope="module")
def plain_report(tmp_path_factory, evaluation):
    """A report without training records, with a config: (its folder, its HTML)."""
    ev, predictions = evaluation
    out = tmp_path_factory.mktemp("plain")
    config = {"data": {"img_size": 64}, "note": "<script>"}
    return out, Path(write_report(str(out), ev, predictions, CLASSES, None, config)).read_text()


def test_report_shows_a_single_group_grouping_as_text_and_tables_escaped(plain_report):
    out, page = plain_report
    assert not (out / "plots" / "groups_skin_type_group.png").exists()
    assert "1 group(s) with data: no comparison plot" in page
    assert "90 sample(s) without a skin_type_group value" in page
    assert "&lt;b&gt;nevus&lt;/b&gt;" in page and "<b>nevus</b>" not in page
    assert "No training records" in page and "training_curves" not in page
    assert "Modality ablation" in page and "text_only" in page


def test_report_lists_group_intervals_gaps_and_the_config(plain_report, evaluation):
    ev, _ = evaluation
    _, page = plain_report
    fitz = ev["groups"]["dataset"]["groups"]["fitzpatrick17k"]
    lo, hi = fitz["accuracy_ci"]
    assert f"{fitz['accuracy']:.3f} ({lo:.3f}–{hi:.3f})" in page
    assert f"{ev['groups']['dataset']['worst_group_gap']['accuracy']:.3f}" in page
    assert "<details><summary>config</summary>" in page
    assert "&quot;img_size&quot;: 64" in page and "&lt;script&gt;" in page
    assert "prob_acne" not in page  # the preview leaves out the probability columns


def test_report_shows_notes_and_the_groups_left_out_of_the_gap(tmp_path, evaluation):
    ev, predictions = evaluation
    labels, probs = np.arange(12) % 4, np.full((12, 4), 0.25)
    table = pd.DataFrame({"site": ["a"] * 10 + ["<b>"] * 2})
    small = group_metrics(labels, probs, table, CLASSES, n_boot=0, min_group_size=10)
    ev = {**ev, "groups": small, "notes": ["The run has no test split: this is its val split."]}
    page = Path(write_report(str(tmp_path), ev, predictions, CLASSES)).read_text()
    assert "<strong>The run has no test split: this is its val split.</strong>" in page
    assert "Fewer than 10 samples, so left out of the gap and the worst group: &lt;b&gt;" in page
    assert "its interval can lie above the point estimate" in page
