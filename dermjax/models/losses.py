"""Classification losses with PyTorch's semantics, plus per-sample masks.

`cross_entropy` equals `torch.nn.functional.cross_entropy(..., reduction="mean")`, class weights
and label smoothing included; `focal_loss` is the original `FocalLoss`. Both take a boolean
`mask` that removes samples from the sum *and* from the normaliser, so evaluation padding, bad
images and masked modalities never count. A loss with no valid sample is 0 with a zero (finite)
gradient, where PyTorch would give NaN; the original skipped such terms instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

LOSS_FNS = ("cross_entropy", "focal")
REDUCTIONS = ("mean",)


def _prepare(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 log-probabilities, labels made safe to gather, and a float mask."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if mask is None:
        mask = jnp.ones(labels.shape, bool)
    mask = mask.astype(bool)
    # Masked samples (e.g. padding labelled -1) must not gather out of range.
    safe_labels = jnp.where(mask, labels, 0).astype(jnp.int32)
    return logp, safe_labels, mask.astype(jnp.float32)


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, or 0 where den == 0, with finite gradients in both cases."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    class_weights: Sequence[float] | jax.Array | None = None,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Mean cross-entropy exactly as `torch.nn.functional.cross_entropy`.

    With weights w: `(1-eps) * sum_i w[y_i] nll_i / sum_i w[y_i]
    + (eps/C) * sum_i sum_c w_c (-log p_ic) / sum_i w[y_i]`; without, w = 1.
    """
    logp, labels, m = _prepare(logits, labels, mask)
    num_classes = logp.shape[-1]
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    if class_weights is None:
        target_w = m
        smooth = -jnp.sum(logp, axis=-1)
    else:
        w = jnp.asarray(class_weights, jnp.float32)
        target_w = w[labels] * m
        smooth = -jnp.sum(logp * w, axis=-1)
    den = jnp.sum(target_w)
    loss = _safe_ratio(jnp.sum(target_w * nll), den)
    if label_smoothing:
        smooth_loss = _safe_ratio(jnp.sum(m * smooth), den)
        loss = (1.0 - label_smoothing) * loss + (label_smoothing / num_classes) * smooth_loss
    return loss


def focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    alpha: Sequence[float] | float | jax.Array | None = None,
    gamma: float = 2.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Plain mean of `-alpha[y] * (1 - p_t)**gamma * log p_t` (not normalised by alpha)."""
    logp, labels, m = _prepare(logits, labels, mask)
    logp_t = jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    one_minus_pt = -jnp.expm1(logp_t)  # 1 - p_t without cancellation when p_t is near 1
    if alpha is None:
        alpha_t = jnp.float32(1.0)
    else:
        a = jnp.asarray(alpha, jnp.float32)
        alpha_t = a[labels] if a.ndim else a
    # (1 - p_t)**gamma has an infinite slope at p_t = 1 for 0 < gamma < 1, and inf * log(1) = NaN
    # in the gradient. Where 1 - p_t == 0 the power is replaced by its value there (0, or 1 for
    # gamma == 0) through a branch with zero gradient, which is the exact limit of the loss's
    # gradient. In float32, 1 - p_t is either 0 or >= ~6e-8, so the power's slope stays finite.
    positive = one_minus_pt > 0
    safe_base = jnp.where(positive, one_minus_pt, 1.0)
    modulator = jnp.where(positive, safe_base**gamma, 0.0**gamma)
    per_sample = -alpha_t * modulator * logp_t
    return _safe_ratio(jnp.sum(m * per_sample), jnp.sum(m))


def _tuple_or_none(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Everything the jitted step needs to compute the loss; hashable, so it can be static."""

    loss_fn: str = "cross_entropy"
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None
    alpha: tuple[float, ...] | float | None = None
    gamma: float = 2.0
    aux_vision_weight: float = 0.3
    aux_text_weight: float = 0.3
    use_auxiliary_loss: bool = False

    def __post_init__(self) -> None:
        if self.loss_fn not in LOSS_FNS:
            raise ValueError(
                f"multimodal_classifier.loss_fn={self.loss_fn!r} is not supported; "
                f"use one of {LOSS_FNS}."
            )
        if self.gamma < 0:
            raise ValueError(f"multimodal_classifier.gamma={self.gamma} must be >= 0.")

    @classmethod
    def create(
        cls,
        *,
        loss_fn: str,
        label_smoothing: float | None,
        class_weights: Sequence[float] | None,
        use_class_weights_from_data: bool,
        alpha: Sequence[float] | float | None,
        gamma: float | None,
        reduction: str | None,
        use_auxiliary_loss: bool,
        auxiliary_loss_weight: float | None,
        auxiliary_vision_loss_weight: float | None,
        auxiliary_text_loss_weight: float | None,
        data_class_weights: Sequence[float] | None = None,
    ) -> LossSpec:
        """Resolves the original's loss rules; keyword names are the config field names.

        Manual `class_weights` win; otherwise `use_class_weights_from_data` injects the data's raw
        1/count weights (`data_class_weights`). Focal alpha is `alpha`, else those class weights,
        else 1.0. Each auxiliary weight defaults to `auxiliary_loss_weight` (0.3 when None); a
        None `gamma` is 2.0 and a None `label_smoothing` is 0.
        """
        if reduction is not None and reduction not in REDUCTIONS:
            raise ValueError(
                f"multimodal_classifier.reduction={reduction!r} is not supported; "
                f"use one of {REDUCTIONS}."
            )
        weights = _tuple_or_none(class_weights)
        if weights is None and use_class_weights_from_data:
            weights = _tuple_or_none(data_class_weights)
        focal_alpha = None
        if loss_fn == "focal":
            if alpha is None:
                focal_alpha = weights if weights is not None else 1.0
            elif isinstance(alpha, (int, float)):
                focal_alpha = float(alpha)
            else:
                focal_alpha = _tuple_or_none(alpha)
        aux_weight = 0.3 if auxiliary_loss_weight is None else float(auxiliary_loss_weight)
        return cls(
            loss_fn=loss_fn,
            label_smoothing=float(label_smoothing or 0.0),
            class_weights=weights,
            alpha=focal_alpha,
            gamma=2.0 if gamma is None else float(gamma),
            aux_vision_weight=(
                aux_weight
                if auxiliary_vision_loss_weight is None
                else float(auxiliary_vision_loss_weight)
            ),
            aux_text_weight=(
                aux_weight
                if auxiliary_text_loss_weight is None
                else float(auxiliary_text_loss_weight)
            ),
            use_auxiliary_loss=bool(use_auxiliary_loss),
        )

    def criterion(self, logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
        """The configured loss over the samples where `mask` is True."""
        if self.loss_fn == "focal":
            return focal_loss(logits, labels, alpha=self.alpha, gamma=self.gamma, mask=mask)
        return cross_entropy(
            logits,
            labels,
            class_weights=self.class_weights,
            label_smoothing=self.label_smoothing,
            mask=mask,
        )


def total_loss(
    outputs: Mapping[str, jax.Array],
    labels: jax.Array,
    spec: LossSpec,
    *,
    sample_valid: jax.Array,
    vision_valid: jax.Array,
    text_valid: jax.Array,
    aux_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`main + wv * aux_vision + wt * aux_text`, each aux term on its own valid subset.

    `aux_weights` ([wv, wt], traced, e.g. from a per-epoch schedule) replaces the spec's fixed
    weights. An aux term with weight 0 or without any valid sample contributes 0 (and is reported
    as 0), as does every aux term of an ablation batch (`outputs["ablation"]` != 0), whose loss
    is the main term alone.
    """
    sample_valid = sample_valid.astype(bool)
    main = spec.criterion(outputs["logits"], labels, sample_valid)
    zero = jnp.zeros((), jnp.float32)
    if aux_weights is None:
        aux_weights = jnp.asarray([spec.aux_vision_weight, spec.aux_text_weight], jnp.float32)
    multimodal = outputs.get("ablation", jnp.zeros((), jnp.int32)) == 0
    total, terms = main, {"loss/main": main, "loss/aux_vision": zero, "loss/aux_text": zero}
    if spec.use_auxiliary_loss:
        for i, (m, valid) in enumerate((("vision", vision_valid), ("text", text_valid))):
            w = jnp.asarray(aux_weights[i], jnp.float32)
            on = multimodal & (w > 0)
            aux = spec.criterion(outputs[f"aux_{m}_logits"], labels, sample_valid & valid)
            term = jnp.where(on, aux, zero)
            total = total + jnp.where(on, w, zero) * term
            terms[f"loss/aux_{m}"] = term
    return total, terms
