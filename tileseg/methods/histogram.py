"""Whole-image histograms of chunked images, summed over chunks by Dask.

Integer images get one bin per integer value between the global minimum and
maximum, exactly like :func:`skimage.exposure.histogram`, so every threshold
that scikit-image derives from a histogram is reproduced exactly. Integer
images are histogrammed in **one** pass: every chunk returns its own
``(minimum, bincount)`` and the partial histograms are merged in a tree.

Float images are binned into ``nbins`` equal bins between the global minimum
and maximum (``numpy.histogram`` with an explicit range, the binning
scikit-image uses for floats). The default ``nbins=256`` is scikit-image's
default, so with the same ``nbins`` the counts, and the thresholds, equal
scikit-image's on the whole array; the thresholds are therefore quantised to
one bin width, ``(max - min) / nbins``. Floats take two passes (minimum and
maximum, then counts) unless ``value_range`` is given.

NaN and infinite values are always left out; ``mask`` and ``nodata`` leave
out more pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError

#: Refuse integer histograms with more bins than this (a corrupt int64 image
#: with values spanning 2**60 would otherwise allocate without bound).
MAX_INT_BINS = 1 << 25


@dataclass(frozen=True)
class Histogram:
    """A whole-image histogram.

    Attributes
    ----------
    counts : numpy.ndarray of int64
        Pixels per bin.
    centers : numpy.ndarray
        Bin centres: consecutive integers (int64) for integer images, the
        centres of ``nbins`` equal bins for floats.
    integer : bool
        Whether the image had an integer dtype (one bin per integer value).
    """

    counts: np.ndarray
    centers: np.ndarray
    integer: bool

    @property
    def n(self) -> int:
        """Number of pixels counted."""
        return int(self.counts.sum())

    @property
    def bin_width(self) -> float:
        """Width of one bin (1 for integer images)."""
        if self.integer or self.centers.size < 2:
            return 1.0
        return float(self.centers[1] - self.centers[0])

    def as_skimage(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, centers)``, the ``hist=`` argument of scikit-image thresholds."""
        return self.counts, self.centers


def _valid(block: np.ndarray, mask: np.ndarray | None, nodata: Any) -> np.ndarray:
    """Flat array of the values of ``block`` to count."""
    keep = None
    if block.dtype.kind == "f":
        keep = np.isfinite(block)
    if nodata is not None:
        nd = block != nodata
        keep = nd if keep is None else keep & nd
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        keep = mask if keep is None else keep & mask
    return block.ravel() if keep is None else block[keep]


def _int_partial(block: np.ndarray, mask: np.ndarray | None, nodata: Any) -> tuple[int, np.ndarray]:
    values = _valid(np.asarray(block), mask, nodata)
    if values.size == 0:
        return 0, np.zeros(0, dtype=np.int64)
    lo = int(values.min())
    hi = int(values.max())
    if hi - lo + 1 > MAX_INT_BINS:
        raise InputError(
            f"integer image spans {hi - lo + 1} values (from {lo!r} to {hi!r}); more than "
            f"{MAX_INT_BINS} histogram bins: pass value_range= or convert the image to float"
        )
    shifted = values.astype(np.int64) - lo if lo != 0 or values.dtype.kind == "i" else values
    return lo, np.bincount(shifted.ravel(), minlength=hi - lo + 1).astype(np.int64)


def _int_merge(*parts: tuple[int, np.ndarray]) -> tuple[int, np.ndarray]:
    parts = tuple(p for p in parts if p[1].size)
    if not parts:
        return 0, np.zeros(0, dtype=np.int64)
    lo = min(p[0] for p in parts)
    hi = max(p[0] + p[1].size for p in parts)
    if hi - lo > MAX_INT_BINS:
        raise InputError(
            f"integer image spans {hi - lo} values (from {lo!r}); more than {MAX_INT_BINS} histogram bins"
        )
    out = np.zeros(hi - lo, dtype=np.int64)
    for start, counts in parts:
        out[start - lo : start - lo + counts.size] += counts
    return lo, out


def _float_partial(
    block: np.ndarray, mask: np.ndarray | None, nodata: Any, nbins: int, rng: tuple
) -> np.ndarray:
    values = _valid(np.asarray(block), mask, nodata)
    counts, _ = np.histogram(values, bins=nbins, range=rng)
    return counts.astype(np.int64)


def _float_minmax(block: np.ndarray, mask: np.ndarray | None, nodata: Any) -> np.ndarray:
    values = _valid(np.asarray(block), mask, nodata)
    if values.size == 0:
        return np.array([np.inf, -np.inf])
    return np.array([values.min(), values.max()], dtype=values.dtype)


def _tree(func, items: list, fan_in: int = 8):
    """Combine delayed ``items`` with ``func`` in a tree of ``fan_in``."""
    from dask import delayed

    while len(items) > 1:
        items = [delayed(func)(*items[i : i + fan_in]) for i in range(0, len(items), fan_in)]
    return items[0]


def _blocks(data, mask) -> tuple[list, list]:
    import dask.array as da

    blocks = list(data.to_delayed().ravel())
    if mask is None:
        return blocks, [None] * len(blocks)
    mask = da.asarray(mask)
    if mask.shape != data.shape:
        raise InputError(f"mask shape {mask.shape!r} does not match image shape {data.shape!r}")
    mask = mask.rechunk(data.chunks)
    return blocks, list(mask.to_delayed().ravel())


def histogram(
    data: Any,
    *,
    mask: Any = None,
    nodata: Any = None,
    nbins: int = 256,
    value_range: tuple[float, float] | None = None,
) -> Histogram:
    """Histogram of a whole (chunked) image, computed chunk by chunk.

    Parameters
    ----------
    data : dask.array.Array or numpy.ndarray
        The image (any number of dimensions; all of it is counted).
    mask : array-like of bool, optional
        Count only pixels where ``mask`` is true (same shape as ``data``).
    nodata : scalar, optional
        Leave out pixels equal to this value.
    nbins : int
        Number of bins for float images (ignored for integer images, which get
        one bin per integer value). Default 256, scikit-image's default.
    value_range : (float, float), optional
        Bin range for float images; saves the min/max pass. Values outside are
        not counted.

    Returns
    -------
    Histogram
        Counts and bin centres; ``hist.as_skimage()`` can be passed as ``hist=``
        to scikit-image's threshold functions.

    Raises
    ------
    InputError
        If no pixel is left to count, or an integer image spans more than
        ``MAX_INT_BINS`` values.
    ConfigError
        If ``nbins`` is not positive.

    Examples
    --------
    >>> import dask.array as da
    >>> h = histogram(da.arange(10, chunks=3).astype("uint8"))
    >>> h.counts.tolist(), h.centers[:3].tolist()
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 2])
    """
    import dask
    import dask.array as da
    from dask import delayed

    data = da.asarray(data)
    if data.dtype.kind not in "uif":
        if data.dtype.kind == "b":
            data = data.astype(np.uint8)
        else:
            raise InputError(f"cannot histogram an image of dtype {data.dtype!r}")
    blocks, masks = _blocks(data, mask)
    if data.dtype.kind in "ui":
        parts = [delayed(_int_partial)(b, m, nodata) for b, m in zip(blocks, masks)]
        lo, counts = dask.compute(_tree(_int_merge, parts))[0]
        if counts.size == 0:
            raise InputError("no pixel left to histogram (all masked or nodata)")
        return Histogram(counts=counts, centers=np.arange(lo, lo + counts.size, dtype=np.int64), integer=True)

    if int(nbins) < 1:
        raise ConfigError(f"nbins must be >= 1, got {nbins!r}")
    if value_range is None:
        mm = [delayed(_float_minmax)(b, m, nodata) for b, m in zip(blocks, masks)]
        both = dask.compute(mm)[0]
        lo = min(x[0] for x in both)
        hi = max(x[1] for x in both)
        if not np.isfinite(lo):
            raise InputError("no finite pixel left to histogram (all masked, nodata or NaN)")
        rng = (lo, hi)
    else:
        rng = (float(value_range[0]), float(value_range[1]))
        if not rng[0] <= rng[1]:
            raise ConfigError(f"value_range must be (low, high) with low <= high, got {value_range!r}")
    parts = [delayed(_float_partial)(b, m, nodata, int(nbins), rng) for b, m in zip(blocks, masks)]
    counts = dask.compute(_tree(lambda *c: np.sum(c, axis=0), parts))[0]
    # Same edges and centres as numpy.histogram / skimage.exposure.histogram.
    _, edges = np.histogram(np.asarray([], dtype=data.dtype), bins=int(nbins), range=rng)
    centers = (edges[:-1] + edges[1:]) / 2.0
    if counts.sum() == 0:
        raise InputError("no pixel left to histogram (all masked, nodata or out of value_range)")
    return Histogram(counts=counts, centers=centers, integer=False)


def _sum_count(block: np.ndarray, mask: np.ndarray | None, nodata: Any) -> np.ndarray:
    values = _valid(np.asarray(block), mask, nodata)
    return np.array([values.sum(dtype=np.float64), values.size], dtype=np.float64)


def masked_mean(data: Any, *, mask: Any = None, nodata: Any = None) -> float:
    """Mean of the counted pixels (float64 sums per chunk, added over chunks).

    Parameters
    ----------
    data : dask.array.Array or numpy.ndarray
        The image.
    mask, nodata
        As in :func:`histogram`; NaN and infinite values are left out.

    Returns
    -------
    float
        The mean (relative error about 1e-15 against ``numpy.mean``).
    """
    import dask
    import dask.array as da
    from dask import delayed

    data = da.asarray(data)
    blocks, masks = _blocks(data, mask)
    parts = [delayed(_sum_count)(b, m, nodata) for b, m in zip(blocks, masks)]
    total, n = dask.compute(_tree(lambda *c: np.sum(c, axis=0), parts))[0]
    if n == 0:
        raise InputError("no pixel left to average (all masked, nodata or NaN)")
    return float(total / n)
