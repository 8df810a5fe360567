"""Config schema, validation (every problem in one error), path derivation, YAML loading."""

import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

from dermjax import config_rules
from dermjax.config import ConfigError, data_paths, load_config, validate, validate_for_run
from dermjax.errors import ConfigError as BaseConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, arg",
    [("default", None), ("demo", None), ("final_model", None), ("final_model", "final_run")],
)
def test_shipped_configs_are_valid(name, arg):
    validate(load_config(name, arg))


def test_the_final_models_are_the_originals_two_and_an_unknown_one_is_named():
    b4, r101 = load_config("final_model"), load_config("final_model", "final_run")
    assert (b4.vision_model.name, b4.data.img_size, b4.training.batch_size) == (
        "efficientnet_b4",
        (380, 380),
        128,
    )
    assert (r101.vision_model.name, r101.data.img_size, r101.training.batch_size) == (
        "resnet101",
        (324, 324),
        64,
    )
    assert (b4.vision_model.unfreeze_layers, r101.vision_model.unfreeze_layers) == (-1, 35)
    weight_decay = [c.optimizer.vision_model.weight_decay for c in (b4, r101)]
    assert weight_decay == [1e-3, 1e-4]
    with pytest.raises(ConfigError, match=r"final_model.py:b5: no such final model"):
        load_config("final_model", "b5")


def test_every_original_readme_section_and_field_exists():
    cfg = load_config("default")
    expected = {
        "data": "use_local dataset min_samples_per_label datasets derm1m_sources has_text "
        "data_fraction test_size val_size img_size seed",
        "training": "batch_size num_workers prefetch_factor num_epochs patience "
        "validation_interval n_warmup_epochs compute_stats weighted_sampling",
        "training.scheduler": "use_cosine_annealing vision_eta_min multimodal_classifier_eta_min",
        "augmentation": "brightness_jitter contrast_jitter saturation_jitter hue_jitter "
        "rotation_degrees scale horizontal_flip_prob vertical_flip_prob translate grayscale_prob",
        "vision_model": "name pretrained pooling_type unfreeze_layers",
        "multimodal_classifier": "projection_dim use_l2_normalization image_projection_hidden "
        "text_projection_hidden text_projection_dropout projection_activation projection_dropout "
        "final_hidden_sizes final_activation final_dropout fusion_strategy use_auxiliary_loss "
        "auxiliary_loss_weight loss_fn label_smoothing use_class_weights_from_data class_weights",
        "masking": "mask_complete",
        "masking.random_mask": "enabled image_prob text_prob",
        "encoder": "model_name batch_size max_length pooling_type qwen_instr embedding_filename",
        "optimizer.vision_model": "name learning_rate weight_decay momentum betas eps",
        "optimizer.multimodal_classifier": "name learning_rate weight_decay momentum betas eps",
        "output": "save_dir log_dir experiment_name wandb_project",
        "checkpoint": "save_frequency keep_last load_from",
    }
    for section, fields in expected.items():
        node = cfg
        for part in section.split("."):
            node = node[part]
        missing = [f for f in fields.split() if f not in node]
        assert not missing, f"{section} lacks {missing}"


def test_several_bad_fields_are_reported_together():
    cfg = load_config("default")
    cfg.training.batch_size = 0
    cfg.vision_model.name = "resnet18"
    cfg.multimodal_classifier.fusion_strategy = "attention"
    cfg.augmentation.horizontal_flip_prob = 1.5
    cfg.optimizer.vision_model.name = "lamb"
    cfg.masking.mask_complete = "audio"
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    for field, value in [
        ("training.batch_size", "0"),
        ("vision_model.name", "'resnet18'"),
        ("multimodal_classifier.fusion_strategy", "'attention'"),
        ("augmentation.horizontal_flip_prob", "1.5"),
        ("optimizer.vision_model.name", "'lamb'"),
        ("masking.mask_complete", "'audio'"),
    ]:
        assert f"{field}={value}" in message
    assert len(info.value.problems) == 6
    assert "efficientnet_b0" in message  # names what is allowed


def test_cross_field_rules():
    cfg = load_config("default")
    cfg.data.test_size, cfg.data.val_size = 0.6, 0.5
    cfg.encoder.model_name, cfg.encoder.pooling_type = "qwen", "cls"
    cfg.vision_model.name, cfg.data.img_size = "vit_b_16", (200, 224)
    cfg.augmentation.scale = (1.2, 0.8)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    text = str(info.value)
    assert "data.test_size + data.val_size" in text
    assert "Qwen models need 'last_token'" in text
    assert "square size divisible by 16" in text
    assert "min must be <= max" in text
    cfg.data.test_size, cfg.data.val_size = 0.5, 0.5  # the boundary: nothing left to train on
    cfg.data.img_size = (200, 200)  # square, but not a multiple of the 16-pixel patch
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert "data.test_size + data.val_size" in str(info.value)
    assert "square size divisible by 16" in str(info.value)


def test_demo_data_needs_a_dataset_folder():
    # It used to pass validation and crash the run with a TypeError in os.path.join.
    cfg = load_config("demo")
    cfg.data.dataset = None
    with pytest.raises(ConfigError, match=r"data\.dataset=None: data\.demo=True needs it"):
        validate(cfg)


def test_val_size_none_means_no_validation_and_is_valid():
    cfg = load_config("default")
    cfg.data.val_size = None
    validate(cfg)  # training.monitor is then unused: the last epoch is the final model
    cfg.data.test_size = 0.95  # test + val >= 1 is only a problem when val_size is set
    validate(cfg)


def test_dropouts_must_be_below_one():
    cfg = load_config("default")
    m = cfg.multimodal_classifier
    m.final_dropout, m.projection_dropout, m.text_projection_dropout = 1.0, 1.0, 1.0
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert len(info.value.problems) == 3
    assert all("in [0.0, 1.0)" in p for p in info.value.problems)
    m.final_dropout, m.projection_dropout, m.text_projection_dropout = 0.0, 0.99, None
    validate(cfg)


def test_option_lists_come_from_the_modules_that_implement_them():
    from dermjax.data import encoders, images, metadata
    from dermjax.models import fusion, layers, losses, registry
    from dermjax.train import early_stopping, masking, optim, step

    for module, names in [
        (encoders, ["TEXT_DTYPES", "TEXT_POOLING"]),
        (images, ["BAD_IMAGE_POLICIES"]),
        (metadata, ["DATASETS", "DERM1M_SOURCES"]),
        (fusion, ["ACTIVATIONS", "FUSION_STRATEGIES"]),
        (layers, ["POOLING_TYPES"]),
        (losses, ["LOSS_FNS", "REDUCTIONS"]),
        (registry, ["BACKBONES", "vit_patch_size"]),
        (early_stopping, ["MONITORS"]),
        (masking, ["MASK_MODES"]),
        (optim, ["OPTIMIZERS"]),
        (step, ["COMPUTE_DTYPES", "NONFINITE_POLICIES"]),
    ]:
        for name in names:
            assert getattr(config_rules, name) is getattr(module, name), name
    assert load_config("default").data.derm1m_sources == metadata.DERM1M_SOURCES


def test_validate_for_run_adds_device_and_path_checks_to_one_error(tmp_path):
    cfg = load_config("default")
    cfg.training.batch_size, cfg.training.eval_batch_size = 30, 6
    cfg.vision_model.name = "resnet18"  # a validate() problem, reported in the same error
    cfg.checkpoint.load_from = str(tmp_path / "missing")
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    cfg.output.save_dir = str(blocker / "ckpt")
    cfg.output.log_dir = str(tmp_path / "new" / "logs")  # creatable: fine
    with pytest.raises(ConfigError) as pure:
        validate(cfg)  # pure: no device count, no file system
    assert len(pure.value.problems) == 1
    with pytest.raises(ConfigError) as info:
        validate_for_run(cfg, device_count=4)
    problems = info.value.problems
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    assert "vision_model.name='resnet18'" in text
    assert "training.batch_size=30: must be divisible by 4 (4 device(s)); use 28 or 32" in text
    assert "training.eval_batch_size=6: must be divisible by 4 (4 device(s)); use 4 or 8" in text
    assert f"checkpoint.load_from={str(tmp_path / 'missing')!r}: no such file" in text
    assert f"output.save_dir={str(blocker / 'ckpt')!r}: {str(blocker)!r} is a file" in text


def test_validate_for_run_accepts_a_runnable_config(tmp_path):
    cfg = load_config("default")
    cfg.training.batch_size, cfg.training.eval_batch_size = 24, None
    cfg.checkpoint.init_from = "gs://bucket/run/checkpoints/10"  # remote: not checked
    cfg.output.save_dir = str(tmp_path / "a" / "b")
    validate_for_run(cfg, device_count=8)
    with pytest.raises(ConfigError, match=r"batch_size=24: .*\(8 device\(s\) over 16 processes\)"):
        validate_for_run(cfg, device_count=8, process_count=16)
    cfg.checkpoint.init_from = str(tmp_path)
    validate_for_run(cfg, device_count=3)


def test_config_is_locked_against_typos():
    cfg = load_config("default")
    with pytest.raises(AttributeError):
        cfg.training.batchsize = 3


def test_paths_derive_from_dataset_and_use_local():
    cfg = load_config("default")
    local = data_paths(cfg)
    assert local.metadata == "/data/dataset_v1/metadata_all_harmonized.csv"
    assert local.img_prefix == "/data/dataset_v1/imgs"
    assert local.embeddings == "/data/dataset_v1/embeddings/sapbert_256_cls.parquet"
    cfg.data.use_local = False
    remote = data_paths(cfg)
    assert remote.metadata == "gs://apcomp215-datasets/dataset_v1/metadata_all_harmonized.csv"
    assert remote.img_prefix == "gs://apcomp215-datasets/dataset_v1/imgs"
    cfg.data.metadata_path, cfg.data.img_prefix = "/x/meta.csv", "/y/imgs"
    cfg.data.embeddings_path = "/z/e.parquet"
    explicit = data_paths(cfg)
    assert (explicit.metadata, explicit.img_prefix, explicit.embeddings) == (
        "/x/meta.csv",
        "/y/imgs",
        "/z/e.parquet",
    )


def test_relative_and_absolute_spellings_of_a_local_root_give_the_same_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("default")
    cfg.data.local_root = "data/../data"
    relative = data_paths(cfg)
    cfg.data.local_root = str(tmp_path / "data")
    assert data_paths(cfg) == relative
    assert relative.cache_dir == str(tmp_path / "data" / "dataset_v1" / "cache")
    cfg.data.dataset, cfg.data.metadata_path = None, "meta.csv"
    assert data_paths(cfg).img_prefix == str(tmp_path / "imgs")


def test_original_yaml_loads_and_unknown_keys_are_rejected(tmp_path):
    good = tmp_path / "exp.yaml"
    good.write_text(
        textwrap.dedent(
            """
            data: {use_local: true, dataset: dataset_v1, min_samples_per_label: 100,
                   has_text: true, test_size: 0.1, val_size: 0.1, img_size: [224, 224], seed: 42}
            training:
              batch_size: 256
              scheduler: {use_cosine_annealing: false, vision_eta_min: 0, multimodal_classifier_eta_min: 1e-7}
            augmentation: {rotation_degrees: 25, translate: null, scale: [0.9, 1.1]}
            vision_model: {name: efficientnet_b0, pretrained: true, pooling_type: avg, unfreeze_layers: 10}
            multimodal_classifier: {image_projection_hidden: [512], final_hidden_sizes: [256, 128],
                                    projection_dim: 256, fusion_strategy: concat_mlp,
                                    loss_fn: cross_entropy}
            encoder: {pre_existing_path: /data/emb.parquet, model_name: sapbert}
            optimizer:
              vision_model: {name: adamw, learning_rate: 1.0e-4, weight_decay: 1.0e-3, betas: [0.9, 0.999]}
              multimodal_classifier: {name: adamw, learning_rate: 5.0e-4, weight_decay: 1.0e-3}
            """
        )
    )
    cfg = load_config("from_yaml", str(good))
    validate(cfg)
    assert cfg.training.scheduler.use_cosine_annealing is False
    assert cfg.training.scheduler.vision_eta_min == 0.0
    assert tuple(cfg.data.img_size) == (224, 224)
    assert cfg.augmentation.translate is None
    assert cfg.vision_model.unfreeze_layers == 10
    assert cfg.data.embeddings_path == "/data/emb.parquet"
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {datset: x}\ntrainingg: {}\n")
    with pytest.raises(ConfigError, match=r"data\.datset.*\n.*trainingg"):
        load_config("from_yaml", str(bad))


def test_yaml_type_errors_are_reported_together_with_every_other_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "training: {batch_size: abc, num_epochs: 3.5, patiense: 2}\n"
        "data: {dataset: dataset_v1, val_size: null, seed: -1}\n"
        "vision_model: resnet50\n"
        "multimodal_classifier: {projection_dim: 8, fusion_strategy: concat_mlp, loss_fn: focal}\n"
        "optimizer:\n"
        "  vision_model: {learning_rate: 1.0e-4, weight_decay: 0}\n"
        "  multimodal_classifier: {learning_rate: 1.0e-4, weight_decay: 0}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config("from_yaml", str(bad))
    text = str(info.value)
    assert len(info.value.problems) == 5, text
    for expected in (
        "training.batch_size='abc': expected an integer",
        "training.num_epochs=3.5: expected an integer",
        "training.patiense: unknown key (did you mean training.patience?)",
        "vision_model='resnet50': expected a section",
        "data.seed=-1",  # loaded fine but invalid: found by validate in the same message
    ):
        assert expected in text


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "syntax.yaml"
    bad.write_text("training:\n  batch_size: 3\n  num_epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{bad}:4:1: YAML syntax error: .*line 3"):
        load_config("from_yaml", str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("from_yaml", str(tmp_path / "missing.yaml"))


def test_config_error_is_the_shared_user_error():
    assert ConfigError is BaseConfigError


def test_cli_with_bad_values_exits_fast_naming_every_field(tmp_path):
    start = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dermjax.main",
            "--config=configs/demo.py",
            "--config.training.num_epochs=0",
            "--config.data.test_size=2.0",
            "--config.vision_model.pooling_type=mean",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    for field in ("training.num_epochs=0", "data.test_size=2.0", "vision_model.pooling_type"):
        assert field in proc.stderr
    assert time.time() - start < 60
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_rejects_unknown_override_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dermjax.main", "--config=configs/demo.py",
         "--config.training.batchsize=4", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        "--config.training.batchsize: no such config field (did you mean training.batch_size?)"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr
