"""Post-process steps leave nodata alone: those pixels take no part and stay nodata.

Oracle: scikit-image / SciPy on the whole image with the same treatment done
by hand (nodata pixels set to the value that makes them "outside" before each
erosion or dilation, left out of labelling and holes, then written back). The
images are structured: blobs with holes, crossed by nodata regions (an edge
band, a diagonal stripe, an interior island) that touch objects and cut
through chunk borders, under several chunkings in 2D and 3D.
"""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.morphology as skm
from hypothesis import given, settings
from hypothesis import strategies as st

from tileseg.errors import InputError
from tileseg.image import Image
from tileseg.postprocess import apply_postprocess
from tileseg.postprocess import morphology as M
from tileseg.postprocess import objects as O
from tileseg.testing.strategies import chunkings

NODATA = 255
LABEL_NODATA = -1  # the nodata of `label` results (README, "Nodata in post-processing")
SHAPES = {2: (61, 67), 3: (19, 23, 21)}
CHUNKINGS = {
    2: [(13, 17), (30, 67), (61, 9), ((5, 40, 16), (33, 1, 33))],
    3: [(7, 9, 8), (19, 5, 21), ((3, 16), (11, 12), (20, 1))],
}
CASES = [(ndim, chunks) for ndim in (2, 3) for chunks in CHUNKINGS[ndim]]


def _scene(ndim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(foreground, invalid)``: blobs of many sizes with holes; nodata at an edge band, a diagonal
    stripe and an interior island, all touching blobs and crossing chunk borders."""
    shape = SHAPES[ndim]
    rng = np.random.default_rng(seed)
    smooth = ndi.gaussian_filter(rng.random(shape), 1.5 if ndim == 2 else 1.2)
    fg = smooth > np.quantile(smooth, 0.55)
    grid = np.indices(shape)
    invalid = grid[-1] < 4  # an edge band
    invalid |= np.abs(grid[-1] - grid[-2] - 10) <= 1  # a diagonal stripe
    centre = [s // 2 for s in shape]
    invalid |= sum((g - c) ** 2 for g, c in zip(grid, centre)) <= 16  # an interior island
    assert fg[invalid].any() and (~fg[invalid]).any()
    return fg, invalid


def _class_map(fg: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    out = fg.astype(np.uint8)
    out[invalid] = NODATA
    return out


def _image(data: np.ndarray, chunks, *, class_map: bool = True, nodata=NODATA) -> Image:
    axes = ("y", "x") if data.ndim == 2 else ("z", "y", "x")
    return Image(da.from_array(data, chunks=chunks), axes=axes, nodata=nodata,
                 class_names=("background", "foreground") if class_map else None)


def _skimage(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # binary_* are deprecated in 0.26
        return func(*args, **kwargs)


# ------------------------------------------------------------------ oracles (whole image, by hand)
BINARY_OPS = {"erosion": ("erode",), "dilation": ("dilate",), "opening": ("erode", "dilate"),
              "closing": ("dilate", "erode")}


def _binary_by_hand(name: str, fg: np.ndarray, invalid: np.ndarray, fp: np.ndarray, mode: str = "ignore"):
    """Each erosion/dilation with nodata set to the border value scikit-image uses outside the image."""
    x = fg.copy()
    for op in BINARY_OPS[name]:
        border = mode != "min" if op == "erode" else mode == "max"
        x[invalid] = border
        func = skm.binary_erosion if op == "erode" else skm.binary_dilation
        x = _skimage(func, x, fp, mode=mode)
    out = x.astype(np.uint8)
    out[invalid] = NODATA
    return out


GREY_OPS = {"grey_erosion": ("min",), "grey_dilation": ("max",), "grey_opening": ("min", "max"),
            "grey_closing": ("max", "min")}


def _grey_by_hand(name: str, data: np.ndarray, invalid: np.ndarray, fp: np.ndarray, nodata, mode: str):
    """Each minimum/maximum with nodata replaced by the neutral element, then nodata written back."""
    x = data.copy()
    for op in GREY_OPS[name]:
        if x.dtype.kind == "f":
            x[invalid] = np.inf if op == "min" else -np.inf
        else:
            x[invalid] = np.iinfo(x.dtype).max if op == "min" else np.iinfo(x.dtype).min
        x = (skm.erosion if op == "min" else skm.dilation)(x, fp, mode=mode)
    x[invalid] = nodata
    return x


def _label_by_hand(fg: np.ndarray, invalid: np.ndarray, connectivity: int) -> np.ndarray:
    lab = ndi.label(fg & ~invalid, ndi.generate_binary_structure(fg.ndim, connectivity))[0].astype(np.int64)
    lab[invalid] = LABEL_NODATA
    return lab


def _fill_holes_by_hand(fg: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    """Background components touching the border or a nodata pixel are no holes."""
    fg = fg & ~invalid
    lab, _ = ndi.label(~fg)
    border = np.zeros_like(fg)
    for ax in range(fg.ndim):
        border[(slice(None),) * ax + (0,)] = True
        border[(slice(None),) * ax + (-1,)] = True
    outside = np.unique(lab[(border | invalid) & (lab > 0)])
    out = (fg | ~np.isin(lab, outside)).astype(np.uint8)
    out[invalid] = NODATA
    return out


# ------------------------------------------------------------------ binary morphology
@pytest.mark.parametrize("ndim, chunks", CASES)
@pytest.mark.parametrize("name", sorted(BINARY_OPS))
def test_binary_morphology_treats_nodata_as_outside(ndim, chunks, name):
    fg, invalid = _scene(ndim, seed=ndim)
    fp = M.make_footprint(ndim, "ball", 2)
    expected = _binary_by_hand(name, fg, invalid, fp)
    for class_map in (True, False):  # a class map, and a 0/1 mask without class names
        out = apply_postprocess(_image(_class_map(fg, invalid), chunks, class_map=class_map),
                                [{name: {"footprint": "ball", "radius": 2}}])
        assert out.nodata == NODATA and out.dtype == np.uint8
        assert out.class_names == (("background", "foreground") if class_map else None)
        np.testing.assert_array_equal(out.data.compute(), expected)
    # the trap: nodata as background lets an erosion eat objects from a nodata edge; nodata as foreground
    # (its value 255 is nonzero) lets a dilation grow objects out of it
    as_value = name in ("erosion", "opening")
    naive = _binary_by_hand(name, np.where(invalid, not as_value, fg), np.zeros_like(invalid), fp)
    assert (expected[~invalid] != naive[~invalid]).any()


@pytest.mark.parametrize("mode", ["ignore", "min", "max"])
def test_binary_modes_apply_to_nodata_as_to_the_border(mode):
    fg, invalid = _scene(2, seed=7)
    fp = M.make_footprint(2, "box", 1)
    data = da.from_array(_class_map(fg, invalid), chunks=(17, 20))
    for name, func in (("opening", M.binary_opening), ("closing", M.binary_closing)):
        got = func(data, footprint="box", radius=1, mode=mode, nodata=NODATA)
        np.testing.assert_array_equal(got.compute(), _binary_by_hand(name, fg, invalid, fp, mode))


def test_mask_results_refuse_nodata_they_cannot_hold():
    m = da.zeros((6, 6), dtype=bool, chunks=3)
    with pytest.raises(InputError, match="boolean mask cannot hold nodata"):
        M.binary_erosion(m, nodata=255)
    with pytest.raises(InputError, match="nodata 1 collides"):
        O.fill_holes(m.astype(np.uint8), nodata=1)


# ------------------------------------------------------------------ grey morphology
@pytest.mark.parametrize("ndim, chunks", CASES)
@pytest.mark.parametrize("name", sorted(GREY_OPS))
def test_grey_morphology_ignores_nodata(ndim, chunks, name):
    fg, invalid = _scene(ndim, seed=3)
    rng = np.random.default_rng(ndim)
    raw = (ndi.gaussian_filter(rng.random(SHAPES[ndim]), 2) * 2000).astype(np.uint16)
    raw[invalid] = 65535  # the largest value: without care it wins every dilation
    fp = M.make_footprint(ndim, "ball", 2)
    out = apply_postprocess(_image(raw, chunks, class_map=False, nodata=65535), [{name: {"radius": 2}}])
    assert out.nodata == 65535 and out.dtype == np.uint16
    np.testing.assert_array_equal(out.data.compute(), _grey_by_hand(name, raw, invalid, fp, 65535, "reflect"))


@pytest.mark.parametrize("mode", ["reflect", "constant", "nearest", "wrap", "ignore"])
def test_grey_nan_nodata_on_floats(mode):
    fg, invalid = _scene(2, seed=4)
    raw = ndi.gaussian_filter(np.random.default_rng(4).normal(size=SHAPES[2]), 1.5).astype(np.float32)
    raw[invalid] = np.nan
    fp = M.make_footprint(2, "disk", 2)
    for name in ("grey_opening", "grey_closing"):
        got = getattr(M, name)(da.from_array(raw, chunks=(20, 23)), footprint="disk", radius=2, mode=mode,
                               nodata=float("nan"))
        expected = _grey_by_hand(name, raw, invalid, fp, np.nan, "max" if mode == "ignore" else mode)
        if mode == "ignore":  # scikit-image's "ignore": the outside never wins (max for erosion, min for dilation)
            expected = _grey_ignore_by_hand(name, raw, invalid, fp)
        np.testing.assert_array_equal(got.compute(), expected)


def _grey_ignore_by_hand(name, data, invalid, fp):
    x = data.copy()
    for op in GREY_OPS[name]:
        x[invalid] = np.inf if op == "min" else -np.inf
        x = (skm.erosion if op == "min" else skm.dilation)(x, fp, mode="ignore")
    x[invalid] = np.nan
    return x


# ------------------------------------------------------------------ label
@pytest.mark.parametrize("ndim, chunks", CASES)
@pytest.mark.parametrize("connectivity", [1, 2])
def test_label_never_labels_nor_joins_through_nodata(ndim, chunks, connectivity):
    fg, invalid = _scene(ndim, seed=5)
    expected = _label_by_hand(fg, invalid, connectivity)
    # the stripe separates objects that nodata pixels of value 255 would otherwise join
    assert expected.max() < ndi.label(fg | invalid, ndi.generate_binary_structure(ndim, connectivity))[1] + \
        ndi.label(fg & ~invalid)[1]
    for class_map in (True, False):
        out = apply_postprocess(_image(_class_map(fg, invalid), chunks, class_map=class_map),
                                [{"label": {"connectivity": connectivity}}])
        assert out.dtype == np.int64 and out.nodata == LABEL_NODATA and out.class_names is None
        np.testing.assert_array_equal(out.data.compute(), expected)


@pytest.mark.parametrize("ndim, chunks", CASES)
def test_small_objects_then_label_keep_nodata_and_the_labels_go_on_through_object_steps(ndim, chunks):
    fg, invalid = _scene(ndim, seed=6)
    steps = [{"remove_small_objects": {"min_size_px": 9}}, "label"]
    out = apply_postprocess(_image(_class_map(fg, invalid), chunks), steps)
    kept = skm.remove_small_objects(fg & ~invalid, max_size=8)
    assert out.nodata == LABEL_NODATA
    np.testing.assert_array_equal(out.data.compute(), _label_by_hand(kept, invalid, 1))
    # instance labels with nodata -1 go on through the object steps: -1 is neither an object nor negative input
    again = apply_postprocess(out, [{"remove_small_objects": {"min_size_px": 30}}])
    lab = _label_by_hand(kept, invalid, 1)
    expected = skm.remove_small_objects(np.where(invalid, 0, lab), max_size=29)
    assert 0 < len(np.unique(expected)) - 1 < lab.max()
    expected[invalid] = LABEL_NODATA
    assert again.nodata == LABEL_NODATA
    np.testing.assert_array_equal(again.data.compute(), expected)


# ------------------------------------------------------------------ holes, small objects, largest
@pytest.mark.parametrize("ndim, chunks", CASES)
def test_fill_holes_background_touching_nodata_is_no_hole(ndim, chunks):
    fg, invalid = _scene(ndim, seed=8)
    # an object enclosing a cavity of background around a nodata island (clear of the other nodata)
    outer, cavity, island = {
        2: ((slice(40, 57), slice(8, 25)), (slice(44, 53), slice(12, 21)), (slice(47, 50), slice(15, 18))),
        3: ((slice(1, 8), slice(15, 23), slice(4, 15)), (slice(2, 7), slice(17, 21), slice(6, 13)),
            (slice(3, 6), slice(18, 20), slice(8, 11))),
    }[ndim]
    fg[outer], fg[cavity], invalid[island] = True, False, True
    expected = _fill_holes_by_hand(fg, invalid)
    for class_map in (True, False):
        out = apply_postprocess(_image(_class_map(fg, invalid), chunks, class_map=class_map), ["fill_holes"])
        assert out.nodata == NODATA and out.dtype == np.uint8
        np.testing.assert_array_equal(out.data.compute(), expected)
    # the cavity is no hole: it touches nodata, whose content is unknown
    naive = ndi.binary_fill_holes(fg & ~invalid)
    assert (naive & ~invalid & ~expected.astype(bool)).any()


@pytest.mark.parametrize("ndim, chunks", CASES)
def test_remove_small_holes_counts_valid_pixels_only(ndim, chunks):
    fg, invalid = _scene(ndim, seed=9)
    expected = skm.remove_small_holes(fg | invalid, max_size=11).astype(np.uint8)  # nodata bounds holes
    expected[invalid] = NODATA
    for class_map in (True, False):
        out = apply_postprocess(_image(_class_map(fg, invalid), chunks, class_map=class_map),
                                [{"remove_small_holes": {"min_size_px": 12}}])
        assert out.nodata == NODATA
        np.testing.assert_array_equal(out.data.compute(), expected)


def test_multi_class_map_with_nodata():
    """Three classes, nodata 255: every step keeps nodata and matches the per-class treatment by hand."""
    fg, invalid = _scene(2, seed=10)
    rng = np.random.default_rng(10)
    cls = np.where(fg, 1 + (ndi.gaussian_filter(rng.random(fg.shape), 3) > 0.5), 0).astype(np.uint8)
    cls[invalid] = NODATA
    img = Image(da.from_array(cls, chunks=(14, 19)), axes=("y", "x"), nodata=NODATA,
                class_names=("a", "b", "c"))
    out = apply_postprocess(img, ["keep_largest"]).data.compute()
    expected = np.zeros_like(cls)
    for c in (1, 2):
        lab, n = ndi.label(cls == c)
        if n:
            expected[lab == 1 + np.argmax(np.bincount(lab.ravel())[1:])] = c
    expected[invalid] = NODATA
    np.testing.assert_array_equal(out, expected)


# ------------------------------------------------------------------ scores -> classes
def test_argmax_and_threshold_of_nodata_scores_are_nodata():
    fg, invalid = _scene(2, seed=11)
    rng = np.random.default_rng(11)
    prob = ndi.gaussian_filter(rng.random((3,) + SHAPES[2]), (0, 2, 2)).astype(np.float32)
    prob[:, invalid] = np.nan
    img = Image(da.from_array(prob, chunks=(3, 20, 30)), axes=("c", "y", "x"), nodata=float("nan"))
    out = apply_postprocess(img, ["argmax"])
    assert out.is_class_map and out.nodata == 255 and out.dtype == np.uint8
    expected = np.argmax(np.nan_to_num(prob), axis=0).astype(np.uint8)
    expected[invalid] = 255
    np.testing.assert_array_equal(out.data.compute(), expected)
    one = img.with_data(img.data[:1])
    out = apply_postprocess(one, [{"threshold": {"value": 0.5}}, "label"])
    assert out.nodata == LABEL_NODATA
    np.testing.assert_array_equal(out.data.compute(), _label_by_hand(prob[0] > 0.5, invalid, 1))


def test_without_nodata_nothing_changes():
    fg, invalid = _scene(2, seed=12)
    img = Image(da.from_array(fg.astype(np.uint8), chunks=(20, 20)), axes=("y", "x"),
                class_names=("background", "foreground"))
    out = apply_postprocess(img, ["opening", "label"])
    assert out.nodata is None
    opened = _skimage(skm.binary_opening, fg, M.make_footprint(2, "ball", 1))
    np.testing.assert_array_equal(out.data.compute(), ndi.label(opened)[0])


@st.composite
def _chunked_scenes(draw):
    ndim = draw(st.sampled_from([2, 3]))
    return ndim, draw(st.integers(0, 2**16)), draw(chunkings(SHAPES[ndim]))


@settings(max_examples=15, deadline=None)
@given(_chunked_scenes(), st.sampled_from(sorted(BINARY_OPS)), st.integers(1, 2))
def test_random_chunkings_binary_step_then_label(case, name, radius):
    """Under irregular chunkings: a binary step then label equal the whole-image treatment by hand."""
    ndim, seed, chunks = case
    fg, invalid = _scene(ndim, seed=seed)
    fp = M.make_footprint(ndim, "ball", radius)
    stepped = _binary_by_hand(name, fg, invalid, fp)
    out = apply_postprocess(_image(_class_map(fg, invalid), chunks),
                            [{name: {"radius": radius}}, {"label": {"connectivity": ndim}}])
    np.testing.assert_array_equal(out.data.compute(), _label_by_hand(stepped == 1, invalid, ndim))
