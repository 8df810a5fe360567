"""Text encoders in Flax NNX from Hugging Face weights: BERT family and Qwen3 embeddings.

`load_text_encoder(model_name, ...)` finds the model (local folder, Hugging Face cache or one of
the original's `ALIASES`; never downloads), builds the NNX model strictly from its safetensors,
and returns a `TextEncoder` whose `encode(texts)` pools like the original and whose `spec`
describes the embeddings it makes. Needs the `text` extra (transformers, for tokenizers only).
"""

from dermjax.text.encoder import DTYPES, TextEncoder, load_text_encoder, qwen_text
from dermjax.text.hub import ALIASES, resolve_model_dir
from dermjax.text.pooling import POOLING

__all__ = [
    "ALIASES",
    "DTYPES",
    "POOLING",
    "TextEncoder",
    "load_text_encoder",
    "qwen_text",
    "resolve_model_dir",
]
