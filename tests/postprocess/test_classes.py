"""argmax / threshold on chunks equal NumPy on the whole array."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from tileseg.errors import ConfigError, InputError
from tileseg.postprocess.classes import argmax, threshold


@pytest.mark.parametrize("spatial", [(13, 17), (5, 6, 7)])
@pytest.mark.parametrize("k", [1, 3, 300])
def test_argmax_equals_numpy(spatial, k):
    rng = np.random.default_rng(k)
    prob = rng.random((k, *spatial)).astype(np.float32)
    prob[:, 0] = 0.5  # ties: lowest class wins, as numpy
    x = da.from_array(prob, chunks=(max(1, k // 2),) + (4,) * len(spatial))
    got = argmax(x)
    assert got.dtype == (np.uint8 if k <= 256 else np.uint16)
    assert got.shape == spatial
    np.testing.assert_array_equal(got.compute(), np.argmax(prob, axis=0))


def test_argmax_min_prob_and_channel_axis():
    rng = np.random.default_rng(0)
    prob = rng.random((9, 11, 3))
    got = argmax(da.from_array(prob, chunks=4), channel_axis=-1, min_prob=0.6).compute()
    expected = np.where(prob.max(-1) < 0.6, 0, prob.argmax(-1))
    np.testing.assert_array_equal(got, expected)


def test_threshold_single_channel_and_squeeze():
    rng = np.random.default_rng(1)
    prob = rng.random((1, 8, 9))
    x = da.from_array(prob, chunks=3)
    np.testing.assert_array_equal(threshold(x, 0.3).compute(), prob > 0.3)
    np.testing.assert_array_equal(threshold(x, 0.3, channel_axis=0).compute(), prob[0] > 0.3)
    # In a pipeline, spacing tells the spatial rank, so the channel axis is dropped.
    np.testing.assert_array_equal(threshold(x, 0.3, spacing=(1.0, 1.0)).compute(), prob[0] > 0.3)


def test_threshold_per_class_values():
    rng = np.random.default_rng(2)
    prob = rng.random((3, 6, 7))
    got = threshold(da.from_array(prob, chunks=2), [0.2, 0.5, 0.9], per_class=True).compute()
    assert got.shape == prob.shape
    for c, v in enumerate([0.2, 0.5, 0.9]):
        np.testing.assert_array_equal(got[c], prob[c] > v)


def test_threshold_errors():
    x = da.zeros((3, 4, 4), chunks=2)
    with pytest.raises(ConfigError, match="one per class"):
        threshold(x, [0.1, 0.2], per_class=True)
    with pytest.raises(ConfigError, match="one number"):
        threshold(x, [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="single channel"):
        threshold(x, 0.5, channel_axis=0)
    with pytest.raises(ConfigError, match="channel_axis"):
        argmax(x, channel_axis=5)
