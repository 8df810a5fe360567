"""DenseNet-121 against torchvision: parameters, logits, the original's features, unfreeze units."""

from flax import nnx

from dermjax.models import create_backbone, unit_count
from dermjax.models.densenet import unfreeze_units
from tests.models import parity


def test_parameter_count_equals_torchvision_weights_meta():
    assert parity.abstract_param_count("densenet121", include_top=True) == 7_978_856


def test_logits_match_torchvision_float64_and_float32():
    tv = parity.import_torchvision()
    model = parity.seeded_torch_model(tv, "densenet121", image_size=64)
    parity.assert_parity("densenet121", model, image_size=64)


def test_features_pool_norm5_without_the_final_relu_like_the_original():
    tv = parity.import_torchvision()
    import torch

    model = parity.seeded_torch_model(tv, "densenet121", image_size=32)

    def original_embedding(m, x):  # CNNModel: densenet.features, then cat([avg, max]), flatten
        maps = m.features(x)
        return torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)

    parity.assert_parity(
        "densenet121",
        model,
        image_size=32,
        f64_tol=None,
        torch_forward=original_embedding,
        include_top=False,
        pooling_type="concat",
    )


def test_unfreeze_units_are_the_twelve_children_of_features():
    model = nnx.eval_shape(lambda: create_backbone("densenet121", rngs=nnx.Rngs(0)))
    units = unfreeze_units(model)
    assert len(units) == unit_count("densenet121") == 12
    assert units[:5] == [
        ("features", "conv0"),
        ("features", "norm0"),
        ("features", "relu0"),
        ("features", "pool0"),
        ("features", "denseblock1"),
    ]
    assert units[-2:] == [("features", "denseblock4"), ("features", "norm5")]
