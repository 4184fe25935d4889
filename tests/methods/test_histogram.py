"""Whole-image histograms from chunks equal scikit-image's on the whole array."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.exposure import histogram as sk_histogram

from tileseg.errors import InputError
from tileseg.methods.histogram import histogram, masked_mean


@st.composite
def chunked(draw, dtypes=("uint8", "uint16", "int16")):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(3, 14 if ndim == 3 else 30)) for _ in range(ndim))
    chunks = tuple(draw(st.integers(1, s)) for s in shape)
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        a = rng.normal(0, 1, shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        lo = max(info.min, -3000)
        hi = min(info.max, 3000 if dtype.itemsize > 1 else 255)
        a = rng.integers(lo, hi, shape, endpoint=True).astype(dtype)
    return a, chunks


@pytest.mark.filterwarnings("ignore:This might be a color image:UserWarning")
@settings(max_examples=25, deadline=None)
@given(chunked())
def test_integer_histogram_equals_skimage(case):
    a, chunks = case
    h = histogram(da.from_array(a, chunks=chunks))
    counts, centers = sk_histogram(a)
    np.testing.assert_array_equal(h.counts, counts)
    np.testing.assert_array_equal(h.centers, centers)
    assert h.integer and h.n == a.size


@pytest.mark.filterwarnings("ignore:This might be a color image:UserWarning")
@settings(max_examples=15, deadline=None)
@given(chunked(dtypes=("float32", "float64")), st.sampled_from([16, 256, 4096]))
def test_float_histogram_equals_skimage_same_nbins(case, nbins):
    a, chunks = case
    h = histogram(da.from_array(a, chunks=chunks), nbins=nbins)
    counts, centers = sk_histogram(a, nbins=nbins)
    np.testing.assert_array_equal(h.counts, counts)
    np.testing.assert_array_equal(h.centers, centers)
    assert h.centers.dtype == centers.dtype


def test_mask_nodata_and_nan_are_left_out():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50, (40, 30)).astype(np.uint16)
    mask = rng.random(a.shape) < 0.6
    h = histogram(da.from_array(a, chunks=(7, 11)), mask=da.from_array(mask, chunks=(13, 5)), nodata=0)
    counts, centers = sk_histogram(a[mask & (a != 0)])
    np.testing.assert_array_equal(h.counts, counts)
    np.testing.assert_array_equal(h.centers, centers)

    f = rng.normal(size=(20, 20))
    f[3, :] = np.nan
    f[5, 5] = np.inf
    hf = histogram(da.from_array(f, chunks=6), nbins=64)
    cf, bf = sk_histogram(f[np.isfinite(f)], nbins=64)
    np.testing.assert_array_equal(hf.counts, cf)
    np.testing.assert_array_equal(hf.centers, bf)
    assert masked_mean(da.from_array(f, chunks=6)) == pytest.approx(np.mean(f[np.isfinite(f)]), rel=1e-12)


def test_value_range_and_errors():
    a = np.linspace(0, 1, 100).reshape(10, 10)
    h = histogram(da.from_array(a, chunks=3), nbins=10, value_range=(0.0, 0.5))
    np.testing.assert_array_equal(h.counts, np.histogram(a, bins=10, range=(0.0, 0.5))[0])
    with pytest.raises(InputError, match="no pixel"):
        histogram(da.from_array(np.zeros((4, 4), np.uint8), chunks=2), nodata=0)
    with pytest.raises(InputError, match="mask shape"):
        histogram(da.zeros((4, 4), dtype=np.uint8), mask=np.ones((3, 4), bool))
