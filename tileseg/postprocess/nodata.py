"""How post-processing steps treat nodata: those pixels take no part and stay nodata.

Every built-in step declares a ``nodata`` keyword (pipelines fill it from the
image, see :mod:`tileseg.step_call`). Pixels equal to it (NaN matches NaN) are
outside the image for the step, the way scikit-image treats pixels beyond the
image border, and come out as ``nodata`` again:

* binary morphology fills them with the border value of its ``mode`` before
  each erosion or dilation (so an erosion eats no more from a nodata edge
  than from the image edge, a dilation never grows into them);
* greyscale morphology fills them with the neutral element (the dtype's
  largest value or +inf before an erosion, the smallest or -inf before a
  dilation);
* object steps and ``label`` see them as background that joins nothing
  (``fill_holes``: background touching them touches the outside, so it is no
  hole; hole sizes count valid pixels only);
* ``label`` writes :data:`LABEL_NODATA` there (its labels are ``>= 0``).

A step whose result is a 0/1 mask returns the input's dtype instead of
``bool`` when ``nodata`` is given, so that it can hold the nodata value.
"""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np

from ..errors import InputError

#: Nodata of the int64 labels of ``label`` when its input had nodata: object ids are >= 1, background 0,
#: and -1 is exact in every writer (GDAL keeps nodata as a double, which cannot hold the largest int64).
LABEL_NODATA = -1


def is_nan(nodata: Any) -> bool:
    """Whether ``nodata`` is NaN."""
    return isinstance(nodata, (float, np.floating)) and math.isnan(nodata)


def invalid_pixels(data: Any, nodata: Any) -> da.Array | None:
    """Lazy boolean array, True where ``data`` equals ``nodata`` (NaN matches NaN); None without nodata.

    A value the dtype cannot hold matches nothing (None).

    >>> import numpy as np
    >>> invalid_pixels(np.array([1.0, np.nan]), float("nan")).compute().tolist()
    [False, True]
    """
    if nodata is None:
        return None
    x = da.asarray(data)
    if not holds(x.dtype, nodata):
        return None
    if is_nan(nodata):
        return x != x
    return x == nodata


def holds(dtype: Any, value: Any) -> bool:
    """Whether ``dtype`` can hold ``value`` exactly (NaN: a float dtype).

    >>> holds("uint8", 255), holds("uint8", 256), holds("int64", -1.0), holds("int16", float("nan"))
    (True, False, True, False)
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return True
    if dtype.kind == "b":
        return value in (0, 1) and not is_nan(value)
    if is_nan(value) or not math.isfinite(float(value)) or float(value) != int(value):
        return False
    info = np.iinfo(dtype)
    return info.min <= int(value) <= info.max


def fill(x: da.Array, invalid: da.Array | None, value: Any) -> da.Array:
    """``x`` with ``value`` where ``invalid`` (``x`` itself when there is nothing to fill)."""
    if invalid is None:
        return x
    return da.where(invalid, np.asarray(value, dtype=x.dtype), x)


def restore(result: da.Array, invalid: da.Array | None, nodata: Any) -> da.Array:
    """``result`` with ``nodata`` where ``invalid`` (``result`` itself without nodata)."""
    if invalid is None:
        return result
    return da.where(invalid, np.asarray(nodata, dtype=result.dtype), result)


def neutral(dtype: Any, for_op: str) -> Any:
    """The value that never wins a minimum (``for_op="min"``) or maximum (``"max"``) filter."""
    dtype = np.dtype(dtype)
    biggest = for_op == "min"
    if dtype.kind == "b":
        return biggest
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return info.max if biggest else info.min
    return np.inf if biggest else -np.inf


def mask_dtype(data: Any, nodata: Any, step: str) -> np.dtype | None:
    """Dtype of a 0/1 mask result that must also hold ``nodata``: the input's (None without nodata).

    Raises
    ------
    InputError
        For a boolean input with nodata, or a nodata of 0 or 1 (it would collide with the result).
    """
    if nodata is None:
        return None
    check_not_bool(data, nodata, step)
    if not is_nan(nodata) and nodata in (0, 1):
        raise InputError(f"{step}: nodata {nodata!r} collides with the 0/1 values of the result; "
                         "use a nodata value other than 0 and 1")
    return np.dtype(da.asarray(data).dtype)


def check_not_bool(data: Any, nodata: Any, step: str) -> None:
    """Refuse ``nodata`` on a boolean input (it cannot hold a nodata value apart from its two classes)."""
    if nodata is not None and np.dtype(da.asarray(data).dtype).kind == "b":
        raise InputError(f"{step}: a boolean mask cannot hold nodata {nodata!r}; give integer data or no nodata")


def restore_mask(mask: da.Array, invalid: da.Array | None, nodata: Any, dtype: np.dtype | None) -> da.Array:
    """A boolean result as ``dtype`` 0/1 with ``nodata`` where ``invalid`` (``mask`` itself without nodata)."""
    if invalid is None or dtype is None:
        return mask
    return restore(mask.astype(dtype), invalid, nodata)
