"""Post-processing steps are registered and chain like the functions they wrap."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.morphology as skm

from tileseg import registry
from tileseg.errors import ConfigError, PluginError
from tileseg.postprocess import STEPS, apply_postprocess

NAMES = {
    "argmax", "threshold", "erosion", "dilation", "opening", "closing", "grey_erosion", "grey_dilation",
    "grey_opening", "grey_closing", "fill_holes", "remove_small_objects", "remove_small_holes",
    "keep_largest", "label",
}  # fmt: skip


def test_all_steps_registered_and_loadable():
    assert set(STEPS) == NAMES
    assert NAMES <= set(registry.available("postprocess"))
    for name in NAMES:
        assert callable(registry.get("postprocess", name))


def test_pipeline_chain_equals_whole_image_reference():
    rng = np.random.default_rng(0)
    prob = ndi.gaussian_filter(rng.random((1, 40, 44)), (0, 2, 2))
    steps = [
        {"threshold": {"value": 0.5}},
        {"opening": {"footprint": "disk", "radius": 1}},
        {"remove_small_objects": {"min_size_phys": 8.0}},
        "fill_holes",
        {"label": {"connectivity": 2}},
    ]
    got = apply_postprocess(da.from_array(prob, chunks=(1, 9, 10)), steps, spacing=(0.5, 1.0)).compute()
    mask = prob[0] > 0.5
    with pytest.warns(FutureWarning):
        mask = skm.binary_opening(mask, skm.disk(1))
    mask = skm.remove_small_objects(mask, max_size=15)  # 16 px * 0.5 = 8.0 is kept
    mask = ndi.binary_fill_holes(mask)
    np.testing.assert_array_equal(got, ndi.label(mask, np.ones((3, 3)))[0])


def test_unknown_step_lists_installed():
    with pytest.raises(PluginError, match="did you mean 'opening'"):
        apply_postprocess(da.zeros((4, 4), chunks=2), ["openin"])


@pytest.mark.parametrize(
    "steps,match",
    [
        ([{"opening": {"radiuss": 2}}], r"postprocess\[0\]\.opening: .*radiuss"),
        ([{"fill_holes": {}}, {"erosion": {"mode": "x"}}], r"postprocess\[1\]\.erosion: .*mode"),
        ([{"opening": {"spacing": [1, 1]}}], "spacing"),
        ([{"a": 1, "b": 2}], r"postprocess\[0\]"),
    ],
)
def test_bad_step_config(steps, match):
    with pytest.raises(ConfigError, match=match):
        apply_postprocess(da.zeros((4, 4), dtype=bool, chunks=2), steps)


@pytest.mark.parametrize("name", ["grey_erosion", "grey_dilation", "grey_opening", "grey_closing"])
def test_grey_steps_on_an_image_as_pipelines_apply_them(name):
    """Pipelines hand steps an Image (step_call): the grey steps must take its pixels, equal to scikit-image."""
    from tileseg.image import Image

    rng = np.random.default_rng(3)
    raw = (ndi.gaussian_filter(rng.random((30, 34)), 2) * 200).astype(np.uint8)
    img = Image(da.from_array(raw, chunks=(7, 9)), axes=("y", "x"))
    got = apply_postprocess(img, [{name: {"footprint": "disk", "radius": 2}}])
    assert isinstance(got, Image) and got.dtype == raw.dtype
    expected = {"grey_erosion": skm.erosion, "grey_dilation": skm.dilation, "grey_opening": skm.opening,
                "grey_closing": skm.closing}[name](raw, skm.disk(2))
    np.testing.assert_array_equal(np.asarray(got.data), expected)
