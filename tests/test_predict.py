"""python -m dermjax.predict from a checkpoint alone: evaluate's top-1, text or not, bad images."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from dermjax import compile_cache, evaluate, predict
from dermjax.errors import UserError
from dermjax.evaluation import inference
from dermjax.evaluation.run import evaluate_checkpoint
from tests.test_evaluate import run_cli, tiny_run


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """The tiny run, its test predictions by evaluate, and the test rows' files and texts."""
    workdir = tiny_run(tmp_path_factory.getbasetemp() / "tiny_eval_run")
    out_dir = workdir / "evaluation" / "test"
    if not (out_dir / "predictions.parquet").exists():  # test_evaluate made it, unless run alone
        evaluate_checkpoint(str(workdir), overrides=[("evaluation.n_boot", "0")])
    data = workdir.parent / "data" / "demo_v1"
    meta = pd.read_csv(data / "metadata_all_harmonized.csv", dtype={"image_id": str})
    pred = pd.read_parquet(out_dir / "predictions.parquet")
    rows = pred.merge(meta[["image_id", "filename", "text_desc"]], on="image_id", how="left")
    rows["path"] = [str(data / "imgs" / name) for name in rows["filename"]]
    return workdir, rows


@pytest.fixture(scope="module")
def model(evaluated_run):
    return inference.load_model(str(evaluated_run[0]))


@pytest.mark.slow
def test_predict_gives_evaluates_top1_and_probabilities_for_the_same_images(evaluated_run, model):
    _, rows = evaluated_run
    prob_columns = [f"prob_{c}" for c in model.classes]
    arrays, errors = inference.load_images(rows["path"].tolist(), model.img_size)
    assert errors == {}
    for row, image in zip(rows.itertuples(), arrays, strict=True):
        has_text = isinstance(row.text_desc, str) and row.text_desc != ""
        vector = inference.text_vector(model, row.text_desc) if has_text else None
        probs = inference.predict_images(
            model, [image], vector, "both" if has_text else "image_only"
        )
        assert model.classes[int(probs[0].argmax())] == row.top1_label
        np.testing.assert_allclose(
            probs[0], rows.loc[row.Index, prob_columns].to_numpy(float), atol=1e-5
        )


@pytest.mark.slow
@pytest.mark.parametrize("text", [[], ["--text="]])  # an empty text is no text, as in training
def test_predict_without_text_is_image_only_and_reports_a_bad_image(evaluated_run, tmp_path, text):
    workdir, rows = evaluated_run
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    images = [rows["path"][0], str(bad), rows["path"][1]]
    args = [f"--checkpoint={workdir}", *text, *images, "--top-k=2"]
    status, out, err = run_cli(predict.run, args)
    assert status == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot read image {bad}: ")
    lines = out.splitlines()
    assert re.fullmatch(
        rf"checkpoint: {workdir}/checkpoints \(best checkpoint, step \d+\)", lines[0]
    )
    assert lines[1] == "note: no --text given (or an empty one): predicting from the image only"
    assert lines[2] == images[0] and lines[5] == images[2] and len(lines) == 8
    assert lines[3].split()[0] == "1" and lines[4].split()[0] == "2"


@pytest.mark.slow
def test_predict_with_text_uses_it_and_prints_json(evaluated_run, model):
    workdir, rows = evaluated_run
    texted = rows[rows["text_desc"].notna() & (rows["text_desc"] != "")].iloc[0]
    args = [f"--checkpoint={workdir}", texted["path"], "--json", "--text", texted["text_desc"]]
    status, out, _ = run_cli(predict.run, args)
    assert status == 0
    printed = json.loads(out)
    assert printed["checkpoint"] == {
        "path": f"{workdir}/checkpoints", "kind": "best", "step": model.ref.step
    }  # fmt: skip
    assert printed["notes"] == []
    (result,) = printed["predictions"]
    assert result["image"] == texted["path"] and result["mode"] == "both"
    assert len(result["top_k"]) == 3
    assert result["top_k"][0]["label"] == texted["top1_label"]
    assert result["top_k"][0]["prob"] == pytest.approx(texted["top1_prob"], abs=1e-5)
    (image,), _ = inference.load_images([texted["path"]], model.img_size)
    image_only = inference.predict_images(model, [image], None, "image_only")[0]
    assert not np.allclose(image_only, texted[[f"prob_{c}" for c in model.classes]].to_numpy(float))


@pytest.mark.slow
def test_json_keeps_an_unreadable_image_in_its_place_and_blank_text_is_text(
    evaluated_run, tmp_path, caplog
):
    # Training embeds a text of blanks (only "" is missing text), so predict does too.
    workdir, rows = evaluated_run
    missing = tmp_path / "gone.jpg"
    images = [str(missing), rows["path"][0]]
    status, out, err = run_cli(
        predict.run, [f"--checkpoint={workdir}", *images, "--json", "--text= "]
    )
    assert status == 1
    printed = json.loads(out)
    assert printed["predictions"][0] == {"image": str(missing), "error": "no such file"}
    assert printed["predictions"][1]["image"] == images[1]
    assert printed["predictions"][1]["mode"] == "both"
    assert f"error: cannot read image {missing}: no such file" in err.splitlines()
    assert "the text gives an all-zero embedding" in caplog.text  # hashing knows no word in it


@pytest.mark.slow
def test_an_override_of_what_the_model_was_trained_with_is_refused(evaluated_run):
    workdir, rows = evaluated_run
    args = [f"--checkpoint={workdir}", rows["path"][0], "--config.data.img_size=(64, 64)"]
    status, out, err = run_cli(predict.run, args)
    assert status == 1 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "(data.img_size: [32, 32] -> [64, 64])" in errors[0]
    assert errors[0].endswith("as trained: drop them")
    assert "results are not the run's" not in err


@pytest.mark.slow
def test_another_text_encoder_for_a_hashing_checkpoint_is_refused(evaluated_run):
    workdir, rows = evaluated_run
    args = [f"--checkpoint={workdir}", rows["path"].iloc[0], "--text", "itchy red plaque"]
    status, out, err = run_cli(predict.run, [*args, "--config.encoder.model_name=pubmedbert"])
    assert status == 1 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the checkpoint was trained with the built-in hashing text encoder; "
        "encoder.model_name='pubmedbert' cannot replace it (the model reads that encoder's "
        "vectors): drop the override"
    ]


@pytest.mark.slow
def test_predict_and_evaluate_use_the_checkpoints_compilation_cache_setting(
    evaluated_run, monkeypatch, tmp_path
):
    workdir, rows = evaluated_run
    used = []
    monkeypatch.setattr(compile_cache, "enable", used.append)
    status, _, err = run_cli(predict.run, [f"--checkpoint={workdir}", rows["path"].iloc[0]])
    assert status == 0, err
    assert used == ["auto"]  # the run's own setting, saved in its checkpoint
    override = f"--config.training.compilation_cache_dir={tmp_path / 'xla'}"
    args = [f"--checkpoint={workdir}", f"--out={tmp_path / 'eval'}", override]
    args.append("--config.evaluation.n_boot=0")
    status, _, err = run_cli(evaluate.run, args)
    assert status == 0, err
    assert used == ["auto", str(tmp_path / "xla")]


def test_predict_with_a_missing_checkpoint_is_one_error_line(tmp_path):
    status, out, err = run_cli(predict.run, [f"--checkpoint={tmp_path / 'none'}", "x.jpg"])
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: --checkpoint=")


@pytest.mark.parametrize(
    ("trained", "has_text", "mode", "note"),
    [
        ("both", True, "both", None),
        ("both", False, "image_only", "no --text given (or an empty one): predicting from the "
         "image only"),
        ("image_only", True, "image_only", "the model was trained on images only: --text is "
         "ignored"),
        ("image_only", False, "image_only", None),
        ("text_only", True, "text_only", None),
    ],
)  # fmt: skip
def test_the_mode_follows_what_the_model_was_trained_on(trained, has_text, mode, note):
    assert predict.choose_mode(trained, has_text) == (mode, note)


def test_a_text_only_model_without_text_is_one_error_asking_for_it():
    with pytest.raises(UserError, match=r"trained on text only .*: pass --text"):
        predict.choose_mode("text_only", False)
