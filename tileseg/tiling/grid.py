"""Pure patch-grid geometry: no dask, no I/O, no pixels.

The grid follows MONAI's ``sliding_window_inference`` convention so that MONAI
can serve as a test oracle:

* ``stride = int(patch * (1 - overlap))`` (at least 1), or
  ``stride = patch - overlap_px`` when the overlap is given in pixels;
* windows start at 0, every ``stride`` pixels, until one reaches the end;
  the last window is moved back to end flush with the image;
* an axis shorter than the patch is padded symmetrically to the patch size
  (``before = (patch - size) // 2``) and the padding is cropped afterwards.

Each patch is *owned* by the output block that holds its start corner. The
owner predicts it once; its contribution spills into the following blocks
when the patch crosses block borders.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import product

import numpy as np

from ..errors import TilingError

log = logging.getLogger(__name__)

#: Largest patch accepted, in pixels (e.g. 512^3); larger ones are a mistake.
MAX_PATCH_PIXELS = 2**27
#: Default output chunk edge per axis (at least the patch size).
DEFAULT_CHUNK = {2: 1024, 3: 128}
#: Default chunks grow (by whole strides) until an image has at most this many blocks: with about
#: ten tasks per block (owner, pieces, final, token, store) an item's graph stays under ~10^5 tasks.
MAX_BLOCKS = 8192


def stride_for(patch: int, *, overlap: float | None = None, overlap_px: int | None = None) -> int:
    """Stride of the windows along one axis.

    Parameters
    ----------
    patch : int
        Patch size along the axis.
    overlap : float, optional
        Overlap as a fraction of the patch, ``0 <= overlap < 1``.
    overlap_px : int, optional
        Overlap in pixels, ``0 <= overlap_px < patch``.

    Returns
    -------
    int
        ``int(patch * (1 - overlap))`` or ``patch - overlap_px``, at least 1.
    """
    if overlap_px is not None:
        return max(1, patch - int(overlap_px))
    return max(1, int(patch * (1 - float(overlap or 0.0))))


def window_starts(size: int, patch: int, stride: int) -> np.ndarray:
    """Start positions of the windows along one axis (``size >= patch``).

    Examples
    --------
    >>> window_starts(100, 64, 48).tolist()
    [0, 36]
    """
    if size <= patch:
        return np.zeros(1, dtype=np.int64)
    n = math.ceil((size - patch) / stride) + 1
    starts = np.arange(n, dtype=np.int64) * stride
    starts[-1] = size - patch
    return starts


def window_start(index: np.ndarray | int, size: int, patch: int, stride: int) -> np.ndarray:
    """Start of window ``index`` along one axis, in closed form (same as ``window_starts(...)[index]``).

    Every window starts ``stride`` after the previous one, except the last,
    which is moved back to end flush with the axis: ``min(i * stride, size - patch)``.

    >>> window_start(np.arange(2), 100, 64, 48).tolist()
    [0, 36]
    """
    return np.minimum(np.asarray(index, dtype=np.int64) * stride, max(size - patch, 0))


def n_windows(size: int, patch: int, stride: int) -> int:
    """Number of windows along one axis (``len(window_starts(size, patch, stride))``)."""
    return 1 if size <= patch else math.ceil((size - patch) / stride) + 1


@dataclass(frozen=True)
class PatchSet:
    """A box of window indices on the grid: the patches one task works on, in closed form.

    Tasks carry this (a few integers, whatever the image size) instead of an
    array of patch corners, and compute the corners when they run (see
    :meth:`PatchGrid.owned`, :meth:`PatchGrid.covering`).

    Attributes
    ----------
    geometry : tuple of (size, patch, stride)
        Per axis, the padded axis length, patch size and stride.
    ranges : tuple of (int, int)
        Per axis, the half-open range of window indices.
    active : numpy.ndarray or None
        For grids that skip patches (:meth:`PatchGrid.with_active`): which
        windows of the box are predicted (shape: the box); None for all.
    """

    geometry: tuple[tuple[int, int, int], ...]
    ranges: tuple[tuple[int, int], ...]
    active: np.ndarray | None = None

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.ranges)

    def __len__(self) -> int:
        if self.active is not None:
            return int(self.active.sum())
        return math.prod(max(0, hi - lo) for lo, hi in self.ranges)

    def indices(self) -> np.ndarray:
        """Window index tuples ``(n, ndim)`` in raster order (active ones only)."""
        mesh = np.meshgrid(*[np.arange(lo, hi, dtype=np.int64) for lo, hi in self.ranges], indexing="ij")
        idx = np.stack([m.ravel() for m in mesh], axis=1) if mesh else np.zeros((0, 0), np.int64)
        if self.active is not None:
            idx = idx[self.active.ravel()]
        return idx.reshape(-1, self.ndim)

    def starts(self) -> np.ndarray:
        """Start corners ``(n, ndim)`` in raster order (active ones only)."""
        idx = self.indices()
        return np.stack([window_start(idx[:, d], *g) for d, g in enumerate(self.geometry)], axis=1) if len(idx) \
            else np.zeros((0, self.ndim), dtype=np.int64)

    def crop_boxes(self) -> np.ndarray:
        """``(n, ndim, 2)`` absolute spans each patch keeps for ``blend='crop'`` (see :meth:`AxisGrid.crop_ranges`)."""
        idx = self.indices()
        return np.stack([_crop_spans(idx[:, d], *g) for d, g in enumerate(self.geometry)], axis=1) if len(idx) \
            else np.zeros((0, self.ndim, 2), dtype=np.int64)


def _crop_spans(index: np.ndarray, size: int, patch: int, stride: int) -> np.ndarray:
    """Per window ``index``: the half-open span nearest to its centre (closed form of :meth:`AxisGrid.crop_ranges`)."""
    n = n_windows(size, patch, stride)

    def cut(i: np.ndarray) -> np.ndarray:  # first pixel nearer to window i + 1 than to window i
        return (2 * window_start(i, size, patch, stride) + 2 * window_start(i + 1, size, patch, stride)
                + 2 * patch - 2) // 4 + 1

    lo = np.where(index == 0, 0, cut(index - 1))
    hi = np.where(index == n - 1, size, cut(index))
    return np.stack([lo, hi], axis=1)


def as_starts(patches: PatchSet | np.ndarray) -> np.ndarray:
    """Patch start corners ``(n, ndim)`` of a :class:`PatchSet` (or an array of them, returned as is)."""
    return patches.starts() if isinstance(patches, PatchSet) else np.asarray(patches)


@dataclass(frozen=True)
class AxisGrid:
    """Windows and output blocks along one (padded) axis.

    Attributes
    ----------
    size : int
        Padded axis length (at least ``patch``).
    patch : int
        Patch size.
    stride : int
        Distance between window starts (the last one may be closer).
    bounds : tuple of int
        Output block boundaries, ``bounds[0] == 0`` and ``bounds[-1] == size``.
    """

    size: int
    patch: int
    stride: int
    bounds: tuple[int, ...]

    @cached_property
    def starts(self) -> np.ndarray:
        """Window start positions."""
        return window_starts(self.size, self.patch, self.stride)

    @property
    def n_blocks(self) -> int:
        """Number of output blocks along the axis."""
        return len(self.bounds) - 1

    def block_of(self, position: int) -> int:
        """Index of the block holding ``position``."""
        return int(np.searchsorted(self.bounds, position, side="right") - 1)

    @cached_property
    def owned(self) -> tuple[tuple[int, int], ...]:
        """Per block, the half-open range of window indices whose start lies in it."""
        edges = np.searchsorted(self.starts, np.asarray(self.bounds), side="left")
        return tuple((int(edges[b]), int(edges[b + 1])) for b in range(self.n_blocks))

    def region(self, block: int) -> tuple[int, int] | None:
        """Pixel span covered by the windows owned by ``block`` (None if it owns none)."""
        lo, hi = self.owned[block]
        if hi <= lo:
            return None
        return int(self.starts[lo]), int(self.starts[hi - 1]) + self.patch

    def targets(self, block: int) -> range:
        """Blocks that the windows owned by ``block`` write into."""
        span = self.region(block)
        if span is None:
            return range(0)
        return range(self.block_of(span[0]), self.block_of(span[1] - 1) + 1)

    @cached_property
    def sources(self) -> tuple[tuple[int, ...], ...]:
        """Per block, the owner blocks whose windows write into it."""
        incoming: list[list[int]] = [[] for _ in range(self.n_blocks)]
        for b in range(self.n_blocks):
            for t in self.targets(b):
                incoming[t].append(b)
        return tuple(tuple(x) for x in incoming)

    def crop_ranges(self) -> np.ndarray:
        """For ``blend='crop'``: per window, the pixel span nearest to its centre.

        Returns
        -------
        numpy.ndarray
            ``(n_windows, 2)`` absolute half-open spans that tile the axis.
            A pixel equally far from two centres goes to the earlier window.
        """
        centres2 = 2 * self.starts + self.patch - 1  # twice the centre position
        cuts = (centres2[:-1] + centres2[1:]) // 4 + 1
        lo = np.concatenate([[0], cuts])
        hi = np.concatenate([cuts, [self.size]])
        return np.stack([lo, hi], axis=1)


@dataclass(frozen=True)
class PatchGrid:
    """The patch grid of an image and its output blocks, all axes.

    Attributes
    ----------
    shape : tuple of int
        Spatial shape of the image before padding.
    axes : tuple of AxisGrid
        Per-axis geometry on the padded image.
    pad : tuple of (int, int)
        Padding added before/after per axis (only on axes shorter than the patch).
    active : numpy.ndarray or None
        Boolean array with one entry per window index tuple (shape: windows
        per axis): the patches that are predicted. ``None``: all of them.
        Inactive patches (e.g. entirely nodata, see :func:`with_active`) are
        owned by no block, read by no task and count in no weight sum.
    """

    shape: tuple[int, ...]
    axes: tuple[AxisGrid, ...]
    pad: tuple[tuple[int, int], ...]
    active: np.ndarray | None = None

    def with_active(self, active: np.ndarray) -> PatchGrid:
        """The same grid predicting only the patches where ``active`` is true.

        >>> g = make_grid((200, 200), (64, 64), overlap=0.5, chunks=100)
        >>> keep = np.zeros((6, 6), bool); keep[0, 0] = keep[5, 5] = True
        >>> h = g.with_active(keep)
        >>> g.n_patches, h.n_patches, sorted(h.owners()), h.patches_of((1, 1)).tolist(), h.region((1, 1))
        (36, 2, [(0, 0), (1, 1)], [[136, 136]], ((136, 200), (136, 200)))
        """
        active = np.asarray(active, dtype=bool)
        expected = tuple(len(a.starts) for a in self.axes)
        if active.shape != expected:
            raise TilingError(f"active patches: shape {active.shape!r} != windows per axis {expected!r}")
        return PatchGrid(shape=self.shape, axes=self.axes, pad=self.pad, active=active)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions."""
        return len(self.axes)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        """Spatial shape after padding."""
        return tuple(a.size for a in self.axes)

    @property
    def patch_size(self) -> tuple[int, ...]:
        """Patch size per axis."""
        return tuple(a.patch for a in self.axes)

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """Output chunks on the padded image (dask ``chunks`` notation)."""
        return tuple(tuple(np.diff(a.bounds).tolist()) for a in self.axes)

    @property
    def n_blocks(self) -> tuple[int, ...]:
        """Number of output blocks per axis."""
        return tuple(a.n_blocks for a in self.axes)

    @property
    def n_patches(self) -> int:
        """Number of patches predicted (all of the grid's, or the active ones)."""
        if self.active is not None:
            return int(self.active.sum())
        return int(np.prod([len(a.starts) for a in self.axes]))

    @property
    def n_windows(self) -> int:
        """Number of patches of the whole grid, predicted or not."""
        return int(np.prod([len(a.starts) for a in self.axes]))

    def owners(self):
        """Yield the block indices that own at least one (active) patch."""
        per_axis = [[b for b in range(a.n_blocks) if a.region(b) is not None] for a in self.axes]
        for block in product(*per_axis):
            if self.active is None or len(self.patch_indices_of(block)):
                yield block

    def _indices(self, ranges: list[np.ndarray]) -> np.ndarray:
        """Window index tuples ``(n, ndim)`` of the mesh of ``ranges``, active ones only, raster order."""
        mesh = np.meshgrid(*ranges, indexing="ij")
        idx = np.stack([m.ravel() for m in mesh], axis=1).astype(np.int64)
        if self.active is not None and len(idx):
            idx = idx[self.active[tuple(idx.T)]]
        return idx

    def _starts(self, idx: np.ndarray) -> np.ndarray:
        return np.stack([a.starts[idx[:, d]] for d, a in enumerate(self.axes)], axis=1) if len(idx) else \
            np.zeros((0, self.ndim), dtype=np.int64)

    def patches_of(self, block: Sequence[int]) -> np.ndarray:
        """Start corners ``(n, ndim)`` of the patches owned by ``block``, in raster order."""
        return self._starts(self.patch_indices_of(block))

    def patch_indices_of(self, block: Sequence[int]) -> np.ndarray:
        """Per-axis window indices ``(n, ndim)`` of the patches owned by ``block``."""
        return self._indices([np.arange(*a.owned[b]) for a, b in zip(self.axes, block)])

    def patches_overlapping(self, block: Sequence[int]) -> np.ndarray:
        """Start corners ``(n, ndim)`` of every (active) patch that covers part of ``block``."""
        return self.covering(block).starts()

    def _set(self, ranges: list[tuple[int, int]]) -> PatchSet:
        active = None
        if self.active is not None:
            active = self.active[tuple(slice(lo, hi) for lo, hi in ranges)]
        return PatchSet(tuple((a.size, a.patch, a.stride) for a in self.axes), tuple(ranges), active)

    def owned(self, block: Sequence[int]) -> PatchSet:
        """The patches owned by ``block`` as a :class:`PatchSet` (same order as :meth:`patches_of`)."""
        return self._set([a.owned[b] for a, b in zip(self.axes, block)])

    def covering(self, block: Sequence[int]) -> PatchSet:
        """Every (active) patch that covers part of ``block``, as a :class:`PatchSet`."""
        ranges = []
        for a, b in zip(self.axes, block):
            lo, hi = a.bounds[b], a.bounds[b + 1]
            # starts increase strictly: the windows meeting [lo, hi) are one contiguous index range
            first = int(np.searchsorted(a.starts, lo - a.patch, side="right"))
            last = int(np.searchsorted(a.starts, hi, side="left"))
            ranges.append((first, max(first, last)))
        return self._set(ranges)

    def region(self, block: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Pixel box covered by the (active) patches owned by ``block``."""
        if self.active is None:
            return tuple(a.region(b) for a, b in zip(self.axes, block))  # type: ignore[misc]
        starts = self.patches_of(block)
        return tuple((int(starts[:, d].min()), int(starts[:, d].max()) + a.patch) for d, a in enumerate(self.axes))

    def targets(self, block: Sequence[int]):
        """Blocks that the patches owned by ``block`` write into."""
        if self.active is None:
            return product(*(a.targets(b) for a, b in zip(self.axes, block)))
        box = self.region(block)
        return product(*(range(a.block_of(lo), a.block_of(hi - 1) + 1) for a, (lo, hi) in zip(self.axes, box)))

    def sources(self, block: Sequence[int]):
        """Owner blocks whose patches write into ``block``."""
        return product(*(a.sources[b] for a, b in zip(self.axes, block)))

    def block_box(self, block: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Pixel box of an output block."""
        return tuple((a.bounds[b], a.bounds[b + 1]) for a, b in zip(self.axes, block))


def _per_axis(value, n: int, name: str) -> tuple:
    if value is None:
        return (None,) * n
    if np.isscalar(value):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise TilingError(f"{name}: has {len(value)} values but the patch has {n} dimensions")
    return value


def _bounds(size: int, chunk) -> tuple[int, ...]:
    if isinstance(chunk, (tuple, list)):
        sizes = [int(c) for c in chunk]
        if sum(sizes) != size or min(sizes) < 1:
            raise TilingError(f"chunks {tuple(sizes)!r} do not add up to the axis length {size}")
        return tuple(np.concatenate([[0], np.cumsum(sizes)]).tolist())
    chunk = int(chunk)
    if chunk < 1:
        raise TilingError(f"chunk size must be >= 1, got {chunk!r}")
    return tuple(list(range(0, size, chunk)) + [size])


def tile_steps(
    patch_size: Sequence[int] | int,
    *,
    overlap: float | Sequence[float] | None = 0.25,
    overlap_px: int | Sequence[int] | None = None,
    ndim: int | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check a patch size and overlap; return ``(patch, strides)`` per axis.

    The one place where patch sizes and overlaps are validated (the pipeline
    schema, :func:`make_grid` and :func:`tileseg.segment` all call it).

    Parameters
    ----------
    patch_size : int or sequence of int
        Patch size per axis (an int: the same on every axis, needs ``ndim``).
    overlap : float or sequence of float, optional
        Fraction of the patch, ``0 <= overlap < 1``.
    overlap_px : int or sequence of int, optional
        Pixels, ``0 <= overlap_px < patch``; excludes a non-zero ``overlap``.
    ndim : int, optional
        Number of spatial axes (default ``len(patch_size)``).

    Raises
    ------
    TilingError
        Naming the offending value.

    >>> tile_steps((64, 64), overlap=0.25)
    ((64, 64), (48, 48))
    >>> tile_steps(32, overlap=None, overlap_px=8, ndim=3)
    ((32, 32, 32), (24, 24, 24))
    """
    if ndim is None:
        if np.isscalar(patch_size):
            raise TilingError("patch_size is a single number: say how many axes (ndim)")
        ndim = len(tuple(patch_size))
    n = int(ndim)
    if n not in (2, 3):
        raise TilingError(f"patch_size: must have 2 (2D) or 3 (3D) entries (got {list(patch_size) if not np.isscalar(patch_size) else patch_size!r})")
    patch = tuple(int(p) for p in _per_axis(patch_size, n, "patch_size"))
    if any(p < 1 for p in patch):
        raise TilingError(f"patch_size: every entry must be > 0 (got {list(patch)!r})")
    if int(np.prod(patch)) > MAX_PATCH_PIXELS:
        raise TilingError(f"patch_size: {list(patch)!r} has more than {MAX_PATCH_PIXELS} pixels")
    if overlap_px is not None and overlap not in (None, 0, 0.0):
        raise TilingError(
            f"overlap_px: overlap and overlap_px are mutually exclusive; give one of them "
            f"(got overlap={overlap!r}, overlap_px={overlap_px!r})")
    if overlap_px is not None:
        ovs = tuple(int(o) for o in _per_axis(overlap_px, n, "overlap_px"))
        for o, p in zip(ovs, patch):
            if not 0 <= o < p:
                raise TilingError(f"overlap_px: entries must be >= 0 and < the patch size "
                                  f"(got overlap_px={overlap_px!r}, patch_size={list(patch)!r})")
        return patch, tuple(stride_for(p, overlap_px=o) for p, o in zip(patch, ovs))
    ovf = tuple(float(o) for o in _per_axis(overlap if overlap is not None else 0.0, n, "overlap"))
    for o in ovf:
        if not 0.0 <= o < 1.0 or math.isnan(o):
            raise TilingError(f"overlap: must be >= 0 and < 1, a fraction of the patch (got {o!r})")
    return patch, tuple(stride_for(p, overlap=o) for p, o in zip(patch, ovf))


def make_grid(
    shape: Sequence[int],
    patch_size: Sequence[int] | int,
    *,
    overlap: float | Sequence[float] | None = 0.25,
    overlap_px: int | Sequence[int] | None = None,
    chunks=None,
    batch_size: int | None = None,
) -> PatchGrid:
    """Build the patch grid for an image.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape of the image.
    patch_size : int or sequence of int
        Patch size per axis.
    overlap : float or sequence of float, optional
        Overlap as a fraction of the patch (``0 <= overlap < 1``).
    overlap_px : int or sequence of int, optional
        Overlap in pixels (``0 <= overlap_px < patch``); excludes ``overlap``.
    chunks : int, sequence, or None
        Output chunk size per axis (int per axis, or explicit dask-style
        chunk tuples). Default: the smallest multiple of the stride that is at
        least ``max(patch, 1024)`` in 2D or ``max(patch, 128)`` in 3D (e.g. 144
        for a 64^3 patch with overlap 0.25), so blocks start on window starts and
        spill only the overlap into their neighbours. Axes shorter than the
        patch always form a single chunk.
    batch_size : int, optional
        With default chunks: grow the chunk by whole strides (at most 1.5x
        per axis) until a full block owns a multiple of ``batch_size``
        patches, so owner tasks send only full batches to the model.

    Returns
    -------
    PatchGrid

    Raises
    ------
    TilingError
        For impossible patch sizes, overlaps or chunks.

    Examples
    --------
    >>> g = make_grid((100, 70), (64, 64), overlap=0.25, chunks=50)
    >>> g.n_patches, g.padded_shape
    (4, (100, 70))
    """
    shape = tuple(int(s) for s in shape)
    n = len(shape)
    if n not in (2, 3):
        raise TilingError(f"images must have 2 or 3 spatial dimensions, got shape {shape!r}")
    if min(shape) < 1:
        raise TilingError(f"image shape {shape!r} has an empty axis")
    patch, strides = tile_steps(patch_size, overlap=overlap, overlap_px=overlap_px, ndim=n)

    if chunks is None:
        # A multiple of the stride: every block then starts on a window start, so a
        # block's windows spill only ``patch - stride`` (the overlap) into the next block,
        # which keeps the spill-over carried between tasks as small as it can be.
        counts = tuple(math.ceil(max(p, DEFAULT_CHUNK[n]) / s) for p, s in zip(patch, strides))
        if batch_size and batch_size > 1:
            counts = fill_batches(counts, int(batch_size))
        counts = _few_blocks(shape, strides, counts)
        chunks = tuple(s * m for s, m in zip(strides, counts))
    chunk_per_axis = _per_axis(chunks, n, "chunks") if not _is_nested(chunks) else tuple(chunks)
    if len(chunk_per_axis) != n:
        raise TilingError(f"chunks {chunks!r} do not match {n} spatial dimensions")

    axes, pad = [], []
    for size, p, s, c in zip(shape, patch, strides, chunk_per_axis):
        if size < p:
            diff = p - size
            pad.append((diff // 2, diff - diff // 2))
            bounds = (0, p)
        else:
            pad.append((0, 0))
            bounds = _bounds(size, c)
        axes.append(AxisGrid(size=max(size, p), patch=p, stride=s, bounds=bounds))
    return PatchGrid(shape=shape, axes=tuple(axes), pad=tuple(pad))


def _few_blocks(shape: Sequence[int], strides: Sequence[int], counts: Sequence[int]) -> tuple[int, ...]:
    """Window counts per block, grown by one common factor until the image has at most :data:`MAX_BLOCKS` blocks.

    >>> _few_blocks((10**6, 10**6), (192, 192), (6, 6))
    (58, 58)
    >>> _few_blocks((1000, 1000), (192, 192), (6, 6))
    (6, 6)
    """
    counts = tuple(int(c) for c in counts)

    def n_blocks(cs: tuple[int, ...]) -> int:
        return math.prod(math.ceil(size / (s * c)) for size, s, c in zip(shape, strides, cs))

    if n_blocks(counts) <= MAX_BLOCKS:
        return counts
    factor = (n_blocks(counts) / MAX_BLOCKS) ** (1 / len(counts))
    grown = tuple(max(c, math.ceil(c * factor)) for c in counts)
    while n_blocks(grown) > MAX_BLOCKS:
        grown = tuple(c + 1 for c in grown)
    log.info("blocks of %s windows per axis (instead of %s) keep the image to at most %d blocks",
             grown, counts, MAX_BLOCKS)
    return grown


def fill_batches(counts: Sequence[int], batch_size: int, growth: float = 1.5) -> tuple[int, ...]:
    """Smallest per-axis window counts, each at most ``growth`` x the given one,
    whose product is a multiple of ``batch_size``; the given counts if none is.

    Examples
    --------
    >>> fill_batches((3, 3, 3), 4), fill_batches((6, 6), 16), fill_batches((5, 5), 7)
    ((3, 3, 4), (6, 8), (5, 7))
    """
    counts = tuple(int(c) for c in counts)
    ranges = [range(c, max(c, math.floor(c * growth)) + 1) for c in counts]
    fits = [c for c in product(*ranges) if math.prod(c) % batch_size == 0]
    return min(fits, key=lambda c: (math.prod(c), c)) if fits else counts


def _is_nested(chunks) -> bool:
    return isinstance(chunks, (tuple, list)) and any(isinstance(c, (tuple, list)) for c in chunks)
