"""Modality masking inside the jitted step, as the original `Trainer._apply_masking`.

A masked modality is replaced by a zero *input*: an all-zero image in normalised space (the
per-channel mean colour, which still goes through the backbone) or a zero text vector. Complete
masking applies in training and evaluation; random masking only in training, and it never masks
both modalities of a sample.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Modalities `mask_complete` can mask everywhere (None masks nothing).
MASK_MODES = ("image", "text")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static masking settings (hashable, so a jitted step can close over them)."""

    mask_complete: str | None = None
    random_enabled: bool = False
    image_prob: float = 0.0
    text_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.mask_complete is not None and self.mask_complete not in MASK_MODES:
            raise ValueError(
                f"masking.mask_complete={self.mask_complete!r} must be None or one of {MASK_MODES}."
            )
        for name in ("image_prob", "text_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"masking.random_mask.{name}={p} must lie in [0, 1].")

    @property
    def random_active(self) -> bool:
        """Random masking runs only when enabled and no complete masking is set."""
        return self.random_enabled and self.mask_complete is None

    @property
    def keep_image_prob(self) -> float:
        """P(keep the image) when both modalities were drawn; 1/2 when both probs are 1."""
        den = (1.0 - self.image_prob) + (1.0 - self.text_prob)
        return (1.0 - self.image_prob) / den if den > 0 else 0.5


def _random_masks(key: jax.Array, batch: int, spec: MaskSpec) -> tuple[jax.Array, jax.Array]:
    """Per-sample Bernoulli masks with the original's at-least-one-modality rule."""
    k_img, k_txt, k_keep = jax.random.split(key, 3)
    img_mask = jax.random.uniform(k_img, (batch,)) < spec.image_prob
    txt_mask = jax.random.uniform(k_txt, (batch,)) < spec.text_prob
    both = img_mask & txt_mask
    keep_img = jax.random.uniform(k_keep, (batch,)) < spec.keep_image_prob
    img_mask = jnp.where(both, ~keep_img, img_mask)
    txt_mask = jnp.where(both, keep_img, txt_mask)
    return img_mask, txt_mask


def apply_masking(
    key: jax.Array,
    images: jax.Array,
    text: jax.Array,
    has_text: jax.Array,
    spec: MaskSpec,
    *,
    training: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Zero the masked inputs; return `(images, text, vision_valid, text_valid)`.

    `images` are normalised float [B,H,W,3], `text` float [B,D]. `text_valid` is also False for
    samples without a description, so they never feed the text auxiliary loss.
    """
    batch = images.shape[0]
    no_mask = jnp.zeros((batch,), bool)
    if spec.mask_complete == "image":
        img_mask, txt_mask = ~no_mask, no_mask
    elif spec.mask_complete == "text":
        img_mask, txt_mask = no_mask, ~no_mask
    elif training and spec.random_active:
        img_mask, txt_mask = _random_masks(key, batch, spec)
    else:  # nothing to mask: skip the full-image select
        return images, text, ~no_mask, has_text.astype(bool)
    images = jnp.where(img_mask[:, None, None, None], jnp.zeros((), images.dtype), images)
    text = jnp.where(txt_mask[:, None], jnp.zeros((), text.dtype), text)
    return images, text, ~img_mask, ~txt_mask & has_text.astype(bool)
