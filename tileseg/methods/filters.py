"""Local filters on chunked images, exact across chunk borders.

Each filter declares its halo (the radius of its footprint) and runs with
``dask.array.map_overlap(depth=halo, boundary="none")``: blocks get their
neighbours' pixels as halo, and at the true image border no padding is added,
so the filter's own ``mode`` (scipy/scikit-image semantics) applies there
exactly as on the whole array. Results therefore equal scikit-image/SciPy on
the whole image, bit for bit, under any chunking (dask rechunks blocks smaller
than the halo; an axis shorter than the halo becomes a single chunk).
This is dask-image's ``ndfilters`` scheme; tileseg does not call dask-image
here because it refuses a halo larger than the array (small images, thin 3D
stacks, large sigmas), and the scikit-image functions (``sobel``,
``threshold_local``, canny's steps) are wrapped per block directly.

Canny is local except for its hysteresis step (weak edges are kept when
8-connected to a strong edge anywhere in the image); that step runs through
:func:`tileseg.methods.regions.seeded_components`, which is global and exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError, InputError


def _depth(ndim: int, radius: Any) -> tuple[int, ...]:
    r = np.broadcast_to(np.asarray(radius, dtype=int), (ndim,))
    return tuple(int(x) for x in r)


def fit_depth(data: Any, depth: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """Make ``map_overlap`` possible: an axis shorter than its halo becomes one chunk with no halo.

    (Dask, and so dask-image, refuse a depth larger than the array.)
    """
    single = {k: -1 for k, (d, n) in enumerate(zip(depth, data.shape)) if d >= n}
    if not single:
        return data, tuple(depth)
    return data.rechunk(single), tuple(0 if k in single else d for k, d in enumerate(depth))


def _overlap(func, data: Any, depth: tuple[int, ...], dtype: Any, **kwargs: Any) -> Any:
    import dask.array as da

    data, depth = fit_depth(da.asarray(data), depth)
    meta = np.empty((0,) * data.ndim, dtype)
    return data.map_overlap(func, depth=depth, boundary="none", dtype=dtype, meta=meta, **kwargs)


def _sigmas(ndim: int, sigma: Any) -> tuple[float, ...]:
    s = np.broadcast_to(np.asarray(sigma, dtype=float), (ndim,))
    if not np.all(s > 0):
        raise ConfigError(f"sigma must be > 0, got {sigma!r}")
    return tuple(float(x) for x in s)


def gaussian_filter(data: Any, sigma: Any = 1.0, *, mode: str = "nearest", truncate: float = 4.0) -> Any:
    """Gaussian smoothing in float32, exact across chunks.

    Equals ``skimage.filters.gaussian(image.astype(np.float32), sigma,
    mode=mode, truncate=truncate, preserve_range=True)`` (and
    ``scipy.ndimage.gaussian_filter`` on float32), with scikit-image's default
    ``mode="nearest"``. Halo: ``ceil(sigma * truncate)`` per axis.

    Parameters
    ----------
    data : dask.array.Array
        2D or 3D image.
    sigma : float or sequence of float
        Standard deviation per axis, in pixels.
    mode : str
        Border mode at the image edge (scipy.ndimage semantics).
    truncate : float
        Kernel radius in sigmas.

    Returns
    -------
    dask.array.Array of float32
    """
    import dask.array as da
    from scipy import ndimage as ndi

    data = da.asarray(data)
    sig = _sigmas(data.ndim, sigma)
    depth = tuple(int(np.ceil(s * truncate)) for s in sig)
    return _overlap(
        ndi.gaussian_filter,
        data.astype(np.float32),
        depth,
        np.float32,
        sigma=sig,
        mode=mode,
        truncate=truncate,
    )


def footprint(ndim: int, radius: int = 1, shape: str = "box") -> np.ndarray:
    """A ``box`` or ``ball`` (disk in 2D) footprint of ``radius`` pixels."""
    if int(radius) < 0:
        raise ConfigError(f"radius must be >= 0, got {radius!r}")
    r = int(radius)
    if shape == "box":
        return np.ones((2 * r + 1,) * ndim, dtype=bool)
    if shape == "ball":
        grid = np.indices((2 * r + 1,) * ndim) - r
        return (grid**2).sum(axis=0) <= r * r
    raise ConfigError(f"footprint shape must be 'box' or 'ball', got {shape!r}")


def median_filter(data: Any, *, radius: int = 1, shape: str = "box", mode: str = "nearest") -> Any:
    """Median filter with a box/ball footprint, exact across chunks.

    With the defaults (3x3[x3] box, ``mode="nearest"``) it equals
    ``skimage.filters.median(image)``; in general it equals
    ``scipy.ndimage.median_filter(image, footprint=footprint(ndim, radius, shape), mode=mode)``.
    Halo: ``radius``. The dtype is kept.
    """
    import dask.array as da
    from scipy import ndimage as ndi

    data = da.asarray(data)
    fp = footprint(data.ndim, radius, shape)
    return _overlap(ndi.median_filter, data, (int(radius),) * data.ndim, data.dtype, footprint=fp, mode=mode)


def _edge_block(block: np.ndarray, kind: str, mode: str) -> np.ndarray:
    import skimage.filters as skf

    func = skf.sobel if kind == "sobel" else skf.scharr
    return func(block, mode=mode)


def edges(data: Any, kind: str = "sobel", *, mode: str = "reflect") -> Any:
    """Sobel or Scharr edge magnitude, exact across chunks.

    Equals ``skimage.filters.sobel(image, mode=mode)`` (or ``scharr``) on the
    whole image: float64 for integer images (scaled to [0, 1] as scikit-image
    does), the float dtype for float images. Halo: 1.
    """
    import dask.array as da

    if kind not in ("sobel", "scharr"):
        raise ConfigError(f"edge filter must be 'sobel' or 'scharr', got {kind!r}")
    data = da.asarray(data)
    dtype = np.float32 if data.dtype == np.float32 else np.float64
    return _overlap(_edge_block, data, (1,) * data.ndim, dtype, kind=kind, mode=mode)


def _local_radius(block_size: tuple[int, ...], method: str, param: Any) -> tuple[int, ...]:
    if method == "gaussian":
        sig = (
            [(b - 1) / 6.0 for b in block_size] if param is None else np.broadcast_to(param, len(block_size))
        )
        return tuple(int(np.ceil(4.0 * s)) for s in sig)  # skimage gaussian: truncate=4
    if method in ("mean", "median"):
        return tuple(b // 2 for b in block_size)
    raise ConfigError(f"local threshold method must be 'gaussian', 'mean' or 'median', got {method!r}")


def _local_block(block: np.ndarray, **kw: Any) -> np.ndarray:
    import skimage.filters as skf

    return block > skf.threshold_local(block, **kw)


def threshold_local_mask(
    data: Any,
    block_size: int = 35,
    *,
    method: str = "gaussian",
    offset: float = 0.0,
    mode: str = "reflect",
    param: float | None = None,
) -> Any:
    """Adaptive threshold mask ``image > skimage.filters.threshold_local(image, ...)``.

    Same parameters and semantics as :func:`skimage.filters.threshold_local`
    (``method="generic"`` is not offered: a Python callable cannot be given a
    halo). ``gaussian`` and ``median`` are bit-for-bit equal to scikit-image on
    the whole image; ``mean`` uses SciPy's ``uniform_filter``, a running sum
    along each line whose last-bit rounding depends on where the line starts,
    so only pixels that tie with their local threshold (to ~1e-12) can differ. Halo: ``block_size // 2`` (mean, median) or ``ceil(4 * sigma)`` with
    ``sigma = (block_size - 1) / 6`` (gaussian).

    Returns
    -------
    dask.array.Array of bool
    """
    import dask.array as da

    data = da.asarray(data)
    bs = tuple(int(b) for b in np.broadcast_to(np.asarray(block_size), (data.ndim,)))
    if any(b < 1 or b % 2 == 0 for b in bs):
        raise ConfigError(f"block_size must be odd and positive, got {block_size!r}")
    depth = _local_radius(bs, method, param)
    return _overlap(
        _local_block, data, depth, bool, block_size=bs, method=method, offset=offset, mode=mode, param=param
    )


def _canny_block(
    block: np.ndarray, sigma: float, low: float, high: float, mode: str, cval: float
) -> np.ndarray:
    """Per-block canny up to hysteresis: 0 none, 1 weak edge, 2 strong edge."""
    from scipy import ndimage as ndi

    try:
        from skimage.feature._canny import _nonmaximum_suppression_bilinear, _preprocess
    except ImportError as exc:  # pragma: no cover - depends on the scikit-image version
        raise ImportError(
            "tileseg's chunked canny uses scikit-image's private canny helpers, which this "
            "scikit-image version does not have; use scikit-image 0.22-0.26"
        ) from exc
    smoothed, eroded_mask = _preprocess(block, None, sigma, mode, cval)
    jsobel = ndi.sobel(smoothed, axis=1)
    isobel = ndi.sobel(smoothed, axis=0)
    magnitude = isobel * isobel
    magnitude += jsobel * jsobel
    np.sqrt(magnitude, out=magnitude)
    low_masked = _nonmaximum_suppression_bilinear(isobel, jsobel, magnitude, eroded_mask, low)
    weak = low_masked > 0
    strong = weak & (low_masked >= high)
    return weak.astype(np.uint8) + strong.astype(np.uint8)


def canny_edges(
    data: Any,
    sigma: float = 1.0,
    *,
    low_threshold: float | None = None,
    high_threshold: float | None = None,
    mode: str = "constant",
    cval: float = 0.0,
) -> Any:
    """Canny edges of a 2D image, equal to ``skimage.feature.canny`` on the whole image.

    Smoothing, gradients and non-maximum suppression run per block with a halo
    of ``ceil(4 * sigma) + 3``; the hysteresis (weak edges 8-connected to a
    strong edge) is solved globally by
    :func:`~tileseg.methods.regions.seeded_components`. Thresholds follow
    scikit-image (``None`` means 0.1 / 0.2 of the dtype range; values are in
    the image's dtype units); ``use_quantiles`` is not offered (it needs
    global percentiles of the gradient). One pass over the data runs when
    called (to solve the hysteresis); the result is lazy.

    Returns
    -------
    dask.array.Array of bool
    """
    import dask.array as da
    from skimage.util.dtype import dtype_limits

    from .regions import seeded_components

    data = da.asarray(data)
    if data.ndim != 2:
        raise InputError(f"canny works on 2D images, got shape {data.shape!r}")
    if data.dtype in (np.int64, np.uint64):
        raise InputError("canny does not support 64-bit integer images (as in scikit-image)")
    dtype_max = dtype_limits(np.empty(0, dtype=data.dtype), clip_negative=False)[1]
    low = 0.1 if low_threshold is None else float(low_threshold) / dtype_max
    high = 0.2 if high_threshold is None else float(high_threshold) / dtype_max
    if high < low:
        raise ConfigError(
            f"canny: low_threshold {low_threshold!r} must be <= high_threshold {high_threshold!r}"
        )
    halo = int(np.ceil(4.0 * float(sigma))) + 3
    code = _overlap(
        _canny_block,
        data,
        (halo, halo),
        np.uint8,
        sigma=float(sigma),
        low=low,
        high=high,
        mode=mode,
        cval=cval,
    )
    return seeded_components(code > 0, code == 2, connectivity=2)


# --- pipeline methods ---------------------------------------------------------------------


def _then_threshold(inp_img: Any, threshold: Any, nbins: int) -> Any:
    from .thresholds import threshold as global_threshold

    if isinstance(threshold, str):
        t = global_threshold(inp_img, threshold, nbins=nbins)
    else:
        t = float(threshold)
    return (inp_img > t).astype(np.uint8)


def local(
    image: Any,
    *,
    spacing: Any = None,
    block_size: int = 35,
    method: str = "gaussian",
    offset: float = 0.0,
    mode: str = "reflect",
    param: float | None = None,
) -> Any:
    """Pipeline method: adaptive threshold (uint8 labels 0/1); see :func:`threshold_local_mask`."""
    from ._input import unwrap

    img = unwrap(image, spacing).single_band("local")
    return threshold_local_mask(img, block_size, method=method, offset=offset, mode=mode, param=param).astype(
        np.uint8
    )


def gaussian(
    image: Any,
    *,
    spacing: Any = None,
    sigma: Any = 1.0,
    threshold: Any = "otsu",
    nbins: int = 256,
    mode: str = "nearest",
) -> Any:
    """Pipeline method: Gaussian smoothing, then a global threshold (method name or value)."""
    from ._input import unwrap

    img = unwrap(image, spacing).single_band("gaussian")
    return _then_threshold(gaussian_filter(img, sigma, mode=mode), threshold, nbins)


def median(
    image: Any,
    *,
    spacing: Any = None,
    radius: int = 1,
    shape: str = "box",
    threshold: Any = "otsu",
    nbins: int = 256,
    mode: str = "nearest",
) -> Any:
    """Pipeline method: median smoothing, then a global threshold (method name or value)."""
    from ._input import unwrap

    img = unwrap(image, spacing).single_band("median")
    return _then_threshold(median_filter(img, radius=radius, shape=shape, mode=mode), threshold, nbins)


def sobel(
    image: Any, *, spacing: Any = None, threshold: Any = "otsu", nbins: int = 256, mode: str = "reflect"
) -> Any:
    """Pipeline method: Sobel edge magnitude above a global threshold (uint8 labels 0/1)."""
    from ._input import unwrap

    img = unwrap(image, spacing).single_band("sobel")
    return _then_threshold(edges(img, "sobel", mode=mode), threshold, nbins)


def scharr(
    image: Any, *, spacing: Any = None, threshold: Any = "otsu", nbins: int = 256, mode: str = "reflect"
) -> Any:
    """Pipeline method: Scharr edge magnitude above a global threshold (uint8 labels 0/1)."""
    from ._input import unwrap

    img = unwrap(image, spacing).single_band("scharr")
    return _then_threshold(edges(img, "scharr", mode=mode), threshold, nbins)


def canny(
    image: Any,
    *,
    spacing: Any = None,
    sigma: float = 1.0,
    low_threshold: float | None = None,
    high_threshold: float | None = None,
    mode: str = "constant",
) -> Any:
    """Pipeline method: Canny edges (2D) as uint8 labels 0/1; see :func:`canny_edges`."""
    from ._input import unwrap

    img = unwrap(image, spacing).single_band("canny")
    return canny_edges(
        img, sigma, low_threshold=low_threshold, high_threshold=high_threshold, mode=mode
    ).astype(np.uint8)
