"""Final reductions of the overlap-add engine: sum an output block's pieces, then argmax or normalise.

For ``labels`` the block is never materialised as ``K x block``: it is
summed and reduced one slab of rows at a time in a scratch buffer that fits
the CPU's L2 cache (:data:`SLAB_BYTES`), and the weight sum is not computed
at all (dividing every class of a pixel by the same positive weight does not
change which class is largest). The argmax itself is a running comparison
against the per-pixel maximum (:func:`first_argmax`), a few vectorised passes
instead of NumPy's per-pixel ``argmax(axis=0)`` loop, and returns the first
maximum on ties exactly like :func:`numpy.argmax`.

Scores (``logits``, ``probabilities``) are normalised by the summed window
weight and turned into probabilities in place, in one freshly allocated
``K x block`` array (never one of the inputs: Dask may rerun a task with the
same inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import buffers

Box = tuple[tuple[int, int], ...]

#: Bytes of scores reduced at a time for labels (fits a 2 MiB L2 cache with its scratch).
SLAB_BYTES = 1 << 20


def first_argmax(scores: np.ndarray, out: np.ndarray, scratch: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """``numpy.argmax(scores, axis=0)`` into ``out``, without NumPy's per-pixel loop.

    The index of the first maximum is the number of leading classes strictly
    below the pixel's maximum: ``max`` over classes (one vectorised
    reduction), then per class a comparison, a logical and and an add.

    Parameters
    ----------
    scores : numpy.ndarray
        ``(K, *shape)`` float scores, each ``scores[k]`` ideally contiguous.
    out : numpy.ndarray
        ``shape`` integer array receiving the indices (e.g. uint8 for K <= 256).
    scratch : tuple of numpy.ndarray, optional
        Three arrays of ``shape`` (float of ``scores``' dtype, bool, bool) to reuse.

    Returns
    -------
    numpy.ndarray
        ``out``. Slabs holding a NaN fall back to :func:`numpy.argmax` (first NaN wins).

    Examples
    --------
    >>> s = np.array([[1, 5, 2], [3, 5, 2], [3, 0, 2]], np.float32)
    >>> first_argmax(s, np.empty(3, np.uint8)).tolist(), np.argmax(s, axis=0).tolist()
    ([1, 0, 0], [1, 0, 0])
    """
    k = scores.shape[0]
    if k == 1:
        out[...] = 0
        return out
    if scratch is None:
        scratch = (np.empty(out.shape, scores.dtype), np.empty(out.shape, bool), np.empty(out.shape, bool))
    top, run, below = scratch
    np.max(scores, axis=0, out=top)
    if np.isnan(top.sum()):  # NaN (or +inf and -inf together): let NumPy decide, rarely
        out[...] = np.argmax(scores, axis=0)
        return out
    np.less(scores[0], top, out=run)
    np.copyto(out, run, casting="unsafe")
    for c in range(1, k - 1):
        np.less(scores[c], top, out=below)
        np.logical_and(run, below, out=run)
        np.add(out, run, out=out, casting="unsafe")
    return out


def _rel(box: Box, origin: Box) -> tuple[slice, ...]:
    return tuple(slice(a - o[0], b - o[0]) for (a, b), o in zip(box, origin))


def clip_pieces(block: Box, pieces: Sequence[tuple[Box, np.ndarray]]) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """The parts of ``(box, K x box)`` pieces inside ``block``, as block-relative slices and views."""
    out = []
    for box, arr in pieces:
        part = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(box, block))
        if any(lo >= hi for lo, hi in part):
            continue
        view = arr if part == box else arr[(slice(None),) + _rel(part, box)]
        out.append((_rel(part, block), view))
    return out


def _covers(sl: tuple[slice, ...], lo: int, hi: int, shape: tuple[int, ...]) -> bool:
    return sl[0].start <= lo and sl[0].stop >= hi and all(s.start == 0 and s.stop == n for s, n in zip(sl[1:], shape))


def sum_rows(dst: np.ndarray, lo: int, hi: int, parts: Sequence[tuple[tuple[slice, ...], np.ndarray]]) -> None:
    """``dst`` (``K x (hi - lo) x rest``) = the sum of the block-relative ``parts`` over rows ``lo:hi``."""
    rest = dst.shape[2:]
    cover = next((i for i, (sl, _) in enumerate(parts) if _covers(sl, lo, hi, rest)), None)
    if cover is None:
        dst.fill(0)
    else:
        sl, arr = parts[cover]
        np.copyto(dst, arr[:, lo - sl[0].start: hi - sl[0].start])
    for i, (sl, arr) in enumerate(parts):
        a, z = max(lo, sl[0].start), min(hi, sl[0].stop)
        if i == cover or a >= z:
            continue
        view = dst[(slice(None), slice(a - lo, z - lo)) + sl[1:]]
        np.add(view, arr[:, a - sl[0].start: z - sl[0].start], out=view)


def labels_from_pieces(block: Box, n_classes: int, dtype: np.dtype | str,
                       pieces: Sequence[tuple[Box, np.ndarray]]) -> np.ndarray:
    """Class map of one output block from its weighted pieces, one cache-sized slab at a time.

    Parameters
    ----------
    block : Box
        The output block.
    n_classes : int
        K. One channel gives ``score > 0``.
    dtype : numpy dtype
        Label dtype.
    pieces : sequence of (Box, numpy.ndarray)
        ``K x box`` weighted sums (not normalised); only their parts inside the block are read.

    Returns
    -------
    numpy.ndarray
        ``block``-shaped labels; pixels no piece covers are 0, pixels where a
        class score is NaN (bad model output) the dtype's largest value.
    """
    shape = tuple(b - a for a, b in block)
    out = buffers.empty(shape, dtype)
    if out.size == 0:
        return out
    parts = clip_pieces(block, pieces)
    row = int(np.prod(shape[1:], dtype=np.int64))
    rows = int(min(shape[0], max(1, SLAB_BYTES // (4 * n_classes * row))))
    buf = np.empty((n_classes, rows) + shape[1:], np.float32)
    scratch = (np.empty((rows,) + shape[1:], np.float32), np.empty((rows,) + shape[1:], bool),
               np.empty((rows,) + shape[1:], bool))
    for lo in range(0, shape[0], rows):
        hi = min(shape[0], lo + rows)
        n = hi - lo
        slab = buf[:, :n]
        sum_rows(slab, lo, hi, parts)
        labels = out[lo:hi]
        if n_classes == 1:
            np.greater(slab[0], 0, out=labels, casting="unsafe")
            top = slab[0]
        else:
            top = scratch[0][:n]
            first_argmax(slab, labels, (top, scratch[1][:n], scratch[2][:n]))
        if not np.isfinite(top.sum()):  # bad model output kept as NaN (bad_output="nodata"), or an overflow
            bad = np.isnan(top)  # the per-pixel maximum is NaN where any class is
            if bad.any():
                labels[bad] = np.iinfo(labels.dtype).max  # the label nodata (see tileseg.graph)
    return out


def scores_from_pieces(block: Box, n_classes: int, output: str, pieces: Sequence[tuple[Box, np.ndarray]],
                       weight: np.ndarray | None) -> np.ndarray:
    """Normalised ``logits`` or ``probabilities`` (``K x block`` float32) from an output block's pieces.

    ``weight`` is the summed window weight over the block (None for crop
    blending, where every pixel has one contribution); pixels of weight 0
    (no predicted patch reaches them, so their sum is 0) are not divided.
    """
    shape = tuple(b - a for a, b in block)
    out = buffers.empty((n_classes,) + shape, np.float32)
    if out.size == 0:
        return out
    sum_rows(out, 0, shape[0], clip_pieces(block, pieces))
    if weight is not None:
        if weight.min() > 0:
            np.divide(out, weight, out=out)
        else:
            np.divide(out, weight, out=out, where=np.broadcast_to(weight > 0, out.shape))
    return activate(out, output)


def activate(logits: np.ndarray, output: str) -> np.ndarray:
    """Softmax (sigmoid for one channel) of ``logits`` in place for ``probabilities``; else unchanged."""
    if output != "probabilities":
        return logits
    if logits.shape[0] == 1:
        np.negative(logits, out=logits)
        np.exp(logits, out=logits)
        np.add(logits, np.float32(1), out=logits)
        return np.reciprocal(logits, out=logits)
    np.subtract(logits, logits.max(axis=0, keepdims=True), out=logits)
    np.exp(logits, out=logits)
    return np.divide(logits, logits.sum(axis=0, keepdims=True), out=logits)


def reduce_logits(logits: np.ndarray, output: str, dtype: str) -> np.ndarray:
    """Turn blended logits ``(K, ...)`` into the requested output (a new array; the input is left alone)."""
    if output == "logits":
        return logits
    if output == "probabilities":
        return activate(np.array(logits, dtype=np.float32), output)
    block = tuple((0, n) for n in logits.shape[1:])
    return labels_from_pieces(block, logits.shape[0], dtype, [(block, np.asarray(logits, dtype=np.float32))])
