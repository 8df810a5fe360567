"""Test-wide environment: CPU JAX, offline services, absl flags parsed (grain#1355)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("FSSPEC_GCS_TOKEN", "anon")
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("EPATH_USE_TF", "false")
os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "dummy")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import flags

flags.FLAGS.mark_as_parsed()

pytest_plugins = ["tests.gcs_emulator"]
