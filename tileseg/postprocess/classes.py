"""Turn per-class probabilities into classes: argmax and thresholds.

Both are pixel-wise, so they run chunk by chunk with no halo and equal
NumPy on the whole array. The class axis is gathered into one chunk first
(it is short: one entry per class).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np

from ..errors import ConfigError, InputError
from ..image import label_dtype

__all__ = ["argmax", "threshold"]


def _channel_axis(x: da.Array, channel_axis: int) -> int:
    if not -x.ndim <= channel_axis < x.ndim:
        raise ConfigError(f"channel_axis {channel_axis!r} is out of range for an array of shape {x.shape!r}")
    return channel_axis % x.ndim


def argmax(
    prob: Any, *, channel_axis: int = 0, min_prob: float | None = None, spacing: Any = None
) -> da.Array:
    """Class of highest probability per pixel.

    Parameters
    ----------
    prob : dask.array.Array or numpy.ndarray
        Scores of shape ``(K, *spatial)`` (class axis at ``channel_axis``).
    channel_axis : int
        The class axis.
    min_prob : float, optional
        Pixels whose highest score is below this get class 0 (background).
    spacing : tuple, optional
        Accepted for the pipeline step signature; unused.

    Returns
    -------
    dask.array.Array
        Class indices ``0..K-1`` of shape ``spatial``, smallest unsigned dtype.
        Ties go to the lowest class index (as :func:`numpy.argmax`).

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[0.2, 0.6]], [[0.8, 0.4]]])
    >>> argmax(p).compute().tolist()
    [[1, 0]]
    """
    x = da.asarray(prob)
    ax = _channel_axis(x, channel_axis)
    k = x.shape[ax]
    if k < 1:
        raise InputError(f"argmax needs at least one class along axis {ax}, got shape {x.shape!r}")
    x = x.rechunk({ax: -1})
    dtype = label_dtype(k)
    out = da.argmax(x, axis=ax).astype(dtype)
    if min_prob is not None:
        out = da.where(da.max(x, axis=ax) < min_prob, np.zeros((), dtype), out)
    return out


def threshold(
    prob: Any,
    value: float | Sequence[float] = 0.5,
    *,
    per_class: bool = False,
    channel_axis: int | None = None,
    spacing: Any = None,
) -> da.Array:
    """Foreground where the score is strictly greater than ``value``.

    Parameters
    ----------
    prob : dask.array.Array or numpy.ndarray
        Scores. With ``per_class`` the class axis is at ``channel_axis`` (default 0).
    value : float or sequence of float
        Threshold; with ``per_class`` one value per class is allowed.
    per_class : bool
        Threshold every class channel with its own value; the result keeps
        the class axis (one boolean mask per class).
    channel_axis : int, optional
        Without ``per_class``: a length-1 channel axis to drop (e.g. 0 for a
        ``(1, *spatial)`` probability map). In a pipeline this is set to 0
        automatically when the data has one more axis than ``spacing``.
    spacing : tuple, optional
        Pixel spacing; only its length is used (see ``channel_axis``).

    Returns
    -------
    dask.array.Array
        Boolean array.

    Examples
    --------
    >>> import numpy as np
    >>> threshold(np.array([[0.2, 0.7]])).compute().tolist()
    [[False, True]]
    """
    x = da.asarray(prob)
    if per_class:
        ax = _channel_axis(x, 0 if channel_axis is None else channel_axis)
        vals = np.atleast_1d(np.asarray(value, dtype=float))
        k = x.shape[ax]
        if vals.size == 1:
            vals = np.repeat(vals, k)
        if vals.ndim != 1 or vals.size != k:
            raise ConfigError(f"threshold value needs 1 or {k} numbers (one per class), got {value!r}")
        shape = [1] * x.ndim
        shape[ax] = k
        return x > vals.reshape(shape)
    if np.ndim(value) != 0:
        raise ConfigError(f"threshold value must be one number unless per_class=True, got {value!r}")
    if channel_axis is None and spacing is not None and x.ndim == len(spacing) + 1:
        channel_axis = 0
    if channel_axis is not None:
        ax = _channel_axis(x, channel_axis)
        if x.shape[ax] != 1:
            raise InputError(
                f"threshold without per_class needs a single channel on axis {ax}, got shape {x.shape!r}; "
                "use per_class=True or argmax for several classes"
            )
        x = x.squeeze(axis=ax)
    return x > value
