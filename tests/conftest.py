"""Test-wide environment: CPU JAX, offline services, absl flags parsed (grain#1355)."""

import os
import tempfile

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
# Compiled train steps are reused across the end-to-end runs (and their subprocesses).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dermjax-test-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

from absl import flags

flags.FLAGS.mark_as_parsed()

pytest_plugins = ["tests.gcs_emulator"]
