"""Object steps after a method that makes classes act on connected components, as the user means.

Oracle: scikit-image / SciPy on the boolean mask of the whole image (or on each
class's mask), with objects that cross chunk borders.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import morphology

from tileseg.image import Image
from tileseg.methods import apply_method
from tileseg.postprocess import apply_postprocess

SHAPES = {2: (90, 77), 3: (26, 31, 29)}
CHUNKS = {2: (20, 33), 3: (9, 13, 11)}


def _blobs(ndim: int, seed: int = 0) -> np.ndarray:
    """Float image whose Otsu foreground has objects of many sizes and holes, across chunk borders."""
    rng = np.random.default_rng(seed)
    smooth = ndi.gaussian_filter(rng.random(SHAPES[ndim]), 1.6 if ndim == 2 else 1.2)
    return ((smooth - smooth.min()) / np.ptp(smooth)).astype(np.float32)


def _image(raw: np.ndarray) -> Image:
    axes = ("y", "x") if raw.ndim == 2 else ("z", "y", "x")
    return Image(da.from_array(raw, chunks=CHUNKS[raw.ndim]), axes=axes, spacing=(0.5,) * raw.ndim)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("step, params, oracle", [
    ("remove_small_objects", {"min_size_px": 12},
     lambda m: morphology.remove_small_objects(m, max_size=11)),
    ("remove_small_objects", {"min_size_phys": 3.0},  # pixels x 0.5^ndim
     None),
    ("remove_small_holes", {"min_size_px": 9}, lambda m: morphology.remove_small_holes(m, max_size=8)),
    ("fill_holes", {}, ndi.binary_fill_holes),
    ("keep_largest", {}, None),
])
def test_threshold_then_object_step_equals_skimage_on_the_mask(ndim, step, params, oracle):
    raw = _blobs(ndim)
    labels = apply_method(_image(raw), "otsu", {})
    assert labels.is_class_map and labels.class_names == ("background", "foreground")
    from skimage.filters import threshold_otsu

    mask = raw > threshold_otsu(raw)
    np.testing.assert_array_equal(labels.data.compute(), mask.astype(np.uint8))
    if step == "remove_small_objects" and "min_size_phys" in params:
        px = int(np.ceil(3.0 / 0.5**ndim))  # sizes strictly below 3.0 physical units go
        oracle = lambda m: morphology.remove_small_objects(m, max_size=px - 1)  # noqa: E731
    if step == "keep_largest":
        def oracle(m):
            lab, n = ndi.label(m)
            sizes = np.bincount(lab.ravel())[1:]
            return lab == 1 + int(np.argmax(sizes))
    out = apply_postprocess(labels, [{step: params}])
    expected = oracle(mask)
    assert out.dtype == np.uint8 and out.is_class_map
    np.testing.assert_array_equal(out.data.compute(), expected.astype(np.uint8))
    # the trap this guards against: the whole foreground is not one object
    assert int(expected.sum()) not in (0, int(mask.sum())) or step in ("fill_holes", "remove_small_holes")


def test_multi_class_map_is_cleaned_per_class():
    raw = _blobs(2, seed=3)
    classes = apply_method(_image(raw), "multi_otsu", {"classes": 3})
    assert classes.class_names == ("class_0", "class_1", "class_2")
    cm = classes.data.compute()
    out = apply_postprocess(classes, [{"remove_small_objects": {"min_size_px": 15}}]).data.compute()
    expected = cm.copy()
    for c in (1, 2):
        kept = morphology.remove_small_objects(cm == c, max_size=14)
        expected[(cm == c) & ~kept] = 0
    np.testing.assert_array_equal(out, expected)
    filled = apply_postprocess(classes, ["fill_holes"]).data.compute()
    exp = cm.copy()
    for c in (1, 2):
        holes = ndi.binary_fill_holes(cm == c) & ~(cm == c)
        exp[holes & (exp == 0)] = c
    np.testing.assert_array_equal(filled, exp)


def test_nodata_pixels_stay_and_take_no_part():
    raw = _blobs(2, seed=5)
    img = _image(raw)
    labels = apply_method(img, "otsu", {})
    with_nodata = labels.with_data(da.where(da.from_array(np.arange(77) < 5, chunks=33)[None, :],
                                            np.uint8(255), labels.data), nodata=255)
    out = apply_postprocess(with_nodata, [{"remove_small_objects": {"min_size_px": 12}}]).data.compute()
    assert (out[:, :5] == 255).all()
    mask = labels.data.compute().astype(bool)
    mask[:, :5] = False
    expected = morphology.remove_small_objects(mask, max_size=11)
    np.testing.assert_array_equal(out[:, 5:], expected[:, 5:].astype(np.uint8))


def test_instance_labels_with_one_label_warn_like_skimage():
    labels = np.zeros((20, 20), np.uint8)
    labels[2:5, 2:5] = 1
    labels[10:18, 10:18] = 1
    img = Image(da.from_array(labels, chunks=7), axes=("y", "x"))  # no class names: instance labels
    with pytest.warns(UserWarning, match="Only one label"):
        out = apply_postprocess(img, [{"remove_small_objects": {"min_size_px": 20}}])
    with pytest.warns(UserWarning, match="Only one label"):
        ref = morphology.remove_small_objects(labels, max_size=19)
    np.testing.assert_array_equal(out.data.compute(), ref)
