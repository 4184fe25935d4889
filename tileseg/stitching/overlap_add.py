"""Task bodies of the overlap-add engine: predict an owner block, split, finalise.

These functions run inside Dask tasks and only see numpy arrays and small
geometry tuples; :mod:`tileseg.graph` wires them together. A *box* is a tuple
of ``(start, stop)`` pairs in padded-image pixel coordinates.

Memory per task: an owner task holds its input region, one batch of patches
(one buffer refilled for every batch) and a ``K x region`` float32
accumulator, filled in place (:mod:`.accumulate`: torch on the model's device
for torch predictors, NumPy otherwise). Before it ends, the owner reduces the
interior of its own block (the pixels no other owner writes to) where the
accumulator lives and hands over only that result plus ``K x box`` copies of
the strips where blocks meet (:mod:`.handover`); the accumulator is freed
with the task (views of it only where the strips are most of it, see
:func:`keep_whole`). A final task pastes the interior and reduces its strips from
the pieces of every owner: one cache-sized slab of scores at a time for
labels, or ``K x strip`` plus the summed blending weight of the strip for
scores, which it recomputes from the geometry (so the weight never travels
between tasks); see :mod:`.reduce`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError, ModelError
from ..tiling.grid import PatchSet, as_starts
from . import buffers, reduce
from .accumulate import NumpyAccumulator, accumulator
from .handover import Handover, OwnerResult, OwnPiece, box_minus, intersect

log = logging.getLogger(__name__)

Box = tuple[tuple[int, int], ...]


def _rel(box: Box, origin: Box) -> tuple[slice, ...]:
    return tuple(slice(a - o[0], b - o[0]) for (a, b), o in zip(box, origin))


def assemble(region: Box, boxes: Sequence[Box], blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Paste the parts of input ``blocks`` (``C x box``) that fall in ``region``."""
    if len(blocks) == 1 and boxes[0] == region:
        return np.asarray(blocks[0])
    n_ch = blocks[0].shape[0]
    out = buffers.empty((n_ch,) + tuple(b - a for a, b in region), blocks[0].dtype)
    for box, blk in zip(boxes, blocks):
        part = intersect(box, region)
        if part is not None:
            out[(slice(None),) + _rel(part, region)] = blk[(slice(None),) + _rel(part, box)]
    return out


def predict_owner(
    predictor,
    region: Box,
    patches: PatchSet | np.ndarray,
    crop: bool | np.ndarray | None,
    patch: tuple[int, ...],
    n_classes: int,
    batch_size: int,
    window: np.ndarray | None,
    nan_policy: str,
    bad_output: str,
    source: str,
    handover: Handover,
    boxes: Sequence[Box],
    read: Callable[[], Sequence[np.ndarray]] | None,
    *blocks: np.ndarray,
    valid: tuple[Sequence[Box], Callable[[], Sequence[np.ndarray]]] | None = None,
) -> OwnerResult:
    """Predict every patch owned by one block, overlap-add it, reduce the block's interior.

    Parameters
    ----------
    predictor : callable
        Maps ``(N, C, *patch)`` float32 to ``(N, K, *patch)``. One with
        ``predict_tensor`` (a torch model) is stitched on its device.
    region : Box
        Pixel box covered by the owned patches.
    patches : PatchSet or numpy.ndarray
        The owned patches (:class:`~tileseg.tiling.grid.PatchSet`: a few
        integers, the corners computed here), or their ``(n, ndim)`` absolute
        start corners.
    crop : bool, numpy.ndarray or None
        ``blend='crop'``: True (spans computed from ``patches``, a PatchSet),
        or the ``(n, ndim, 2)`` absolute pixel spans each patch keeps; None or
        False for windowed blending.
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
        nodata there) and counts them (see :func:`check_output`). The
        accumulator is checked once at the end; only when it is not finite
        are the patches predicted again, checked batch by batch.
    source : str
        Image name for error messages.
    handover : Handover
        The owner's block, its interior and the other blocks it spills into
        (:mod:`.handover`).
    boxes : sequence of Box
        Pixel boxes of the input blocks that cover ``region``.
    read : callable or None
        Returns those input blocks (``C x box``); None when they are passed
        in ``blocks`` instead (extra ``blocks`` are ordering tokens).
    blocks : numpy.ndarray
        The input blocks, when ``read`` is None.
    valid : (boxes, read), optional
        The boxes of the boolean validity blocks under ``region`` and a
        callable returning them: patches without a valid pixel are not
        predicted (they cover only pixels the final tasks write as nodata).

    Returns
    -------
    OwnerResult
        The interior of the own block reduced (labels, or normalised scores),
        and ``K x box`` float32 weighted sums of the rest of the own block and
        of the spill-over into each other target block.
    """
    inputs = read() if read is not None else blocks[: len(boxes)]
    x = assemble(region, boxes, inputs)
    del inputs
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if nan_policy == "error" and np.isnan(x.min()):  # min propagates NaN: one pass, no mask array
        raise InputError(
            f"{source}: input contains NaN in pixel box {region!r}; "
            "fix the input, mask it as nodata, or set nan_policy='fill'"
        )
    starts = as_starts(patches)
    crop_boxes = patches.crop_boxes() if crop is True else (None if crop is None or crop is False else crop)
    predicted = starts
    if valid is not None:  # all-invalid patches are not predicted (they cover only pixels written as nodata)
        keep = _any_valid(region, valid, starts - np.array([a for a, _ in region]), patch)
        if keep is not None:
            predicted = starts[keep]
            crop_boxes = crop_boxes[keep] if crop_boxes is not None else None
    args = (predictor, x, region, predicted, crop_boxes, patch, n_classes, batch_size, window, bad_output, source)
    if getattr(predictor, "predict_tensor", None) is None:
        return _stitch(args, region, handover, starts, window, host=True)
    from ..predictors.oom import is_out_of_memory, release_cached_memory

    try:
        return _stitch(args, region, handover, starts, window, host=False)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        log.warning("%s: out of device memory while stitching block %r on the model's device (%s); stitching it "
                    "on the host instead", source, region, str(exc).strip()[:200])
    release_cached_memory()  # outside the except block: the traceback's tensors are gone
    return _stitch(args, region, handover, starts, window, host=True)


def _stitch(args: tuple, region: Box, handover: Handover, starts: np.ndarray, window: np.ndarray | None,
            host: bool) -> OwnerResult:
    """Accumulate (again, checking every batch, when the output is not finite) and hand over.

    ``host``: the predictor's host outputs (``__call__``) and a NumPy
    accumulator, for predictors without ``predict_tensor`` and as the
    fallback when the device runs out of memory outside the model's forward
    (concatenating slices, output conventions, the reduction), which the
    batch back-off of :mod:`tileseg.predictors.oom` does not cover.
    """
    acc = _accumulate(*args, careful=False, host=host)
    if not acc.finite():  # bad model output (or an overflow): again, checking every batch
        del acc  # freed before the second one is filled
        acc = _accumulate(*args, careful=True, host=host)
    return hand_over(acc, region, handover, starts, window)


def _accumulate(predictor, x: np.ndarray, region: Box, starts: np.ndarray, crop_boxes: np.ndarray | None,
                patch: tuple[int, ...], n_classes: int, batch_size: int, window: np.ndarray | None,
                bad_output: str, source: str, careful: bool, host: bool = False):
    """The owner's accumulator (:mod:`.accumulate`) with every owned patch added; ``careful``: check each batch.

    ``host``: call the predictor itself (NumPy outputs) even when it has ``predict_tensor``.
    """
    shape = tuple(b - a for a, b in region)
    origin = np.array([a for a, _ in region])
    local = starts - origin
    forward = None if host else getattr(predictor, "predict_tensor", None)  # tensors on the device: stitch there
    batch = None  # one input batch buffer, refilled for every batch of the task
    acc = None
    for i in range(0, len(local), batch_size):
        idx = local[i : i + batch_size]
        if batch is None:
            batch = buffers.empty((min(batch_size, len(local)), x.shape[0]) + tuple(patch), np.float32)
        part = batch[: len(idx)]
        for j, c in enumerate(idx):
            np.copyto(part[j], x[(slice(None),) + tuple(slice(s, s + p) for s, p in zip(c, patch))])
        pred = forward(part) if forward is not None else np.asarray(predictor(part), dtype=np.float32)
        expected = (len(idx), n_classes) + tuple(patch)
        if tuple(pred.shape) != expected:
            raise ModelError(f"model returned shape {tuple(pred.shape)!r} for a batch of {part.shape!r}; "
                             f"expected {expected!r}")
        if careful:
            pred = check_output(pred, idx + origin, patch, bad_output, source, region)
        if acc is None:
            acc = accumulator(pred, n_classes, shape, window)
        for j, c in enumerate(idx):
            if crop_boxes is None:
                acc.add(pred[j], tuple(slice(s, s + p) for s, p in zip(c, patch)))
            else:
                keep = crop_boxes[i + j] - origin[:, None]
                acc.add_crop(pred[j], tuple(slice(a, b) for a, b in keep),
                             tuple(slice(a - s, b - s) for (a, b), s in zip(keep, c)))
        del pred
    if acc is None:  # an owner always has patches; kept for safety
        acc = NumpyAccumulator(n_classes, shape, window)
    return acc


def hand_over(acc, region: Box, handover: Handover, starts: np.ndarray, window: np.ndarray | None) -> OwnerResult:
    """Split an owner's accumulator: its block's interior reduced where it lives, host copies of the rest.

    The interior is reduced by the accumulator itself (on the model's device
    for torch), so from a GPU only the interior's labels (or normalised
    scores) and the ``K``-channel strips and spill-over cross to the host.
    Spill-over pieces are copies, so the accumulator is not pinned while
    those blocks wait for their other owners; so are the own block's
    strips unless they are most of the accumulator (:func:`keep_whole`):
    the accumulator is freed when the owner task ends.
    """
    strips = [p for p in (intersect(s, region) for s in box_minus(handover.block, handover.interior))
              if p is not None]
    # a view pins the whole accumulator until the block's final task has run (with ordering edges, owners
    # further on run meanwhile): copies unless the strips are most of it (blocks hardly larger than a patch)
    view = keep_whole(strips, region)
    own_parts = [(part, acc.part(_rel(part, region), view=view)) for part in strips]
    reduced = None
    inner = handover.interior
    if inner is not None:
        if handover.output == "labels":
            reduced = acc.labels(_rel(inner, region), handover.dtype)
        else:  # only this owner's patches reach the interior: its weight sum is theirs
            weight = None if window is None else weight_sum(inner, starts, window)
            reduced = acc.scores(_rel(inner, region), weight, handover.output)
    spill = {}
    for target in handover.targets:
        part = intersect(region, target)
        if part is not None:
            spill[target] = (part, acc.part(_rel(part, region)))
    return OwnerResult(region, OwnPiece(inner, reduced, tuple(own_parts)), spill)


#: Own strips are handed over as views of a host accumulator (pinning all of it) only when they hold
#: more than this fraction of its pixels; otherwise they are copied and the accumulator freed with the task.
VIEW_FRACTION = 0.5


def keep_whole(strips: Sequence[Box], region: Box) -> bool:
    """Whether the own strips cover more than :data:`VIEW_FRACTION` of ``region`` (then views beat copies).

    >>> keep_whole([((0, 2), (0, 10))], ((0, 10), (0, 10))), keep_whole([((0, 8), (0, 10))], ((0, 10), (0, 10)))
    (False, True)
    """
    px = sum(int(np.prod([b - a for a, b in s])) for s in strips)
    return px > VIEW_FRACTION * int(np.prod([b - a for a, b in region]))


def _any_valid(region: Box, valid: tuple[Sequence[Box], Callable[[], Sequence[np.ndarray]]], local: np.ndarray,
               patch: tuple[int, ...]) -> np.ndarray | None:
    """Per patch (``local`` corners in ``region``): whether it holds a valid pixel; None when all pixels are."""
    boxes, read = valid
    parts = [np.asarray(b, dtype=bool)[None] for b in read()]
    v = assemble(region, boxes, parts)[0]
    if v.all():
        return None
    return np.array([bool(v[tuple(slice(s, s + p) for s, p in zip(c, patch))].any()) for c in local], dtype=bool)


def check_output(pred: np.ndarray, starts: np.ndarray, patch: tuple[int, ...], bad_output: str, source: str,
                 region: Box) -> np.ndarray:
    """NaN/Inf in a batch of model output: an error naming the patch, or NaN pixels that become nodata.

    Parameters
    ----------
    pred : numpy.ndarray or torch.Tensor
        ``(N, K, *patch)`` model output (a tensor stays on its device unless it is bad).
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
    if not isinstance(pred, np.ndarray):  # a tensor on the model's device (see .accumulate)
        if bool(pred.sum().isfinite()):  # one reduction, no mask tensor; an overflow goes on to the exact check
            return pred
        import torch

        return torch.from_numpy(check_output(pred.cpu().numpy(), starts, patch, bad_output, source, region)).to(
            pred.device)
    if np.isfinite(pred.sum()):  # one pass, no mask array; an overflowing sum goes on to the exact check
        return pred
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


def take_piece(owner: OwnerResult, target: Box, own: bool = False) -> OwnPiece | tuple[Box, np.ndarray]:
    """What an owner hands block ``target``: its :class:`OwnPiece`, or the ``(box, K x box)`` spill-over."""
    if own:
        return owner.own
    try:
        return owner.spill[target]
    except KeyError:
        raise ValueError(f"block {target!r} does not meet the owner region {owner.region!r}") from None


def weight_sum(block: Box, starts: PatchSet | np.ndarray, window: np.ndarray) -> np.ndarray:
    """Summed blending weight over ``block`` of the patches starting at ``starts`` (corners or a PatchSet)."""
    patch = window.shape
    starts = as_starts(starts)
    out = np.zeros(tuple(b - a for a, b in block), dtype=np.float32)
    for s in starts:
        part = intersect(block, tuple((int(a), int(a) + p) for a, p in zip(s, patch)))
        if part is not None:
            out[_rel(part, block)] += window[tuple(slice(a - int(o), b - int(o)) for (a, b), o in zip(part, s))]
    return out


def finalize_block(
    block: Box, n_classes: int, output: str, dtype: str, starts: PatchSet | np.ndarray, window: np.ndarray | None,
    *pieces: OwnPiece | tuple[Box, np.ndarray],
) -> np.ndarray:
    """Paste the block's reduced interior; sum the pieces falling in the rest, normalise and reduce.

    Parameters
    ----------
    block : Box
        The output block.
    n_classes, output, dtype
        K, the output kind and the label dtype.
    starts : PatchSet or numpy.ndarray
        Every patch covering part of the block (a
        :class:`~tileseg.tiling.grid.PatchSet`, or ``(n, ndim)`` start corners).
    window : numpy.ndarray or None
        Blending window; None for ``crop``, where every pixel has exactly one
        contribution and needs no normalisation.
    pieces
        The own owner's :class:`OwnPiece` (interior already reduced) and
        ``(box, K x box)`` weighted predictions from the owner tasks (read, never modified).

    Returns
    -------
    numpy.ndarray
        ``K x block`` float32 for ``logits``/``probabilities``, or a
        ``block``-shaped label array of ``dtype`` for ``labels`` (argmax of
        the weighted sums: the per-pixel weight cannot change it, so it is
        not computed; see :mod:`.reduce`).
    """
    own = next((p for p in pieces if isinstance(p, OwnPiece)), None)
    parts = [q for p in pieces for q in (p.parts if isinstance(p, OwnPiece) else (p,))]
    inner = own.interior if own is not None else None
    shape = tuple(b - a for a, b in block)
    if output == "labels":
        out = buffers.empty(shape, dtype)
        if inner is not None:
            out[_rel(inner, block)] = own.reduced
        for strip in box_minus(block, inner):
            out[_rel(strip, block)] = reduce.labels_from_pieces(strip, n_classes, dtype, parts)
        return out
    out = buffers.empty((n_classes,) + shape, np.float32)
    if inner is not None:
        out[(slice(None),) + _rel(inner, block)] = own.reduced
    for strip in box_minus(block, inner):
        weight = None if window is None else weight_sum(strip, starts, window)
        out[(slice(None),) + _rel(strip, block)] = reduce.scores_from_pieces(strip, n_classes, output, parts, weight)
    return out


def finalize_valid(valid: Any, nodata: Any, block: Box, n_classes: int, output: str, dtype: str,
                   starts: PatchSet | np.ndarray, window: np.ndarray | None,
                   *pieces: tuple[Box, np.ndarray]) -> np.ndarray:
    """:func:`finalize_block`, then ``nodata`` wherever the input is invalid.

    ``valid`` is the block's boolean validity, or a callable returning it in a
    list (a :class:`~tileseg.tiling.reads.RegionRead`: the final task reads it
    itself, so validity is computed only when its block is finished).
    """
    out = finalize_block(block, n_classes, output, dtype, starts, window, *pieces)
    v = np.asarray(valid()[0] if callable(valid) else valid, dtype=bool)
    if v.all():
        return out
    invalid = ~v
    np.copyto(out, out.dtype.type(nodata), where=invalid if out.ndim == v.ndim else invalid[None])
    return out  # a fresh array of this task, never one of its inputs


# kept here for callers that import it from the engine module
reduce_logits = reduce.reduce_logits
