"""Object cleanup on chunks equals scikit-image / SciPy on the whole image."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.morphology as skm
from hypothesis import given, settings
from hypothesis import strategies as st

from tileseg.errors import ConfigError, InputError
from tileseg.postprocess import objects as O
from tileseg.testing.strategies import chunkings

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def masks(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(3, 30 if ndim == 2 else 12), min_size=ndim, max_size=ndim)))
    chunks = draw(chunkings(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    img = ndi.gaussian_filter(rng.random(shape), draw(st.sampled_from([0.0, 0.8, 1.5])))
    mask = img > np.quantile(img, draw(st.sampled_from([0.3, 0.5, 0.8])))
    return mask, chunks, draw(st.integers(1, ndim))


def _quiet(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return func(*args, **kwargs)


@SETTINGS
@given(masks(), st.integers(0, 40))
def test_remove_small_objects_equals_skimage(case, min_size):
    mask, chunks, conn = case
    got = O.remove_small_objects(da.from_array(mask, chunks=chunks), min_size_px=min_size, connectivity=conn)
    expected = skm.remove_small_objects(mask, max_size=min_size - 1, connectivity=conn) if min_size else mask
    assert got.dtype == bool
    np.testing.assert_array_equal(got.compute(), expected)


@SETTINGS
@given(masks(), st.integers(1, 40))
def test_remove_small_objects_on_labels_equals_skimage(case, min_size):
    mask, chunks, conn = case
    labels = ndi.label(mask, ndi.generate_binary_structure(mask.ndim, conn))[0].astype(np.uint16)
    labels[labels == 2] = 1  # one label made of two disconnected pieces counts as one object
    got = O.remove_small_objects(da.from_array(labels, chunks=chunks), min_size_px=min_size)
    assert got.dtype == labels.dtype
    np.testing.assert_array_equal(
        got.compute(), _quiet(skm.remove_small_objects, labels, max_size=min_size - 1)
    )


@SETTINGS
@given(masks(), st.integers(1, 40))
def test_remove_small_holes_equals_skimage(case, min_size):
    mask, chunks, conn = case
    got = O.remove_small_holes(da.from_array(mask, chunks=chunks), min_size_px=min_size, connectivity=conn)
    np.testing.assert_array_equal(
        got.compute(), skm.remove_small_holes(mask, max_size=min_size - 1, connectivity=conn)
    )


@SETTINGS
@given(masks())
def test_fill_holes_equals_scipy(case):
    mask, chunks, conn = case
    got = O.fill_holes(da.from_array(mask, chunks=chunks), connectivity=conn)
    expected = ndi.binary_fill_holes(mask, ndi.generate_binary_structure(mask.ndim, conn))
    np.testing.assert_array_equal(got.compute(), expected)


def test_hole_crossing_chunk_borders_is_filled_but_open_bay_is_not():
    mask = np.zeros((24, 24), bool)
    mask[2:14, 2:14] = True
    mask[5:11, 5:11] = False  # hole across the chunk corner at (8, 8)
    mask[16:22, 10:24] = True
    mask[18:20, 14:24] = False  # a bay open to the image border: not a hole
    got = O.fill_holes(da.from_array(mask, chunks=8)).compute()
    assert got[5:11, 5:11].all()
    assert not got[18:20, 14:24].any()
    np.testing.assert_array_equal(got, ndi.binary_fill_holes(mask))


def test_3d_hole_spanning_many_chunks_and_diagonal_leak():
    mask = np.ones((12, 12, 12), bool)
    mask[2:10, 2:10, 2:10] = False  # a cavity over 8 chunks of 6^3
    mask[1, 1, 1] = False  # touches the cavity only at a corner, and the border only at a corner
    mask[0, 0, 0] = False
    for conn in (1, 2, 3):
        got = O.fill_holes(da.from_array(mask, chunks=6), connectivity=conn).compute()
        np.testing.assert_array_equal(
            got, ndi.binary_fill_holes(mask, ndi.generate_binary_structure(3, conn))
        )
    # With full connectivity the cavity leaks to the border through the corner chain.
    assert not O.fill_holes(da.from_array(mask, chunks=6), connectivity=3).compute()[5, 5, 5]
    assert O.fill_holes(da.from_array(mask, chunks=6), connectivity=1).compute()[5, 5, 5]


def test_object_larger_than_a_chunk_is_kept_small_pieces_removed():
    mask = np.zeros((30, 30), bool)
    mask[3:27, 12:15] = True  # 72 pixels over 3 chunk rows, each piece < 30
    mask[1, 1] = mask[28, 28] = True
    got = O.remove_small_objects(da.from_array(mask, chunks=10), min_size_px=30).compute()
    expected = mask.copy()
    expected[1, 1] = expected[28, 28] = False
    np.testing.assert_array_equal(got, expected)


def test_physical_size_uses_spacing():
    mask = np.zeros((10, 20), bool)
    mask[1:3, 1:3] = True  # 4 px = 4 * 0.5 * 2.0 = 4.0 units
    mask[5:8, 5:8] = True  # 9 px = 9.0 units
    x = da.from_array(mask, chunks=4)
    got = O.remove_small_objects(x, min_size_phys=5.0, spacing=(0.5, 2.0)).compute()
    np.testing.assert_array_equal(got, skm.remove_small_objects(mask, max_size=4))
    got = O.remove_small_objects(x, min_size_phys=4.0, spacing=(0.5, 2.0)).compute()
    np.testing.assert_array_equal(got, mask)  # 4.0 is not < 4.0
    got = O.remove_small_objects(x, min_size_phys=4.5, spacing=(0.25, 1.0)).compute()  # px * 0.25
    np.testing.assert_array_equal(got, skm.remove_small_objects(mask, max_size=17))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one"),
        ({"min_size_px": 3, "min_size_phys": 2.0, "spacing": (1, 1)}, "exactly one"),
        ({"min_size_phys": 2.0}, "spacing"),
        ({"min_size_phys": 2.0, "spacing": (1.0,)}, "spacing"),
        ({"min_size_phys": 2.0, "spacing": (1.0, -1.0)}, "spacing"),
        ({"min_size_px": -1}, "min_size_px"),
        ({"min_size_px": 2.5}, "min_size_px"),
    ],
)
def test_size_parameter_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        O.remove_small_objects(da.zeros((4, 4), dtype=bool, chunks=2), **kwargs)


def test_negative_labels_rejected():
    with pytest.raises(InputError, match="negative"):
        O.remove_small_objects(da.from_array(np.array([[0, -1], [2, 2]]), chunks=1), min_size_px=2)


def _largest_reference(mask, conn):
    lab, n = ndi.label(mask, ndi.generate_binary_structure(mask.ndim, conn))
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == np.argmax(sizes)  # ties: lowest label = first in raster order


@SETTINGS
@given(masks())
def test_keep_largest_mask(case):
    mask, chunks, conn = case
    got = O.keep_largest(da.from_array(mask, chunks=chunks), connectivity=conn)
    np.testing.assert_array_equal(got.compute(), _largest_reference(mask, conn))


@SETTINGS
@given(st.integers(0, 2**16), st.sampled_from([(4, 5), (7, 7), (3, 11)]), st.integers(1, 2), st.booleans())
def test_keep_largest_per_class(seed, chunks, conn, per_class):
    rng = np.random.default_rng(seed)
    cls = ndi.zoom(rng.integers(0, 4, (7, 6)), 3, order=0).astype(np.uint8)[:20, :17]
    got = O.keep_largest(da.from_array(cls, chunks=chunks), per_class=per_class, connectivity=conn).compute()
    assert got.dtype == np.uint8
    if per_class:
        expected = np.zeros_like(cls)
        for v in range(1, 4):
            expected[_largest_reference(cls == v, conn)] = v
    else:
        expected = np.where(_largest_reference(cls != 0, conn), cls, 0)
    np.testing.assert_array_equal(got, expected)


def test_keep_largest_tie_goes_to_first_in_raster_order():
    mask = np.zeros((6, 6), bool)
    mask[4:6, 4:6] = True
    mask[0:2, 0:2] = True
    got = O.keep_largest(da.from_array(mask, chunks=3)).compute()
    assert got[0, 0] and not got[5, 5]


def test_label_step_returns_labels():
    mask = np.eye(6, dtype=bool)
    got = O.label_step(da.from_array(mask, chunks=2), spacing=(1.0, 1.0), connectivity=2).compute()
    np.testing.assert_array_equal(got, ndi.label(mask, np.ones((3, 3)))[0])
