"""Global-statistic thresholds on chunked images: one threshold for the whole image.

Every threshold is computed from the whole-image :func:`~tileseg.methods.histogram.histogram`
(one Dask reduction) and then applied chunk by chunk, so there are no seams.

Exactness
---------
* Integer images: ``otsu``, ``multi_otsu``, ``yen``, ``isodata``,
  ``triangle`` and ``li`` equal scikit-image's ``threshold_*`` on the whole
  array (one bin per integer value; Li runs its iteration on the histogram,
  which is what scikit-image itself does for integer images). ``mean`` is the
  exact integer sum divided by the count (scikit-image's ``np.mean`` may differ
  in the last bit).
* Float images: ``otsu``, ``multi_otsu``, ``yen``, ``isodata`` and
  ``triangle`` equal scikit-image's with the same ``nbins`` (default 256, the
  scikit-image default), i.e. they are quantised to one bin width
  ``(max - min) / nbins``. ``li`` on floats iterates on the bin centres
  (scikit-image iterates on the pixel values), so it agrees with
  scikit-image's Li to within about one bin width; raise ``nbins`` (e.g.
  4096) to tighten it. ``mean`` is a float64 sum (relative error ~1e-15).

Foreground is ``data > threshold`` (strictly greater), scikit-image's
convention; multi-Otsu classes are ``numpy.digitize(data, thresholds)``
(class ``i`` holds ``t[i-1] < v <= t[i]``, as in scikit-image's examples).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .histogram import Histogram, histogram

#: Names of the histogram-based thresholds.
METHODS = ("otsu", "li", "yen", "triangle", "isodata", "mean")


def _hist(data: Any, hist: Histogram | None, mask: Any, nodata: Any, nbins: int) -> Histogram:
    return hist if hist is not None else histogram(data, mask=mask, nodata=nodata, nbins=nbins)


def _single(h: Histogram):
    nz = np.flatnonzero(h.counts)
    if nz.size == 1:
        return h.centers[nz[0]]
    return None


def threshold_from_histogram(h: Histogram, method: str, **params: Any) -> float:
    """Threshold of ``method`` from a whole-image histogram.

    Parameters
    ----------
    h : Histogram
        From :func:`~tileseg.methods.histogram.histogram`.
    method : {"otsu", "li", "yen", "triangle", "isodata", "mean"}
        The thresholding method.
    **params
        ``tolerance`` and ``initial_guess`` (float) for ``li``.

    Returns
    -------
    float
        The threshold; foreground is ``data > threshold``.
    """
    import skimage.filters as skf

    single = _single(h)
    if single is not None and method != "mean":
        return single  # scikit-image returns the value of a constant image
    hist = h.as_skimage()
    if method == "otsu":
        return skf.threshold_otsu(hist=hist)
    if method == "yen":
        return skf.threshold_yen(hist=hist)
    if method == "isodata":
        return skf.threshold_isodata(hist=hist)
    if method == "triangle":
        return _triangle(h)
    if method == "li":
        return _li(h, **params)
    if method == "mean":
        if h.integer:
            total = int(np.dot(h.counts.astype(object), h.centers.astype(object)))
            return total / h.n
        return float(np.dot(h.counts.astype(np.float64), h.centers.astype(np.float64)) / h.n)
    raise ConfigError(f"unknown threshold method {method!r}; expected one of {METHODS}")


def _triangle(h: Histogram):
    """scikit-image's triangle algorithm (``threshold_triangle``) on a histogram."""
    hist = h.counts.copy()
    nbins = hist.size
    arg_peak_height = int(np.argmax(hist))
    peak_height = hist[arg_peak_height]
    arg_low_level, arg_high_level = np.flatnonzero(hist)[[0, -1]]
    flip = arg_peak_height - arg_low_level < arg_high_level - arg_peak_height
    if flip:
        hist = hist[::-1]
        arg_low_level = nbins - arg_high_level - 1
        arg_peak_height = nbins - arg_peak_height - 1
    width = arg_peak_height - arg_low_level
    x1 = np.arange(width)
    y1 = hist[x1 + arg_low_level]
    norm = np.sqrt(peak_height**2 + width**2)
    peak_height = peak_height / norm
    width = width / norm
    length = peak_height * x1 - width * y1
    arg_level = int(np.argmax(length)) + arg_low_level
    if flip:
        arg_level = nbins - arg_level - 1
    return h.centers[arg_level]


def _li(h: Histogram, tolerance: float | None = None, initial_guess: float | None = None) -> float:
    """Li's minimum cross-entropy iteration on a histogram (scikit-image's integer path)."""
    keep = h.counts > 0
    counts = h.counts[keep]
    centers = h.centers[keep]
    image_min = centers[0]
    values = centers - image_min  # Li needs non-negative values
    hist = counts.astype(np.float32)
    if h.integer:
        tolerance = tolerance or 0.5
        mean = int(np.dot(counts.astype(object), values.astype(object))) / int(counts.sum())
    else:
        tolerance = tolerance or h.bin_width / 2
        mean = float(np.dot(counts.astype(np.float64), values.astype(np.float64)) / counts.sum())
    if initial_guess is None:
        t_next = mean
    else:
        t_next = float(initial_guess) - float(image_min)
        if not 0 < t_next < values[-1]:
            raise ConfigError(
                f"li initial_guess {initial_guess!r} is outside the image range "
                f"[{image_min!r}, {centers[-1]!r}]"
            )
    t_curr = -2 * tolerance
    while abs(t_next - t_curr) > tolerance:
        t_curr = t_next
        foreground = values > t_curr
        background = ~foreground
        mean_fore = np.average(values[foreground], weights=hist[foreground])
        mean_back = np.average(values[background], weights=hist[background])
        if mean_back == 0:
            break
        t_next = (mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore))
    return t_next + image_min


def threshold(
    data: Any,
    method: str = "otsu",
    *,
    mask: Any = None,
    nodata: Any = None,
    nbins: int = 256,
    hist: Histogram | None = None,
    **params: Any,
) -> float:
    """Whole-image threshold of a chunked image.

    Parameters
    ----------
    data : dask.array.Array or numpy.ndarray
        The image (2D or 3D, single band).
    method : {"otsu", "li", "yen", "triangle", "isodata", "mean"}
        The method.
    mask : array-like of bool, optional
        Compute the statistic only where ``mask`` is true.
    nodata : scalar, optional
        Leave out pixels equal to this value.
    nbins : int
        Bins for float images (integer images get one bin per value).
    hist : Histogram, optional
        A precomputed histogram (skips the pass over the data).
    **params
        Method options (``tolerance``, ``initial_guess`` for Li).

    Returns
    -------
    float
        The threshold; foreground is ``data > threshold``.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> img = da.from_array(np.array([[0, 0, 200, 210]], dtype="uint8"), chunks=1)
    >>> int(threshold(img, "otsu"))
    0
    """
    if method == "mean" and hist is None and getattr(data, "dtype", np.dtype("f8")).kind == "f":
        from .histogram import masked_mean

        return masked_mean(data, mask=mask, nodata=nodata)
    return threshold_from_histogram(_hist(data, hist, mask, nodata, nbins), method, **params)


def threshold_multi_otsu(
    data: Any,
    classes: int = 3,
    *,
    mask: Any = None,
    nodata: Any = None,
    nbins: int = 256,
    hist: Histogram | None = None,
) -> np.ndarray:
    """Multi-Otsu thresholds of the whole image (``classes - 1`` values, ascending).

    Equal to ``skimage.filters.threshold_multiotsu`` on integer images, and on
    float images with the same ``nbins``.
    """
    import skimage.filters as skf

    h = _hist(data, hist, mask, nodata, nbins)
    prob = h.counts / np.sum(h.counts)  # scikit-image normalises before its float32 cast
    return skf.threshold_multiotsu(classes=int(classes), hist=(prob, h.centers))


def apply_threshold(data: Any, t: float) -> Any:
    """Foreground mask ``data > t`` (bool dask array)."""
    import dask.array as da

    return da.asarray(data) > t


def classify(data: Any, thresholds: np.ndarray) -> Any:
    """Classes ``numpy.digitize(data, thresholds)`` chunk by chunk (smallest uint dtype)."""
    import dask.array as da

    thresholds = np.asarray(thresholds)
    dtype = np.uint8 if thresholds.size < 255 else np.uint16
    return da.asarray(data).map_blocks(lambda b: np.digitize(b, bins=thresholds).astype(dtype), dtype=dtype)


def to_physical(data: Any, slope: float = 1.0, intercept: float = 0.0) -> Any:
    """Physical values ``data * slope + intercept`` (e.g. CT Hounsfield units), lazily in float64."""
    import dask.array as da

    return da.asarray(data).astype(np.float64) * float(slope) + float(intercept)


def rescale_from_attrs(metadata: dict) -> tuple[float, float] | None:
    """Rescale ``(slope, intercept)`` found in an image's attributes, or None.

    Looks for ``rescale_slope``/``rescale_intercept`` and the DICOM keywords
    ``RescaleSlope``/``RescaleIntercept``, at the top level or under
    ``"dicom"``. An image whose reader already applied the rescale
    (``attrs["dicom"]["rescale_applied"]`` true, as the DICOM reader sets)
    gives ``(1.0, 0.0)``.
    """
    if isinstance(metadata.get("dicom"), dict):
        if metadata["dicom"].get("rescale_applied"):
            return 1.0, 0.0
        found = rescale_from_attrs(metadata["dicom"])
        if found is not None:
            return found
    for s_key, i_key in (("rescale_slope", "rescale_intercept"), ("RescaleSlope", "RescaleIntercept")):
        if s_key in metadata or i_key in metadata:
            try:
                return float(metadata.get(s_key, 1.0)), float(metadata.get(i_key, 0.0))
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"image attributes {s_key}/{i_key} are not numbers: "
                    f"{metadata.get(s_key)!r}, {metadata.get(i_key)!r}"
                ) from exc
    return None


# --- pipeline methods: f(data, *, spacing=None, **params) -> dask labels -------------------


def _defaults(inp: Any, mask: Any, nodata: Any) -> tuple[Any, Any]:
    """The image's own mask and nodata where the parameters give none."""
    return (inp.mask if mask is None else mask), (inp.nodata if nodata is None else nodata)


def _global(method: str, data: Any, spacing: Any, mask: Any, nodata: Any, nbins: int, **params: Any) -> Any:
    from ._input import as_labels, unwrap

    inp = unwrap(data, spacing)
    img = inp.single_band(method)
    mask, nodata = _defaults(inp, mask, nodata)
    t = threshold(img, method, mask=mask, nodata=nodata, nbins=nbins, **params)
    return as_labels(img > t)


def otsu(image: Any, *, spacing: Any = None, mask: Any = None, nodata: Any = None, nbins: int = 256) -> Any:
    """Pipeline method: ``image > threshold_otsu`` over the whole image, as uint8 labels (0/1)."""
    return _global("otsu", image, spacing, mask, nodata, nbins)


def li(
    image: Any,
    *,
    spacing: Any = None,
    mask: Any = None,
    nodata: Any = None,
    nbins: int = 256,
    tolerance: float | None = None,
    initial_guess: float | None = None,
) -> Any:
    """Pipeline method: ``image > threshold_li`` (uint8 labels 0/1)."""
    return _global("li", image, spacing, mask, nodata, nbins, tolerance=tolerance, initial_guess=initial_guess)


def yen(image: Any, *, spacing: Any = None, mask: Any = None, nodata: Any = None, nbins: int = 256) -> Any:
    """Pipeline method: ``image > threshold_yen`` (uint8 labels 0/1)."""
    return _global("yen", image, spacing, mask, nodata, nbins)


def triangle(
    image: Any, *, spacing: Any = None, mask: Any = None, nodata: Any = None, nbins: int = 256
) -> Any:
    """Pipeline method: ``image > threshold_triangle`` (uint8 labels 0/1)."""
    return _global("triangle", image, spacing, mask, nodata, nbins)


def isodata(image: Any, *, spacing: Any = None, mask: Any = None, nodata: Any = None, nbins: int = 256) -> Any:
    """Pipeline method: ``image > threshold_isodata`` (uint8 labels 0/1)."""
    return _global("isodata", image, spacing, mask, nodata, nbins)


def mean(image: Any, *, spacing: Any = None, mask: Any = None, nodata: Any = None) -> Any:
    """Pipeline method: ``image > mean(image)`` (uint8 labels 0/1)."""
    return _global("mean", image, spacing, mask, nodata, 256)


def multi_otsu(
    image: Any,
    *,
    spacing: Any = None,
    classes: int = 3,
    mask: Any = None,
    nodata: Any = None,
    nbins: int = 256,
) -> Any:
    """Pipeline method: multi-Otsu classes ``numpy.digitize(image, thresholds)`` (0 .. classes-1)."""
    from ._input import unwrap

    inp = unwrap(image, spacing)
    img = inp.single_band("multi_otsu")
    mask, nodata = _defaults(inp, mask, nodata)
    return classify(img, threshold_multi_otsu(img, classes, mask=mask, nodata=nodata, nbins=nbins))


def fixed(image: Any, *, spacing: Any = None, threshold: float) -> Any:
    """Pipeline method: ``image > threshold`` for a given value (uint8 labels 0/1)."""
    from ._input import as_labels, unwrap

    return as_labels(unwrap(image, spacing).single_band("fixed") > float(threshold))


def fixed_physical(
    image: Any,
    *,
    spacing: Any = None,
    threshold: float,
    slope: float | None = None,
    intercept: float | None = None,
    upper: float | None = None,
) -> Any:
    """Pipeline method: threshold in physical units, e.g. Hounsfield units for CT.

    The physical value is ``raw * slope + intercept``; ``slope``/``intercept``
    are taken from the arguments, else from the image attributes
    (``rescale_slope``/``rescale_intercept`` or DICOM
    ``RescaleSlope``/``RescaleIntercept``). Foreground is
    ``physical > threshold`` (and ``physical <= upper`` when ``upper`` is given,
    e.g. a bone window).

    Raises
    ------
    ConfigError
        If neither the arguments nor the attributes give a rescale.
    """
    from ._input import as_labels, unwrap

    inp = unwrap(image, spacing)
    img = inp.single_band("fixed_physical")
    if slope is None and intercept is None:
        found = rescale_from_attrs(inp.attrs)
        if found is None:
            raise ConfigError(
                "fixed_physical needs slope/intercept: pass them, or give an Image whose attributes have "
                "rescale_slope/rescale_intercept (or DICOM RescaleSlope/RescaleIntercept)"
            )
        slope, intercept = found
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    if slope == 0:
        raise ConfigError("fixed_physical: slope must not be 0")
    phys = to_physical(img, slope, intercept)
    fg = phys > float(threshold)
    if upper is not None:
        fg = fg & (phys <= float(upper))
    return as_labels(fg)
