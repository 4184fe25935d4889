"""The only module that knows the stage order: image -> preprocess -> tiles ->
predictor -> overlap-add -> per-chunk reduction, as one lazy Dask graph.

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
    never travel between tasks), apply the activation/argmax. Peak memory is bounded by the chunk size, not by
    the image size.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from itertools import product
from typing import Any

import numpy as np

from .errors import InputError, ModelError, TilingError
from .image import Image, as_image
from .stitching import buffers
from .stitching import overlap_add as oa
from .stitching.weights import blend_window, check_blend
from .tiling.grid import PatchGrid, make_grid
from .tiling.reads import private_reads

log = logging.getLogger(__name__)

OUTPUTS = ("labels", "probabilities", "logits")
NAN_POLICIES = ("error", "fill")
PAD_MODES = ("reflect", "constant", "edge", "symmetric")


def label_dtype(n_classes: int) -> np.dtype:
    """Smallest unsigned integer dtype holding labels ``0 .. n_classes - 1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if max(n_classes - 1, 1) <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _spatial_ndim(image: Any, patch_size: Any) -> int | None:
    if isinstance(image, Image):
        return image.spatial_ndim
    if np.isscalar(patch_size):
        return None
    return len(tuple(patch_size))


def _prepare_input(image: Any, patch_size: Any) -> Image:
    nd = _spatial_ndim(image, patch_size)
    try:
        img = as_image(image, spatial_ndim=nd)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    dt = img.dtype
    if dt.kind not in "biuf":
        raise InputError(f"{img.source or 'image'}: unsupported dtype {dt!s}; expected bool, integer or float pixels")
    return img


def _channels_first(img: Image):
    data = img.data
    return data if img.has_channels else data[None]


def _grid_for(img: Image, patch_size, overlap, overlap_px, chunks, batch_size: int | None = None) -> PatchGrid:
    n = img.spatial_ndim
    if np.isscalar(patch_size):
        patch_size = (int(patch_size),) * n
    if len(tuple(patch_size)) != n:
        raise TilingError(
            f"patch_size {tuple(patch_size)!r} has {len(tuple(patch_size))} axes but "
            f"{img.source or 'the image'} has {n} spatial axes {img.axes!r}"
        )
    return make_grid(img.spatial_shape, patch_size, overlap=overlap, overlap_px=overlap_px, chunks=chunks,
                     batch_size=batch_size)


def plan(
    image: Any,
    *,
    patch_size: Sequence[int] | int,
    overlap: float | Sequence[float] | None = 0.25,
    overlap_px: int | Sequence[int] | None = None,
    chunks: Any = None,
    out_channels: int = 1,
    batch_size: int = 8,
    output: str = "labels",
) -> dict[str, Any]:
    """Describe the work :func:`segment` would do, without computing anything.

    Returns
    -------
    dict
        ``shape`` (spatial), ``channels``, ``chunks`` (output chunk sizes per
        axis), ``n_patches``, ``n_blocks``, ``n_owner_tasks`` and
        ``est_peak_task_bytes`` (largest owner task: input region, one batch,
        the ``K x region`` accumulator, plus one output chunk).
    """
    img = _prepare_input(image, patch_size)
    grid = _grid_for(img, patch_size, overlap, overlap_px, chunks, int(batch_size))
    n_ch = img.data.shape[0] if img.has_channels else 1
    k = int(out_channels)
    patch_px = int(np.prod(grid.patch_size))
    owners = list(grid.owners())
    largest = max((int(np.prod([b - a for a, b in grid.region(o)])) for o in owners), default=0)
    block_px = int(np.prod([max(c) for c in grid.chunks]))
    out_bytes = block_px * (k * 4 if output != "labels" else label_dtype(k).itemsize)
    est = 4 * (largest * (n_ch + k) + batch_size * patch_px * (n_ch + k)) + out_bytes
    return {
        "shape": tuple(img.spatial_shape),
        "channels": n_ch,
        "chunks": tuple(max(c) for c in grid.chunks),
        "n_patches": grid.n_patches,
        "n_blocks": int(np.prod(grid.n_blocks)),
        "n_owner_tasks": len(owners),
        "est_peak_task_bytes": int(est),
    }


def segment(
    image: Any,
    model: Any,
    *,
    patch_size: Sequence[int] | int,
    overlap: float | Sequence[float] | None = 0.25,
    overlap_px: int | Sequence[int] | None = None,
    blend: str = "gaussian",
    batch_size: int = 8,
    output: str = "labels",
    chunks: Any = None,
    pad_mode: str = "reflect",
    device: str | None = None,
    precision: str = "fp32",
    preprocess: Sequence[Any] | None = None,
    out_channels: int | None = None,
    nan_policy: str = "error",
    fill_value: float = 0.0,
    resources: dict[str, float] | None = None,
    lookahead: int | None = None,
):
    """Segment an image patch by patch into a lazy dask array.

    Parameters
    ----------
    image : numpy.ndarray, dask.array.Array or Image
        2D/3D image, optionally with a leading channel axis (an array with
        ``len(patch_size) + 1`` dimensions).
    model : torch.nn.Module, str, dict, Predictor or callable
        Anything :func:`tileseg.predictors.load_predictor` accepts; maps a
        batch ``(N, C, *patch)`` to ``(N, K, *patch)``.
    patch_size : int or sequence of int
        Patch size per spatial axis.
    overlap : float, optional
        Overlap as a fraction of the patch, ``0 <= overlap < 1``.
    overlap_px : int or sequence of int, optional
        Overlap in pixels instead of ``overlap``.
    blend : {"gaussian", "hann", "constant", "crop"}
        How overlapping predictions are combined.
    batch_size : int
        Patches per model call.
    output : {"labels", "probabilities", "logits"}
        Argmax labels (``> 0.5`` for one class; smallest unsigned dtype),
        softmax/sigmoid of the blended logits, or the blended logits.
    chunks : int, sequence or None
        Output chunk size per spatial axis; the result does not depend on it.
        Default: a multiple of the stride of about 1024 px (2D) or 128 (3D),
        grown so that a block owns whole batches (see :func:`make_grid`).
    pad_mode : str
        Padding of axes shorter than the patch (``reflect``, ``constant`` ...).
    device, precision : str, optional
        Passed to the predictor loader (``precision`` in fp32/fp16/bf16).
    preprocess : list, optional
        Preprocessing steps (see :mod:`tileseg.preprocess`).
    out_channels : int, optional
        K; when unknown, one patch of zeros is run through the model here.
    nan_policy : {"error", "fill"}
        NaN input raises :class:`InputError` naming the pixel box (``error``,
        at compute time) or is replaced by ``fill_value`` before preprocessing.
    resources : dict, optional
        Dask resources required by model tasks, e.g. ``{"GPU": 1}``.
    lookahead : int, optional
        Bound how far (in blocks, raster order) prediction may run ahead of
        finished output chunks: the owner task of block ``i`` waits for
        output block ``i - lookahead``. This keeps the working set to about
        one slab of spill-over margins whatever order the scheduler picks;
        use it when the whole result is computed or stored (``tileseg run``
        does). Leave it None when computing only part of the result: the
        ordering edges would pull in every earlier block.

    Returns
    -------
    dask.array.Array
        ``(*spatial)`` labels, or ``(K, *spatial)`` float32.

    Examples
    --------
    >>> import numpy as np
    >>> identity = lambda batch: batch
    >>> x = np.random.default_rng(0).random((100, 90), dtype=np.float32)
    >>> y = segment(x, identity, patch_size=(32, 32), blend="constant", output="logits", chunks=40)
    >>> bool(np.allclose(y.compute()[0], x))
    True
    """
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    from .predictors import load_predictor

    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if pad_mode not in PAD_MODES:
        raise TilingError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    check_blend(blend)
    img = _prepare_input(image, patch_size)
    grid = _grid_for(img, patch_size, overlap, overlap_px, chunks, int(batch_size))
    source = img.source or "image"

    data = _channels_first(img)
    if data.dtype.kind == "f" and nan_policy == "fill":
        data = da.where(da.isnan(data), fill_value, data)
    if preprocess:
        from .preprocess import apply_preprocess

        data = apply_preprocess(data, list(preprocess))
    if data.dtype != np.float32:
        data = data.astype(np.float32)
    n_ch = data.shape[0]
    if any(p != (0, 0) for p in grid.pad):
        data = pad(data, ((0, 0),) + grid.pad, pad_mode, fill_value)
    data, reads, readers = _owner_inputs(_align_input(data, grid), grid)

    predictor = load_predictor(model, device=device, precision=precision)
    n_classes = _n_classes(predictor, out_channels, n_ch, grid.patch_size, source)

    token = uuid.uuid4().hex
    model_key = (f"tileseg-model-{token}", 0)
    window_key = (f"tileseg-window-{token}", 0)
    owner_name, piece_name, final_name, token_name = (
        f"tileseg-{s}-{token}" for s in ("predict", "piece", "final", "done")
    )
    window = None if blend == "crop" else blend_window(grid.patch_size, blend)
    crop = [a.crop_ranges() for a in grid.axes] if blend == "crop" else None
    dtype = label_dtype(n_classes) if output == "labels" else np.dtype(np.float32)

    owner_dsk: dict[Any, Any] = {model_key: predictor, window_key: window}
    piece_dsk: dict[Any, Any] = {}
    sources: dict[tuple[int, ...], list[Any]] = {}  # block -> pieces falling in it
    cut: dict[tuple[int, ...], list[Any]] = {}  # owner -> pieces cut from it
    for owner, (boxes, in_idx) in reads.items():
        region = grid.region(owner)
        targets = list(grid.targets(owner))
        read = readers[owner] if readers is not None else None
        in_keys = [] if read is not None else [(data.name,) + idx for idx in in_idx]
        if lookahead:
            rank = int(np.ravel_multi_index(owner, grid.n_blocks))
            if rank >= lookahead:
                in_keys.append((token_name,) + tuple(int(v) for v in np.unravel_index(rank - lookahead, grid.n_blocks)))
        crop_boxes = None
        if crop is not None:
            idx = grid.patch_indices_of(owner)
            crop_boxes = np.stack([crop[d][idx[:, d]] for d in range(grid.ndim)], axis=1)
        owner_dsk[(owner_name,) + owner] = (
            oa.predict_owner, model_key, region, grid.patches_of(owner), crop_boxes, grid.patch_size,
            n_classes, int(batch_size), window_key, nan_policy, source, boxes, read, *in_keys,
        )
        for t in targets:
            key = (piece_name,) + owner + t
            piece_dsk[key] = (oa.take_piece, (owner_name,) + owner, grid.block_box(t))
            sources.setdefault(t, []).append(key)
            cut.setdefault(owner, []).append(key)

    lead = () if output == "labels" else (0,)
    final_dsk = {
        (final_name,) + lead + t: (
            oa.finalize_block, grid.block_box(t), n_classes, output, dtype.str, grid.patches_overlapping(t),
            window_key, *keys,
        )
        for t, keys in sources.items()
    }
    # block t is done when its output is final and its owner's buffer has been cut up (freed)
    token_dsk = (
        {(token_name,) + t: (_done, (final_name,) + lead + t, *cut.get(t, ())) for t in sources} if lookahead else {}
    )
    # One layer: with lookahead edges the owner -> piece -> final -> token
    # dependencies would form a cycle between separate layers.
    layer = MaterializedLayer(
        {**owner_dsk, **piece_dsk, **final_dsk, **token_dsk},
        annotations={"resources": _owner_resources(owner_name, resources)} if resources else None,
    )
    if readers is not None:  # owners read their input themselves
        layers, deps = {final_name: layer}, {final_name: set()}
    else:
        layers = dict(data.dask.layers)
        deps = {k: set(v) for k, v in data.dask.dependencies.items()}
        layers[final_name] = layer
        deps[final_name] = {data.name}
    out_chunks = grid.chunks if output == "labels" else ((n_classes,),) + grid.chunks
    result = da.Array(HighLevelGraph(layers, deps), final_name, out_chunks, dtype=dtype)

    if any(p != (0, 0) for p in grid.pad):
        crop_sl = tuple(slice(b, b + n) for (b, _), n in zip(grid.pad, grid.shape))
        result = result[(slice(None),) * len(lead) + crop_sl]
    return result


class _owner_resources:
    """Per-key resource annotation: only model tasks need e.g. a GPU."""

    def __init__(self, owner_name: str, resources: dict[str, float]) -> None:
        self.owner_name, self.resources = owner_name, dict(resources)

    def __call__(self, key) -> dict[str, float] | None:
        return self.resources if isinstance(key, tuple) and key[0] == self.owner_name else None


def _done(*_finished) -> None:
    """Token task: an output block is finished (used for lookahead edges)."""
    return None


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
    lo = int(np.searchsorted(bounds, span[0], side="right") - 1)
    hi = int(np.searchsorted(bounds, span[1], side="left"))
    return range(lo, hi)


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


def _n_classes(predictor, out_channels, n_ch: int, patch: tuple[int, ...], source: str) -> int:
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
