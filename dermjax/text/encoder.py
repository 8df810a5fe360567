"""Sentence embeddings with the NNX text encoders: tokenise, batch, run jitted, pool.

Texts are tokenised once (the model's own tokenizer, truncated at `max_length`), ordered by
length and cut into batches of exactly `batch_size` rows (the last one filled with repeats) and
one of a few token counts (`_bucket`), so each bucket compiles once and short texts are not
padded to the longest. Padding and pooling follow the original: right padding, except left padding for
Qwen models, whose texts become "Instruct: {instruction}\\nQuery: {text}".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from dermjax.errors import ConfigError, DataError
from dermjax.text import hub
from dermjax.text.bert import BertConfig, BertModel
from dermjax.text.pooling import POOLING, matryoshka, pool
from dermjax.text.qwen3 import Qwen3Config, Qwen3Model
from dermjax.text.weights import load_weights

DTYPES = ("float32", "bfloat16")  # encoder dtype: parameters and compute
_FAMILIES = {"bert": (BertConfig, BertModel), "qwen3": (Qwen3Config, Qwen3Model)}
_MIN_BUCKET = 16


def qwen_text(instruction: str, text: str) -> str:
    """The original's Qwen query format."""
    return f"Instruct: {instruction}\nQuery: {text}"


def _bucket(length: int, max_length: int) -> int:
    """Padded token count: `length` rounded up to a quarter of the next power of two (at least
    16: 16, 32, 48, 64, 96, 128, 192, 256, 384, 512...), capped at max_length. Few shapes to
    compile, at most 25% padding."""
    step = max(_MIN_BUCKET, (1 << (max(length, 1) - 1).bit_length()) // 4)
    return min(max_length, -(-length // step) * step)


class TextEncoder:
    """A loaded encoder: `encode(texts)` -> float32 [N, dim]; `spec` describes it (JSON-able).

    `spec` identifies what made an embedding: `weights_sha256` (config.json and weight files),
    pooling, max_length, instruction, dim, dtype; `model`, `model_id` and `revision` say where
    the weights came from.
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer: Any,
        *,
        spec: dict[str, Any],
        batch_size: int,
        mesh: Mesh | None,
    ):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.batch_size = batch_size
        self.left_padding = spec["family"] == "qwen3"
        self._input_sharding, replicated = None, None
        if mesh is not None:
            replicated = NamedSharding(mesh, P())
            divides = batch_size % mesh.shape["data"] == 0
            self._input_sharding = NamedSharding(mesh, P("data")) if divides else replicated
        graphdef, state = nnx.split(model)
        pooling, output_dim = spec["pooling"], spec["output_dim"]

        @jax.jit
        def hidden_states(state, input_ids, attention_mask):
            return nnx.merge(graphdef, state)(input_ids, attention_mask)

        @partial(jax.jit, out_shardings=replicated)  # every process can read the result
        def forward(state, input_ids, attention_mask):
            embeddings = pool(
                hidden_states(state, input_ids, attention_mask), attention_mask, pooling
            )
            return embeddings if output_dim is None else matryoshka(embeddings, output_dim)

        self._state, self._forward, self._hidden_states = state, forward, hidden_states

    def hidden_states(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The model's last hidden states [B, T, hidden] for token ids (jitted, no pooling)."""
        return np.asarray(self._hidden_states(self._state, input_ids, attention_mask))

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (instruction applied for Qwen), truncated at max_length."""
        if self.spec["instruction"] is not None:
            texts = [qwen_text(self.spec["instruction"], t) for t in texts]
        return self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.spec["max_length"],
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]

    def pad(
        self, rows: Sequence[Sequence[int]], length: int, *, left: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int32 [len(rows), length], padded on the model's side
        (or on the left when `left`)."""
        left = self.left_padding if left is None else left
        ids = np.full((len(rows), length), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if left else slice(0, len(row))
            ids[i, span], mask[i, span] = row, 1
        return ids, mask

    def encode(
        self, texts: Sequence[str], progress: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """float32 [len(texts), dim] embeddings of non-empty texts, in order.

        `progress(done, total)` is called after each batch.
        """
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t]
        if bad:
            raise ValueError(f"texts must be non-empty strings; rows {bad[:10]} are not")
        out = np.zeros((len(texts), self.spec["dim"]), np.float32)
        tokens = self.tokenize(texts) if texts else []
        order = sorted(range(len(texts)), key=lambda i: len(tokens[i]))
        pending: list[tuple[list[int], jax.Array]] = []
        done = 0

        def collect() -> None:
            nonlocal done
            rows, embeddings = pending.pop(0)
            out[rows] = np.asarray(embeddings)[: len(rows)]
            done += len(rows)
            if progress is not None:
                progress(done, len(texts))

        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            pending.append((rows, self._run([tokens[i] for i in rows])))
            if len(pending) > 1:  # read the previous batch back while this one runs
                collect()
        while pending:
            collect()
        return out

    def _run(self, batch: list[list[int]]) -> jax.Array:
        """Dispatches one batch (filled to batch_size with repeats); returns without waiting."""
        batch = batch + [batch[-1]] * (self.batch_size - len(batch))
        ids, mask = self.pad(batch, _bucket(max(map(len, batch)), self.spec["max_length"]))
        if self._input_sharding is not None:
            ids, mask = jax.device_put((ids, mask), self._input_sharding)
        return self._forward(self._state, ids, mask)


def _check_options(
    family: str, cfg: Any, *, max_length: int, pooling_type: str, batch_size: int,
    output_dim: int | None, dtype: str, where: str,
) -> None:  # fmt: skip
    problems = []
    if pooling_type not in POOLING:
        problems.append(f"pooling_type={pooling_type!r}: choose one of {POOLING}")
    elif family == "qwen3" and pooling_type != "last_token":
        problems.append(f"pooling_type={pooling_type!r}: Qwen models need 'last_token' ({where})")
    elif family != "qwen3" and pooling_type == "last_token":
        problems.append(f"pooling_type='last_token' is only for Qwen models, not {where}")
    if dtype not in DTYPES:
        problems.append(f"dtype={dtype!r}: choose one of {DTYPES}")
    if batch_size < 1 or max_length < 1:
        problems.append(f"batch_size={batch_size}, max_length={max_length}: must be >= 1")
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        problems.append(f"max_length={max_length} exceeds {where}'s {limit} positions")
    if output_dim is not None and (family != "qwen3" or not 1 <= output_dim <= cfg.hidden_size):
        problems.append(
            f"output_dim={output_dim}: Matryoshka truncation is for Qwen3 models, 1..hidden size"
        )
    if problems:
        raise ConfigError(problems)


def _param_sharding(
    abstract: nnx.Module, mesh: Mesh | None, shard_params: bool | None
) -> Callable[[tuple, tuple], jax.sharding.Sharding]:
    """Where each parameter goes: one device without a mesh; replicated over the mesh; or, when
    sharding (None: when the parameters exceed half of one device's memory), each matrix split
    over 'data' along its largest divisible dimension (XLA gathers it where it is used)."""
    if mesh is None:
        return lambda *_: SingleDeviceSharding(jax.devices()[0])
    replicated, n = NamedSharding(mesh, P()), mesh.shape["data"]
    if shard_params is None:
        leaves = jax.tree.leaves(nnx.state(abstract))
        size = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
        limit = (mesh.devices.flat[0].memory_stats() or {}).get("bytes_limit")
        shard_params = bool(limit) and size > limit / 2
    if not shard_params or n == 1:
        return lambda *_: replicated

    def sharding_for(path: tuple, shape: tuple) -> jax.sharding.Sharding:
        dims = [d for d, size in enumerate(shape) if size % n == 0] if len(shape) > 1 else []
        if not dims:
            return replicated
        axis = max(dims, key=lambda d: shape[d])
        return NamedSharding(mesh, P(*("data" if d == axis else None for d in range(len(shape)))))

    return sharding_for


def load_text_encoder(
    model_name: str | os.PathLike,
    *,
    max_length: int,
    pooling_type: str,
    batch_size: int,
    instruction: str | None = None,
    output_dim: int | None = None,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    shard_params: bool | None = None,
) -> TextEncoder:
    """Loads a BERT-family or Qwen3 encoder from a folder, the Hugging Face cache or an alias.

    Never downloads (see `dermjax.text.hub.resolve_model_dir`). `instruction` is used by Qwen
    models only (ignored for BERT); `output_dim` truncates Qwen3 embeddings to their first dims
    and L2-normalises them (Matryoshka), off by default as in the original. With a `mesh`,
    parameters are replicated over it (split over 'data' with `shard_params`, by default when
    they would fill more than half of a device) and batches split over 'data' when they divide.
    """
    from transformers import AutoTokenizer

    model_name = os.fspath(model_name)
    model_dir = hub.resolve_model_dir(model_name)
    where = f"{model_name} ({model_dir})"
    config = json.loads((model_dir / "config.json").read_text())
    family = config.get("model_type")
    if family not in _FAMILIES:
        raise DataError(
            f"{where}: model_type {family!r} is not supported; text encoders are "
            f"{', '.join(_FAMILIES)} models"
        )
    config_cls, model_cls = _FAMILIES[family]
    cfg = config_cls.from_hf(config, where)
    _check_options(
        family, cfg, max_length=max_length, pooling_type=pooling_type, batch_size=batch_size,
        output_dim=output_dim, dtype=dtype, where=where,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(
        model_dir, local_files_only=True, padding_side="left" if family == "qwen3" else "right"
    )
    if tokenizer.pad_token_id is None:
        raise DataError(f"{where}: the tokenizer has no pad token")
    abstract = nnx.eval_shape(lambda: model_cls(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    model = load_weights(
        abstract,
        hub.weight_files(model_dir),
        sharding_for=_param_sharding(abstract, mesh, shard_params),
        what=where,
    )
    local = Path(model_name).expanduser().is_dir()
    spec = {
        "model": model_name,
        "model_id": str(model_dir.resolve()) if local else hub.hub_id(model_name),
        "revision": hub.revision(model_dir),
        "weights_sha256": hub.weights_sha256(model_dir),
        "family": family,
        "pooling": pooling_type,
        "max_length": max_length,
        "instruction": instruction if family == "qwen3" else None,
        "output_dim": output_dim,
        "dim": output_dim or cfg.hidden_size,
        "dtype": dtype,
    }
    return TextEncoder(model, tokenizer, spec=spec, batch_size=batch_size, mesh=mesh)
