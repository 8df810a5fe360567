"""ViT-B/16, B/32, L/16, L/32 against torchvision: structure, parity, pos-embedding resize, bf16.

torchvision's `VisionTransformer` takes `image_size`, so parity runs the real architectures at
small sizes (64 px; ViT-L at batch 1, L/16 at 32 px, float32 only: its float64 torch copy alone
is 2.4 GB). Class token, position embedding, head and every 1-D tensor are randomised.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dermjax.models import BACKBONES, create_backbone, is_vit, unit_count, vit
from dermjax.models.registry import backbone_spec
from dermjax.models.vit import resize_pos_embedding, trainable_prefixes, unfreeze_units
from tests.models import parity

# torchvision Weights.meta["num_params"] (224 px).
TORCHVISION_PARAMS = {
    "vit_b_16": 86_567_656,
    "vit_b_32": 88_224_232,
    "vit_l_16": 304_326_632,
    "vit_l_32": 306_535_400,
}
SIZE = 64


def torch_vit(name: str, image_size: int) -> Any:
    """torchvision's VisionTransformer with `name`'s architecture at `image_size`, seeded."""
    import torch

    tv = parity.import_torchvision()
    torch.manual_seed(0)
    return tv.models.vision_transformer.VisionTransformer(
        image_size=image_size, **backbone_spec(name).variant
    )


@pytest.fixture(scope="module")
def b32() -> tuple:
    """A randomised torch ViT-B/32 at 64 px (eval mode) and its state_dict."""
    model = parity.randomize_torch_model(torch_vit("vit_b_32", SIZE), SIZE)
    return model, parity.torch_state_dict(model)


def abstract_vit(name: str, **kwargs: Any) -> nnx.Module:
    return nnx.eval_shape(lambda: create_backbone(name, rngs=nnx.Rngs(0), **kwargs))


@pytest.mark.parametrize("name", [n for n in BACKBONES if is_vit(n)])
def test_parameter_count_matches_torchvision(name: str) -> None:
    assert parity.abstract_param_count(name, include_top=True) == TORCHVISION_PARAMS[name]


def test_parameter_count_equals_torchvision_vit_b_16_module() -> None:
    tv = parity.import_torchvision()
    reference = parity.torch_param_count(tv.models.vit_b_16())
    assert parity.abstract_param_count("vit_b_16", include_top=True) == reference


@pytest.mark.parametrize(
    ("name", "image_size", "batch", "float64"),
    [
        ("vit_b_16", SIZE, 2, True),
        ("vit_b_32", SIZE, 2, True),
        pytest.param("vit_l_16", 32, 1, False, marks=pytest.mark.slow),
        pytest.param("vit_l_32", SIZE, 1, False, marks=pytest.mark.slow),
    ],
)
def test_logits_match_torchvision(name: str, image_size: int, batch: int, float64: bool) -> None:
    model = parity.randomize_torch_model(torch_vit(name, image_size), image_size)
    result = parity.assert_parity(
        name,
        model,
        image_size=image_size,
        batch=batch,
        f64_tol=parity.F64_TOL if float64 else None,
    )
    assert result["ref_max_abs"] > 1  # the randomised head makes the comparison meaningful


def test_headless_output_is_class_token_after_final_layer_norm(b32: tuple) -> None:
    import torch

    model, _ = b32

    def original(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        tokens = m._process_input(x)
        tokens = torch.cat([m.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return m.encoder(tokens)[:, 0]

    result = parity.assert_parity(
        "vit_b_32",
        model,
        image_size=SIZE,
        include_top=False,
        pooling_type="max",  # ignored by ViTs
        f64_tol=None,
        torch_forward=original,
    )
    assert result["ref_max_abs"] > 1


@pytest.mark.parametrize(("grid", "grid_new"), [(14, 10), (7, 12), (3, 1)])
def test_resize_pos_embedding_equals_torchvision_interpolate_embeddings(
    grid: int, grid_new: int
) -> None:
    import torch

    tv = parity.import_torchvision()
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1, 1 + grid * grid, 8))
    state = {"encoder.pos_embedding": torch.from_numpy(pos)}
    ref = tv.models.vision_transformer.interpolate_embeddings(grid_new * 16, 16, state)
    ref = ref["encoder.pos_embedding"].numpy()
    out = resize_pos_embedding(pos, 1 + grid_new * grid_new)
    assert out.shape == ref.shape == (1, 1 + grid_new * grid_new, 8)
    assert parity.max_abs_diff(out, ref) < 1e-12
    out32 = resize_pos_embedding(pos.astype(np.float32), 1 + grid_new * grid_new)
    assert out32.dtype == np.float32
    assert parity.max_abs_diff(out32, ref) < 1e-5


def test_resize_pos_embedding_rejects_non_square_grids() -> None:
    with pytest.raises(ValueError, match="square"):
        resize_pos_embedding(np.zeros((1, 1 + 12, 4)), 1 + 16)


def test_checkpoint_trained_at_224_runs_at_160_like_torchvision_interpolated_model() -> None:
    tv = parity.import_torchvision()
    at_224 = parity.randomize_torch_model(torch_vit("vit_b_32", 224), 224)
    state = parity.torch_state_dict(at_224)
    at_160 = torch_vit("vit_b_32", 160)
    at_160.load_state_dict(
        tv.models.vision_transformer.interpolate_embeddings(160, 32, at_224.state_dict())
    )
    at_160.eval()
    x = parity.random_images(1, 160, seed=4)
    ref = parity.torch_logits(at_160, x)
    module = parity.build_loaded("vit_b_32", state, include_top=True, image_size=160)
    assert module.encoder.pos_embedding.shape == (1, 1 + 5 * 5, 768)
    out = parity.jax_logits(module, x)
    assert parity.max_abs_diff(out, ref) <= parity.OTHER_F32_TOL * max(1, np.abs(ref).max())


def test_image_size_must_be_a_multiple_of_the_patch_size() -> None:
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        abstract_vit("vit_b_16", image_size=100)


def test_input_size_must_equal_the_built_image_size() -> None:
    def forward() -> jax.Array:
        model = create_backbone("vit_b_32", rngs=nnx.Rngs(0), image_size=SIZE)
        return model(jnp.zeros((1, 96, 96, 3)))

    with pytest.raises(ValueError, match="built for 64x64"):
        nnx.eval_shape(forward)


@pytest.mark.parametrize(("name", "blocks"), [("vit_b_16", 12), ("vit_l_32", 24)])
def test_unfreeze_units_are_the_encoder_blocks(name: str, blocks: int) -> None:
    units = unfreeze_units(abstract_vit(name))
    assert units == [("encoder", "layers", f"encoder_layer_{i}") for i in range(blocks)]
    assert unit_count(name) == blocks


def test_trainable_prefixes_are_last_blocks_plus_embeddings_and_final_norm() -> None:
    model = abstract_vit("vit_b_16", include_top=True)
    paths = [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]

    def selected(prefixes: list[tuple]) -> list[tuple]:
        return [p for p in paths if any(p[: len(q)] == q for q in prefixes)]

    embeddings = [("conv_proj",), ("class_token",), ("encoder", "pos_embedding"), ("encoder", "ln")]
    last_two = [("encoder", "layers", f"encoder_layer_{i}") for i in (10, 11)]
    assert trainable_prefixes(model, 2) == [*last_two, *embeddings]
    assert all(selected([prefix]) for prefix in trainable_prefixes(model, 2))
    assert trainable_prefixes(model, 0) == []
    assert selected(trainable_prefixes(model, -1)) == paths
    every_block_and_embedding = selected(trainable_prefixes(model, 12))
    assert sorted(set(paths) - set(every_block_and_embedding)) == [
        ("heads", "head", "bias"),
        ("heads", "head", "kernel"),
    ]


def test_train_mode_equals_eval_mode_without_dropout(b32: tuple) -> None:
    _, state = b32
    module = parity.build_loaded("vit_b_32", state, include_top=True, image_size=SIZE)
    x = parity.random_images(2, SIZE, seed=5)
    eval_out = parity.jax_logits(module, x)
    module.train()
    np.testing.assert_array_equal(parity.jax_logits(module, x), eval_out)


def test_bfloat16_keeps_float32_params_and_agrees_with_float32(b32: tuple) -> None:
    """Loose by nature (bf16 carries ~0.4% error per op)."""
    _, state = b32
    x = parity.random_images(8, SIZE, seed=6)
    kwargs = {"include_top": True, "image_size": SIZE}
    ref = parity.jax_logits(parity.build_loaded("vit_b_32", state, **kwargs), x)
    module = parity.build_loaded("vit_b_32", state, dtype=jnp.bfloat16, **kwargs)
    params = jax.tree.leaves(nnx.state(module, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}
    out = parity.jax_logits(module, x, jnp.bfloat16)
    assert out.dtype == np.float32
    assert np.linalg.norm(out - ref) <= 0.1 * np.linalg.norm(ref)
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.75


def test_gpu_attention_falls_back_to_xla_when_cudnn_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # On this CPU JAX refuses cuDNN while tracing ("cuDNN is not detected"), as it would on a
    # GPU with an unsupported cuDNN: the model must compute XLA's attention and say why.
    monkeypatch.setattr(vit.jax, "default_backend", lambda: "gpu")
    vit._warn_cudnn_refused.cache_clear()
    q, k, v = (
        jax.random.normal(key, (2, 5, 3, 8), jnp.bfloat16)
        for key in jax.random.split(jax.random.key(0), 3)
    )
    with caplog.at_level("WARNING", logger=vit.__name__):
        got = vit._attention(q, k, v)
        vit._attention(q, k, v)
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    refused = [r for r in caplog.records if "cuDNN attention unavailable" in r.getMessage()]
    assert len(refused) == 1, "the reason is logged once, not per call"
