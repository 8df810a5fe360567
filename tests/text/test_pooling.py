"""Pooling rules of the original's encode_with_transformers."""

import numpy as np
import pytest

from dermjax.text.pooling import matryoshka, pool

HIDDEN = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)


def test_cls_is_token_zero():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(pool(HIDDEN, mask, "cls"), HIDDEN[:, 0])


def test_mean_is_masked_and_clamped():
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    pooled = np.asarray(pool(HIDDEN, mask, "mean"))
    np.testing.assert_allclose(pooled[0], HIDDEN[0, :2].mean(0))
    np.testing.assert_array_equal(pooled[1], np.zeros(3))  # denominator clamped: no NaN


def test_last_token_takes_last_column_under_left_padding():
    mask = np.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    np.testing.assert_array_equal(pool(HIDDEN, mask, "last_token"), HIDDEN[:, -1])


def test_last_token_takes_sum_minus_one_otherwise():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    expected = np.stack([HIDDEN[0, 1], HIDDEN[1, 3]])
    np.testing.assert_array_equal(pool(HIDDEN, mask, "last_token"), expected)


def test_unknown_pooling_is_rejected():
    with pytest.raises(ValueError, match="pooling_type 'max'"):
        pool(HIDDEN, np.ones((2, 4)), "max")


def test_matryoshka_keeps_the_first_dims_at_unit_norm():
    out = np.asarray(matryoshka(np.array([[3.0, 4.0, 100.0]]), 2))
    np.testing.assert_allclose(out, [[0.6, 0.8]], rtol=1e-6)
