"""Chunked morphology equals scikit-image / SciPy on the whole image."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.morphology as skm
from hypothesis import given, settings
from hypothesis import strategies as st

from tileseg.errors import ConfigError
from tileseg.postprocess import morphology as M
from tileseg.testing.strategies import chunkings

SETTINGS = settings(max_examples=25, deadline=None)

BINARY = {
    "binary_erosion": skm.binary_erosion,
    "binary_dilation": skm.binary_dilation,
    "binary_opening": skm.binary_opening,
    "binary_closing": skm.binary_closing,
}
GREY = {
    "grey_erosion": skm.erosion,
    "grey_dilation": skm.dilation,
    "grey_opening": skm.opening,
    "grey_closing": skm.closing,
}


@st.composite
def images(draw, dtype):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(4, 30 if ndim == 2 else 11), min_size=ndim, max_size=ndim)))
    chunks = draw(chunkings(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if dtype == "bool":
        img = ndi.gaussian_filter(rng.random(shape), draw(st.sampled_from([0.5, 1.0, 2.0]))) > 0.5
    elif dtype == "uint8":
        img = rng.integers(0, 256, shape).astype(np.uint8)
    else:
        img = rng.normal(size=shape).astype(np.float32)
    return img, chunks


def _skimage(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # binary_* are deprecated in 0.26
        return func(*args, **kwargs)


@SETTINGS
@given(
    images("bool"),
    st.sampled_from(sorted(BINARY)),
    st.sampled_from(["ball", "disk", "box"]),
    st.integers(0, 3),
    st.sampled_from(["ignore", "min", "max"]),
)
def test_binary_equals_skimage(case, name, kind, radius, mode):
    mask, chunks = case
    fp = M.make_footprint(mask.ndim, kind, radius)
    got = getattr(M, name)(da.from_array(mask, chunks=chunks), footprint=kind, radius=radius, mode=mode)
    assert got.dtype == bool
    np.testing.assert_array_equal(got.compute(), _skimage(BINARY[name], mask, fp, mode=mode))


@SETTINGS
@given(
    images("uint8") | images("float32"),
    st.sampled_from(sorted(GREY)),
    st.sampled_from(["ball", "disk", "box"]),
    st.integers(1, 3),
    st.sampled_from(["reflect", "constant", "nearest", "mirror", "wrap", "ignore", "max", "min"]),
)
def test_grey_equals_skimage(case, name, kind, radius, mode):
    img, chunks = case
    fp = M.make_footprint(img.ndim, kind, radius)
    got = getattr(M, name)(
        da.from_array(img, chunks=chunks), footprint=kind, radius=radius, mode=mode, cval=3
    )
    assert got.dtype == img.dtype
    np.testing.assert_array_equal(got.compute(), GREY[name](img, fp, mode=mode, cval=3))


@pytest.mark.parametrize("name", sorted(GREY))
def test_asymmetric_explicit_footprint_follows_skimage(name):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 100, (23, 19)).astype(np.int16)
    fp = np.array([[0, 1, 1], [0, 1, 0], [1, 1, 0]], bool)
    got = getattr(M, name)(da.from_array(img, chunks=(5, 6)), footprint=fp)
    np.testing.assert_array_equal(got.compute(), GREY[name](img, fp))


def test_binary_min_mode_equals_scipy_border_value_zero():
    rng = np.random.default_rng(1)
    mask = ndi.gaussian_filter(rng.random((20, 21, 22)), 1.5) > 0.45
    fp = M.make_footprint(3, "ball", 2)
    got = M.binary_erosion(da.from_array(mask, chunks=(6, 7, 5)), footprint="ball", radius=2, mode="min")
    np.testing.assert_array_equal(got.compute(), ndi.binary_erosion(mask, fp, border_value=0))


@pytest.mark.parametrize("radius", range(0, 9))
def test_ball_and_disk_footprints_equal_skimage(radius):
    np.testing.assert_array_equal(M.make_footprint(2, "ball", radius), skm.disk(radius).astype(bool))
    np.testing.assert_array_equal(M.make_footprint(3, "ball", radius), skm.ball(radius).astype(bool))
    np.testing.assert_array_equal(M.make_footprint(3, "disk", radius), skm.disk(radius).astype(bool)[None])


def test_footprints():
    assert M.make_footprint(3, "ball", 2).shape == (5, 5, 5)
    np.testing.assert_array_equal(M.make_footprint(2, "ball", 2), skm.disk(2).astype(bool))
    np.testing.assert_array_equal(M.make_footprint(3, "disk", 1)[0], skm.disk(1).astype(bool))
    assert M.make_footprint(3, "disk", 1).shape == (1, 3, 3)
    assert M.make_footprint(2, "box", 3).all() and M.make_footprint(2, "box", 3).shape == (7, 7)
    assert M.make_footprint(3, "box", 0).shape == (1, 1, 1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"footprint": "sphere"}, "unknown footprint"),
        ({"radius": -1}, "radius"),
        ({"radius": 1.5}, "radius"),
        ({"footprint": np.ones((2, 3))}, "odd size"),
        ({"mode": "reflect"}, "binary morphology mode"),
    ],
)
def test_bad_parameters_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        M.binary_erosion(da.zeros((5, 5), dtype=bool, chunks=2), **kwargs)


def test_grey_unknown_mode():
    with pytest.raises(ConfigError, match="greyscale morphology mode"):
        M.grey_erosion(da.zeros((5, 5), chunks=2), mode="periodic")


def test_dilation_of_a_pixel_at_a_chunk_corner_crosses_into_all_neighbours():
    mask = np.zeros((20, 20, 20), bool)
    mask[9, 9, 9] = True  # last voxel of chunk (0, 0, 0)
    got = M.binary_dilation(da.from_array(mask, chunks=10), footprint="box", radius=3).compute()
    expected = np.zeros_like(mask)
    expected[6:13, 6:13, 6:13] = True  # spans all 8 chunks
    np.testing.assert_array_equal(got, expected)
    back = M.binary_erosion(da.from_array(got, chunks=(10, 7, 10)), footprint="box", radius=3).compute()
    np.testing.assert_array_equal(back, mask)
