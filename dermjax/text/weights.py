"""Strict loading of Hugging Face safetensors weights into the NNX text encoders.

The encoders name their submodules like the Hugging Face tensors, so a parameter's NNX path maps
to its tensor name by joining with dots and renaming the leaf (`kernel`, `embedding`, `scale` ->
`weight`; Linear kernels are the transposed torch weights). Tensor names may carry a `model.` or
`bert.` prefix. Tensors the encoders do not use are ignored: BERT's pooler and pre-training heads
(`pooler.*`, `cls.*`), a causal LM head (`lm_head.*`) and `position_ids` buffers.

Files are read by memory-mapping their safetensors layout directly (bf16 included, no torch);
every parameter goes from the mapped file into its device array through
`jax.make_array_from_callback`, so each device receives only its own shard.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from dermjax.errors import DataError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_PREFIXES = ("model.", "bert.")
_IGNORED = re.compile(r"^(pooler|cls|lm_head)\.|(^|\.)position_ids$")
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_MAX_LISTED = 20


def read_tensors(files: list[Path]) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of every tensor in `files`, names without `model.`/`bert.` prefix."""
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        buffer = np.memmap(path, dtype=np.uint8, mode="r")
        start = 8 + size
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _DTYPES:
                raise DataError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            dtype = np.dtype(_DTYPES[entry["dtype"]])
            array = buffer[start + begin : start + end].view(dtype).reshape(entry["shape"])
            key = next((name[len(p) :] for p in _PREFIXES if name.startswith(p)), name)
            if key in tensors:
                raise DataError(f"{path}: tensor {key} appears twice (with and without a prefix)")
            tensors[key] = array
    return tensors


def hf_name(path: tuple) -> str:
    """The Hugging Face tensor name of an NNX parameter path."""
    *owner, leaf = path
    return ".".join([*(str(p) for p in owner), _LEAF_TO_HF.get(leaf, leaf)])


def _listing(title: str, names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{title} ({len(names)}): {shown}{more}"


def load_weights(
    abstract: nnx.Module,
    files: list[Path],
    *,
    sharding_for: Callable[[tuple, tuple], jax.sharding.Sharding],
    what: str,
) -> nnx.Module:
    """Fills an abstract module (from `nnx.eval_shape`) with the tensors of `files`.

    Strict: one `DataError` lists every missing, unexpected and mis-shaped tensor before any
    array is made. Values are cast to each parameter's dtype; `sharding_for(path, shape)` places
    each parameter.
    """
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    tensors = read_tensors(files)
    missing, mis_shaped, used = [], [], set()
    for path, var in flat:
        name = hf_name(path)
        want = tuple(var.get_value().shape)
        if name not in tensors:
            missing.append(name)
            continue
        used.add(name)
        got = tensors[name].shape
        got = got[::-1] if path[-1] == "kernel" else got
        if tuple(got) != want:
            mis_shaped.append(f"{name} {tuple(tensors[name].shape)} (expected {want[::-1]})")
    unexpected = sorted(k for k in tensors if k not in used and not _IGNORED.search(k))
    problems = [
        _listing(title, names)
        for title, names in (
            ("missing tensors", missing),
            ("unexpected tensors", unexpected),
            ("mis-shaped tensors", mis_shaped),
        )
        if names
    ]
    if problems:
        raise DataError(f"weights of {what} do not fit its config.json: " + "; ".join(problems))
    for path, var in flat:
        value = var.get_value()
        source = tensors[hf_name(path)]
        source = source.T if path[-1] == "kernel" else source

        def shard(index, source=source, dtype=value.dtype):
            return np.asarray(source[index], dtype=dtype)

        var.set_value(
            jax.make_array_from_callback(value.shape, sharding_for(path, value.shape), shard)
        )
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
