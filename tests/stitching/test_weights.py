"""Blending windows against MONAI's importance map."""

from __future__ import annotations

import numpy as np
import pytest

from tileseg.errors import TilingError
from tileseg.stitching.weights import blend_window


@pytest.mark.parametrize("patch", [(16, 16), (15, 32), (8, 9, 10)])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_window_matches_monai(patch, mode):
    monai_utils = pytest.importorskip("monai.data.utils")
    ref = monai_utils.compute_importance_map(patch, mode=mode, sigma_scale=0.125).numpy()
    np.testing.assert_allclose(blend_window(patch, mode), ref, rtol=1e-6, atol=1e-7)


def test_hann_is_positive_symmetric_and_peaks_in_the_middle():
    w = blend_window((9, 12), "hann")
    assert w.min() > 0
    np.testing.assert_allclose(w, w[::-1, ::-1])
    assert np.unravel_index(w.argmax(), w.shape)[0] == 4


def test_crop_has_no_window():
    with pytest.raises(TilingError, match="crop"):
        blend_window((8, 8), "crop")
    with pytest.raises(TilingError, match="blend must be one of"):
        blend_window((8, 8), "median")
