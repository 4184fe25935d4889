"""Blending windows for overlap-add stitching.

``gaussian`` matches MONAI's ``compute_importance_map`` (sigma = 0.125 x patch
per axis, product of 1-D Gaussians, clamped below at ``max(min, 1e-3)``);
``hann`` is a sine-squared window sampled at pixel centres (never zero),
clamped the same way; ``constant`` is a plain average. ``crop`` is not a
window: each pixel comes from the patch whose centre is nearest (see
:meth:`tileseg.tiling.grid.AxisGrid.crop_ranges`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from ..errors import TilingError

BLENDS = ("gaussian", "hann", "constant", "crop")
SIGMA_SCALE = 0.125


def check_blend(blend: str) -> str:
    """Return ``blend`` if known, else raise :class:`TilingError`."""
    if blend not in BLENDS:
        raise TilingError(f"blend must be one of {BLENDS}, got {blend!r}")
    return blend


@lru_cache(maxsize=16)
def _window(patch: tuple[int, ...], blend: str) -> np.ndarray:
    if blend == "constant":
        return np.ones(patch, dtype=np.float32)
    w: np.ndarray | None = None
    for p in patch:
        if blend == "gaussian":
            sigma = p * SIGMA_SCALE
            x = np.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=np.float32)
            v = np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32)
        else:  # hann
            v = (np.sin(np.pi * (np.arange(p, dtype=np.float64) + 0.5) / p) ** 2).astype(np.float32)
        w = v if w is None else w[..., None] * v
    assert w is not None
    w = np.maximum(w, max(float(w.min()), 1e-3)).astype(np.float32)
    w.setflags(write=False)
    return w


def blend_window(patch_size: Sequence[int], blend: str) -> np.ndarray:
    """Weight window of shape ``patch_size`` for ``gaussian``, ``hann`` or ``constant``.

    Parameters
    ----------
    patch_size : sequence of int
        Patch size per axis.
    blend : str
        ``"gaussian"``, ``"hann"`` or ``"constant"``.

    Returns
    -------
    numpy.ndarray
        Read-only float32 array, strictly positive.
    """
    check_blend(blend)
    if blend == "crop":
        raise TilingError("blend='crop' has no window; it selects the nearest patch per pixel")
    return _window(tuple(int(p) for p in patch_size), blend)
