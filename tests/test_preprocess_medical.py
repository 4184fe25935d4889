"""CT windowing and masked z-score against numpy on the whole image, under odd chunkings."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from tileseg.errors import ConfigError
from tileseg.preprocess import apply_preprocess
from tileseg.preprocess_medical import ct_window, zscore_masked

RNG = np.random.default_rng(21)


def ct_volume():
    hu = RNG.normal(40, 300, size=(2, 13, 17, 19)).astype(np.int16)
    hu[0, 0, 0, :3] = (-1024, 3000, 40)
    return hu


@pytest.mark.parametrize("chunks", [(1, 4, 5, 7), (2, 13, 17, 19)])
def test_ct_window_equals_numpy(chunks):
    hu = ct_volume()
    got = ct_window(da.from_array(hu, chunks=chunks), center=40, width=400)
    assert got.dtype == np.float32 and got.chunks == da.from_array(hu, chunks=chunks).chunks
    expected = (np.clip(hu.astype(np.float64), -160, 240) + 160) / 400
    np.testing.assert_allclose(got.compute(), expected, atol=1e-6)
    assert got[0, 0, 0, :3].compute().tolist() == [0.0, 1.0, 0.5]


def test_ct_window_via_pipeline_steps_and_bad_width():
    hu = ct_volume()
    out = apply_preprocess(da.from_array(hu, chunks=(1, 5, 6, 7)), [{"ct_window": {"center": -600, "width": 1500}}])
    np.testing.assert_allclose(out.compute(), (np.clip(hu, -1350, 150) + 1350) / 1500.0, atol=1e-6)
    with pytest.raises(ConfigError, match="width"):
        ct_window(hu, center=0, width=0)
    with pytest.raises(ConfigError, match="ct_window"):
        apply_preprocess(hu, [{"ct_window": {"centre": 0, "width": 10}}])


@pytest.mark.parametrize("chunks", [(1, 3, 7, 5), (2, 13, 17, 19)])
def test_zscore_masked_equals_numpy_on_foreground(chunks):
    vol = RNG.normal(300, 50, size=(2, 13, 17, 19)).astype(np.float32)
    vol[:, :, :5] = 0.0  # background (air)
    vol[1] *= 3
    got = zscore_masked(da.from_array(vol, chunks=chunks), mask_threshold=0)
    expected = np.empty_like(vol, dtype=np.float64)
    for c in range(2):
        fg = vol[c][vol[c] > 0].astype(np.float64)
        expected[c] = (vol[c] - fg.mean()) / fg.std()
    np.testing.assert_allclose(got.compute(), expected, rtol=1e-5, atol=1e-5)
    zeroed = zscore_masked(da.from_array(vol, chunks=chunks), mask_threshold=0, outside_value=0)
    np.testing.assert_allclose(zeroed.compute(), np.where(vol > 0, expected, 0.0), rtol=1e-5, atol=1e-5)
    plain = apply_preprocess(vol, ["zscore"]).compute()  # the unmasked step differs: the mask matters
    assert not np.allclose(plain, expected, atol=1e-2)


def test_zscore_masked_without_foreground_is_finite():
    out = zscore_masked(np.zeros((1, 4, 4)), mask_threshold=10).compute()
    assert np.isfinite(out).all()
