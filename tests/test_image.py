"""The image model: geometry fields, conventions, with_data, validity, axes."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from tileseg import geometry
from tileseg.image import Image, as_image, geometry_from_attrs, label_dtype, parse_axes


def _img(shape=(2, 30, 40), **kw):
    data = da.from_array(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), chunks=(1, 16, 16))
    return Image(data, axes=("c", "y", "x"), **kw)


def test_defaults_and_validation():
    img = _img()
    assert img.spacing == (1.0, 1.0) and img.origin == (0.0, 0.0) and img.units == (None, None)
    assert img.direction == ((1.0, 0.0), (0.0, 1.0))
    assert img.crs is None and img.transform is None and img.nodata is None and img.class_names is None
    assert img.spatial_shape == (30, 40) and img.spatial_axes == ("y", "x")
    with pytest.raises(ValueError, match="spacing"):
        _img(spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="2 entries"):
        _img(origin=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="unit vectors"):
        _img(direction=((2.0, 0.0), (0.0, 1.0)))
    with pytest.raises(ValueError, match="degenerate"):
        _img(transform=(0, 0, 1, 0, 0, 1))
    with pytest.raises(ValueError, match="mask shape"):
        _img(mask=da.ones((30, 41), dtype=bool))
    with pytest.raises(ValueError, match="expected optional 'c' first"):
        Image(da.zeros((4, 5, 6)), axes=("x", "y", "z"))


def test_affine_and_centre_origin_convert_both_ways():
    """rasterio's affine maps pixel corners; origin is the first pixel's centre."""
    t = (30.0, 0.0, 500000.0, 0.0, -30.0, 4000030.0)
    spacing, origin = geometry.grid_from_affine(t)
    assert spacing == (30.0, 30.0) and origin == (4000015.0, 500015.0)
    assert geometry.affine_from_grid(spacing, origin) == t
    # the centre of pixel (row 2, col 3) through the affine equals origin + index * step
    a, b, c, d, e, f = t
    col, row = 3 + 0.5, 2 + 0.5
    assert (a * col + b * row + c, d * col + e * row + f) == (origin[1] + 3 * 30.0, origin[0] - 2 * 30.0)
    rotated = (20.0, 5.0, 100.0, 5.0, -20.0, 900.0)
    sp, og = geometry.grid_from_affine(rotated)
    assert sp == pytest.approx((np.hypot(5, 20), np.hypot(20, 5)))
    assert og == pytest.approx((900 + 2.5 - 10, 100 + 10 + 2.5))
    assert _img(transform=t).affine == t
    assert _img(spacing=(30.0, 30.0), origin=(4000015.0, 500015.0)).affine == t


def test_with_data_derives_shape_and_drops_reader_facts():
    img = _img(spacing=(0.5, 2.0), crs="EPSG:32621", nodata=-1.0, mask=da.ones((30, 40), dtype=bool),
               attrs={"k": 1}, reader_info={"chunks": (1, 16, 16), "dtype": "float32"})
    labels = (img.data[0] > 3).astype(np.uint8)
    out = img.with_data(labels, class_names=("bg", "fg"))
    assert out.axes == ("y", "x") and out.shape == (30, 40) and out.dtype == np.uint8
    assert out.spacing == (0.5, 2.0) and out.crs == "EPSG:32621" and out.attrs == {"k": 1}
    assert out.reader_info == {}  # the reader's facts about the input are not the output's
    assert out.nodata is None  # -1.0 means nothing in a uint8 class map
    assert out.mask is not None and out.is_class_map
    probs = img.with_data(img.data * 0.5)
    assert probs.nodata == -1.0 and probs.axes == ("c", "y", "x") and not probs.is_class_map
    small = img.with_data(img.data[:, :10])
    assert small.mask is None


def test_valid_combines_mask_and_nodata():
    raw = np.array([[[1, 0, 3], [0, 5, 6]], [[1, 0, 0], [4, 5, 6]]], dtype=np.uint16)
    mask = np.array([[True, True, True], [True, True, False]])
    img = Image(da.from_array(raw), axes=("c", "y", "x"), nodata=0, mask=da.from_array(mask))
    expected = mask & ~(raw == 0).all(axis=0)  # GDAL's rule: nodata only where every band is
    assert not expected[0, 1] and expected[1, 0] and expected[0, 2]
    np.testing.assert_array_equal(img.valid().compute(), expected)
    nan = np.array([[1.0, np.nan], [2.0, 3.0]], dtype=np.float32)
    img2 = Image(da.from_array(nan), axes=("y", "x"), nodata=float("nan"))
    np.testing.assert_array_equal(img2.valid().compute(), ~np.isnan(nan))
    assert Image(da.zeros((3, 3)), axes=("y", "x")).valid() is None


def test_geometry_attrs_round_trip_and_json():
    import json

    img = _img(direction=((0.0, 1.0), (1.0, 0.0)), crs="EPSG:4326", transform=(1, 0, 0, 0, -1, 0),
               nodata=float("nan"), class_names=("a", "b"))
    attrs = json.loads(json.dumps(img.geometry_attrs(), allow_nan=False))
    back = geometry_from_attrs(attrs)
    assert back["direction"] == [[0.0, 1.0], [1.0, 0.0]] and back["crs"] == "EPSG:4326"
    assert np.isnan(back["nodata"]) and back["class_names"] == ["a", "b"]


def test_axes_option_reorders_lazily():
    raw = np.arange(2 * 3 * 4).reshape(3, 4, 2)  # y, x, c
    img = as_image(raw, axes="yxc")
    assert img.axes == ("c", "y", "x")
    np.testing.assert_array_equal(img.data.compute(), np.moveaxis(raw, -1, 0))
    img = as_image(raw[None], axes="tyxc")
    assert img.axes == ("c", "y", "x")
    assert as_image(np.zeros((1, 5, 6)), axes="cyx").axes == ("c", "y", "x")
    assert as_image(np.zeros((1, 5, 6))).axes == ("z", "y", "x")  # without axes: a thin volume
    with pytest.raises(ValueError, match="at most once"):
        parse_axes("yyx")
    with pytest.raises(ValueError, match="time points"):
        as_image(np.zeros((2, 5, 6)), axes="tyx")


def test_label_dtype():
    assert label_dtype(1) == np.uint8 and label_dtype(256) == np.uint8
    assert label_dtype(257) == np.uint16 and label_dtype(70000) == np.uint32


def test_world_affine_matches_the_index_to_physical_rule_and_inverts():
    """origin + (p * spacing) @ direction in (z, y, x) order equals the 4x4 index -> LPS affine, reversed."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_euler("zyx", [20, -35, 10], degrees=True).as_matrix()
    spacing, origin = (2.5, 0.7, 0.9), (-120.0, 33.0, 7.5)
    a = np.asarray(geometry.world_affine(spacing, origin, rot))
    p = np.array([4.0, 11.0, 3.0])  # (z, y, x) index
    physical = np.asarray(origin) + (p * np.asarray(spacing)) @ rot
    lps = a @ np.array([p[2], p[1], p[0], 1.0])
    np.testing.assert_allclose(lps[:3], physical[::-1])
    sp, og, dr = geometry.geometry_from_world_affine(a)
    np.testing.assert_allclose(sp, spacing)
    np.testing.assert_allclose(og, origin)
    np.testing.assert_allclose(dr, rot, atol=1e-12)
