"""A trained model from its checkpoint alone, run over a split's records or over image files.

`load_model(path)` opens the checkpoint a path names (`checkpoint_source.open_checkpoint`: the
best step when there is one, else the latest; the config saved in it), traces the model's
shapes and restores its weights, only reading the folder. Classes,
image size, normalisation and the text-encoder spec come from the checkpoint's meta, so no
training data is needed to predict.

Modalities go through the training code's masking path (`apply_masking` with complete masking):
`image_only` zeroes the text input, `text_only` the (normalised) image, `both` masks nothing. A
model trained with `masking.mask_complete` set is run as trained (`LoadedModel.default_mode`).
Logits stay float32 on the device; probabilities are the float64 softmax on the host.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from dermjax import experiment, parallel
from dermjax.data import embeddings, encoders, fs, images, pipeline
from dermjax.data.augment import prepare_eval
from dermjax.embedding_file import text_encoder
from dermjax.errors import DataError
from dermjax.evaluation.checkpoint_source import Checkpoint, open_checkpoint, text_input_size
from dermjax.train.checkpoint import CheckpointReader
from dermjax.train.masking import MaskSpec, apply_masking
from dermjax.train.step import ModelParts, StepSpec, split_model

log = logging.getLogger(__name__)

# Modality modes and the modality each one masks completely.
MODES = ("both", "image_only", "text_only")
_MASKED = {"both": None, "image_only": "text", "text_only": "image"}


@dataclasses.dataclass
class LoadedModel(Checkpoint):
    """A restored model with what running it needs; `logits` runs one batch in some modes."""

    text_dim: int = 0
    mesh: jax.sharding.Mesh | None = None
    parts: ModelParts | None = None
    weights: dict = dataclasses.field(default_factory=dict)  # params, batch_stats (replicated)
    spec: StepSpec | None = None
    _steps: dict = dataclasses.field(default_factory=dict)

    @property
    def eval_batch_size(self) -> int:
        t, n = self.cfg.training, jax.device_count()
        size = t.eval_batch_size or t.batch_size
        return -(-size // n) * n  # padding rows are free: round up to split over the devices

    def logits(self, batch: dict[str, Any], modes: Sequence[str]) -> np.ndarray:
        """float32 [len(modes), B, C] for a batch with `image`, `text` and `has_text`."""
        key = tuple(modes)
        if unknown := [m for m in key if m not in MODES]:
            raise ValueError(f"unknown modes {unknown}; use some of {MODES}")
        if key not in self._steps:
            self._steps[key] = _logits_step(self.parts, self.spec, key)
        return parallel.to_host(self._steps[key](self.weights, batch))


def _logits_step(parts: ModelParts, spec: StepSpec, modes: tuple[str, ...]):
    """Jitted (weights, batch) -> logits per mode, each through complete masking."""
    masks = [MaskSpec(mask_complete=_MASKED[m]) for m in modes]

    def step(weights, rngs, batch):
        normalised = prepare_eval(batch["image"], spec.mean, spec.std)
        out = []
        for mask in masks:
            x, text, _, _ = apply_masking(
                jax.random.key(0),
                normalised,
                batch["text"],
                batch["has_text"],
                mask,
                training=False,
            )
            fresh = jax.tree.map(lambda v: v, rngs)  # new Variables per merge, as the steps do
            model = nnx.merge(parts.eval_graph, weights["params"], weights["batch_stats"], fresh)
            out.append(model(x.astype(spec.compute_dtype), text)["logits"])
        return jax.numpy.stack(out)

    jitted = jax.jit(step)
    return lambda weights, batch: jitted(weights, parts.rngs, batch)


def load_model(source: str | Checkpoint) -> LoadedModel:
    """Rebuilds the model of a checkpoint (a path or `open_checkpoint`'s) and restores its weights.

    The folder is only read; the model's shapes are traced, never initialised.
    """
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    ref, cfg, classes = ckpt.ref, ckpt.cfg, ckpt.classes
    text_dim = text_input_size(ckpt)
    abstract_model = nnx.eval_shape(  # shapes only: every weight is read from the checkpoint
        lambda: experiment.make_model(
            cfg,
            num_classes=len(classes),
            text_dim=text_dim,
            rngs=nnx.Rngs(0),
            weights_from_checkpoint=True,
        )
    )
    parts, params, batch_stats = split_model(abstract_model, [], update_frozen_bn_stats=True)
    parts.rngs = jax.tree.map(_concrete_rng, parts.rngs)  # dropout streams: unused in eval
    mesh = parallel.make_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        {"params": params, "batch_stats": batch_stats},
    )
    with CheckpointReader(ref.directory) as reader:
        weights, _ = reader.restore_weights(ref.step, abstract_weights=abstract)
    mean, std = ckpt.meta["normalization_mean"], ckpt.meta["normalization_std"]
    spec = experiment.step_spec(cfg, np.ones(len(classes), np.float32), mean, std)
    log.info("restored the %s checkpoint (step %d) of %s", ref.kind, ref.step, ref.directory)
    return LoadedModel(
        ref,
        cfg,
        ckpt.meta,
        ckpt.trained_changes,
        text_dim=text_dim,
        mesh=mesh,
        parts=parts,
        weights=weights,
        spec=spec,
    )


def _concrete_rng(leaf: jax.ShapeDtypeStruct) -> jax.Array:
    """A fixed value for an abstract RNG-state leaf (a key or a counter)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.split(jax.random.key(0), leaf.shape) if leaf.shape else jax.random.key(0)
    return jax.numpy.zeros(leaf.shape, leaf.dtype)


def softmax64(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64 on the host."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# ---- A split's records ------------------------------------------------------------------------
def predict_records(
    model: LoadedModel, records: pipeline.Records, *, split: str, modes: Sequence[str]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({mode: float32 logits [N, C]}, readable bool[N]) over `records`, in their order.

    Decoding, resizing and padding are the evaluation loader's; unreadable images are skipped
    (False in the second array) and logged.
    """
    from dermjax.tracking import Progress

    n, t = len(records), model.cfg.training
    loader = pipeline.eval_loader(
        records,
        batch_size=model.eval_batch_size,
        img_size=model.img_size,
        split=split,
        num_workers=t.num_workers,
        prefetch_factor=t.prefetch_factor,
        on_bad_image="skip",
        cache=_exact_cache(model, records),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    out = np.zeros((len(modes), n, len(model.classes)), np.float32)
    readable = np.zeros(n, bool)
    main = jax.process_index() == 0
    progress = Progress(n, desc=f"{split} ({', '.join(modes)})", enabled=main)
    it = iter(loader)
    try:
        for batch in it:
            sharded = parallel.shard_batch(batch, model.mesh)
            logits = model.logits(sharded, modes)
            index, valid = parallel.to_host(sharded["index"]), parallel.to_host(sharded["valid"])
            rows = index >= 0
            out[:, index[rows]] = logits[:, rows]
            readable[index[rows]] = valid[rows]
            progress.update(int(rows.sum()))
    finally:
        pipeline.close_iterator(it)
    progress.close()
    return dict(zip(modes, out, strict=True)), readable


def _exact_cache(model: LoadedModel, records: pipeline.Records):
    """The prepared cache of evaluation-size images, when one serves these records."""
    if not model.cfg.data.use_cache:
        return None
    from dermjax.config import data_paths
    from dermjax.data import cache

    cache_dir = data_paths(model.cfg).cache_dir
    found = cache.find_cache(cache_dir, images.EXACT, model.img_size, records.paths)
    if found is not None:
        log.info("using prepared cache at %s", found.directory)
    return found


# ---- Image files ------------------------------------------------------------------------------
def load_images(
    paths: Sequence[str], img_size: tuple[int, int]
) -> tuple[list[np.ndarray | None], dict[str, str]]:
    """Each file decoded and resized as the evaluation pipeline does (None where unreadable).

    Returns the images and {path: reason} for the unreadable ones.
    """
    loaded: list[np.ndarray | None] = []
    errors: dict[str, str] = {}
    for path, data in zip(paths, fs.read_many(list(paths)), strict=True):
        try:
            if isinstance(data, Exception):
                raise images.BadImageError(path, _read_error(data))
            loaded.append(images.load_eval(data, path, img_size))
        except images.BadImageError as e:
            loaded.append(None)
            errors[path] = e.reason
    return loaded, errors


def _read_error(error: Exception) -> str:
    """Why a file could not be read, without repeating its (absolute) path."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "a folder, not an image file"
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"{type(error).__name__}: {error}"


def text_vector(model: LoadedModel, text: str) -> np.ndarray:
    """`text` embedded by the checkpoint's text encoder (the hashing one works offline).

    The local encoder must be the one the run was trained with (same weights, pooling, length,
    dimension; its folder may have moved). A run trained from an embeddings file made
    elsewhere stores no spec to check against, which is said in a warning.
    """
    spec = dict(model.meta.get("encoder") or {})
    name = model.cfg.encoder.model_name
    if spec.get("name") == "hashing":
        if name != encoders.HASH_MODEL:
            raise DataError(
                f"the checkpoint was trained with the built-in hashing text encoder; "
                f"encoder.model_name={name!r} cannot replace it (the model reads that encoder's "
                "vectors): drop the override"
            )
        encoder: Any = encoders.HashingTextEncoder(
            dim=spec["dim"], ngram=tuple(spec["ngram"]), seed=spec["seed"]
        )
    else:
        try:  # a local model folder or the HF cache
            encoder = text_encoder(model.cfg)
        except DataError as e:
            raise DataError(
                f"{e}. The checkpoint's text encoder is needed to embed --text: point "
                "--config.encoder.model_name=FOLDER at a copy of it"
            ) from e
        if "dim" not in spec:
            log.warning(
                "this model was trained on text embeddings that store no dermjax encoder spec "
                "(made elsewhere): --text is embedded with encoder.model_name=%r, pooling %s, "
                "max_length %s, which cannot be checked to be the encoder that made them",
                name,
                model.cfg.encoder.pooling_type,
                model.cfg.encoder.max_length,
            )
        elif diff := embeddings.spec_differences(spec, encoder.spec, ("checkpoint", "local")):
            raise DataError(
                f"the local text encoder {name!r} is not the one the checkpoint was trained with "
                f"({'; '.join(diff)}): use that model"
            )
    vector = np.asarray(encoder.encode([text])[0], np.float32)
    if vector.shape != (model.text_dim,):
        raise DataError(
            f"the text encoder gives {vector.shape[0]} values, the model takes {model.text_dim}"
        )
    if not vector.any():
        log.warning(
            "the text gives an all-zero embedding (the hashing encoder found no word in it): the "
            "model sees text present but empty"
        )
    return vector


def predict_images(
    model: LoadedModel, arrays: Sequence[np.ndarray], text: np.ndarray | None, mode: str
) -> np.ndarray:
    """float64 probabilities [N, C] for uint8 images [H, W, 3] (all of `img_size`) in `mode`.

    `text` (one vector for every image) is used unless `mode` masks it; None means no text.
    """
    if not arrays:
        return np.zeros((0, len(model.classes)))
    n, size = len(arrays), min(len(arrays), model.eval_batch_size)
    size = -(-size // jax.device_count()) * jax.device_count()
    vector = np.zeros(model.text_dim, np.float32) if text is None else text
    out = []
    for start in range(0, n, size):
        chunk = list(arrays[start : start + size])
        real = len(chunk)
        chunk += [np.zeros_like(chunk[0])] * (size - real)
        batch = {
            "image": np.stack(chunk),
            "text": np.repeat(vector[None], size, axis=0),
            "has_text": np.full(size, text is not None),
        }
        logits = model.logits(parallel.shard_batch(batch, model.mesh), (mode,))
        out.append(softmax64(logits[0, :real]))
    return np.concatenate(out)
