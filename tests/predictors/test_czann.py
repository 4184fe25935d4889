"""A real trained ONNX model (napari-czann-segment 0.1.2) on its real image, against direct ONNX Runtime calls.

The wheel is fetched once with ``pip download`` into the data cache (see
:mod:`tileseg.testing.czann`); without network the tests skip, saying so.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("czifile")

import tileseg  # noqa: E402
from tileseg.errors import ImageNotFoundError, ModelError  # noqa: E402
from tileseg.testing.czann import fetch_czann, read_czi  # noqa: E402


@pytest.fixture(scope="module")
def czann():
    try:
        m = fetch_czann(timeout=300)
    except ImageNotFoundError as exc:
        pytest.skip(f"napari-czann-segment 0.1.2 cannot be fetched here: {exc}")
    return m, read_czi(m.czi)


def _direct(m, tile: np.ndarray) -> np.ndarray:
    """``(2, H, W)`` softmax of the model on one uint16 tile, the way the napari plugin feeds it."""
    import onnxruntime as ort

    sess = ort.InferenceSession(m.onnx, providers=["CPUExecutionProvider"])
    x = (tile.astype(np.float32) / np.iinfo(tile.dtype).max)[None, :, :, None]
    return np.moveaxis(sess.run(None, {sess.get_inputs()[0].name: x})[0][0], -1, 0)


def test_xml_contract_is_read(czann):
    m, image = czann
    assert image.shape == (2755, 3675) and image.dtype == np.uint16
    assert (m.tile, m.border, m.classes, m.scale_by_bitdepth) == ((1024, 1024), 64, ("background", "nuc"), True)


def test_one_tile_equals_onnxruntime_directly(czann):
    m, image = czann
    tile = image[900:1924, 1400:2424]
    want = _direct(m, tile)
    got = tileseg.segment(tile, m.model_spec(), patch_size=m.tile, output="probabilities",
                          preprocess=m.preprocess(tile.dtype), class_names=m.classes).data.compute()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    # a real segmentation: nuclei cover a fair part of the tile, not nothing or everything
    assert 0.02 < (want[1] > 0.5).mean() < 0.6


def test_fixed_tile_size_is_enforced(czann):
    m, image = czann
    with pytest.raises(ModelError, match=r"only patches of size \[1024, 1024\].*tiling.patch_size: \[1024, 1024\]"):
        tileseg.segment(image[:600, :600], m.model_spec(), patch_size=(512, 512))
