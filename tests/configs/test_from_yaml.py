"""Original YAML files, the later original's keys included, load with the original's rules."""

import importlib.util
import logging
import pathlib
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from dermjax import experiment, experiment_data
from dermjax.config import ConfigError, data_paths, load_config, validate
from dermjax.configs import from_yaml

# Every key of the later original, in the shape of its modal_template.yaml / final configs.
LATER = """
data:
  use_local: True
  dataset: dataset_v2
  min_samples_per_label: 250
  datasets: [fitzpatrick17k, ddi, isic, derm1m]
  per_dataset_split_ratios:
    fitzpatrick17k: {train: 0.9, val: 0.1, test: 0.0}
    ddi: {train: 0.3, val: 0.4, test: 0.3}
    isic: {train: 0.7, val: 0.2, test: 0.1}
    derm1m: {train: 0.9, val: 0.0, test: 0.1}
  has_text: null
  test_size: 0.2
  val_size: 0.1
  img_size: [380, 380]
training:
  compute_stats: True
  use_normalization: False
  vision_only_pretraining: {enabled: true, epochs: 3}
  auxiliary_loss_schedule:
    vision: {schedule_type: constant, start_epoch: 0, end_epoch: 100, start_weight: 0.5,
             end_weight: 0.5}
    text: {schedule_type: linear, start_epoch: 3, end_epoch: 30, start_weight: 0, end_weight: 0.2}
vision_model: {name: resnet101, pretrained: true, pooling_type: concat, unfreeze_layers: 35}
multimodal_classifier:
  num_classes: null
  sample_weights: null
  vision_embedding_dim: null
  text_embedding_dim: null
  projection_activation: ReLU
  final_activation: GELU
  use_auxiliary_loss: true
  auxiliary_vision_loss_weight: 0.5
  auxiliary_text_loss_weight: 0.3
  loss_fn: focal
  reduction: mean
masking:
  random_mask: {enabled: True, image_prob: 0.0, text_prob: 0.1}
  epoch_schedule:
    enabled: false
optimizer:
  vision_model: {name: AdamW, learning_rate: 0.0001, weight_decay: 0.001}
  multimodal_classifier: {name: Adam, learning_rate: 0.0005, weight_decay: 0.0001}
checkpoint: {gcs_uri: "gs://bucket/test_best.pth"}
"""
SEED = """
data: {dataset: dataset_v1, test_size: 0.1, val_size: 0.1}
vision_model: {name: resnet50, unfreeze_layers: 10}
optimizer:
  vision_model: {name: adamw, learning_rate: 1.0e-4, weight_decay: 1.0e-3}
"""


# The keys the original cannot run without; `_load` adds those a test's file leaves out.
REQUIRED = {
    "data": {"dataset": "dataset_v1"},
    "multimodal_classifier": {
        "projection_dim": 256,
        "fusion_strategy": "concat_mlp",
        "loss_fn": "cross_entropy",
    },
    "optimizer": {
        group: {"learning_rate": 1.0e-4, "weight_decay": 1.0e-3}
        for group in ("vision_model", "multimodal_classifier")
    },
}


def _with_required(raw: dict, required: dict) -> dict:
    for key, value in required.items():
        if isinstance(value, dict):
            raw[key] = _with_required(raw.get(key) or {}, value)
        else:
            raw.setdefault(key, value)
    return raw


def _write(tmp_path, text: str, name: str = "exp.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _load(tmp_path, text: str, name: str = "exp.yaml"):
    raw = _with_required(yaml.safe_load(textwrap.dedent(text)) or {}, REQUIRED)
    path = _write(tmp_path, yaml.safe_dump(raw), name)
    return load_config("from_yaml", str(path))


def test_every_later_key_loads_onto_its_dermjax_field(tmp_path):
    cfg = _load(tmp_path, LATER)
    validate(cfg)
    assert cfg.data.per_dataset_split_ratios["ddi"] == {"train": 0.3, "val": 0.4, "test": 0.3}
    assert cfg.data.per_dataset_split_ratios["derm1m"]["val"] == 0.0
    assert cfg.training.use_normalization is False
    pre = cfg.training.vision_only_pretraining
    assert (pre.enabled, pre.epochs) == (True, 3)
    text = cfg.training.auxiliary_loss_schedule.text
    assert (text.schedule_type, text.start_epoch, text.end_epoch) == ("linear", 3, 30)
    assert (text.start_weight, text.end_weight) == (0.0, 0.2)
    assert cfg.training.auxiliary_loss_schedule.vision.start_weight == 0.5
    assert cfg.masking.epoch_schedule.enabled is False
    assert cfg.multimodal_classifier.auxiliary_text_loss_weight == 0.3
    assert cfg.multimodal_classifier.reduction == "mean"


def test_derived_and_unread_keys_are_dropped_with_one_warning_naming_them(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dermjax.configs.from_yaml"):
        _load(tmp_path, LATER)
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(ignored) == 1
    for key in (
        "multimodal_classifier.num_classes",
        "multimodal_classifier.sample_weights",
        "multimodal_classifier.vision_embedding_dim",
        "multimodal_classifier.text_embedding_dim",
        "checkpoint.gcs_uri='gs://bucket/test_best.pth'",
    ):
        assert key in ignored[0]


def test_names_the_original_lower_cased_load_in_any_case_and_others_do_not(tmp_path):
    cfg = _load(tmp_path, LATER)
    assert cfg.optimizer.vision_model.name == "adamw"
    assert cfg.optimizer.multimodal_classifier.name == "adam"
    assert cfg.multimodal_classifier.projection_activation == "relu"
    assert cfg.multimodal_classifier.final_activation == "gelu"
    cfg = _load(tmp_path, "multimodal_classifier: {loss_fn: Focal, fusion_strategy: Concat_MLP}")
    with pytest.raises(ConfigError, match=r"fusion_strategy='Concat_MLP'.*\n.*loss_fn='Focal'"):
        validate(cfg)  # the original compared these two as written


def test_selection_is_on_validation_loss_and_stated(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dermjax.configs.from_yaml"):
        assert _load(tmp_path, SEED).training.monitor == "val/loss"
    assert "training.monitor='val/loss'" in caplog.text
    explicit = _load(tmp_path, SEED + "training: {monitor: val/macro_f1}\n")
    assert explicit.training.monitor == "val/macro_f1"


@pytest.mark.parametrize(
    ("extra", "rule"),
    [
        ("", "children"),  # 700cca3: the last N top-level children
        ("training: {use_normalization: true}\n", "conv_count"),
        ("checkpoint: {gcs_uri: gs://b/x.pth}\n", "conv_count"),  # dropped, but it dates the file
        ("multimodal_classifier: {auxiliary_vision_loss_weight: 0.5}\n", "conv_count"),
        ("vision_model: {unfreeze_rule: children}\ntraining: {use_normalization: true}\n", None),
    ],
)
def test_unfreeze_rule_is_the_one_of_the_files_era_unless_set(tmp_path, caplog, extra, rule):
    seed = SEED.replace("vision_model: {name: resnet50, unfreeze_layers: 10}\n", "")
    text = seed + extra + ("" if "vision_model" in extra else "vision_model: {name: resnet50}\n")
    with caplog.at_level(logging.WARNING, logger="dermjax.configs.from_yaml"):
        cfg = _load(tmp_path, text)
    assert cfg.vision_model.unfreeze_rule == (rule or "children")
    stated = f"vision_model.unfreeze_rule='{rule}'"
    assert (stated in caplog.text) == (rule is not None)


@pytest.mark.parametrize(
    ("ratios", "problem"),
    [
        ("{scin2: {train: 1.0}}", r"per_dataset_split_ratios\.scin2: unknown dataset"),
        ("{ddi: {train: 0.8, val: 0.1}}", r"ddi=.*train \+ val \+ test = 0\.9 must be 1"),
        (
            "{ddi: {train: 0.9, validation: 0.1}}",
            r"ddi=.*expected a mapping of \['train', 'val', 'test'\] \(validation is not one\)",
        ),
        ("{ddi: {train: 1.5, val: -0.5}}", r"ddi=.*every ratio must be a number in \[0, 1\]"),
    ],
)
def test_bad_split_ratios_are_config_errors_naming_the_dataset(tmp_path, ratios, problem):
    with pytest.raises(ConfigError, match=problem):
        validate(_load(tmp_path, f"data: {{per_dataset_split_ratios: {ratios}}}"))


def test_a_missing_ratio_counts_as_zero_and_zero_split_sizes_are_valid(tmp_path):
    validate(_load(tmp_path, "data: {per_dataset_split_ratios: {ddi: {train: 0.9, test: 0.1}}}"))
    validate(_load(tmp_path, "data: {test_size: 0, val_size: 0.0}"))


def _frame() -> pd.DataFrame:
    rows = [(d, lab) for d in ("isic", "ddi") for lab in ("a", "b") for _ in range(20)]
    df = pd.DataFrame(rows, columns=["dataset", "label"])
    df["image_id"] = [f"id{i}" for i in range(len(df))]
    return df.sample(frac=1.0, random_state=0)


def test_per_dataset_ratios_choose_the_split_and_warn_that_sizes_are_ignored(tmp_path, caplog):
    cfg = _load(tmp_path, LATER)
    with caplog.at_level(logging.WARNING, logger="dermjax.experiment_data"):
        train, val, test = experiment_data.split_metadata(cfg, _frame())
    assert "data.test_size=0.2 and data.val_size=0.1 are ignored" in caplog.text
    # isic 0.7/0.2/0.1: 27/9/4 (ceil(36 * (0.2 / 0.9)) is 9 in floating point, as in sklearn);
    # ddi 0.3/0.4/0.3: 11/17/12
    assert (len(train), len(val), len(test)) == (27 + 11, 9 + 17, 4 + 12)
    cfg.data.per_dataset_split_ratios = None
    train, val, test = experiment_data.split_metadata(cfg, _frame())
    assert (len(train), len(val), len(test)) == (56, 8, 16)


def test_without_normalization_no_statistics_reach_the_steps_or_the_checkpoint(tmp_path):
    cfg = load_config("demo")
    cfg.data.local_root, cfg.data.demo_size, cfg.data.min_samples_per_label = str(tmp_path), 120, 1
    datasets = ("fitzpatrick17k", "ddi", "isic", "derm1m")
    cfg.data.per_dataset_split_ratios = {
        d: {"train": 0.5, "val": 0.5, "test": 0.0} for d in datasets
    }
    cfg.training.use_normalization, cfg.training.compute_stats = False, True  # stats ignored
    data = experiment_data.load_data(cfg, str(tmp_path))
    assert data.mean is None and data.std is None
    assert data.test is None and len(data.val.labels) > 0  # test 0 everywhere: no test split
    meta = experiment.Components.meta(SimpleNamespace(data=data, cfg=cfg))
    assert meta["normalization_mean"] is None and meta["normalization_std"] is None
    spec = experiment.step_spec(cfg, data.class_weights, data.mean, data.std)
    assert (spec.mean, spec.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # (x - 0) / 1 == x
    assert not (tmp_path / "normalization_stats.json").exists()


def test_check_script_prints_a_row_per_file_and_fails_on_a_bad_one(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "check_original_configs",
        pathlib.Path(__file__).parents[2] / "scripts" / "check_original_configs.py",
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "later.yaml").write_text(
        yaml.safe_dump(_with_required(yaml.safe_load(LATER), REQUIRED))
    )
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "template.yaml").write_text("model: {name: resnet50}\nsplits: {}\n")
    assert script.main([str(tmp_path)]) == 0
    bad = _with_required(yaml.safe_load(SEED + "training: {patiense: 3}\n"), REQUIRED)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert script.main([str(tmp_path)]) == 1
    rows = capsys.readouterr().out.splitlines()[-4:]
    assert (
        rows[0].split()[:2] == ["bad.yaml", "FAIL"] and "training.patiense: unknown key" in rows[0]
    )
    assert rows[1].split()[:2] == ["later.yaml", "ok"]
    assert rows[2].split()[:2] == ["old/template.yaml", "skip"]
    assert rows[3] == "3 files: 1 ok, 1 failed, 1 skipped"
    assert script.main([str(tmp_path / "later.yaml")]) == 0  # one file
    assert capsys.readouterr().out.splitlines()[0].split()[:2] == ["later.yaml", "ok"]


@pytest.mark.parametrize("arg", ["configs/from_yaml.py", "configs/from_yaml.py:"])
def test_from_yaml_without_a_yaml_file_is_one_config_error_line(tmp_path, arg):
    proc = subprocess.run(
        [sys.executable, "-m", "dermjax.main", f"--config={arg}", f"--workdir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "error: configs/from_yaml.py needs the YAML file: "
        "--config=configs/from_yaml.py:path/to/experiment.yaml\n"
    )
    assert "Traceback" not in proc.stderr


def test_keys_a_file_omits_get_the_originals_defaults_and_are_stated(tmp_path, caplog):
    # dermjax's own defaults are exp_arch_009's values; the original's code builds single
    # Linear layers, dropout 0.2 and no label smoothing for a file that does not say.
    with caplog.at_level(logging.WARNING, logger="dermjax.configs.from_yaml"):
        head = _load(tmp_path, SEED).multimodal_classifier
    assert head.image_projection_hidden == () and head.text_projection_hidden == ()
    assert head.final_hidden_sizes == ()
    assert (head.projection_dropout, head.label_smoothing) == (0.2, 0.0)
    assert "the original's defaults for keys the file omits" in caplog.text
    assert "multimodal_classifier.label_smoothing=0.0" in caplog.text
    explicit = "multimodal_classifier: {final_hidden_sizes: [64], label_smoothing: 0.1}\n"
    head = _load(tmp_path, SEED + explicit).multimodal_classifier
    assert (head.final_hidden_sizes, head.label_smoothing) == ((64,), 0.1)
    assert head.image_projection_hidden == ()


def test_keys_the_original_cannot_run_without_are_each_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config("from_yaml", str(_write(tmp_path, "# every line commented out\n")))
    missing = [p for p in info.value.problems if "missing; the original stops without it" in p]
    assert len(missing) == len(from_yaml.REQUIRED_KEYS) == 7
    assert "data.dataset=None: set data.dataset, or both data.metadata_path" in str(info.value)
    path = _write(tmp_path, SEED)  # no head section, one optimizer group
    with pytest.raises(ConfigError) as info:
        load_config("from_yaml", str(path))
    named = " ".join(info.value.problems)
    assert "multimodal_classifier.projection_dim: missing" in named
    assert "optimizer.multimodal_classifier.learning_rate: missing" in named
    assert "data.dataset" not in named and "optimizer.vision_model" not in named


def test_an_older_file_without_a_dataset_keeps_its_files_next_to_its_metadata(tmp_path):
    # dermjax's default dataset (dataset_v1) would put the embeddings and the prepared cache in
    # a folder the file never names.
    raw = _with_required({}, REQUIRED)
    del raw["data"]["dataset"]
    raw["data"].update(metadata_path="/gcs-data/final/meta.csv", img_prefix="/gcs-data/final/imgs")
    cfg = load_config("from_yaml", str(_write(tmp_path, yaml.safe_dump(raw))))
    validate(cfg)
    paths = data_paths(cfg)
    assert cfg.data.dataset is None and paths.img_prefix == "/gcs-data/final/imgs"
    assert paths.embeddings == "/gcs-data/final/embeddings/sapbert_256_cls.parquet"
    assert paths.cache_dir == "/gcs-data/final/cache"


def test_embedding_filename_wins_over_the_legacy_pre_existing_path(tmp_path, caplog):
    legacy = "encoder: {pre_existing_path: /old/emb.parquet}\n"
    assert _load(tmp_path, SEED + legacy).data.embeddings_path == "/old/emb.parquet"
    both = "encoder: {pre_existing_path: /old/emb.parquet, embedding_filename: new.parquet}\n"
    with caplog.at_level(logging.WARNING, logger="dermjax.configs.from_yaml"):
        cfg = _load(tmp_path, SEED + both)
    assert cfg.data.embeddings_path is None and cfg.encoder.embedding_filename == "new.parquet"
    assert "encoder.pre_existing_path='/old/emb.parquet' (encoder.embedding_filename is set" in (
        caplog.text
    )


def test_a_file_of_the_oldest_layout_is_one_line_naming_its_sections(tmp_path):
    path = _write(tmp_path, "model: {name: resnet50}\nsplits: {test: 0.1}\nimage: {size: 224}\n")
    with pytest.raises(from_yaml.OldLayoutError) as info:
        from_yaml.get_config(str(path))
    assert str(info.value).startswith(f"{path} is in the original's oldest layout (sections model")
    assert "\n" not in str(info.value)


def test_an_unknown_key_suggests_the_close_or_same_named_key(tmp_path):
    text = "multimodal_classifier: {lable_smoothing: 0.1}\ntraining: {seed: 3}\n"
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    named = "\n".join(info.value.problems)
    assert "lable_smoothing: unknown key (did you mean multimodal_classifier.label_smoothing?)" in (
        named
    )
    assert "training.seed: unknown key (did you mean data.seed?)" in named


def test_exponents_yaml_reads_as_strings_are_numbers_in_lists_and_mappings_too(tmp_path):
    text = """
    multimodal_classifier: {class_weights: [1, 2.0, 1e-3], alpha: 1e-1, loss_fn: focal}
    data: {per_dataset_split_ratios: {ddi: {train: 1e0, val: 0, test: 0e0}}}
    """
    cfg = _load(tmp_path, text)
    validate(cfg)
    assert cfg.multimodal_classifier.class_weights == (1, 2.0, 0.001)
    assert cfg.multimodal_classifier.alpha == 0.1
    assert cfg.data.per_dataset_split_ratios["ddi"] == {"train": 1.0, "val": 0, "test": 0.0}
    with pytest.raises(ConfigError, match=r"data\.img_size='224': expected a list"):
        _load(tmp_path, "data: {img_size: '224'}")


def test_loss_keys_the_chosen_loss_never_reads_are_stated(tmp_path, caplog):
    text = "multimodal_classifier: {loss_fn: focal, label_smoothing: 0.2, gamma: 3}\n"
    with caplog.at_level(logging.WARNING, logger="dermjax.configs.from_yaml"):
        _load(tmp_path, text)
    unused = [r.getMessage() for r in caplog.records if "without effect" in r.getMessage()]
    assert unused == [
        "original config keys without effect: multimodal_classifier.label_smoothing=0.2 "
        "(loss_fn 'focal' does not use it)"
    ]


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(from_yaml.YamlFileError) as info:
        from_yaml.get_config(str(tmp_path / "nope.yaml"))
    assert str(info.value) == (
        f"cannot read the YAML file {tmp_path / 'nope.yaml'} (No such file or directory)"
    )
