r"""The original's final ResNet-101 run (`final_run.yaml`) in bf16, for a TPU VM pod slice.

ResNet-101 (ImageNet weights, concat pooling) at 324x324 + PubMedBERT-256-cls text, concat_mlp
fusion with auxiliary vision/text heads (0.5/0.3), focal loss, weighted sampling, random text
masking (0.1), AdamW, cosine schedule over 100 epochs after 5 warm-up epochs, global batch 64,
and each dataset split 0.9/0.1 (train/validation) on its own: `configs/final_model.py:final_run`
in bfloat16. Data is read from `data.gcs_root` (gs://); every TPU host reads its own slice of
each batch.

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

from ml_collections import config_dict

from dermjax.configs import final_model


def get_config() -> config_dict.ConfigDict:
    """Returns the final ResNet-101 config (bf16, data on GCS)."""
    cfg = final_model.get_config("final_run")  # every setting of final_run.yaml
    cfg.data.use_local = False  # read under data.gcs_root
    cfg.training.dtype = "bfloat16"
    cfg.output.experiment_name = "tpu_resnet101"
    return cfg
