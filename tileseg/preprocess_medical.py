"""Medical intensity preprocessing: CT windowing and z-score inside a foreground mask.

Steps for the ``preprocess:`` list of a pipeline (registered in
:mod:`tileseg.registry` like those of :mod:`tileseg.preprocess`; same
conventions: lazy ``(C, *spatial)`` dask arrays in, float32 out, statistics
over the whole image so tiled results equal whole-image preprocessing)::

    preprocess:
      - ct_window: {center: 40, width: 400}         # clip HU to the window, scale to [0, 1]
      - zscore_masked: {mask_threshold: 0}          # mean/std of pixels > 0 only (MR: body, not air)
"""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np

from .errors import ConfigError
from .preprocess import _as_dask, _bcast, channel_stats

__all__ = ["ct_window", "zscore_masked"]


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"preprocess.{name}: expected a finite number, got {value!r}")
    return float(value)


def ct_window(data: Any, *, center: float, width: float) -> da.Array:
    """Clip to the window ``[center - width/2, center + width/2]`` and scale it to ``[0, 1]``.

    Parameters
    ----------
    data : dask or numpy array ``(C, *spatial)``
        Values in the window's unit (Hounsfield units for CT).
    center, width : float
        Window level and width (``width > 0``), e.g. 40/400 (soft tissue), -600/1500 (lung).

    Returns
    -------
    dask.array.Array
        float32, same shape and chunks; NaN stays NaN.

    Examples
    --------
    >>> ct_window(np.array([[-1000, -160, 40, 240, 3000]]), center=40, width=400).compute().tolist()
    [[0.0, 0.0, 0.5, 1.0, 1.0]]
    """
    c, w = _number(center, "ct_window.center"), _number(width, "ct_window.width")
    if w <= 0:
        raise ConfigError(f"preprocess.ct_window.width must be > 0, got {width!r}")
    lo = c - w / 2.0
    arr = _as_dask(data).astype(np.float32)
    return (da.clip(arr, np.float32(lo), np.float32(lo + w)) - np.float32(lo)) / np.float32(w)


def zscore_masked(data: Any, *, mask_threshold: float, outside_value: float | None = None,
                  nodata: float | None = None) -> da.Array:
    """``(x - mean) / std`` per channel, mean and std taken over pixels ``> mask_threshold`` only.

    Parameters
    ----------
    data : dask or numpy array ``(C, *spatial)``
    mask_threshold : float
        A pixel is foreground (counts in the statistics) where its value is
        above this, per channel.
    outside_value : float, optional
        Output value of background pixels (e.g. 0, as nnU-Net does);
        ``None`` normalises them like the foreground.
    nodata : float, optional
        Value left out of the statistics.

    Returns
    -------
    dask.array.Array
        float32, same shape and chunks. A std of 0 (or no foreground) is treated as 1.

    Examples
    --------
    >>> out = zscore_masked(np.array([[0, 0, 2, 4, 6]]), mask_threshold=0, outside_value=0)
    >>> out.compute().astype(float).round(3).tolist()
    [[0.0, 0.0, -1.225, 0.0, 1.225]]
    """
    thr = _number(mask_threshold, "zscore_masked.mask_threshold")
    arr = _as_dask(data)
    fg = arr > thr
    mean, std = channel_stats(da.where(fg, arr.astype(np.float64), np.nan), nodata=nodata)
    std = np.where(std > 0, std, 1.0)
    out = (arr.astype(np.float32) - _bcast(mean, arr.ndim)) / _bcast(std, arr.ndim)
    if outside_value is not None:
        out = da.where(fg, out, np.float32(_number(outside_value, "zscore_masked.outside_value")))
    return out
