"""Intensity preprocessing on lazy ``(C, *spatial)`` dask arrays, per channel.

Every step returns a lazy float32 dask array with the input's chunks. Steps
that need image statistics (``zscore``, ``percentile``) compute them over the
*whole* image when the graph is built (one small Dask reduction per step,
returning a few numbers per channel), so tiled results equal whole-image
preprocessing exactly, whatever the chunking.

Steps (``preprocess:`` in a pipeline file, applied in order; registered in
:mod:`tileseg.registry` under the ``preprocess`` kind, so plugins can add
more through the ``tileseg.preprocess`` entry-point group)::

    preprocess:
      - zscore: {}                                  # global mean/std per channel
      - fixed: {mean: [120.0], std: [30.0]}         # given mean/std (scalar or per channel)
      - percentile: {lower: 0.5, upper: 99.5}       # clip to global percentiles, scale to [0, 1]
      - clip: {min: 0.0, max: 1.0}
      - scale: {multiply: 2.0, add: -1.0}

Medical steps (``ct_window``, ``zscore_masked``) are in :mod:`tileseg.preprocess_medical`.

Conventions
-----------
- Values equal to ``nodata`` (when given) and non-finite values (NaN, inf) are
  left out of the statistics; their output values are computed like any
  other pixel (NaN stays NaN).
- A standard deviation of 0 (constant channel) or a percentile range of 0 is
  treated as 1, so the step never divides by zero.
- Images of more than :data:`SUBSAMPLE_ABOVE_PIXELS` (2**32) pixels per channel
  take these statistics from :data:`SUBSAMPLE_BLOCKS` blocks spread evenly over
  the image (logged), not from every pixel: a normalisation needs the
  intensity distribution, not every pixel of a 10^12-pixel mosaic, and the
  exact pass would read the whole image once more before segmenting it.
  Smaller images (every test, CT, a whole slide) get exact statistics.
  Thresholding methods (Otsu and the other histogram thresholds) stay exact at
  any size: their threshold decides every pixel's class.
- ``percentile`` follows ``numpy.percentile`` (linear interpolation). It is
  exact for integer images of up to 16 bits (and for wider integer images whose
  value range spans at most 2**20 values), via a per-chunk ``bincount`` summed
  over the image. Float images (and wider integer ranges) use a histogram of
  ``bins`` (default 65536) equal bins between the global finite min and max,
  interpolating linearly inside a bin: the error is below one bin width,
  ``(max - min) / bins``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from itertools import product
from typing import Any

import dask
import dask.array as da
import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "apply_preprocess", "zscore", "fixed", "percentile", "clip", "scale",
    "channel_stats", "channel_percentiles",
]

EXACT_INT_RANGE = 2**20
DEFAULT_BINS = 65536


def _as_dask(data: Any) -> da.Array:
    arr = data if isinstance(data, da.Array) else da.asarray(data)
    if arr.ndim < 2:
        raise ConfigError(f"preprocess: expected an array (C, *spatial), got shape {arr.shape!r}")
    return arr


def _per_channel(value: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, n)
    if arr.size != n:
        raise ConfigError(f"preprocess.{name}: expected a scalar or {n} values (one per channel), got {value!r}")
    return arr


def _bcast(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.astype(np.float32).reshape((-1,) + (1,) * (ndim - 1))


def _valid(block: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """Mask of pixels that count in statistics, or None when all do."""
    mask = None
    if block.dtype.kind in "fc":
        mask = np.isfinite(block)
    if nodata is not None:
        nd = block != nodata
        mask = nd if mask is None else mask & nd
    return mask


def _tree(items: list, combine: Callable[[Any, Any], Any]) -> Any:
    """Pairwise (tree) reduction of delayed items, so few partial results are alive at once."""
    while len(items) > 1:
        items = [dask.delayed(combine)(items[i], items[i + 1]) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    return items[0]


#: Images with more pixels than this (per channel) get their statistics from a subsample of blocks.
SUBSAMPLE_ABOVE_PIXELS = 2**32
#: About how many windows such a subsample reads (on an even lattice over the image).
SUBSAMPLE_BLOCKS = 64
#: Pixels in each window. A window lies in one block, and that block is computed whole (slices are not
#: pushed below the preprocessing steps), so the cost is about SUBSAMPLE_BLOCKS blocks.
SUBSAMPLE_WINDOW = 2**16


def _windows(arr: da.Array, per_axis: int) -> da.Array:
    """``(C, n)``: windows of ``arr`` ``(C, *spatial)`` centred on an even lattice of ``per_axis`` points per axis.

    Each window lies inside the block holding its centre (one block read each), flattened, one chunk each.
    """
    side = max(1, int(round(SUBSAMPLE_WINDOW ** (1 / (arr.ndim - 1)))))
    bounds = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in arr.chunks[1:]]
    axes = []
    for b, n in zip(bounds, arr.shape[1:]):
        spans = []
        for k in range(per_axis):
            centre = int((k + 0.5) * n / per_axis)
            i = int(np.searchsorted(b, centre, side="right") - 1)
            lo, hi = int(b[i]), int(b[i + 1])
            w = min(side, hi - lo)
            start = min(max(lo, centre - w // 2), hi - w)
            spans.append(slice(start, start + w))
        axes.append(spans)
    pieces = [arr[(slice(None), *region)].reshape(arr.shape[0], -1, merge_chunks=True)
              for region in product(*axes)]
    return da.concatenate(pieces, axis=1)


def sample_blocks(numblocks: Sequence[int], n_pixels: int, *, above: int | None = None,
                  max_blocks: int | None = None) -> int | None:
    """Sample points per axis for the statistics of a huge image, or None for "use every pixel".

    Every pixel is used unless the image has more than ``above`` pixels and
    more than ``max_blocks`` blocks (defaults :data:`SUBSAMPLE_ABOVE_PIXELS`,
    :data:`SUBSAMPLE_BLOCKS`); then about ``max_blocks`` windows are read, on
    a lattice of this many evenly spaced points per axis.

    >>> sample_blocks((10, 10), 100), sample_blocks((1000, 1000), 10**12)
    (None, 8)
    """
    above = SUBSAMPLE_ABOVE_PIXELS if above is None else above
    max_blocks = SUBSAMPLE_BLOCKS if max_blocks is None else max_blocks
    total = int(np.prod(numblocks, dtype=np.int64))
    if n_pixels <= above or total <= max_blocks:
        return None
    return max(1, int(max_blocks ** (1 / len(numblocks)) + 1e-9))


def _reduce_blocks(arr: da.Array, fn: Callable[[np.ndarray, slice], Any],
                   combine: Callable[[Any, Any], Any]) -> list[tuple[slice, Any]]:
    """``fn(block, channels)`` on every block, tree-combined per channel chunk; one Dask compute.

    On images above :data:`SUBSAMPLE_ABOVE_PIXELS` pixels only the blocks of
    :func:`sample_blocks` are read (an approximation, logged), so set-up does
    not read a huge image once more before segmenting it.

    Returns ``(channel slice, combined result)`` per channel chunk.
    """
    offsets = np.concatenate([[0], np.cumsum(arr.chunks[0])])
    spatial = arr.numblocks[1:]
    chosen = sample_blocks(spatial, int(np.prod(arr.shape[1:], dtype=np.int64)))
    if chosen is not None:
        log.info("image statistics from %d windows of %d pixels (of %d blocks; a subsample: the image has "
                 "%.3g pixels per channel)", chosen ** len(spatial), SUBSAMPLE_WINDOW,
                 int(np.prod(spatial, dtype=np.int64)), float(np.prod(arr.shape[1:], dtype=float)))
        arr = _windows(arr.rechunk({0: arr.chunks[0]}), chosen)
    roots, keys = [], []
    blocks = arr.to_delayed()
    chosen = list(np.ndindex(blocks.shape[1:]))
    get = blocks.__getitem__
    for c in range(arr.numblocks[0]):
        ch = slice(int(offsets[c]), int(offsets[c + 1]))
        parts = [dask.delayed(fn)(get((c, *idx)), ch) for idx in chosen]
        roots.append(_tree(parts, combine))
        keys.append(ch)
    return list(zip(keys, dask.compute(*roots)))


def _merge_moments(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chan et al.'s parallel merge of (count, mean, M2) rows."""
    out = a.copy()
    for i in range(len(a)):
        n_a, m_a, s_a = a[i]
        n_b, m_b, s_b = b[i]
        if n_b == 0:
            continue
        n = n_a + n_b
        delta = m_b - m_a
        out[i] = (n, m_a + delta * n_b / n, s_a + s_b + delta * delta * n_a * n_b / n)
    return out


def _merge_minmax(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack([np.minimum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])], axis=1)


def _moments(block: np.ndarray, nodata: float | None) -> np.ndarray:
    """(c, 3) per channel: count, mean, sum of squared deviations (float64)."""
    c = block.shape[0]
    flat = block.reshape(c, -1)
    mask = _valid(flat, nodata)
    out = np.zeros((c, 3))
    for i in range(c):
        v = flat[i] if mask is None else flat[i][mask[i]]
        if v.size:
            v = v.astype(np.float64)
            m = v.mean()
            out[i] = (v.size, m, np.square(v - m).sum())
    return out


def channel_stats(data: Any, *, nodata: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Global per-channel mean and (population) standard deviation, in one Dask pass.

    Per-block moments are merged pairwise with Chan et al.'s parallel formula
    (numerically stable, float64). Channels without valid pixels get mean 0 and std 0.

    Examples
    --------
    >>> import numpy as np
    >>> mean, std = channel_stats(np.arange(8.0).reshape(2, 4))
    >>> mean.tolist(), std.round(3).tolist()
    ([1.5, 5.5], [1.118, 1.118])
    """
    arr = _as_dask(data)
    n_ch = arr.shape[0]
    acc = np.zeros((n_ch, 3))
    for ch, res in _reduce_blocks(arr, lambda b, ch: _moments(b, nodata), _merge_moments):
        acc[ch] = res
    count = acc[:, 0]
    std = np.sqrt(np.divide(acc[:, 2], count, out=np.zeros(n_ch), where=count > 0))
    return acc[:, 1], std


def zscore(data: Any, *, nodata: float | None = None) -> da.Array:
    """``(x - mean) / std`` per channel with the global mean/std of the whole image.

    Parameters
    ----------
    data : dask or numpy array ``(C, *spatial)``
    nodata : float, optional
        Value left out of the statistics.

    Returns
    -------
    dask.array.Array
        float32, same shape and chunks. A std of 0 is treated as 1.
    """
    arr = _as_dask(data)
    mean, std = channel_stats(arr, nodata=nodata)
    std = np.where(std > 0, std, 1.0)
    return fixed(arr, mean=mean, std=std)


def fixed(data: Any, *, mean: Any, std: Any) -> da.Array:
    """``(x - mean) / std`` with given values (scalars or one per channel); std 0 is treated as 1."""
    arr = _as_dask(data)
    m = _per_channel(mean, arr.shape[0], "fixed.mean")
    s = _per_channel(std, arr.shape[0], "fixed.std")
    s = np.where(s != 0, s, 1.0)
    return (arr.astype(np.float32) - _bcast(m, arr.ndim)) / _bcast(s, arr.ndim)


def _bincount(block: np.ndarray, lo: int, size: int, nodata: float | None) -> np.ndarray:
    c = block.shape[0]
    flat = block.reshape(c, -1)
    mask = _valid(flat, nodata)
    out = np.zeros((c, size), dtype=np.int64)
    for i in range(c):
        v = flat[i] if mask is None else flat[i][mask[i]]
        out[i] = np.bincount((v.astype(np.int64) - lo), minlength=size)
    return out


def _minmax(block: np.ndarray, nodata: float | None) -> np.ndarray:
    c = block.shape[0]
    flat = block.reshape(c, -1)
    mask = _valid(flat, nodata)
    out = np.full((c, 2), [np.inf, -np.inf])
    for i in range(c):
        v = flat[i] if mask is None else flat[i][mask[i]]
        if v.size:
            out[i] = (v.min(), v.max())
    return out


def _histogram(block: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int, nodata: float | None):
    c = block.shape[0]
    flat = block.reshape(c, -1)
    mask = _valid(flat, nodata)
    out = np.zeros((c, bins), dtype=np.int64)
    for i in range(c):
        v = flat[i] if mask is None else flat[i][mask[i]]
        if v.size and hi[i] > lo[i]:
            idx = ((v.astype(np.float64) - lo[i]) * (bins / (hi[i] - lo[i]))).astype(np.int64)
            out[i] = np.bincount(np.clip(idx, 0, bins - 1), minlength=bins)
        elif v.size:
            out[i, 0] = v.size
    return out


def _sum_by_channel(results: list[tuple[slice, np.ndarray]], n_ch: int, width: int) -> np.ndarray:
    acc = np.zeros((n_ch, width), dtype=np.int64)
    for ch, res in results:
        acc[ch] = res
    return acc


def _ranks(n: int, q: float) -> tuple[int, int, float]:
    pos = q / 100.0 * (n - 1)
    lo = int(np.floor(pos))
    return lo, min(lo + 1, n - 1), pos - lo


def _value_at_rank_exact(cum: np.ndarray, rank: int, lo: int) -> float:
    return float(lo + np.searchsorted(cum, rank, side="right"))


def _value_at_rank_hist(counts: np.ndarray, cum: np.ndarray, rank: int, lo: float, width: float) -> float:
    b = int(np.searchsorted(cum, rank, side="right"))
    before = cum[b - 1] if b > 0 else 0
    frac = (rank - before + 0.5) / counts[b]  # position inside the bin, values assumed evenly spread
    return lo + (b + frac) * width


def channel_percentiles(data: Any, qs: Sequence[float], *, nodata: float | None = None,
                        bins: int = DEFAULT_BINS) -> np.ndarray:
    """Global per-channel percentiles ``(C, len(qs))`` like ``numpy.percentile`` (linear).

    Exact for integer images (see the module docstring); histogram-based with
    ``bins`` bins for float images. Channels without valid pixels give NaN.

    Examples
    --------
    >>> import numpy as np
    >>> channel_percentiles(np.arange(101, dtype=np.uint8)[None], [10, 50]).tolist()
    [[10.0, 50.0]]
    """
    arr = _as_dask(data)
    for q in qs:
        if not 0 <= q <= 100:
            raise ConfigError(f"preprocess.percentile: percentiles must be within [0, 100], got {q!r}")
    n_ch = arr.shape[0]
    out = np.full((n_ch, len(qs)), np.nan)
    kind = arr.dtype.kind
    if kind == "b":
        arr = arr.astype(np.uint8)
        kind = "u"
    exact = None
    if kind in "ui":
        if arr.dtype.itemsize <= 2:
            info = np.iinfo(arr.dtype)
            exact = (int(info.min), int(info.max) - int(info.min) + 1)
        else:
            mm = _sum_minmax(arr, nodata)
            if np.isfinite(mm).all() and (mm[:, 1] - mm[:, 0]).max() < EXACT_INT_RANGE:
                lo = int(mm[:, 0].min())
                exact = (lo, int(mm[:, 1].max()) - lo + 1)
    if exact is not None:
        lo, size = exact
        parts = _reduce_blocks(arr, lambda b, ch: _bincount(b, lo, size, nodata), np.add)
        counts = _sum_by_channel(parts, n_ch, size)
        for i in range(n_ch):
            cum = np.cumsum(counts[i])
            n = int(cum[-1])
            if n == 0:
                continue
            for j, q in enumerate(qs):
                r0, r1, f = _ranks(n, q)
                v0, v1 = _value_at_rank_exact(cum, r0, lo), _value_at_rank_exact(cum, r1, lo)
                out[i, j] = v0 + f * (v1 - v0)
        return out
    mm = _sum_minmax(arr, nodata)
    lo_v, hi_v = mm[:, 0], mm[:, 1]
    parts = _reduce_blocks(arr, lambda b, ch: _histogram(b, lo_v[ch], hi_v[ch], bins, nodata), np.add)
    counts = _sum_by_channel(parts, n_ch, bins)
    for i in range(n_ch):
        cum = np.cumsum(counts[i])
        n = int(cum[-1])
        if n == 0:
            continue
        if not hi_v[i] > lo_v[i]:
            out[i] = lo_v[i]
            continue
        width = (hi_v[i] - lo_v[i]) / bins
        for j, q in enumerate(qs):
            r0, r1, f = _ranks(n, q)
            v0 = _value_at_rank_hist(counts[i], cum, r0, lo_v[i], width)
            v1 = _value_at_rank_hist(counts[i], cum, r1, lo_v[i], width)
            out[i, j] = min(max(v0 + f * (v1 - v0), lo_v[i]), hi_v[i])
    return out


def _sum_minmax(arr: da.Array, nodata: float | None) -> np.ndarray:
    acc = np.full((arr.shape[0], 2), [np.inf, -np.inf])
    for ch, res in _reduce_blocks(arr, lambda b, ch: _minmax(b, nodata), _merge_minmax):
        acc[ch] = res
    return acc


def percentile(data: Any, *, lower: float = 0.5, upper: float = 99.5, nodata: float | None = None,
               bins: int = DEFAULT_BINS) -> da.Array:
    """Clip each channel to its global ``[lower, upper]`` percentiles and scale that range to [0, 1].

    Parameters
    ----------
    data : dask or numpy array ``(C, *spatial)``
    lower, upper : float
        Percentiles in [0, 100], ``lower < upper``.
    nodata : float, optional
        Value left out of the statistics.
    bins : int
        Histogram bins for float images (integer images are exact).

    Returns
    -------
    dask.array.Array
        float32 in [0, 1] (NaN stays NaN). A zero range is treated as 1.
    """
    if not lower < upper:
        raise ConfigError(f"preprocess.percentile: lower must be < upper, got {lower!r} and {upper!r}")
    if not isinstance(bins, int) or bins < 2:
        raise ConfigError(f"preprocess.percentile.bins: must be an integer >= 2, got {bins!r}")
    arr = _as_dask(data)
    p = channel_percentiles(arr, [lower, upper], nodata=nodata, bins=bins)
    lo = np.nan_to_num(p[:, 0])
    rng = np.nan_to_num(p[:, 1]) - lo
    rng = np.where(rng > 0, rng, 1.0)
    out = (arr.astype(np.float32) - _bcast(lo, arr.ndim)) / _bcast(rng, arr.ndim)
    return da.clip(out, np.float32(0), np.float32(1))


def clip(data: Any, *, min: float | None = None, max: float | None = None) -> da.Array:  # noqa: A002
    """Clip to ``[min, max]`` (either may be None); float32 output."""
    if min is None and max is None:
        raise ConfigError("preprocess.clip: give min, max or both")
    if min is not None and max is not None and min > max:
        raise ConfigError(f"preprocess.clip: min must be <= max, got {min!r} and {max!r}")
    arr = _as_dask(data).astype(np.float32)
    return da.clip(arr, None if min is None else np.float32(min), None if max is None else np.float32(max))


def scale(data: Any, *, multiply: float = 1.0, add: float = 0.0) -> da.Array:
    """``x * multiply + add`` (scalars or one value per channel); float32 output."""
    arr = _as_dask(data)
    m = _per_channel(multiply, arr.shape[0], "scale.multiply")
    a = _per_channel(add, arr.shape[0], "scale.add")
    return arr.astype(np.float32) * _bcast(m, arr.ndim) + _bcast(a, arr.ndim)


def _parse_step(step: Any, index: int) -> tuple[str, dict]:
    """``(name, params)`` of one step, checked against the ``preprocess`` registry and the step's signature."""
    from .config.schema import _step_pair, check_call
    from .registry import available, get, suggest

    try:
        name, params = _step_pair(step, "preprocess")
        names = available("preprocess")
        if name not in names:
            raise ValueError(f"unknown step {name!r}{suggest(name, names)} (installed: {', '.join(names)})")
        check_call(get("preprocess", name), "preprocess step", name, params, from_image=False)
    except ValueError as exc:
        raise ConfigError(f"preprocess[{index}]: {exc}") from None
    return name, params


def apply_preprocess(data: Any, steps: Sequence[Any] | None) -> da.Array:
    """Apply preprocessing steps in order; returns a lazy float32 dask array.

    Parameters
    ----------
    data : dask or numpy array ``(C, *spatial)``
    steps : list of str or dict
        e.g. ``["zscore"]`` or ``[{"percentile": {"lower": 1, "upper": 99}}, {"scale": {"multiply": 2}}]``.
        All steps are validated before any statistic is computed.

    Raises
    ------
    ConfigError
        For an unknown step (the message lists the known ones) or bad parameters.

    Examples
    --------
    >>> import numpy as np
    >>> out = apply_preprocess(np.array([[0, 2, 4, 6]]), [{"zscore": {}}])
    >>> out.dtype, out.compute().astype(float).round(2).tolist()
    (dtype('float32'), [[-1.34, -0.45, 0.45, 1.34]])
    """
    arr = _as_dask(data)
    if isinstance(steps, (str, dict)):
        steps = [steps]
    parsed = [_parse_step(s, i) for i, s in enumerate(steps or [])]
    from .registry import get

    for name, params in parsed:
        arr = get("preprocess", name)(arr, **params)
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr
