r"""The original's final ResNet-101 run (`final_run.yaml`) in bf16, for a TPU VM pod slice.

ResNet-101 (ImageNet weights, concat pooling) at 324x324 + PubMedBERT-256-cls text, concat_mlp
fusion with auxiliary vision/text heads (0.5/0.3), focal loss, weighted sampling, random text
masking (0.1), AdamW, cosine schedule over 100 epochs after 5 warm-up epochs, global batch 64,
and each dataset split 0.9/0.1 (train/validation) on its own.
Data is read from `data.gcs_root` (gs://); every TPU host reads its own slice of each batch.

Once, on a machine with internet and torch, convert the backbone weights and write the text
embeddings to the bucket:

  python scripts/convert_torchvision.py --arch resnet101 --weights DEFAULT \
      --out resnet101.safetensors
  python -m dermjax.embed --config=configs/tpu_resnet101.py --config.data.gcs_root=gs://BUCKET

Then, from the repository root (scripts/tpu_vm/README.md has the whole flow):

  scripts/tpu_vm/create.sh --name derm --zone us-west4-a --accelerator-type v5litepod-16 \
      --version v2-alpha-tpuv5-lite --spot
  scripts/tpu_vm/install.sh --name derm --zone us-west4-a --weights resnet101.safetensors
  scripts/tpu_vm/launch.sh --name derm --zone us-west4-a --config configs/tpu_resnet101.py \
      --save-dir gs://BUCKET/checkpoints -- --config.data.gcs_root=gs://BUCKET
  scripts/tpu_vm/logs.sh --name derm --zone us-west4-a
  scripts/tpu_vm/resume_spot.sh ...  # after a preemption: create.sh's + install.sh's + launch.sh's
  scripts/tpu_vm/delete.sh --name derm --zone us-west4-a

The global batch must divide by the device count (16 on a v5litepod-16; 64 fits slices of up to
64 chips); larger slices take a larger --config.training.batch_size.
"""

from dermjax.configs import default


def get_config():
    """Returns the final ResNet-101 config (bf16, data on GCS)."""
    cfg = default.get_config()
    d = cfg.data
    d.use_local = False  # read under data.gcs_root
    d.dataset = "dataset_v2"
    d.min_samples_per_label = 250
    d.has_text = None
    d.img_size = (324, 324)
    # Each dataset split 0.9/0.1 on its own and no test split, as in the original: the final
    # summary then reports the validation split only.
    split = {"train": 0.9, "val": 0.1, "test": 0.0}
    d.per_dataset_split_ratios = {name: dict(split) for name in d.datasets}

    t = cfg.training
    t.batch_size = 64
    t.num_epochs = 100
    t.patience = 100
    t.n_warmup_epochs = 5
    t.weighted_sampling = True
    t.compute_stats = False  # ImageNet statistics
    t.monitor = "val/loss"  # the original's early-stopping and best-checkpoint rule
    t.dtype = "bfloat16"

    v = cfg.vision_model
    v.name = "resnet101"
    v.pretrained = True
    v.pooling_type = "concat"
    v.unfreeze_rule = "conv_count"  # the later original's rule: the last 35 Conv2d layers,
    v.unfreeze_layers = 35  # from layer3[14].conv3 on

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
    m.label_smoothing = 0.2  # as in final_run.yaml; focal loss ignores it
    m.use_class_weights_from_data = False

    cfg.masking.random_mask.enabled = True
    cfg.masking.random_mask.text_prob = 0.1

    e = cfg.encoder
    e.model_name = "pubmedbert"
    e.max_length = 256
    e.pooling_type = "cls"

    for group, lr in (("vision_model", 1e-4), ("multimodal_classifier", 5e-4)):
        cfg.optimizer[group].name = "adamw"
        cfg.optimizer[group].learning_rate = lr
        cfg.optimizer[group].weight_decay = 1e-4

    cfg.output.experiment_name = "tpu_resnet101"
    return cfg
