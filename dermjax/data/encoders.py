"""Text encoder choices, known without loading a model, and the built-in hashing encoder.

`EncoderSettings` is what the config's `encoder.*` fields choose; dermjax stores it in every
embeddings file it writes and compares it at training time. It also derives the file name, so
two encoders never share a file:
`<model>_<max_length>_<pooling>[_<output_dim>][_bf16][_i<hash>].parquet`, where <model> is the
last component of encoder.model_name (an alias, a Hugging Face id or a folder), `_i<hash>` the
first 8 hex digits of the SHA-256 of a non-default Qwen instruction; `hash<dim>.parquet` for the
built-in hashing encoder. E.g. sapbert_256_cls.parquet, Qwen3-Embedding-8B_512_last_token.parquet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

TEXT_POOLING = ("cls", "mean", "last_token")  # encoder.pooling_type of transformer encoders
TEXT_DTYPES = ("float32", "bfloat16")  # encoder.dtype: the text encoder's compute dtype
HASH_MODEL = "hash"  # encoder.model_name of the built-in HashingTextEncoder
HASH_DIM = 256
QWEN_INSTRUCTION = (
    "Represent the patient's description and characteristics (including clinical details, age, "
    "sex, and symptoms) as a semantic embedding suitable for clinical classification. "
    "Return an embedding."
)
_TOKEN = re.compile(r"\w+")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class TextEncoder(Protocol):
    """What computing embeddings needs: `encode` and a JSON-able `spec` that includes "dim"."""

    @property
    def spec(self) -> dict[str, Any]: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class EncoderSettings:
    """The configured choice of text encoder, known without loading it.

    Stored in every file dermjax writes and compared at training time; `model_name` is kept as
    configured (a folder path is compared as written, an alias as its Hugging Face id when
    `dermjax.text` is installed). The hashing encoder has only `model_name`.
    """

    model_name: str
    max_length: int | None = None
    pooling_type: str | None = None
    instruction: str | None = None  # Qwen (last_token) models only
    output_dim: int | None = None
    dtype: str | None = None

    @classmethod
    def create(
        cls, model_name: str, *, max_length: int, pooling_type: str, instruction: str | None,
        output_dim: int | None, dtype: str,
    ) -> EncoderSettings:  # fmt: skip
        """Settings from the encoder config fields; fields the model ignores are dropped."""
        if model_name == HASH_MODEL:
            return cls(HASH_MODEL)
        instruction = instruction if pooling_type == "last_token" else None
        return cls(model_name, max_length, pooling_type, instruction, output_dim, dtype)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form with the model name canonical (alias -> Hugging Face id)."""
        out = dataclasses.asdict(self)
        out["model_name"] = _canonical_model(self.model_name)
        return out

    def filename(self) -> str:
        """The derived embeddings file name (rule in the module docstring)."""
        if self.model_name == HASH_MODEL:
            return f"{HASH_MODEL}{HASH_DIM}.parquet"
        model = _UNSAFE.sub("-", os.path.basename(self.model_name.rstrip("/"))) or "model"
        parts = [model, str(self.max_length), str(self.pooling_type)]
        if self.output_dim is not None:
            parts.append(str(self.output_dim))
        if self.dtype == "bfloat16":
            parts.append("bf16")
        if self.instruction is not None and self.instruction != QWEN_INSTRUCTION:
            parts.append("i" + hashlib.sha256(self.instruction.encode()).hexdigest()[:8])
        return "_".join(parts) + ".parquet"


def _canonical_model(name: str) -> str:
    try:
        from dermjax.text import ALIASES  # optional; imports transformers
    except ImportError:
        ALIASES = {}
    name = ALIASES.get(name.lower(), name)
    return os.path.normpath(name) if os.path.isdir(name) else name


@lru_cache(maxsize=1 << 18)
def _hash64(gram: str, seed: int) -> int:
    digest = hashlib.blake2b(gram.encode(), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little")


@dataclasses.dataclass(frozen=True)
class HashingTextEncoder:
    """Deterministic, dependency-free text encoder: signed hashing of word n-grams.

    Each lower-cased word n-gram (n in `ngram`, inclusive) adds +1 or -1 to one of `dim` buckets,
    both chosen by a keyed BLAKE2 hash, so results do not depend on the process or platform.
    Vectors are raw counts, not normalised, like the original's transformer embeddings.
    """

    dim: int = 256
    ngram: tuple[int, int] = (1, 2)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ngram", tuple(self.ngram))
        low, high = self.ngram
        if self.dim < 1 or not 1 <= low <= high:
            raise ValueError(
                f"HashingTextEncoder needs dim >= 1 and 1 <= ngram[0] <= ngram[1], got dim={self.dim}, ngram={self.ngram}"
            )

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "hashing", "dim": self.dim, "ngram": list(self.ngram), "seed": self.seed}

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        low, high = self.ngram
        for row, text in enumerate(texts):
            words = _TOKEN.findall(str(text).lower())
            for n in range(low, high + 1):
                for start in range(len(words) - n + 1):
                    h = _hash64(" ".join(words[start : start + n]), self.seed)
                    out[row, h % self.dim] += 1.0 if h >> 63 else -1.0
        return out
