"""Every dermjax config field with its default; the schema other configs start from.

Sections and names follow the original ml_workflow YAML one to one (data, training, augmentation,
vision_model, multimodal_classifier, masking, encoder, optimizer, output, checkpoint); fields that
are new in dermjax sit in the section they belong to and are marked "dermjax:".
Defaults follow the original's best run (exp_arch_009: EfficientNet-B0 + SapBERT-256-cls,
concat_mlp, AdamW 1e-4 / 5e-4) where the original had no default of its own.

Run (needs the real dataset under /data/dataset_v1 and converted weights):
  python -m dermjax.main --config=configs/default.py --workdir=workdirs/exp
Any field is overridable: --config.training.batch_size=64 --config.vision_model.name=resnet50
"""

from ml_collections import config_dict

from dermjax.data.encoders import QWEN_INSTRUCTION
from dermjax.data.metadata import DERM1M_SOURCES

_P = config_dict.placeholder


def _opt(value, field_type):
    """A field with a default that may also be set to None (an optional augmentation)."""
    return config_dict.FieldReference(value, field_type=field_type)


def get_config() -> config_dict.ConfigDict:
    """Returns the locked default config (unknown keys are rejected)."""
    c = config_dict.ConfigDict()

    c.data = d = config_dict.ConfigDict()
    d.use_local = True  # true: read under data.local_root; false: under data.gcs_root (gs://)
    d.dataset = _opt(
        "dataset_v1", str
    )  # dataset version folder; derives metadata, image and embedding paths
    d.local_root = "/data"  # dermjax: root of local datasets (the original hard-coded /data)
    d.gcs_root = "gs://apcomp215-datasets"  # dermjax: bucket root used when use_local is false
    d.metadata_path = _P(str)  # dermjax: explicit metadata CSV (overrides the derived path)
    d.img_prefix = _P(str)  # dermjax: explicit image folder (overrides the derived path)
    d.embeddings_path = _P(str)  # dermjax: explicit embeddings parquet (overrides derived path)
    d.min_samples_per_label = _opt(
        100, int
    )  # keep labels with at least this many rows (counted on whole CSV)
    d.datasets = _opt(
        ("fitzpatrick17k", "ddi", "isic", "derm1m"), tuple
    )  # datasets to keep; None keeps all
    d.derm1m_sources = _opt(
        DERM1M_SOURCES, tuple
    )  # derm1m sources to keep (first orig_filename component)
    d.has_text = _opt(
        True, bool
    )  # true: only rows with text; false: only rows without; None: no filter
    d.data_fraction = _P(float)  # fraction of rows kept, stratified, seed 42; None keeps all
    d.test_size = 0.1  # fraction held out for test (stratified by label); 0: no test split
    d.val_size = _opt(
        0.1, float
    )  # fraction of the whole held out for validation; None or 0: none, last epoch kept
    d.per_dataset_split_ratios = _P(
        dict
    )  # {dataset: {train, val, test}}: split each dataset on its own; test_size/val_size unused
    d.img_size = (224, 224)  # image (height, width) fed to the backbone
    d.seed = 42  # seed for splits, shuffling, augmentation, init and masking
    d.on_bad_image = "skip"  # dermjax: skip (count, log, list in workdir) or error
    d.cache_dir = _P(
        str
    )  # dermjax: prepared-image cache folder (local or gs://); None: <dataset>/cache
    d.use_cache = True  # dermjax: read the prepared cache when one matches the data
    d.demo = False  # dermjax: generate the synthetic demo dataset under local_root if absent
    d.demo_size = 1200  # dermjax: rows of the synthetic demo dataset

    c.training = t = config_dict.ConfigDict()
    t.batch_size = 256  # global batch size (split over devices)
    t.eval_batch_size = _P(int)  # dermjax: evaluation batch size; None uses batch_size
    t.num_workers = 16  # grain worker processes for decode/resize (0: in the main process)
    t.prefetch_factor = 8  # batches buffered per worker
    t.num_epochs = 10  # maximum number of epochs
    t.patience = 5  # validations without improvement before early stopping
    t.validation_interval = 1  # validate every N epochs, and after the last
    t.n_warmup_epochs = 3  # epochs with the whole backbone frozen (head only)
    t.compute_stats = False  # true: mean/std from training images; false: ImageNet statistics
    t.use_normalization = True  # false: no Normalize, images stay in [0, 1]; compute_stats unused
    t.weighted_sampling = False  # sample inversely to class frequency (with replacement)
    t.monitor = "val/accuracy"  # dermjax: early-stopping/best metric (unused when val_size is None)
    t.update_frozen_bn_stats = True  # dermjax: frozen BatchNorm layers still update statistics
    t.on_nonfinite = "error"  # dermjax: on a NaN/inf loss stop with an error, or skip the batch
    t.dtype = "float32"  # dermjax: compute dtype (bfloat16 = mixed precision, f32 params)
    t.log_every_steps = 10  # dermjax: progress line every N steps
    t.shard_params = False  # dermjax: split params + optimizer states over devices (FSDP)
    # dermjax: compiled-program cache folder (or gs://); auto: $JAX_COMPILATION_CACHE_DIR, else
    # $XDG_CACHE_HOME/dermjax/jax (~/.cache/dermjax/jax); None: off
    t.compilation_cache_dir = _opt("auto", str)
    t.scheduler = s = config_dict.ConfigDict()
    s.use_cosine_annealing = True  # cosine LR per epoch after warm-up (T_max = num_epochs)
    s.vision_eta_min = 1e-7  # minimum backbone learning rate
    s.multimodal_classifier_eta_min = 1e-7  # minimum head learning rate
    t.vision_only_pretraining = vo = config_dict.ConfigDict()
    vo.enabled = False  # first train backbone -> vision projection -> aux vision head alone
    vo.epochs = 0  # epochs e < this are vision-only (needs use_auxiliary_loss)
    vo.patience_ends_run = False  # dermjax: patience out ends this phase only; true: the original
    # (it ends the whole run)
    t.auxiliary_loss_schedule = als = config_dict.ConfigDict()
    for modality in ("vision", "text"):  # all five None: constant auxiliary_<m>_loss_weight
        ws = als[modality] = config_dict.ConfigDict()
        ws.schedule_type = _P(str)  # constant, linear, exponential, cosine or step
        ws.start_epoch = _P(int)  # epochs before this: weight 0 (aux term off)
        ws.end_epoch = _P(int)  # from this epoch on: end_weight
        ws.start_weight = _P(float)  # weight at start_epoch
        ws.end_weight = _P(float)  # weight reached at end_epoch

    c.augmentation = a = config_dict.ConfigDict()
    a.brightness_jitter = _opt(0.1, float)  # brightness factor range [1-x, 1+x]; None off
    a.contrast_jitter = _opt(0.1, float)  # contrast factor range [1-x, 1+x]; None off
    a.saturation_jitter = _opt(0.1, float)  # saturation factor range [1-x, 1+x]; None off
    a.hue_jitter = _opt(0.01, float)  # hue shift range [-x, x] (at most 0.5); None off
    a.rotation_degrees = _opt(25.0, float)  # random rotation in [-x, x] degrees; None off
    a.translate = _P(tuple)  # max translation fractions (x, y); None off
    a.scale = _opt((0.9, 1.1), tuple)  # random scale range; None off
    a.grayscale_prob = _P(float)  # probability of grayscale; None off
    a.horizontal_flip_prob = _opt(0.5, float)  # probability of a horizontal flip; None off
    a.vertical_flip_prob = _P(float)  # probability of a vertical flip; None off

    c.vision_model = v = config_dict.ConfigDict()
    v.name = "efficientnet_b0"  # backbone (see dermjax.models.registry.BACKBONES)
    v.pretrained = True  # load converted torchvision ImageNet weights
    v.weights_path = _P(str)  # dermjax: converted weights file; None: $DERMJAX_WEIGHTS_DIR/<name>
    v.pooling_type = "avg"  # CNN pooling: avg, max or concat (ignored by ViTs)
    v.unfreeze_layers = -1  # -1 all trainable, 0 all frozen, N last N units trainable
    v.unfreeze_rule = "children"  # what N counts: children (700cca3) or conv_count (resnet)

    c.multimodal_classifier = m = config_dict.ConfigDict()
    m.projection_dim = 256  # common projection size of both modalities
    m.use_l2_normalization = False  # L2-normalise projections before fusion
    m.image_projection_hidden = (512,)  # hidden sizes of the vision projection MLP
    m.text_projection_hidden = (512,)  # hidden sizes of the text projection MLP
    m.text_projection_dropout = _P(float)  # text projection dropout; None: projection_dropout
    m.projection_activation = "relu"  # relu, gelu, silu/swish, leaky_relu
    m.projection_dropout = 0.3  # dropout in the projection MLPs
    m.final_hidden_sizes = (256, 128)  # hidden sizes of the classifier after fusion
    m.final_activation = "relu"  # activation of the final classifier
    m.final_dropout = 0.3  # dropout of the final classifier
    m.fusion_strategy = "concat_mlp"  # concat_mlp or weighted_sum (learnable softmax weights)
    m.use_auxiliary_loss = False  # add per-modality auxiliary heads and losses
    m.auxiliary_loss_weight = 0.3  # weight of each auxiliary loss
    m.auxiliary_vision_loss_weight = _P(float)  # dermjax: vision aux weight; None: the above
    m.auxiliary_text_loss_weight = _P(float)  # dermjax: text aux weight; None: the above
    m.loss_fn = "cross_entropy"  # cross_entropy or focal
    m.label_smoothing = 0.1  # label smoothing of cross_entropy
    m.use_class_weights_from_data = False  # use raw 1/count weights unless class_weights is set
    m.class_weights = _P(tuple)  # manual per-class weights
    m.alpha = _P(object)  # focal alpha: float or per-class list; None: class weights or 1.0
    m.gamma = 2.0  # focal gamma
    m.reduction = "mean"  # loss reduction (mean only, as every original config)
    m.zero_masked_projections = False  # zero a masked sample's projection (before L2)
    m.ablation_routing = False  # one-modality batch: projection -> its aux head (needs aux loss)
    m.vision_only_l2_normalization = True  # dermjax: L2 in vision-only pre-training too (with
    # use_l2_normalization); false: the original, which skipped it there
    m.text_content_gating = "content"  # dermjax: text-less samples count as text-masked: content
    # (always) or aux_weight (only while the text aux weight > 0, as the original)

    c.masking = k = config_dict.ConfigDict()
    k.mask_complete = _P(str)  # None, "image" or "text": mask that modality everywhere
    k.random_mask = r = config_dict.ConfigDict()
    r.enabled = False  # random modality dropout in training
    r.image_prob = 0.0  # per-sample probability of masking the image
    r.text_prob = 0.0  # per-sample probability of masking the text
    r.in_eval = False  # dermjax: also mask randomly in val/test (the original's later behaviour)
    k.epoch_schedule = es = config_dict.ConfigDict()
    es.enabled = False  # mask whole modalities in the epochs below (over mask_complete/random)
    for modality in ("vision", "text"):
        es[modality] = config_dict.ConfigDict()
        es[modality].mask_epochs = ()  # [[start, end), ...] absolute epochs with it masked

    c.encoder = e = config_dict.ConfigDict()
    e.embedding_filename = _P(
        str
    )  # parquet in <dataset>/embeddings/; None: named after the encoder
    e.model_name = "sapbert"  # pubmedbert, biosyn, sapbert, qwen, hash (built-in), HF id or folder
    e.max_length = 256  # maximum tokens per text
    e.pooling_type = "cls"  # cls, mean or last_token (Qwen models only, and required by them)
    e.batch_size = 32  # texts per encoder batch (split over the devices)
    e.output_dim = _P(int)  # dermjax: Qwen3 Matryoshka size (truncate + L2-normalise); None: off
    e.dtype = "float32"  # dermjax: text encoder compute dtype: float32 or bfloat16
    e.qwen_instr = QWEN_INSTRUCTION  # instruction prefix for Qwen embedding models

    c.optimizer = o = config_dict.ConfigDict()
    for group, lr in (("vision_model", 1e-4), ("multimodal_classifier", 5e-4)):
        g = config_dict.ConfigDict()
        g.name = "adamw"  # adam (L2 decay), adamw (decoupled decay) or sgd
        g.learning_rate = lr  # initial learning rate
        g.weight_decay = 1e-3  # weight decay
        g.betas = (0.9, 0.999)  # Adam betas
        g.eps = 1e-8  # Adam epsilon
        g.momentum = 0.9  # SGD momentum
        o[group] = g

    c.output = u = config_dict.ConfigDict()
    # Without --workdir: checkpoints in <save_dir>/<experiment_name> (None: <run>/checkpoints),
    # the run folder (train.log, metrics.jsonl, summary.json, lock) <log_dir>/<experiment_name>
    # (None: ./workdirs/<experiment_name>). --workdir overrides both.
    u.save_dir = _P(str)  # parent of the checkpoint folder (local or gs://)
    u.log_dir = _P(str)  # dermjax: parent of the run folder
    u.experiment_name = "dermjax"  # run name (wandb run name, default workdir name)
    u.wandb_project = _P(str)  # wandb project; None disables wandb

    c.checkpoint = p = config_dict.ConfigDict()
    p.save_frequency = 1  # save every N epochs
    p.keep_last = 2  # periodic checkpoints kept (the best is kept in addition)
    p.load_from = _P(str)  # resume from a checkpoint step folder or a workdir (its latest)
    p.init_from = _P(str)  # dermjax: initialise weights only from a checkpoint (fine-tuning)
    p.auto_resume = True  # dermjax: resume from the workdir's latest checkpoint if present

    c.evaluation = ev = config_dict.ConfigDict()  # dermjax: python -m dermjax.evaluate
    ev.group_columns = _P(tuple)  # metadata columns to break down by; None: dataset, skin type
    ev.groups_path = _P(str)  # table joined on image_id for group columns (e.g. DDI skin_tone)
    ev.n_boot = 1000  # bootstrap resamples for the group intervals (0: none)
    ev.min_group_size = 10  # smaller groups are reported but left out of the worst-group gap
    ev.top_k = (1, 3, 5)  # top-k accuracies reported and top-k columns of predictions.parquet
    ev.after_training = True  # evaluate the test split into <run>/evaluation/test after training

    c.lock()
    return c
