"""Task bodies of the overlap-add engine: predict an owner block, split, finalise.

These functions run inside Dask tasks and only see numpy arrays and small
geometry tuples; :mod:`tileseg.graph` wires them together. A *box* is a tuple
of ``(start, stop)`` pairs in padded-image pixel coordinates.

Memory per task: an owner task holds its input region, one batch of patches
and a ``K x region`` float32 accumulator; a finalise task holds ``K x block``
plus the summed blending weight of its block, which it recomputes from the
geometry (so the weight never travels between tasks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError, ModelError
from . import buffers

Box = tuple[tuple[int, int], ...]


def _rel(box: Box, origin: Box) -> tuple[slice, ...]:
    return tuple(slice(a - o[0], b - o[0]) for (a, b), o in zip(box, origin))


def intersect(a: Box, b: Box) -> Box | None:
    """Intersection of two boxes, or None when empty."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return None if any(lo >= hi for lo, hi in out) else out


def assemble(region: Box, boxes: Sequence[Box], blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Paste the parts of input ``blocks`` (``C x box``) that fall in ``region``."""
    if len(blocks) == 1 and boxes[0] == region:
        return np.asarray(blocks[0])
    n_ch = blocks[0].shape[0]
    out = np.empty((n_ch,) + tuple(b - a for a, b in region), dtype=blocks[0].dtype)
    for box, blk in zip(boxes, blocks):
        part = intersect(box, region)
        if part is not None:
            out[(slice(None),) + _rel(part, region)] = blk[(slice(None),) + _rel(part, box)]
    return out


def predict_owner(
    predictor,
    region: Box,
    starts: np.ndarray,
    crop_boxes: np.ndarray | None,
    patch: tuple[int, ...],
    n_classes: int,
    batch_size: int,
    window: np.ndarray | None,
    nan_policy: str,
    bad_output: str,
    source: str,
    boxes: Sequence[Box],
    read: Callable[[], Sequence[np.ndarray]] | None,
    *blocks: np.ndarray,
) -> tuple[Box, np.ndarray]:
    """Predict every patch owned by one block and overlap-add it.

    Parameters
    ----------
    predictor : callable
        Maps ``(N, C, *patch)`` float32 to ``(N, K, *patch)``.
    region : Box
        Pixel box covered by the owned patches.
    starts : numpy.ndarray
        ``(n, ndim)`` patch start corners (absolute).
    crop_boxes : numpy.ndarray or None
        ``(n, ndim, 2)`` absolute pixel spans each patch keeps for
        ``blend='crop'``; None for windowed blending.
    patch : tuple of int
        Patch size.
    n_classes : int
        K, the number of model output channels.
    batch_size : int
        Patches per predictor call.
    window : numpy.ndarray or None
        Blending window (None for crop).
    nan_policy : str
        ``"error"`` raises on NaN input; ``"fill"`` (already applied upstream) passes.
    bad_output : str
        NaN/Inf in the model output: ``"error"`` raises a ModelError naming the
        patch box; ``"nodata"`` makes those pixels NaN (the final tasks write
        nodata there) and counts them (see :func:`check_output`).
    source : str
        Image name for error messages.
    boxes : sequence of Box
        Pixel boxes of the input blocks that cover ``region``.
    read : callable or None
        Returns those input blocks (``C x box``); None when they are passed
        in ``blocks`` instead (extra ``blocks`` are ordering tokens).
    blocks : numpy.ndarray
        The input blocks, when ``read`` is None.

    Returns
    -------
    (Box, numpy.ndarray)
        ``region`` and the ``K x region`` float32 accumulator of weighted
        predictions.
    """
    inputs = read() if read is not None else blocks[: len(boxes)]
    x = assemble(region, boxes, inputs)
    del inputs
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if nan_policy == "error" and np.isnan(x).any():
        raise InputError(
            f"{source}: input contains NaN in pixel box {region!r}; "
            "fix the input, mask it as nodata, or set nan_policy='fill'"
        )
    shape = tuple(b - a for a, b in region)
    acc = buffers.zeros((n_classes,) + shape, np.float32)  # handed to the piece tasks
    origin = np.array([a for a, _ in region])
    local = starts - origin
    for i in range(0, len(local), batch_size):
        idx = local[i : i + batch_size]
        batch = np.stack([x[(slice(None),) + tuple(slice(s, s + p) for s, p in zip(c, patch))] for c in idx])
        pred = predictor(batch)
        pred = np.asarray(pred, dtype=np.float32)
        expected = (len(idx), n_classes) + tuple(patch)
        if pred.shape != expected:
            raise ModelError(f"model returned shape {pred.shape!r} for a batch of {batch.shape!r}; expected {expected!r}")
        pred = check_output(pred, idx + origin, patch, bad_output, source, region)
        for j, c in enumerate(idx):
            if crop_boxes is None:
                sl = tuple(slice(s, s + p) for s, p in zip(c, patch))
                acc[(slice(None),) + sl] += pred[j] * window
            else:
                keep = crop_boxes[i + j] - origin[:, None]
                sl = tuple(slice(a, b) for a, b in keep)
                inner = tuple(slice(a - s, b - s) for (a, b), s in zip(keep, c))
                acc[(slice(None),) + sl] += pred[j][(slice(None),) + inner]
    return region, acc


def check_output(pred: np.ndarray, starts: np.ndarray, patch: tuple[int, ...], bad_output: str, source: str,
                 region: Box) -> np.ndarray:
    """NaN/Inf in a batch of model output: an error naming the patch, or NaN pixels that become nodata.

    Parameters
    ----------
    pred : numpy.ndarray
        ``(N, K, *patch)`` model output.
    starts : numpy.ndarray
        ``(N, ndim)`` absolute start corners of the patches (padded image pixels).
    bad_output : {"error", "nodata"}
        Raise, or set every channel of a pixel with a non-finite value to NaN
        and count the pixels (``bad_output_px``) and patches
        (``bad_output_patches``) under ``source`` in :mod:`tileseg.counters`.

    Raises
    ------
    ModelError
        With ``bad_output="error"``: names the image, the first bad patch's
        pixel box and the owner block's region.
    """
    finite = np.isfinite(pred)
    if finite.all():
        return pred
    good_px = finite.all(axis=1)  # (N, *patch): every class finite
    bad_patches = np.flatnonzero(~good_px.reshape(len(pred), -1).all(axis=1))
    first = tuple((int(s), int(s) + p) for s, p in zip(starts[bad_patches[0]], patch))
    n_px = int((~good_px).sum())
    if bad_output == "error":
        raise ModelError(
            f"{source}: model output contains NaN or Inf in {len(bad_patches)} patch(es) of block region {region!r}, "
            f"first at pixel box {first!r} ({n_px} pixels); check the model and its input scaling, or set "
            "bad_output: nodata to write those pixels as nodata")
    from .. import counters

    counters.add("bad_output_px", source, n_px)
    counters.add("bad_output_patches", source, len(bad_patches))
    import logging

    logging.getLogger(__name__).warning("%s: model output has NaN/Inf at %d pixels of %d patch(es), first at "
                                        "pixel box %r: written as nodata", source, n_px, len(bad_patches), first)
    return np.where(good_px[:, None], pred, np.float32(np.nan))


def take_piece(owner: tuple[Box, np.ndarray], target: Box) -> tuple[Box, np.ndarray]:
    """Copy out the part of an owner's accumulator that falls in block ``target``."""
    region, acc = owner
    part = intersect(region, target)
    assert part is not None, (region, target)
    return part, buffers.copy(acc[(slice(None),) + _rel(part, region)])  # may wait for a whole slab


def weight_sum(block: Box, starts: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Summed blending weight over ``block`` of the patches starting at ``starts``."""
    patch = window.shape
    out = np.zeros(tuple(b - a for a, b in block), dtype=np.float32)
    for s in starts:
        part = intersect(block, tuple((int(a), int(a) + p) for a, p in zip(s, patch)))
        if part is not None:
            out[_rel(part, block)] += window[tuple(slice(a - int(o), b - int(o)) for (a, b), o in zip(part, s))]
    return out


def finalize_block(
    block: Box, n_classes: int, output: str, dtype: str, starts: np.ndarray, window: np.ndarray | None,
    *pieces: tuple[Box, np.ndarray],
) -> np.ndarray:
    """Sum the pieces falling in one output block, normalise and reduce.

    Parameters
    ----------
    block : Box
        The output block.
    n_classes, output, dtype
        K, the output kind and the label dtype.
    starts : numpy.ndarray
        ``(n, ndim)`` start corners of every patch covering part of the block.
    window : numpy.ndarray or None
        Blending window; None for ``crop``, where every pixel has exactly one
        contribution and needs no normalisation.
    pieces
        ``(box, K x box)`` weighted predictions from the owner tasks.

    Returns
    -------
    numpy.ndarray
        ``K x block`` float32 for ``logits``/``probabilities``, or a
        ``block``-shaped label array of ``dtype`` for ``labels``.
    """
    shape = tuple(b - a for a, b in block)
    if len(pieces) == 1 and pieces[0][0] == block:
        # never modify an input in place: Dask may hand it to a rerun of this task
        logits = pieces[0][1] if window is None else _normalised(pieces[0][1], weight_sum(block, starts, window))
    else:
        logits = np.zeros((n_classes,) + shape, dtype=np.float32)
        for box, arr in pieces:
            logits[(slice(None),) + _rel(box, block)] += arr
        if window is not None:
            logits = _normalised(logits, weight_sum(block, starts, window), out=logits)
    return reduce_logits(logits, output, dtype)


def finalize_valid(valid: Any, nodata: Any, block: Box, n_classes: int, output: str, dtype: str,
                   starts: np.ndarray, window: np.ndarray | None, *pieces: tuple[Box, np.ndarray]) -> np.ndarray:
    """:func:`finalize_block`, then ``nodata`` wherever the input is invalid.

    ``valid`` is the block's boolean validity, or a callable returning it in a
    list (a :class:`~tileseg.tiling.reads.RegionRead`: the final task reads it
    itself, so validity is computed only when its block is finished).
    """
    out = finalize_block(block, n_classes, output, dtype, starts, window, *pieces)
    v = np.asarray(valid()[0] if callable(valid) else valid, dtype=bool)
    if v.all():
        return out
    if out.ndim == v.ndim:
        return np.where(v, out, out.dtype.type(nodata))
    return np.where(v[None], out, out.dtype.type(nodata))


def _normalised(acc: np.ndarray, weight: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``acc / weight``; pixels no predicted patch covers (weight 0, skipped nodata) stay 0."""
    if weight.size and weight.min() > 0:
        return np.divide(acc, weight, out=out)
    if out is None:
        out = np.zeros_like(acc)
    return np.divide(acc, weight, out=out, where=np.broadcast_to(weight > 0, acc.shape))


def reduce_logits(logits: np.ndarray, output: str, dtype: str) -> np.ndarray:
    """Turn blended logits ``(K, ...)`` into the requested output."""
    if output == "logits":
        return logits
    n_classes = logits.shape[0]
    if output == "probabilities":
        if n_classes == 1:
            return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        e = np.exp(logits - logits.max(axis=0, keepdims=True))
        return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)
    bad = np.isnan(logits).any(axis=0)  # bad model output kept as NaN (bad_output="nodata")
    if n_classes == 1:
        labels = (logits[0] > 0).astype(dtype)
    else:
        labels = np.argmax(np.where(bad, np.float32(0), logits) if bad.any() else logits, axis=0).astype(dtype)
    if bad.any():  # the label nodata: the dtype's largest value (see tileseg.graph)
        labels[bad] = np.iinfo(labels.dtype).max
    return labels
