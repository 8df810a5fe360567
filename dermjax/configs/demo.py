"""The embedded demo: a synthetic, deterministic dermatology dataset, trained on a CPU.

  python -m dermjax.main --config=configs/demo.py [--workdir=workdirs/demo]

Generates the demo data under ./data/demo_v1 if absent (about 1,200 images over 8 labels and all
four source datasets, with hashed-n-gram text embeddings), then trains a randomly initialised
ResNet-50 with a concat_mlp fusion head: three warm-up epochs with the backbone frozen, then three
with the last backbone stage fine-tuned; validation each epoch; a final test evaluation.
Writes metrics.jsonl and summary.json to the workdir. Measured wall time and accuracy: README.md.
"""

from dermjax.configs import default


def get_config():
    """Returns the CPU-sized demo config."""
    cfg = default.get_config()
    cfg.data.demo = True
    cfg.data.local_root = "data"
    cfg.data.dataset = "demo_v1"
    cfg.data.min_samples_per_label = 20
    cfg.data.has_text = None
    cfg.data.img_size = (64, 64)
    cfg.data.test_size = 0.15
    cfg.data.val_size = 0.15

    cfg.training.batch_size = 32
    # In-process loading: on two cores a worker process competes with XLA for the cores, and
    # decoding 64 px images is cheap (demo 1:40 without a worker, 2:00 with one).
    cfg.training.num_workers = 0
    cfg.training.prefetch_factor = 4
    cfg.training.num_epochs = 6
    cfg.training.n_warmup_epochs = 3
    cfg.training.patience = 3
    # The backbone is randomly initialised here: frozen BatchNorm layers normalised with batch
    # statistics wash out its random features (linear-probe test accuracy 0.32 vs 0.86 with the
    # running statistics), so frozen layers run in inference mode. With pretrained weights the
    # original's behaviour (statistics keep updating) is the default.
    cfg.training.update_frozen_bn_stats = False

    cfg.vision_model.name = "resnet50"
    cfg.vision_model.pretrained = False
    cfg.vision_model.unfreeze_layers = 1

    cfg.multimodal_classifier.image_projection_hidden = (256,)
    cfg.multimodal_classifier.text_projection_hidden = (256,)
    cfg.multimodal_classifier.final_hidden_sizes = (128,)

    cfg.encoder.model_name = "hash"
    cfg.encoder.embedding_filename = None  # derived from the encoder: hash256.parquet

    cfg.optimizer.multimodal_classifier.learning_rate = 1e-3
    cfg.output.experiment_name = "demo"
    return cfg
