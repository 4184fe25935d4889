"""The only module that knows the stage order: image -> model input -> patch grid ->
predictor -> overlap-add -> per-chunk reduction -> result image, as one lazy Dask graph.

:func:`segment_image` is that order as a short sequence of named stages, each
taking the :class:`~tileseg.options.TilingOptions` /
:class:`~tileseg.options.InferenceOptions` it needs.

Graph shape (one task per block, never one per patch):

``owner`` tasks
    one per output block that holds the start corner of at least one patch;
    predicts those patches in batches and overlap-adds ``prediction x
    window`` into a ``K x region`` accumulator (region = block plus at most
    one patch margin). Every patch of the grid is predicted exactly once.
``piece`` tasks
    cut each owner's accumulator into the parts falling in each output block
    (its own block and the spill-over into following blocks), so an owner's
    buffer is released as soon as it has been cut.
``final`` tasks
    one per output block: add the pieces, divide by the summed weight of the
    patches covering the block (recomputed from the geometry, so weights
    never travel between tasks), apply the activation/argmax. Peak memory is
    bounded by the chunk size, not by the image size.
"""

from __future__ import annotations

import logging
import uuid
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from itertools import product
from typing import Any

import numpy as np
from dask.highlevelgraph import MaterializedLayer

from . import gcpause
from .errors import ConfigError, InputError, ModelError, TilingError
from .image import Image, label_dtype
from .options import InferenceOptions, TilingOptions
from .placement import model_key
from .stitching import buffers
from .stitching import overlap_add as oa
from .stitching.handover import Handover, interior
from .stitching.weights import blend_window
from .tiling.grid import PatchGrid, make_grid
from .tiling.reads import private_reads

log = logging.getLogger(__name__)

#: Above this many (padded) pixels, ``skip_nodata`` is decided by each owner task from the validity under
#: its region instead of by a pass over the whole validity before computing (see :func:`overlap_add`).
PREPASS_MAX_PIXELS = 2**32

#: Name prefix of the lookahead tokens: ordering-only edges (a pruned graph may drop them, see
#: :func:`tileseg.writers.blocks.needed`).
ORDER_TOKEN = "tileseg-done-"


# --------------------------------------------------------------------------- stages


def segment_image(image: Image, predictor: Any, tiling: TilingOptions, inference: InferenceOptions) -> Image:
    """Segment ``image`` patch by patch into a lazy result :class:`Image`.

    Parameters
    ----------
    image : Image
        2D/3D image, optional leading channel axis.
    predictor : Predictor
        Maps ``(N, C, *patch)`` float32 to ``(N, K, *patch)``
        (see :func:`tileseg.predictors.load_predictor`).
    tiling, inference : TilingOptions, InferenceOptions
        How to cut and stitch; how to run the model and what to return.

    Returns
    -------
    Image
        The input's geometry around labels ``(*spatial)`` (a class map with
        ``class_names``) or ``(K, *spatial)`` float32; pixels the input marks
        invalid (``nodata``/``mask``) are the result's ``nodata``.
    """
    return segment_with_stats(image, predictor, tiling, inference)[0]


def segment_with_stats(image: Image, predictor: Any, tiling: TilingOptions,
                       inference: InferenceOptions) -> tuple[Image, dict[str, int]]:
    """:func:`segment_image` plus ``{"n_patches", "n_patches_skipped"}`` (patches left out as all-nodata)."""
    if tiling.target_spacing is not None:
        return segment_resampled(image, predictor, tiling, inference)
    conventions = getattr(predictor, "conventions", None)
    if getattr(conventions, "output_grid", False) and conventions.output_stride > 1:
        from .output_grid import segment_on_output_grid  # a strided model stitched on its own grid

        return segment_on_output_grid(image, predictor, tiling, inference)
    img = check_input(image)
    grid = plan_grid(img, tiling, inference.batch_size)
    valid = img.valid()
    skip_in_tasks = False
    if valid is not None and inference.skip_nodata:
        if int(np.prod(grid.padded_shape, dtype=np.int64)) > PREPASS_MAX_PIXELS:
            # a pass over the whole validity before starting would take as long as reading the image:
            # each owner task reads its region's validity and leaves out its all-nodata patches instead
            log.info("%s: all-nodata patches are left out by the tasks (no pass over the image's validity "
                     "before computing: it has more than %d pixels)", img.source or "image", PREPASS_MAX_PIXELS)
            skip_in_tasks = True
        else:
            grid = grid.with_active(active_patches(valid, grid))
    data = model_input(img, grid, tiling, inference, valid)
    n_classes = model_classes(predictor, inference.out_channels, int(data.shape[0]), grid.patch_size,
                              img.source or "image")
    names = class_names(inference, n_classes)
    labels = inference.output == "labels"
    # invalid input pixels become the result's nodata: the largest label value (a wider dtype when a
    # class needs it), NaN for scores; the final tasks apply it, reading the validity themselves
    # bad model output (bad_output="nodata") is nodata too
    has_nodata = valid is not None or inference.bad_output == "nodata"
    dtype = label_dtype(len(names) + has_nodata) if labels else np.dtype(np.float32)
    nodata: Any = None if not has_nodata else (int(np.iinfo(dtype).max) if labels else float("nan"))
    with gcpause.paused():  # hundreds of thousands of small objects for a huge image: no collections meanwhile
        stitched = overlap_add(data, grid, predictor, n_classes, tiling.blend, inference, img.source or "image",
                               dtype=dtype, valid=valid, nodata=nodata, skip_in_tasks=skip_in_tasks)
    axes = img.spatial_axes if labels else ("c",) + img.spatial_axes
    result = img.with_data(crop_padding(stitched, grid), axes=axes, class_names=names if labels or
                           inference.class_names else None, nodata=nodata)
    stats = {"n_patches": grid.n_patches, "n_patches_skipped": grid.n_windows - grid.n_patches}
    if skip_in_tasks:  # decided by the tasks, unknown while building
        stats = {"n_patches": None, "n_patches_skipped": None}
    return result, stats


def segment_resampled(image: Image, predictor: Any, tiling: TilingOptions,
                      inference: InferenceOptions) -> tuple[Image, dict[str, int]]:
    """:func:`segment_with_stats` on the image resampled to ``tiling.target_spacing``, back on its grid.

    nnU-Net's order: the input (invalid and, with ``nan_policy="fill"``, NaN
    pixels first set to ``fill_value``) is resampled linearly to the target
    spacing, its validity with nearest; the engine returns logits there; they
    are resampled linearly onto exactly the input's grid (shape, spacing,
    origin, direction) and only then turned into labels or probabilities.
    Pixels the input marks invalid are the result's nodata. Lazy throughout.
    """
    import dask.array as da

    from .image import nodata_outside
    from .resample import resample, resample_to
    from .stitching.overlap_add import reduce_logits

    img = check_input(image)
    if inference.bad_output != "error":
        raise ConfigError("bad_output: nodata is not supported with target_spacing (the resampling back would "
                          "spread the bad pixels); use bad_output: error")
    if len(tiling.target_spacing) != img.spatial_ndim:
        raise TilingError(f"target_spacing {tiling.target_spacing!r} has {len(tiling.target_spacing)} entries but "
                          f"{img.source or 'the image'} has {img.spatial_ndim} spatial axes {img.axes!r}")
    if tuple(tiling.target_spacing) == img.spacing:  # already there: nothing to resample
        return segment_with_stats(img, predictor, replace(tiling, target_spacing=None), inference)
    valid = img.valid()
    data = img.data
    if data.dtype.kind == "f" and inference.nan_policy == "fill":
        data = da.where(da.isnan(data), inference.fill_value, data)
    if valid is not None:
        data = da.where(valid[None] if img.has_channels else valid, data.astype(np.float32),
                        np.float32(inference.fill_value))
    source = img.with_data(data, axes=img.axes, nodata=None, mask=valid)
    moved = resample(source, tiling.target_spacing, order=1, chunks=tiling.chunks)
    inner_tiling = replace(tiling, target_spacing=None)
    scores, stats = segment_with_stats(moved, predictor, inner_tiling, replace(inference, output="logits"))
    if valid is not None:  # invalid pixels are NaN there: no weight on the way back (validity is applied below)
        scores = scores.with_data(da.where(da.isnan(scores.data), np.float32(0), scores.data), nodata=None)
    chunks = tiling.chunks if tiling.chunks is not None else tuple(max(c) for c in scores.data.chunks[1:])
    back = resample_to(scores, img, order=1, chunks=chunks).data.rechunk({0: -1})
    labels = inference.output == "labels"
    names = class_names(inference, int(back.shape[0]))
    if labels:
        dtype = label_dtype(len(names) + (valid is not None))
        out = back.map_blocks(reduce_logits, "labels", dtype.str, drop_axis=0, dtype=dtype)
    else:
        out = back.map_blocks(reduce_logits, inference.output, "f4", dtype=np.float32)
    axes = img.spatial_axes if labels else ("c",) + img.spatial_axes
    result = img.with_data(out, axes=axes, class_names=names if labels or inference.class_names else None,
                           nodata=None)
    return nodata_outside(result, valid, len(names) if labels else None), stats


def check_input(image: Image) -> Image:
    """Refuse pixel types a model cannot take (the message names the image)."""
    if image.dtype.kind not in "biuf":
        raise InputError(f"{image.source or 'image'}: unsupported dtype {image.dtype!s}; "
                         "expected bool, integer or float pixels")
    return image


def plan_grid(image: Image, tiling: TilingOptions, batch_size: int | None = None) -> PatchGrid:
    """The patch grid of ``image`` (patch axes must match its spatial axes)."""
    n = image.spatial_ndim
    patch_size = tiling.patch_size
    if np.isscalar(patch_size):
        patch_size = (int(patch_size),) * n
    if len(tuple(patch_size)) != n:
        raise TilingError(
            f"patch_size {tuple(patch_size)!r} has {len(tuple(patch_size))} axes but "
            f"{image.source or 'the image'} has {n} spatial axes {image.axes!r}"
        )
    return make_grid(image.spatial_shape, patch_size, overlap=tiling.overlap, overlap_px=tiling.overlap_px,
                     chunks=tiling.chunks, batch_size=batch_size)


def model_input(image: Image, grid: PatchGrid, tiling: TilingOptions, inference: InferenceOptions,
                valid: Any = None):
    """``(C, *padded)`` float32 dask array: NaN policy, preprocessing, nodata filling, padding, chunks.

    Invalid pixels (``valid`` false: nodata or masked) are left out of the
    preprocessing statistics and reach the model as ``fill_value``.
    """
    import dask.array as da

    data = image.data if image.has_channels else image.data[None]
    if not image.has_channels and all(p == (0, 0) for p in grid.pad):
        from .readers.dicom import region_chunks

        planes = region_chunks(image.data, grid.chunks)  # owners then read their region, not whole planes
        data = data if planes is None else planes[None]
    if data.dtype.kind == "f" and inference.nan_policy == "fill":
        data = da.where(da.isnan(data), inference.fill_value, data)
    if valid is not None:  # NaN keeps invalid pixels out of the statistics (see tileseg.preprocess)
        data = da.where(valid[None], data.astype(np.float32), np.float32(np.nan))
    if inference.preprocess:
        from .preprocess import apply_preprocess

        data = apply_preprocess(data, list(inference.preprocess))
    if valid is not None:
        data = da.where(valid[None], data, np.float32(inference.fill_value))
    if data.dtype != np.float32:
        data = data.astype(np.float32)
    if any(p != (0, 0) for p in grid.pad):
        data = pad(data, ((0, 0),) + grid.pad, tiling.pad_mode, inference.fill_value)
    return _align_input(data, grid)


def model_classes(predictor: Any, out_channels: int | None, n_ch: int, patch: tuple[int, ...], source: str) -> int:
    """K, the model's output channels: checked input channels, declared or probed with one patch.

    Raises
    ------
    ModelError
        Channel mismatch, or a model that fails on (or returns the wrong shape for) the probe.
    """
    expected_in = getattr(predictor, "in_channels", None)
    if expected_in is not None and int(expected_in) != n_ch:
        raise ModelError(f"model expects {expected_in} input channels, {source} has {n_ch}")
    k = out_channels if out_channels is not None else getattr(predictor, "out_channels", None)
    if k is not None:
        return int(k)
    probe = np.zeros((1, n_ch) + tuple(patch), dtype=np.float32)
    try:
        out = np.asarray(predictor(probe))
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"model failed on a {probe.shape!r} probe batch for {source} ({n_ch} channels): {exc}") from exc
    if out.ndim != probe.ndim or out.shape[0] != 1 or out.shape[2:] != tuple(patch):
        raise ModelError(f"model returned shape {out.shape!r} for a batch of {probe.shape!r}; expected (1, K, *patch)")
    return int(out.shape[1])


def overlap_add(data, grid: PatchGrid, predictor: Any, n_classes: int, blend: str, inference: InferenceOptions,
                source: str, *, dtype: Any = None, valid: Any = None, nodata: Any = None,
                skip_in_tasks: bool = False):
    """The owner / piece / final (and lookahead token) tasks as one dask array over the padded grid.

    With ``valid`` (the input's lazy validity, unpadded), each final task reads
    its own block of it (:mod:`tileseg.tiling.reads`) and writes ``nodata``
    where it is false, so the validity is never shared between tasks nor
    computed ahead of its block. With ``skip_in_tasks`` each owner task also
    reads the validity under its region and does not predict its all-invalid
    patches: exact, since such a patch covers only pixels written as nodata
    (for an image too large for a pass over its validity before computing, see
    :func:`active_patches`).
    """
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    data, reads, readers = _owner_inputs(data, grid)
    lookahead = resolve_lookahead(inference.lookahead)
    inference = replace(inference, lookahead=lookahead)
    token = uuid.uuid4().hex
    names = _Names(token, inference.resources)
    output = inference.output
    window = None if blend == "crop" else blend_window(grid.patch_size, blend)
    if dtype is None:
        dtype = label_dtype(n_classes) if output == "labels" else np.dtype(np.float32)
    dtype = np.dtype(dtype)
    lead = () if output == "labels" else (0,)
    blocks = list(product(*(range(n) for n in grid.n_blocks)))  # blocks no patch reaches are final too
    checks, extra_layers, padded_valid = _validity_reads(valid, grid, blocks)
    owner_valid = None
    if skip_in_tasks and checks is not None and extra_layers is None:
        owner_valid = _owner_validity(padded_valid, grid, reads)
    owner_dsk, sources, cut = _owner_tasks(grid, names, predictor, window, blend, reads, readers, data.name,
                                           n_classes, inference, source, dtype.str, owner_valid)
    final_dsk = {
        (names.final,) + lead + t: (
            _Final(grid.block_box(t), n_classes, output, dtype.str, grid.covering(t), checks is not None, nodata),
            names.window, *((checks[t],) if checks is not None else ()), *sources.get(t, ()))
        for t in blocks
    }
    # block t is done when its output is final and its owner's buffer has been cut up (freed)
    token_dsk = ({(names.done,) + t: (_done, (names.final,) + lead + t, *cut.get(t, ())) for t in blocks}
                 if lookahead else {})
    # One layer: with lookahead edges the owner -> piece -> final -> token
    # dependencies would form a cycle between separate layers.
    # no resource annotation: optimisation drops it; placement reads the model key (tileseg.placement)
    layer = (_OrderedLayer if token_dsk else MaterializedLayer)({**owner_dsk, **final_dsk, **token_dsk})
    if readers is not None:  # owners read their input themselves
        layers, deps = {names.final: layer}, {names.final: set()}
    else:
        layers = dict(data.dask.layers)
        deps = {k: set(v) for k, v in data.dask.dependencies.items()}
        layers[names.final] = layer
        deps[names.final] = {data.name}
    if extra_layers is not None:  # an in-memory validity mask: shared blocks
        layers.update(extra_layers.dask.layers)
        deps.update({k: set(v) for k, v in extra_layers.dask.dependencies.items()})
        deps[names.final] = deps[names.final] | {extra_layers.name}
    out_chunks = grid.chunks if output == "labels" else ((n_classes,),) + grid.chunks
    return da.Array(HighLevelGraph(layers, deps), names.final, out_chunks, dtype=dtype)


def active_patches(valid: Any, grid: PatchGrid) -> np.ndarray:
    """Which patches hold at least one valid pixel: one lazy reduction over the validity mask.

    The padded axes are split into cells at every patch start and end; each
    chunk of ``valid`` reports, per cell it touches, whether it has a valid
    pixel (a few bytes per chunk), and a patch is active when any of the
    cells it spans is. Exact, and it reads the mask once.

    Returns
    -------
    numpy.ndarray
        Boolean, one entry per window index tuple (see :meth:`PatchGrid.with_active`).
    """
    import dask

    valid = pad(valid, grid.pad, "constant", 0) if any(p != (0, 0) for p in grid.pad) else valid
    cuts = [np.unique(np.concatenate([a.starts, a.starts + a.patch, [0, a.size]])) for a in grid.axes]
    offsets = [np.concatenate([[0], np.cumsum(c)]) for c in valid.chunks]
    parts = [dask.delayed(_cells_any)(block, [int(o[i]) for o, i in zip(offsets, idx)], cuts)
             for idx, block in zip(product(*(range(len(c)) for c in valid.chunks)), valid.to_delayed().ravel())]
    cells = np.zeros(tuple(len(c) - 1 for c in cuts), dtype=bool)
    for first, hit in dask.compute(*parts):
        sl = tuple(slice(f, f + n) for f, n in zip(first, hit.shape))
        cells[sl] |= hit
    # a patch spans cells [start, start + patch): prefix sums give "any" per patch
    csum = cells.astype(np.int64)
    for d in range(csum.ndim):
        csum = np.concatenate([np.zeros_like(csum.take([0], axis=d)), np.cumsum(csum, axis=d)], axis=d)
    lo = [np.searchsorted(c, a.starts) for c, a in zip(cuts, grid.axes)]
    hi = [np.searchsorted(c, a.starts + a.patch) for c, a in zip(cuts, grid.axes)]
    total = np.zeros(tuple(len(a.starts) for a in grid.axes), dtype=np.int64)
    for corner in product((0, 1), repeat=grid.ndim):  # inclusion-exclusion over the box corners
        ix = np.ix_(*[(h if c else lw) for c, lw, h in zip(corner, lo, hi)])
        total += (-1) ** (grid.ndim - sum(corner)) * csum[ix]
    return total > 0


def _cells_any(block: np.ndarray, lo: list[int], cuts: list[np.ndarray]) -> tuple[tuple[int, ...], np.ndarray]:
    """Per cell touching ``block`` (global offset ``lo``): whether it holds a valid pixel."""
    starts, firsts = [], []
    for d, (c, o) in enumerate(zip(cuts, lo)):
        n = block.shape[d]
        first = int(np.searchsorted(c, o, side="right") - 1)
        last = int(np.searchsorted(c, o + n, side="left"))
        local = np.clip(c[first:last] - o, 0, n)
        starts.append(local)
        firsts.append(first)
    hit = np.asarray(block, dtype=bool)
    for d, st in enumerate(starts):
        hit = np.logical_or.reduceat(hit, st, axis=d) if hit.shape[d] else hit
    return tuple(firsts), hit


def _validity_reads(valid: Any, grid: PatchGrid, blocks: list[tuple[int, ...]]) -> tuple[dict | None, Any, Any]:
    """Per output block, what its final task uses to read the validity: a RegionRead, or a shared key.

    Returns ``(per-block, None, padded validity)`` normally; ``(per-block keys, the padded dask
    array, the same)`` when the validity is an in-memory array that cannot be packed into every task.
    """
    if valid is None:
        return None, None, None
    if any(p != (0, 0) for p in grid.pad):
        valid = pad(valid, grid.pad, "constant", 0)
    valid = valid.rechunk(grid.chunks)
    keys = {t: (valid.name,) + t for t in blocks}
    readers = private_reads(valid.__dask_graph__(), {t: [k] for t, k in keys.items()})
    if readers is None:
        valid = valid.map_blocks(buffers.copy, dtype=bool, name=f"tileseg-valid-{uuid.uuid4().hex}")
        return {t: (valid.name,) + t for t in blocks}, valid, valid
    return readers, None, valid


def _owner_validity(valid: Any, grid: PatchGrid, reads: dict) -> dict | None:
    """Per owner: the boxes of the output blocks under its region and a RegionRead of their validity."""
    wanted = {o: [(valid.name,) + t for t in grid.targets(o)] for o in reads}
    readers = private_reads(valid.__dask_graph__(), wanted)
    if readers is None:
        return None
    return {o: ([grid.block_box(t) for t in grid.targets(o)], readers[o]) for o in reads}


def crop_padding(result, grid: PatchGrid):
    """Remove the padding added for axes shorter than the patch."""
    if all(p == (0, 0) for p in grid.pad):
        return result
    crop_sl = tuple(slice(b, b + n) for (b, _), n in zip(grid.pad, grid.shape))
    return result[(slice(None),) * (result.ndim - len(crop_sl)) + crop_sl]


def class_names(inference: InferenceOptions, n_classes: int) -> tuple[str, ...]:
    """The classes of the result: ``inference.class_names`` checked against the model, or defaults.

    A one-channel model has two classes (background, foreground).

    Raises
    ------
    ModelError
        Names that do not match the model's output channels.
    """
    n_names = max(n_classes, 2) if inference.output == "labels" or n_classes == 1 else n_classes
    names = inference.class_names
    if names is not None and len(names) != n_names:
        raise ModelError(f"class_names lists {len(names)} classes {list(names)!r} but the model gives "
                         f"{n_classes} channel(s) ({n_names} classes)")
    if names is None:
        names = ("background", "foreground") if n_names == 2 else tuple(f"class_{i}" for i in range(n_names))
    return tuple(names)


def plan(image: Image, tiling: TilingOptions, *, out_channels: int = 1, batch_size: int = 8,
         output: str = "labels") -> dict[str, Any]:
    """Describe the work :func:`segment_image` would do, without computing anything.

    Returns
    -------
    dict
        ``shape`` (spatial), ``resampled_shape`` (with a ``target_spacing``
        that changes it: the grid the patches are laid on), ``channels``,
        ``chunks`` (output chunk sizes per axis), ``n_patches``, ``n_blocks``, ``n_owner_tasks`` and
        ``est_peak_task_bytes`` (largest owner task: input region, one batch,
        the ``K x region`` accumulator, plus one output chunk).
    """
    img = check_input(image)
    source_shape = img.spatial_shape
    if tiling.target_spacing is not None:  # the grid is laid on the resampled image
        import dask.array as da

        from .resample import resampled_shape

        if len(tiling.target_spacing) != img.spatial_ndim:
            raise TilingError(f"target_spacing {tiling.target_spacing!r} does not match the {img.spatial_ndim} "
                              f"spatial axes of {img.source or 'the image'}")
        lead = tuple(img.data.shape[:1]) if img.has_channels else ()
        shape = resampled_shape(source_shape, img.spacing, tiling.target_spacing)
        img = img.with_data(da.empty(lead + shape, dtype=img.dtype, chunks=-1), axes=img.axes,
                            spacing=tiling.target_spacing)
        tiling = replace(tiling, target_spacing=None)
    grid = plan_grid(img, tiling, int(batch_size))
    n_ch = img.data.shape[0] if img.has_channels else 1
    k = int(out_channels)
    patch_px = int(np.prod(grid.patch_size))
    owners = list(grid.owners())
    largest = max((int(np.prod([b - a for a, b in grid.region(o)])) for o in owners), default=0)
    block_px = int(np.prod([max(c) for c in grid.chunks]))
    out_bytes = block_px * (k * 4 if output != "labels" else label_dtype(k).itemsize)
    est = 4 * (largest * (n_ch + k) + batch_size * patch_px * (n_ch + k)) + out_bytes
    extra = {"resampled_shape": tuple(img.spatial_shape)} if source_shape != img.spatial_shape else {}
    return {
        **extra,
        "shape": tuple(source_shape),
        "channels": n_ch,
        "chunks": tuple(max(c) for c in grid.chunks),
        "n_patches": grid.n_patches,
        "n_blocks": int(np.prod(grid.n_blocks)),
        "n_owner_tasks": len(owners),
        "est_peak_task_bytes": int(est),
    }


# --------------------------------------------------------------------------- tasks


class _Names:
    """Graph key names of one segmentation.

    The model key carries the resources inference needs (see
    :mod:`tileseg.placement`): every owner task depends on it, so the
    restriction survives graph optimisation, which drops layer annotations.
    """

    def __init__(self, token: str, resources: dict[str, float] | None = None) -> None:
        self.model = model_key(token, resources)
        self.window = (f"tileseg-window-{token}", 0)
        self.predict, self.piece, self.final = (f"tileseg-{s}-{token}" for s in ("predict", "piece", "final"))
        self.done = f"{ORDER_TOKEN}{token}"


def _owner_tasks(grid: PatchGrid, names: _Names, predictor: Any, window: Any, blend: str, reads: dict,
                 readers: dict | None, input_name: str, n_classes: int, inference: InferenceOptions,
                 source: str, dtype: str, owner_valid: dict | None = None) -> tuple[dict, dict, dict]:
    """Owner (predict) and piece tasks; which pieces fall in each block; which pieces each owner was cut into."""
    dsk: dict[Any, Any] = {names.model: predictor, names.window: window}
    sources: dict[tuple[int, ...], list[Any]] = {}  # block -> pieces falling in it
    cut: dict[tuple[int, ...], list[Any]] = {}  # owner -> pieces cut from it
    crop = blend == "crop"
    lookahead = inference.lookahead or 0
    handovers = _handovers(grid, reads, inference.output, dtype)
    for owner, (boxes, in_idx) in reads.items():
        read = readers[owner] if readers is not None else None
        in_keys = [] if read is not None else [(input_name,) + idx for idx in in_idx]
        if lookahead:
            rank = int(np.ravel_multi_index(owner, grid.n_blocks))
            if rank >= lookahead:
                in_keys.append((names.done,) + tuple(int(v) for v in np.unravel_index(rank - lookahead, grid.n_blocks)))
        # the owned patches as a few integers (tasks compute the corners): the graph does not grow with them
        dsk[(names.predict,) + owner] = (
            _Owner(grid.region(owner), grid.owned(owner), crop, grid.patch_size, n_classes,
                   int(inference.batch_size), inference.nan_policy, inference.bad_output, source, handovers[owner],
                   boxes, read, owner_valid[owner] if owner_valid is not None else None),
            names.model, names.window, *in_keys,
        )
        for t in grid.targets(owner):
            key = (names.piece,) + owner + t
            dsk[key] = (partial(oa.take_piece, target=grid.block_box(t), own=t == owner), (names.predict,) + owner)
            sources.setdefault(t, []).append(key)
            cut.setdefault(owner, []).append(key)
    return dsk, sources, cut


def _handovers(grid: PatchGrid, owners, output: str, dtype: str) -> dict[tuple[int, ...], Handover]:
    """Per owner block: its interior (no other owner writes there) and the other blocks it spills into."""
    regions = {o: grid.region(o) for o in owners}
    targets = {o: [t for t in grid.targets(o) if t != o] for o in owners}
    reaching: dict[tuple[int, ...], list] = {}  # block -> regions of the other owners writing into it
    for o, ts in targets.items():
        for t in ts:
            reaching.setdefault(t, []).append(regions[o])
    out = {}
    for o in owners:
        block = grid.block_box(o)
        out[o] = Handover(block, interior(block, regions[o], reaching.get(o, ())),
                          tuple(grid.block_box(t) for t in targets[o]), output, dtype)
    return out


# Task callables holding a task's constant arguments: Dask sees one opaque object, not nested tuples
# it would scan for keys in every pass over the graph (building, culling, converting, ordering).


@dataclass(frozen=True, repr=False, eq=False)
class _Owner:
    """Owner task: :func:`~tileseg.stitching.overlap_add.predict_owner` with its constant arguments."""

    region: tuple[tuple[int, int], ...]
    patches: Any
    crop: bool
    patch: tuple[int, ...]
    n_classes: int
    batch_size: int
    nan_policy: str
    bad_output: str
    source: str
    handover: Any
    boxes: list[Any]
    read: Any
    valid: Any = None

    def __call__(self, predictor: Any, window: Any, *blocks: Any) -> Any:
        extra = {} if self.valid is None else {"valid": self.valid}
        return oa.predict_owner(predictor, self.region, self.patches, self.crop, self.patch, self.n_classes,
                                self.batch_size, window, self.nan_policy, self.bad_output, self.source,
                                self.handover, self.boxes, self.read, *blocks, **extra)

    def __repr__(self) -> str:
        return f"predict_owner(region={self.region!r}, {len(self.patches)} patches)"


@dataclass(frozen=True, repr=False, eq=False)
class _Final:
    """Final task: :func:`~tileseg.stitching.overlap_add.finalize_block` (or ``finalize_valid``) of one block."""

    block: tuple[tuple[int, int], ...]
    n_classes: int
    output: str
    dtype: str
    patches: Any
    has_valid: bool
    nodata: Any

    def __call__(self, window: Any, *rest: Any) -> Any:
        head = (self.block, self.n_classes, self.output, self.dtype, self.patches, window)
        if self.has_valid:
            return oa.finalize_valid(rest[0], self.nodata, *head, *rest[1:])
        return oa.finalize_block(*head, *rest)

    def __repr__(self) -> str:
        return f"finalize_block(block={self.block!r})"


def _done(*_finished) -> None:
    """Token task: an output block is finished (used for lookahead edges)."""
    return None


def resolve_lookahead(lookahead: int | None, client: Any = None) -> int:
    """The ordering window: ``lookahead`` itself, or by default two blocks per thread that computes (at least 4).

    The threads are those of the active distributed client (``client``, or the
    default one), else Dask's ``num_workers`` setting, else the CPU count.
    0 turns the ordering edges off.

    Raises
    ------
    ConfigError
        A negative or non-integer ``lookahead``.
    """
    if lookahead is not None:
        if isinstance(lookahead, bool) or not isinstance(lookahead, (int, np.integer)) or lookahead < 0:
            raise ConfigError(f"lookahead must be an integer >= 0 (0: no ordering edges), got {lookahead!r}")
        return int(lookahead)
    import os

    import dask

    threads = None
    if client is None:
        from .placement import active_client

        client = active_client()
    if client is not None:
        try:
            threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
        except Exception:  # pragma: no cover - a scheduler that went away
            threads = None
    if not threads:
        threads = dask.config.get("num_workers", None) or os.cpu_count() or 1
    return max(4, 2 * int(threads))


def _is_order_token(key: Any) -> bool:
    name = key[0] if isinstance(key, tuple) else key
    return isinstance(name, str) and name.startswith(ORDER_TOKEN)


class _OrderedLayer(MaterializedLayer):
    """The engine's tasks with ordering edges that never make a partial result compute more.

    Culled for the whole result, the lookahead tokens stay (they bound memory
    whatever order the scheduler picks). Culled for part of it (a slice, some
    blocks), a token whose output block is not needed anyway is replaced by
    a constant, as :func:`tileseg.writers.blocks.needed` does: otherwise
    one token would pull in every earlier block.
    """

    def cull(self, keys: Any, all_hlg_keys: Any) -> Any:
        from dask.core import keys_in_tasks

        mapping = self.mapping
        seen: set[Any] = set()
        tokens: set[Any] = set()
        stack = [k for k in keys if k in mapping]
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            for d in keys_in_tasks(mapping, [mapping[k]]):
                if _is_order_token(d):
                    tokens.add(d)
                elif d not in seen:
                    stack.append(d)
        cut = {t for t in tokens if not all(d in seen for d in keys_in_tasks(mapping, [mapping[t]]))}
        if not cut:
            return super().cull(keys, all_hlg_keys)
        pruned = {k: (None if k in cut else v) for k, v in mapping.items()}
        return MaterializedLayer(pruned, annotations=self.annotations).cull(keys, all_hlg_keys)


def pad(data, width: Sequence[tuple[int, int]], mode: str, fill_value: float = 0.0):
    """``numpy.pad`` for dask arrays, also when the padding is wider than the axis.

    ``dask.array.pad`` reflects only once: asked for more padding than a
    ``reflect``/``symmetric`` axis can mirror, it silently returns a shorter
    array. Here each axis is padded in steps of at most one period, which is
    what ``numpy.pad`` does (checked against it in the tests).
    """
    import dask.array as da

    if mode == "constant":
        return da.pad(data, tuple(width), mode="constant", constant_values=fill_value)
    if mode not in ("reflect", "symmetric"):
        return da.pad(data, tuple(width), mode=mode)
    for axis, (before, after) in enumerate(width):
        n = data.shape[axis]
        period = n if mode == "symmetric" else n - 1
        if n == 1:  # a single pixel mirrors onto itself
            period, step_mode = max(before, after, 1), "edge"
        else:
            step_mode = mode
        while before or after:
            b, a = min(before, period), min(after, period)
            step = [(0, 0)] * data.ndim
            step[axis] = (b, a)
            data = da.pad(data, tuple(step), mode=step_mode)
            before, after = before - b, after - a
    return data


def _blocks_overlapping(bounds: list[int], span: tuple[int, int]) -> range:
    return range(bisect_right(bounds, span[0]) - 1, bisect_left(bounds, span[1]))


def _align_input(data, grid: PatchGrid):
    """One channel chunk; spatial chunks kept where they suit the output grid.

    Owner tasks paste their region from the input blocks it overlaps, so the
    input's own chunks are used as they are unless they are much smaller
    (more than 4x: many tiny dependencies) or much larger (one block pinned
    by many owners) than the output chunks; those axes are rechunked to the
    output grid. Keeping the store's chunks matters for memory: only the
    input blocks under the overlap strip between two owners stay alive
    between their tasks, where merged output-sized blocks would keep a
    whole slab of input.
    """
    new = {0: -1}
    for d, (have, want) in enumerate(zip(data.chunks[1:], grid.chunks), start=1):
        if max(have) * 4 < max(want) or max(have) > 4 * max(want):
            new[d] = want
    return data.rechunk(new)


def _owner_inputs(data, grid: PatchGrid):
    """Which input blocks each owner reads, and how.

    Returns ``(data, reads, readers)``: ``reads[owner] = (boxes, block
    indices)`` of the input blocks under the owner's region; ``readers`` maps
    owners to the :class:`~tileseg.tiling.reads.RegionRead` they run
    themselves, or is None when the input blocks are shared tasks of ``data``
    (input chunks larger than the output's, or in-memory data in the graph),
    in which case ``data`` is returned with its blocks copied off the heap.
    """
    bounds = [np.concatenate([[0], np.cumsum(c)]).tolist() for c in data.chunks[1:]]
    reads: dict[tuple[int, ...], tuple[list[Any], list[tuple[int, ...]]]] = {}
    for owner in grid.owners():
        idx = list(product(*(_blocks_overlapping(b, span) for b, span in zip(bounds, grid.region(owner)))))
        reads[owner] = ([tuple((b[j], b[j + 1]) for b, j in zip(bounds, i)) for i in idx], [(0,) + i for i in idx])
    readers = None
    if _small_input_chunks(data, grid):
        readers = private_reads(data.__dask_graph__(), {o: [(data.name,) + i for i in idx] for o, (_, idx) in reads.items()})
    if readers is None:
        # shared input blocks wait for every owner that overlaps them: keep them off the heap
        data = data.map_blocks(buffers.copy, dtype=data.dtype, name=f"tileseg-input-{uuid.uuid4().hex}")
    return data, reads, readers


def _small_input_chunks(data, grid: PatchGrid) -> bool:
    """Whether owners read their own copy of the input (see :mod:`tiling.reads`).

    Worth it when input chunks are no larger than output chunks: each owner
    then re-reads at most a thin layer of extra chunks. With larger input
    chunks every owner would decode whole big chunks again, so they are shared.
    """
    return all(max(have) <= max(want) for have, want in zip(data.chunks[1:], grid.chunks))
