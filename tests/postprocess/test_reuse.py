"""Whole-image statistics computed once per item: ``label`` after ``remove_small_objects`` reuses its components."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from tileseg.image import Image
from tileseg.postprocess import apply_postprocess

skimage = pytest.importorskip("skimage")


def _class_map(seed: int = 0):
    rng = np.random.default_rng(seed)
    mask = rng.random((90, 110)) > 0.62  # many small and a few merged objects, crossing chunk borders
    return mask, Image(da.from_array(mask.astype(np.uint8), chunks=(23, 31)), axes=("y", "x"),
                       class_names=("background", "object"))


@pytest.fixture
def components_calls(monkeypatch) -> list:
    """The connectivity of every whole-image components pass from now on (the passes still run)."""
    import tileseg.postprocess.class_maps as class_maps
    import tileseg.stitching.labels as labels

    solved: list = []
    real = labels.components

    def counting(*args, **kwargs):
        solved.append(kwargs.get("connectivity"))
        return real(*args, **kwargs)

    monkeypatch.setattr(class_maps, "components", counting)
    monkeypatch.setattr(labels, "components", counting)
    return solved

@pytest.mark.parametrize("connectivity", [1, 2])
def test_label_after_small_object_removal_solves_components_once(components_calls, connectivity):
    from skimage.measure import label
    from skimage.morphology import remove_small_objects

    solved = components_calls
    mask, image = _class_map()
    out = apply_postprocess(image, [{"remove_small_objects": {"min_size_px": 4, "connectivity": connectivity}},
                                    {"label": {"connectivity": connectivity}}])
    want = label(remove_small_objects(mask, max_size=3, connectivity=connectivity), connectivity=connectivity)
    got = out.data.compute()
    assert got.max() == want.max() > 20
    np.testing.assert_array_equal(got, want)
    assert solved == [connectivity]  # one whole-image components pass, not two


def test_other_connectivity_solves_again(monkeypatch):
    from skimage.measure import label
    from skimage.morphology import remove_small_objects

    mask, image = _class_map(1)
    out = apply_postprocess(image, [{"remove_small_objects": {"min_size_px": 4, "connectivity": 1}},
                                    {"label": {"connectivity": 2}}])
    want = label(remove_small_objects(mask, max_size=3, connectivity=1), connectivity=2)
    np.testing.assert_array_equal(out.data.compute(), want)


def test_label_after_small_object_removal_with_nodata_solves_once_and_never_reads_the_input_again(components_calls):
    """With nodata the reuse holds, and the labels come from the solved components alone."""
    from skimage.measure import label
    from skimage.morphology import remove_small_objects

    solved = components_calls
    mask, _ = _class_map(2)
    invalid = np.zeros_like(mask)
    invalid[:, 40:47] = True  # a band across chunk borders, splitting objects
    invalid[60:, :] = True
    reads = []

    def read(block):
        reads.append(1)
        return block

    data = da.from_array(np.where(invalid, 255, mask).astype(np.uint8), chunks=(23, 31)).map_blocks(read)
    image = Image(data, axes=("y", "x"), class_names=("background", "object"), nodata=255)
    out = apply_postprocess(image, [{"remove_small_objects": {"min_size_px": 4}}, "label"])
    first_pass = len(reads)
    got = out.data.compute()
    assert len(reads) == first_pass  # no second computation of the input
    want = label(remove_small_objects(mask & ~invalid, max_size=3), connectivity=1).astype(np.int64)
    want[invalid] = -1
    assert out.nodata == -1 and want.max() > 20
    np.testing.assert_array_equal(got, want)
    assert solved == [1]
