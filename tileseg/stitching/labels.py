"""Connected components across chunks: global 64-bit labels, memory-bounded.

Why not :func:`dask_image.ndmeasure.label`: it returns int32 labels (overflow
risk once many chunks hold many objects) and builds a graph whose size grows
with the whole image; measured here it took 35.6 s at 256^3 (about 350x
:func:`scipy.ndimage.label`) and did not finish 512^3 in 15 minutes, and its
graph construction runs out of memory at 5120^3 (dask-image issue 391). This
module therefore implements the usual scalable scheme itself:

1. label every chunk on its own with :func:`scipy.ndimage.label`
   (local labels ``1..n_b``; one task per chunk);
2. in the same pass, collect per chunk small summaries (label count, size and
   first raster index of every local label, labels touching the image border)
   and, for every chunk face, the pairs of provisional labels that touch across
   the face (with the connectivity's diagonal offsets, so objects meeting only
   at a chunk edge or corner are joined too);
3. solve the union-find on that edge list on the client with
   :func:`scipy.sparse.csgraph.connected_components` (its size grows with the
   number of objects and chunk faces, not with the volume);
4. relabel chunk by chunk with a per-chunk lookup table (lazily; the local
   labelling is recomputed, so nothing of image size is ever held).

The graph has O(number of chunks) tasks; each task holds O(chunk + faces)
data. Final labels are numbered in order of first appearance in C (raster)
order over the whole image, which is exactly what :func:`scipy.ndimage.label`
gives for the whole array.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from ..errors import ConfigError, InputError

__all__ = ["Components", "components", "label", "structure"]

_INT64_MAX = np.iinfo(np.int64).max


def structure(ndim: int, connectivity: int) -> np.ndarray:
    """Structuring element for ``connectivity`` (1 = faces ... ``ndim`` = all neighbours).

    Raises
    ------
    ConfigError
        If ``connectivity`` is not in ``1..ndim``.
    """
    import scipy.ndimage as ndi

    if not isinstance(connectivity, (int, np.integer)) or not 1 <= connectivity <= ndim:
        raise ConfigError(
            f"connectivity must be an integer in 1..{ndim} for {ndim}D data, got {connectivity!r}"
        )
    return ndi.generate_binary_structure(ndim, int(connectivity))


def _label_block(block: np.ndarray, struct: np.ndarray, by_value: bool) -> np.ndarray:
    """Local labels (int64, 0 = background) of one chunk."""
    import scipy.ndimage as ndi

    if not by_value:
        lab, _ = ndi.label(block, struct, output=np.int64)
        return lab
    out = np.zeros(block.shape, dtype=np.int64)
    n = 0
    for v in np.unique(block):
        if v == 0:
            continue
        lab, k = ndi.label(block == v, struct, output=np.int64)
        fg = lab > 0
        out[fg] = lab[fg] + n
        n += k
    return out


def _block_summary(
    lab: np.ndarray, values: np.ndarray | None, offset: tuple[int, ...], shape: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Per-chunk summary: sizes, first global raster index, border flags, values."""
    flat = lab.ravel()
    n = int(flat.max()) if flat.size else 0
    sizes = np.bincount(flat, minlength=n + 1)[1:].astype(np.int64)
    nz = np.flatnonzero(flat)
    first_local = np.full(n + 1, _INT64_MAX, dtype=np.int64)
    np.minimum.at(first_local, flat[nz], nz)
    first_local = first_local[1:]
    # Local C order equals global C order inside one chunk, so the first local
    # pixel is also the one with the smallest global raster index.
    coords = np.unravel_index(first_local, lab.shape) if n else [np.zeros(0, np.int64)] * lab.ndim
    glob = tuple(np.asarray(c, dtype=np.int64) + o for c, o in zip(coords, offset))
    first = np.ravel_multi_index(glob, shape).astype(np.int64) if n else np.zeros(0, np.int64)
    border = np.zeros(n + 1, dtype=bool)
    for ax in range(lab.ndim):
        if offset[ax] == 0:
            border[np.take(lab, 0, axis=ax)] = True
        if offset[ax] + lab.shape[ax] == shape[ax]:
            border[np.take(lab, -1, axis=ax)] = True
    out = {"n": np.int64(n), "sizes": sizes, "first": first, "border": border[1:]}
    if values is not None:
        out["values"] = values.ravel()[first_local] if n else values.ravel()[:0]
    return out


def _face_pairs(pair: np.ndarray, axis: int, offsets: list[tuple[int, ...]], depth: int) -> np.ndarray:
    """Label pairs touching across one chunk face.

    ``pair`` stacks (last slab of the lower chunks, first slab of the upper
    chunks) along axis 0; the face axis has length 1; the other axes carry a
    halo of ``depth`` (0 or 1) padded with background.
    """
    lo = np.take(pair[0], 0, axis=axis)
    hi = np.take(pair[1], 0, axis=axis)
    core = tuple(slice(depth, s - depth) for s in hi.shape)
    b = hi[core]
    found = []
    for off in offsets:
        sl = tuple(slice(depth + o, s - depth + o) for o, s in zip(off, lo.shape))
        a = lo[sl]
        m = (a > 0) & (b > 0)
        if m.any():
            found.append(np.stack([a[m], b[m]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    ab = np.concatenate(found)
    # Cheap pre-filter (neighbouring face pixels mostly repeat a pair), then an
    # exact de-duplication on a compact 1D key.
    keep = np.ones(len(ab), dtype=bool)
    keep[1:] = np.any(ab[1:] != ab[:-1], axis=1)
    ab = ab[keep]
    ua, ia = np.unique(ab[:, 0], return_inverse=True)
    ub, ib = np.unique(ab[:, 1], return_inverse=True)
    key = np.unique(ia.astype(np.int64) * len(ub) + ib)
    return np.stack([ua[key // len(ub)], ub[key % len(ub)]], axis=1)


@dataclass
class Components:
    """Connected components of a chunked array, solved globally.

    Attributes
    ----------
    local : dask.array.Array
        Per-chunk local labels (int64, lazily recomputed when used).
    counts : numpy.ndarray
        Number of local labels per chunk (chunks in C order of the chunk grid).
    comp : numpy.ndarray
        Global component index (``0..n-1``) of every local label, chunk after chunk.
    n : int
        Number of components.
    sizes : numpy.ndarray
        Pixel count per component.
    first : numpy.ndarray
        Smallest global raster (C-order) index per component.
    border : numpy.ndarray
        Whether the component touches the image border.
    values : numpy.ndarray or None
        The input value of each component (when labelled by value).
    """

    local: Any
    counts: np.ndarray
    comp: np.ndarray
    n: int
    sizes: np.ndarray
    first: np.ndarray
    border: np.ndarray
    values: np.ndarray | None

    def raster_rank(self) -> np.ndarray:
        """Rank (0-based) of each component by first appearance in raster order."""
        rank = np.empty(self.n, dtype=np.int64)
        rank[np.argsort(self.first, kind="stable")] = np.arange(self.n, dtype=np.int64)
        return rank

    def apply(self, table: np.ndarray, background: Any = 0) -> da.Array:
        """Map every pixel's component through ``table`` (indexed by component).

        Background pixels (local label 0) get ``background``. The result is lazy:
        one task per chunk, each with only its own slice of the lookup table.
        """
        table = np.asarray(table)
        node_values = table[self.comp]
        bounds = np.concatenate([[0], np.cumsum(self.counts)])
        blocks = self.local.to_delayed(optimize_graph=False)
        grid = blocks.shape
        chunks = self.local.chunks
        arrays = np.empty(grid, dtype=object)
        for i, idx in enumerate(itertools.product(*(range(g) for g in grid))):
            lut = np.concatenate(
                [np.asarray([background], dtype=table.dtype), node_values[bounds[i] : bounds[i + 1]]]
            )
            shape = tuple(chunks[ax][j] for ax, j in enumerate(idx))
            arrays[idx] = da.from_delayed(
                dask.delayed(_take)(blocks[idx], lut), shape=shape, dtype=table.dtype
            )
        return da.block(arrays.tolist())


def _take(lab: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return lut[lab]


def components(data: Any, *, connectivity: int = 1, by_value: bool = False) -> Components:
    """Solve the connected components of a chunked array (one compute of small summaries).

    Parameters
    ----------
    data : dask.array.Array or numpy.ndarray
        Foreground is nonzero. With ``by_value`` neighbours join only when
        their values are equal (components of each class of a class map).
    connectivity : int
        1 (faces) to ``ndim`` (faces, edges and corners).
    by_value : bool
        Label each nonzero value separately.

    Returns
    -------
    Components
    """
    x = da.asarray(data)
    if x.ndim == 0:
        raise InputError("cannot label a 0-dimensional array")
    if x.dtype.kind not in "biu":
        raise InputError(f"labelling needs a boolean or integer array, got dtype {x.dtype!r}")
    if not by_value and x.dtype != bool:
        x = x != 0
    struct = structure(x.ndim, connectivity)
    if x.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        local = da.zeros(x.shape, dtype=np.int64, chunks=x.chunks)
        values = np.zeros(0, dtype=x.dtype) if by_value else None
        counts = np.zeros(int(np.prod(x.numblocks)), dtype=np.int64)
        return Components(local, counts, empty, 0, empty, empty, np.zeros(0, dtype=bool), values)
    if any(0 in c for c in x.chunks):
        # Empty chunks (e.g. after slicing) would break the chunk-face bookkeeping.
        x = x.rechunk(tuple(tuple(v for v in c if v) for c in x.chunks))
    local = x.map_blocks(_label_block, struct, by_value, dtype=np.int64)

    # Provisional globally unique labels: local + (block linear index) * stride.
    stride = int(np.prod([max(c) for c in local.chunks]))
    grid = local.numblocks
    if np.prod(grid, dtype=float) * stride >= _INT64_MAX:  # pragma: no cover - absurd sizes
        raise InputError(f"too many chunks ({grid!r}) for 64-bit labels")

    def _provisional(lab: np.ndarray, axis: int, shift: int, block_info: Any = None) -> np.ndarray:
        # ``lab`` is a one-pixel slab; slab k along ``axis`` belongs to chunk k + shift.
        loc = list(block_info[0]["chunk-location"])
        loc[axis] += shift
        lin = int(np.ravel_multi_index(loc, grid))
        return np.where(lab > 0, lab + lin * stride, 0)

    offsets_per_axis = [np.cumsum((0,) + c[:-1]) for c in x.chunks]
    summaries = []
    lblocks = local.to_delayed(optimize_graph=False)
    vblocks = x.to_delayed(optimize_graph=False) if by_value else None
    for idx in itertools.product(*(range(g) for g in grid)):
        off = tuple(int(offsets_per_axis[ax][j]) for ax, j in enumerate(idx))
        vals = vblocks[idx] if by_value else None
        summaries.append(dask.delayed(_block_summary)(lblocks[idx], vals, off, x.shape))

    pair_tasks = []
    for axis in range(x.ndim):
        if grid[axis] < 2:
            continue
        bounds = np.cumsum(x.chunks[axis])[:-1]
        slabs = []
        for pos, shift in ((bounds - 1, 0), (bounds, 1)):
            # One fancy-index layer per side (not one slice per chunk face).
            sel = local[(slice(None),) * axis + (pos,)]
            sel = sel.rechunk({axis: 1})
            slabs.append(sel.map_blocks(_provisional, axis, shift, dtype=np.int64))
        los, his = slabs
        pair = da.stack([los, his]).rechunk({0: 2})
        # Offsets in the other axes allowed by the structure for a step of +1 along `axis`.
        sub = np.take(struct, 2, axis=axis)
        offsets = [tuple(int(v) - 1 for v in o) for o in zip(*np.nonzero(sub))] if sub.ndim else [()]
        depth = 1 if connectivity > 1 and x.ndim > 1 else 0
        if depth:
            dep = {a + 1: (1 if a != axis else 0) for a in range(x.ndim)}
            dep[0] = 0
            pair = da.overlap.overlap(pair, depth=dep, boundary=0)
        for blk in pair.to_delayed(optimize_graph=False).ravel():
            pair_tasks.append(dask.delayed(_face_pairs)(blk, axis, offsets, depth))

    # No graph optimisation: fusing would recompute each chunk's labelling once
    # per consumer (summary and up to 2*ndim face slabs).
    summaries, pairs = dask.compute(summaries, pair_tasks, optimize_graph=False)

    counts = np.array([int(s["n"]) for s in summaries], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    total = int(bounds[-1])
    if pairs:
        edges = np.concatenate(pairs)
    else:
        edges = np.zeros((0, 2), dtype=np.int64)
    if len(edges):
        blk = edges // stride
        node = bounds[blk] + (edges - blk * stride) - 1
    else:
        node = edges
    if by_value and len(node):
        node_vals = np.concatenate([s["values"] for s in summaries])
        node = node[node_vals[node[:, 0]] == node_vals[node[:, 1]]]

    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(node), dtype=np.int8), (node[:, 0], node[:, 1])), shape=(total, total))
    n, comp = connected_components(graph, directed=False)
    comp = comp.astype(np.int64)

    sizes = np.bincount(comp, weights=np.concatenate([s["sizes"] for s in summaries]), minlength=n).astype(
        np.int64
    )
    first = np.full(n, _INT64_MAX, dtype=np.int64)
    np.minimum.at(first, comp, np.concatenate([s["first"] for s in summaries]))
    border = np.zeros(n, dtype=bool)
    np.logical_or.at(border, comp, np.concatenate([s["border"] for s in summaries]))
    values = None
    if by_value:
        values = np.zeros(n, dtype=x.dtype)
        values[comp] = np.concatenate([s["values"] for s in summaries])
    return Components(local, counts, comp, int(n), sizes, first, border, values)


def label(
    mask: Any, *, connectivity: int = 1, sequential: bool = True, by_value: bool = False
) -> tuple[da.Array, int]:
    """Label the connected components of a chunked mask with global int64 labels.

    Parameters
    ----------
    mask : dask.array.Array or numpy.ndarray
        2D or 3D (any ndim works); nonzero is foreground.
    connectivity : int
        1 (faces) to ``ndim`` (all neighbours), as
        :func:`scipy.ndimage.generate_binary_structure`.
    sequential : bool
        Number components ``1..n`` in order of first appearance in C (raster)
        order over the whole image, so the result equals
        ``scipy.ndimage.label(mask, structure)`` exactly. If False the labels
        are still ``1..n`` and unique, but in an unspecified order.
    by_value : bool
        Neighbours join only when their values are equal (label each class of
        a class map separately).

    Returns
    -------
    labels : dask.array.Array
        int64 labels, same shape and chunks as ``mask`` (lazy; empty chunks are dropped).
    n : int
        Number of components (computed eagerly from per-chunk summaries).

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> m = da.from_array(np.array([[1, 1, 0, 1], [0, 1, 0, 1]], bool), chunks=2)
    >>> lab, n = label(m)
    >>> n, lab.compute().tolist()
    (2, [[1, 1, 0, 2], [0, 1, 0, 2]])
    """
    comps = components(mask, connectivity=connectivity, by_value=by_value)
    if sequential:
        table = comps.raster_rank() + 1
    else:
        table = np.arange(1, comps.n + 1, dtype=np.int64)
    return comps.apply(table.astype(np.int64), background=0), comps.n
