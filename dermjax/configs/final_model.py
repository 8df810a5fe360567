r"""The original's two final models, on local data (or gs:// with data.use_local=false).

  python -m dermjax.main --config=configs/final_model.py             # FINAL_MODEL: EfficientNet-B4
  python -m dermjax.main --config=configs/final_model.py:final_run   # final_run.yaml: ResNet-101

The original has two "final" configs, and they differ:
- `efficientnet_b4` (`exp_arch_dv2_40_FINAL_MODEL.yaml`): EfficientNet-B4, concat pooling, the
  whole backbone trained after the warm-up, 380x380, batch 128, vision weight decay 1e-3;
- `final_run` (`final_run.yaml`): ResNet-101, concat pooling, the last 35 Conv2d layers trained
  after the warm-up (from layer3[14].conv3 on), 324x324, batch 64, vision weight decay 1e-4.
Both: dataset_v2 with at least 250 images per label, rows with or without text, each dataset
split 0.9/0.1 (train/validation) on its own and no test split (the summary then reports
validation, named as such); ImageNet normalisation; PubMedBERT-256 [CLS] text; projection 256
with image MLP (512, 256) and text MLP (512,), GELU, dropout 0.6, concat_mlp fusion into (128,);
auxiliary vision/text heads weighted 0.5/0.3 from epoch 0; focal loss (gamma 2, alpha 1; its
label_smoothing 0.2 is kept and unused, as in the original); weighted sampling; random text
masking 0.1 with the later original's masking path; AdamW (vision lr 1e-4, head lr 5e-4 and
weight decay 1e-4); cosine over 100 epochs after 5 warm-up epochs; patience 100 on val/loss.
Fields the original's files leave out keep the original's defaults (dermjax's defaults).

float32, as the original trained; on a recent GPU add --config.training.dtype=bfloat16.
`configs/tpu_resnet101.py` is `final_run` in bfloat16 on a TPU pod slice.
"""

from ml_collections import config_dict

from dermjax.configs import default
from dermjax.errors import ConfigError

VARIANTS = {
    "efficientnet_b4": dict(
        name="efficientnet_b4", unfreeze_layers=-1, img_size=380, batch_size=128, vision_wd=1e-3
    ),
    "final_run": dict(
        name="resnet101", unfreeze_layers=35, img_size=324, batch_size=64, vision_wd=1e-4
    ),
}


def get_config(variant: str | None = None) -> config_dict.ConfigDict:
    """The final model `variant` (default efficientnet_b4, the original's FINAL_MODEL)."""
    variant = variant or "efficientnet_b4"
    if variant not in VARIANTS:
        raise ConfigError(
            f"configs/final_model.py:{variant}: no such final model; use one of {list(VARIANTS)}"
        )
    spec = VARIANTS[variant]
    cfg = default.get_config()
    d = cfg.data
    d.dataset = "dataset_v2"
    d.min_samples_per_label = 250
    d.has_text = None
    d.img_size = (spec["img_size"], spec["img_size"])
    split = {"train": 0.9, "val": 0.1, "test": 0.0}
    d.per_dataset_split_ratios = {name: dict(split) for name in d.datasets}

    t = cfg.training
    t.batch_size = spec["batch_size"]
    t.num_epochs = 100
    t.patience = 100
    t.n_warmup_epochs = 5
    t.weighted_sampling = True
    t.compute_stats = False  # ImageNet statistics
    t.monitor = "val/loss"  # the original's early-stopping and best-checkpoint rule

    v = cfg.vision_model
    v.name = spec["name"]
    v.pretrained = True
    v.pooling_type = "concat"
    v.unfreeze_rule = "conv_count"  # the later original's rule (the last N Conv2d layers)
    v.unfreeze_layers = spec["unfreeze_layers"]

    m = cfg.multimodal_classifier
    m.projection_dim = 256
    m.image_projection_hidden = (512, 256)
    m.text_projection_hidden = (512,)
    m.projection_activation = "gelu"
    m.projection_dropout = 0.6
    m.final_hidden_sizes = (128,)
    m.fusion_strategy = "concat_mlp"
    # The original's auxiliary_loss_schedule is constant from epoch 0 (vision 0.5, text 0.3): the
    # fixed per-modality weights below are the same thing.
    m.use_auxiliary_loss = True
    m.auxiliary_vision_loss_weight = 0.5
    m.auxiliary_text_loss_weight = 0.3
    m.loss_fn = "focal"
    m.gamma = 2.0
    m.alpha = 1.0
    m.label_smoothing = 0.2  # as in both files; focal loss ignores it
    m.use_class_weights_from_data = False
    # Later-era files: masked samples' projections are zeroed, and a batch left with one
    # modality goes through that modality's auxiliary head (as from_yaml sets for them).
    m.zero_masked_projections = True
    m.ablation_routing = True

    cfg.masking.random_mask.enabled = True
    cfg.masking.random_mask.text_prob = 0.1

    e = cfg.encoder
    e.model_name = "pubmedbert"
    e.max_length = 256
    e.pooling_type = "cls"

    for group, lr, wd in (
        ("vision_model", 1e-4, spec["vision_wd"]),
        ("multimodal_classifier", 5e-4, 1e-4),
    ):
        cfg.optimizer[group].name = "adamw"
        cfg.optimizer[group].learning_rate = lr
        cfg.optimizer[group].weight_decay = wd

    cfg.output.experiment_name = variant
    return cfg
