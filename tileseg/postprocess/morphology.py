"""Binary and greyscale morphology on chunked arrays, exact across chunk borders.

Each operation runs chunk by chunk with a halo equal to the footprint radius
(``map_overlap`` with ``boundary="none"``), so every output pixel sees exactly
the neighbourhood it sees on the whole image; at the true image border SciPy's
own border rule applies, as it does on the whole array. Results therefore
equal scikit-image / SciPy on the whole image.

Binary operations use :mod:`dask_image.ndmorph` (exact: it does the same halo
with ``boundary="none"``); greyscale operations use
:func:`dask_image.ndfilters.minimum_filter` / ``maximum_filter`` (a flat
greyscale erosion/dilation is a minimum/maximum filter over the footprint).

Border handling follows :mod:`skimage.morphology` (0.26):

* binary ``mode``: ``"ignore"`` (default; pixels outside the image never
  change the result), ``"min"`` (outside is False, as
  ``scipy.ndimage.binary_erosion(border_value=0)``) or ``"max"`` (outside is True);
* greyscale ``mode``: ``"reflect"`` (default), ``"constant"`` (with ``cval``),
  ``"nearest"``, ``"mirror"``, ``"wrap"``, ``"max"``, ``"min"``, ``"ignore"``.

With ``nodata``, pixels equal to it are outside the image too (see
:mod:`.nodata`): before every erosion or dilation they take the border value
of the binary ``mode`` or the greyscale neutral element, and they are
``nodata`` in the result.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

from ..errors import ConfigError
from . import nodata as nd

__all__ = [
    "binary_closing",
    "binary_dilation",
    "binary_erosion",
    "binary_opening",
    "make_footprint",
    "grey_closing",
    "grey_dilation",
    "grey_erosion",
    "grey_opening",
]

FOOTPRINTS = ("ball", "disk", "box")
_BINARY_MODES = ("ignore", "min", "max")
_GREY_MODES = ("reflect", "constant", "nearest", "mirror", "wrap", "max", "min", "ignore")


def make_footprint(ndim: int, kind: str | np.ndarray = "ball", radius: int = 1) -> np.ndarray:
    """Build a footprint for ``ndim``-dimensional data.

    Parameters
    ----------
    ndim : int
        Number of spatial dimensions of the data (2 or 3).
    kind : {"ball", "disk", "box"} or array_like
        ``"ball"``: :func:`skimage.morphology.ball` in 3D, :func:`~skimage.morphology.disk`
        in 2D. ``"disk"``: a 2D disk; on 3D data it acts in each z slice
        (shape ``(1, 2r+1, 2r+1)``). ``"box"``: all ones, side ``2r+1``. An explicit
        boolean array of odd shape with ``ndim`` dimensions is used as given.
    radius : int
        Radius in pixels (>= 0).

    Returns
    -------
    numpy.ndarray
        Boolean footprint with odd side lengths.

    Raises
    ------
    ConfigError
        For an unknown kind, a negative radius or an unusable explicit footprint.
    """
    if not isinstance(kind, str):
        fp = np.asarray(kind).astype(bool)
        if fp.ndim != ndim or any(s % 2 == 0 for s in fp.shape):
            raise ConfigError(f"footprint must have {ndim} dimensions of odd size, got shape {fp.shape!r}")
        return fp
    if not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ConfigError(f"radius must be a non-negative integer (pixels), got {radius!r}")
    r = int(radius)
    if kind == "box":
        return np.ones((2 * r + 1,) * ndim, dtype=bool)
    if kind == "ball":
        if ndim in (2, 3):
            return _euclidean_ball(ndim, r)
    if kind == "disk":
        d = _euclidean_ball(2, r)
        if ndim == 2:
            return d
        if ndim == 3:
            return d[None]
    if kind in FOOTPRINTS:
        raise ConfigError(f"footprint {kind!r} is not defined for {ndim}D data")
    raise ConfigError(f"unknown footprint {kind!r}; expected one of {FOOTPRINTS} or an array")


def _euclidean_ball(ndim: int, r: int) -> np.ndarray:
    """Pixels within Euclidean distance ``r`` of the centre: scikit-image's ``disk(r)`` (2D) / ``ball(r)`` (3D).

    Built here so that a pipeline's set-up does not import :mod:`skimage.morphology`
    (about 0.4 s); the tests compare it with scikit-image.
    """
    axis = np.arange(-r, r + 1) ** 2
    dist = sum(axis.reshape((-1,) + (1,) * (ndim - 1 - d)) for d in range(ndim))
    return np.asarray(dist <= r * r, dtype=bool)


def _binary_mode(mode: str) -> str:
    if mode not in _BINARY_MODES:
        raise ConfigError(f"unknown binary morphology mode {mode!r}; expected one of {_BINARY_MODES}")
    return mode


def _as_mask(data: Any) -> da.Array:
    x = da.asarray(data)
    return x if x.dtype == bool else x != 0


def _binary(mask: Any, ops: tuple[str, ...], footprint: Any, radius: int, mode: str, nodata: Any,
            step: str) -> da.Array:
    """Erosions/dilations in order, nodata pixels set to the border value of ``mode`` before each."""
    from dask_image import ndmorph

    _binary_mode(mode)
    dtype = nd.mask_dtype(mask, nodata, step)
    invalid = nd.invalid_pixels(mask, nodata)
    x = _as_mask(mask)
    fp = make_footprint(x.ndim, footprint, radius)
    for op in ops:
        # scikit-image's border rule: erosion sees True outside unless "min", dilation False unless "max"
        border = mode != "min" if op == "erode" else mode == "max"
        func = ndmorph.binary_erosion if op == "erode" else ndmorph.binary_dilation
        x = func(nd.fill(x, invalid, border), structure=fp, border_value=int(border))
    return nd.restore_mask(x, invalid, nodata, dtype)


def binary_erosion(
    mask: Any,
    *,
    footprint: str | np.ndarray = "ball",
    radius: int = 1,
    mode: str = "ignore",
    spacing: Any = None,
    nodata: Any = None,
) -> da.Array:
    """Binary erosion, equal to :func:`skimage.morphology.binary_erosion` on the whole image.

    Parameters
    ----------
    mask : dask.array.Array or numpy.ndarray
        Spatial array; nonzero is foreground.
    footprint : {"ball", "disk", "box"} or array_like
        See :func:`make_footprint`.
    radius : int
        Footprint radius in pixels (also the chunk halo).
    mode : {"ignore", "min", "max"}
        Border rule as in scikit-image: ``"ignore"`` and ``"max"`` treat
        outside pixels as True, ``"min"`` as False.
    spacing : tuple, optional
        Accepted for the pipeline step signature; unused.
    nodata : int or float, optional
        Pixels equal to it are outside the image (they take the border value
        of ``mode``) and are ``nodata`` in the result.

    Returns
    -------
    dask.array.Array
        Lazy boolean array, same chunks; with ``nodata``, the input's dtype
        (0/1, and ``nodata`` where the input is nodata).

    Raises
    ------
    InputError
        ``nodata`` with a boolean input, or a nodata of 0 or 1.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True
    >>> int(binary_erosion(m, footprint="box", radius=1).sum().compute())
    1
    """
    return _binary(mask, ("erode",), footprint, radius, mode, nodata, "erosion")


def binary_dilation(
    mask: Any,
    *,
    footprint: str | np.ndarray = "ball",
    radius: int = 1,
    mode: str = "ignore",
    spacing: Any = None,
    nodata: Any = None,
) -> da.Array:
    """Binary dilation, equal to :func:`skimage.morphology.binary_dilation` on the whole image.

    ``mode``: ``"ignore"`` and ``"min"`` treat outside pixels as False, ``"max"``
    as True. Other parameters as :func:`binary_erosion`.
    """
    return _binary(mask, ("dilate",), footprint, radius, mode, nodata, "dilation")


def binary_opening(
    mask: Any,
    *,
    footprint: str | np.ndarray = "ball",
    radius: int = 1,
    mode: str = "ignore",
    spacing: Any = None,
    nodata: Any = None,
) -> da.Array:
    """Binary opening (erosion then dilation), as :func:`skimage.morphology.binary_opening`."""
    return _binary(mask, ("erode", "dilate"), footprint, radius, mode, nodata, "opening")


def binary_closing(
    mask: Any,
    *,
    footprint: str | np.ndarray = "ball",
    radius: int = 1,
    mode: str = "ignore",
    spacing: Any = None,
    nodata: Any = None,
) -> da.Array:
    """Binary closing (dilation then erosion), as :func:`skimage.morphology.binary_closing`."""
    return _binary(mask, ("dilate", "erode"), footprint, radius, mode, nodata, "closing")


def _grey_mode(dtype: np.dtype, mode: str, cval: float, ignore_as: str) -> tuple[str, Any]:
    if mode not in _GREY_MODES:
        raise ConfigError(f"unknown greyscale morphology mode {mode!r}; expected one of {_GREY_MODES}")
    if mode == "ignore":
        mode = ignore_as
    if mode in ("max", "min"):
        if np.dtype(dtype).kind == "b":
            cval = mode == "max"
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            cval = info.max if mode == "max" else info.min
        else:
            cval = np.inf if mode == "max" else -np.inf
        mode = "constant"
    return mode, cval


def _wrapped(x: da.Array, name: str, fp: np.ndarray) -> da.Array:
    """``mode="wrap"``: the halo at the image border comes from the opposite side."""
    import scipy.ndimage as ndi

    depth = {ax: s // 2 for ax, s in enumerate(fp.shape)}
    if any(x.shape[ax] < d for ax, d in depth.items()):
        raise ConfigError(
            f"mode 'wrap' needs every axis at least as long as the footprint radius; shape {x.shape!r}"
        )
    func = getattr(ndi, name)
    return x.map_overlap(func, depth=depth, boundary="periodic", dtype=x.dtype, footprint=fp, mode="wrap")


def _mirror(fp: np.ndarray) -> np.ndarray:
    return fp[(slice(None, None, -1),) * fp.ndim]


def _grey(x: da.Array, ops: tuple[tuple[str, np.ndarray], ...], mode: str, cval: float, nodata: Any) -> da.Array:
    """Minimum/maximum filters in order, nodata pixels set to the neutral element before each."""
    from dask_image import ndfilters

    invalid = nd.invalid_pixels(x, nodata)
    for op, fp in ops:
        # "ignore": the outside never wins, as the neutral element
        m, c = _grey_mode(x.dtype, mode, cval, "max" if op == "min" else "min")
        x = nd.fill(x, invalid, nd.neutral(x.dtype, op))
        if m == "wrap":
            x = _wrapped(x, f"{'minimum' if op == 'min' else 'maximum'}_filter", fp)
        else:
            func = ndfilters.minimum_filter if op == "min" else ndfilters.maximum_filter
            x = func(x, footprint=fp, mode=m, cval=c)
    return nd.restore(x, invalid, nodata)


def grey_erosion(
    data: Any,
    *,
    footprint: str | np.ndarray = "ball",
    radius: int = 1,
    mode: str = "reflect",
    cval: float = 0.0,
    spacing: Any = None,
    nodata: Any = None,
) -> da.Array:
    """Greyscale erosion, equal to :func:`skimage.morphology.erosion` on the whole image.

    Parameters
    ----------
    data : dask.array.Array or numpy.ndarray
        Spatial array of any real dtype (named ``data``, not ``image``: a step whose first
        parameter is ``image`` receives the whole Image, see :mod:`tileseg.step_call`).
    footprint, radius
        See :func:`make_footprint`.
    mode : str
        ``"reflect"`` (default), ``"constant"``, ``"nearest"``, ``"mirror"``,
        ``"wrap"``, ``"max"``, ``"min"`` or ``"ignore"`` (as ``"max"``), as in scikit-image.
    cval : float
        Value outside the image for ``mode="constant"``.
    spacing : tuple, optional
        Accepted for the pipeline step signature; unused.
    nodata : int or float, optional
        Pixels equal to it never win the minimum (they count as the dtype's
        largest value, +inf for floats) and are ``nodata`` in the result.

    Returns
    -------
    dask.array.Array
        Lazy array of the input dtype.
    """
    x = da.asarray(data)
    return _grey(x, (("min", make_footprint(x.ndim, footprint, radius)),), mode, cval, nodata)


def grey_dilation(
    data: Any,
    *,
    footprint: str | np.ndarray = "ball",
    radius: int = 1,
    mode: str = "reflect",
    cval: float = 0.0,
    spacing: Any = None,
    nodata: Any = None,
) -> da.Array:
    """Greyscale dilation, equal to :func:`skimage.morphology.dilation` on the whole image.

    ``mode="ignore"`` acts as ``"min"``. Like scikit-image 0.26, the footprint
    is not mirrored. ``nodata`` pixels count as the dtype's smallest value
    (-inf for floats). Other parameters as :func:`grey_erosion`.
    """
    x = da.asarray(data)
    return _grey(x, (("max", make_footprint(x.ndim, footprint, radius)),), mode, cval, nodata)


def grey_opening(
    data: Any,
    *,
    footprint: str | np.ndarray = "ball",
    radius: int = 1,
    mode: str = "reflect",
    cval: float = 0.0,
    spacing: Any = None,
    nodata: Any = None,
) -> da.Array:
    """Greyscale opening (erosion then dilation), as :func:`skimage.morphology.opening`."""
    x = da.asarray(data)
    fp = make_footprint(x.ndim, footprint, radius)
    # scikit-image mirrors the footprint for the second step (no-op for symmetric ones).
    return _grey(x, (("min", fp), ("max", _mirror(fp))), mode, cval, nodata)


def grey_closing(
    data: Any,
    *,
    footprint: str | np.ndarray = "ball",
    radius: int = 1,
    mode: str = "reflect",
    cval: float = 0.0,
    spacing: Any = None,
    nodata: Any = None,
) -> da.Array:
    """Greyscale closing (dilation then erosion), as :func:`skimage.morphology.closing`."""
    x = da.asarray(data)
    fp = make_footprint(x.ndim, footprint, radius)
    return _grey(x, (("max", fp), ("min", _mirror(fp))), mode, cval, nodata)
