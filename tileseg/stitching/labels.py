"""Connected components across chunks: global 64-bit labels, memory-bounded.

Why not :func:`dask_image.ndmeasure.label`: it returns int32 labels (overflow
risk once many chunks hold many objects), builds a graph whose size grows with
the whole image (it runs out of memory building it at 5120^3, dask-image
issue 391) and solves the chunk-border equivalences inside the Dask graph
(one task per face, a tree of merges); measured here it took 35.6 s at 256^3
(about 350x :func:`scipy.ndimage.label`) and did not finish 512^3 in 15
minutes. This module implements the usual scalable scheme with one pass over
the input:

1. **scan** (one task per chunk): label the chunk with
   :func:`scipy.ndimage.label` (local labels ``1..n_b``, int32), summarise it
   (label count, size and first raster index of every label, labels touching
   the image border), hand over its first and last slab along every axis, and
   keep the local labels, compressed, in a :class:`~.label_store.LabelStore`
   (a temporary directory, or memory under a distributed client);
2. **merge** (client): assemble each chunk-boundary plane from the slabs and
   collect the label pairs that touch across it (diagonal offsets included for
   connectivity > 1, :mod:`.label_faces`), then solve the union-find on that
   edge list with :func:`scipy.sparse.csgraph.connected_components` (its size
   grows with the number of objects and chunk faces, not with the volume);
3. **relabel** (lazily, one task per chunk): read the chunk's stored local
   labels and map them through its slice of a lookup table. The upstream graph
   (reading, thresholding, morphology, ...) is computed once, in the scan.

Final labels are numbered in order of first appearance in C (raster) order
over the whole image, which is exactly what :func:`scipy.ndimage.label` gives
for the whole array.
"""

from __future__ import annotations

import functools
import itertools
import uuid
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from ..errors import ConfigError, InputError
from .label_faces import boundary_pairs
from .label_store import LabelStore, compress, resolve_spill

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


def _first_in_raster_order(lab: np.ndarray) -> np.ndarray:
    """Flat index of the first pixel of labels ``1..n`` numbered in order of first appearance.

    :func:`scipy.ndimage.label` numbers labels that way, so label ``k`` starts
    where the running maximum of the flattened labels first reaches ``k``.
    """
    flat = lab.ravel()
    if not flat.size:
        return np.zeros(0, dtype=np.int64)
    top = np.maximum.accumulate(flat)
    first = np.flatnonzero(top[1:] != top[:-1]) + 1
    if flat[0] > 0:
        first = np.concatenate([[0], first])
    return first.astype(np.int64)


def _label_block(block: np.ndarray, struct: np.ndarray, by_value: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Local labels of one chunk, the flat index of each label's first pixel, and each label's value."""
    import scipy.ndimage as ndi

    dtype = np.int32 if block.size < 2**31 else np.int64
    if not by_value:
        lab, _ = ndi.label(block, struct, output=dtype)
        return lab, _first_in_raster_order(lab), None
    out = np.zeros(block.shape, dtype=dtype)
    firsts, values = [], []
    n = 0
    for v in np.unique(block):
        if v == 0:
            continue
        lab, k = ndi.label(block == v, struct, output=dtype)
        fg = lab > 0
        out[fg] = lab[fg] + n
        firsts.append(_first_in_raster_order(lab))
        values.append(np.full(k, v, dtype=block.dtype))
        n += k
    first = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
    vals = np.concatenate(values) if values else np.zeros(0, block.dtype)
    return out, first, vals


def _scan(
    block: np.ndarray,
    index: int,
    offset: tuple[int, ...],
    shape: tuple[int, ...],
    struct: np.ndarray,
    by_value: bool,
    store: LabelStore,
) -> dict[str, Any]:
    """Label one chunk, summarise it, keep its labels and hand over its border slabs."""
    lab, first_local, values = _label_block(block, struct, by_value)
    n = len(first_local)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.int64)
    # Local C order equals global C order inside one chunk, so the first local
    # pixel is also the one with the smallest global raster index.
    if n:
        coords = np.unravel_index(first_local, lab.shape)
        glob = tuple(np.asarray(c, dtype=np.int64) + o for c, o in zip(coords, offset))
        first = np.ravel_multi_index(glob, shape).astype(np.int64)
    else:
        first = np.zeros(0, np.int64)
    border = np.zeros(n + 1, dtype=bool)
    faces: dict[tuple[int, int], Any] = {}
    for ax in range(lab.ndim):
        lo, hi = np.take(lab, 0, axis=ax), np.take(lab, -1, axis=ax)
        if offset[ax] == 0:
            border[lo] = True
        else:
            faces[ax, 0] = compress(lo)
        if offset[ax] + lab.shape[ax] == shape[ax]:
            border[hi] = True
        else:
            faces[ax, 1] = compress(hi)
    return {
        "n": n,
        "sizes": sizes,
        "first": first,
        "border": border[1:],
        "values": values,
        "faces": faces,
        "token": store.put(index, lab),
    }


def _relabel(store: LabelStore, index: int, token: Any, lut: np.ndarray) -> np.ndarray:
    return lut[store.get(index, token)]


@dataclass
class Components:
    """Connected components of a chunked array, solved globally.

    Attributes
    ----------
    store : LabelStore
        The per-chunk local labels, kept from the scan.
    tokens : list
        What ``store.get`` needs per chunk (chunks in C order of the chunk grid).
    chunks : tuple of tuple of int
        The chunking of the labelled array.
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

    store: LabelStore | None
    tokens: list
    chunks: tuple[tuple[int, ...], ...]
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
        one task per chunk, which reads the chunk's stored local labels and
        maps them through only its own slice of the lookup table. The array
        keeps the label store alive (a temporary directory is removed when the
        last array using it is garbage collected).
        """
        table = np.asarray(table)
        shape = tuple(sum(c) for c in self.chunks)
        if self.store is None:  # an empty array
            return da.full(shape, background, dtype=table.dtype, chunks=self.chunks)
        node_values = table[self.comp]
        bounds = np.concatenate([[0], np.cumsum(self.counts)])
        name = f"label-apply-{uuid.uuid4().hex}"
        grid = tuple(len(c) for c in self.chunks)
        dsk = {}
        for i, idx in enumerate(itertools.product(*(range(g) for g in grid))):
            lut = np.concatenate(
                [np.asarray([background], dtype=table.dtype), node_values[bounds[i] : bounds[i + 1]]]
            )
            # A partial keeps the arguments opaque to Dask (no traversal of the token tuple).
            dsk[(name, *idx)] = (functools.partial(_relabel, self.store, i, self.tokens[i], lut),)
        meta = np.empty((0,) * len(shape), dtype=table.dtype)
        return da.Array(dsk, name, chunks=self.chunks, dtype=table.dtype, meta=meta)


def components(data: Any, *, connectivity: int = 1, by_value: bool = False, spill: str = "auto") -> Components:
    """Solve the connected components of a chunked array (one pass over the input).

    Parameters
    ----------
    data : dask.array.Array or numpy.ndarray
        Foreground is nonzero. With ``by_value`` neighbours join only when
        their values are equal (components of each class of a class map).
    connectivity : int
        1 (faces) to ``ndim`` (faces, edges and corners).
    by_value : bool
        Label each nonzero value separately.
    spill : {"auto", "disk", "memory"}
        Where the per-chunk local labels wait for the relabel pass
        (:mod:`tileseg.stitching.label_store`): ``"auto"`` is a temporary
        directory, or memory under a distributed client.

    Returns
    -------
    Components
    """
    x = da.asarray(data)
    if x.ndim == 0:
        raise InputError("cannot label a 0-dimensional array")
    if x.dtype.kind not in "biu":
        raise InputError(f"labelling needs a boolean or integer array, got dtype {x.dtype!r}")
    mode = resolve_spill(spill)
    if not by_value and x.dtype != bool:
        x = x != 0
    struct = structure(x.ndim, connectivity)
    if x.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        values = np.zeros(0, dtype=x.dtype) if by_value else None
        counts = np.zeros(int(np.prod(x.numblocks)), dtype=np.int64)
        return Components(None, [], x.chunks, counts, empty, 0, empty, empty, np.zeros(0, dtype=bool), values)
    if any(0 in c for c in x.chunks):
        # Empty chunks (e.g. after slicing) would break the chunk-face bookkeeping.
        x = x.rechunk(tuple(tuple(v for v in c if v) for c in x.chunks))
    grid = x.numblocks
    store = LabelStore(mode)
    starts = [np.cumsum((0,) + c[:-1]) for c in x.chunks]
    blocks = x.to_delayed().ravel()
    scan = dask.delayed(_scan, pure=False)
    tasks = []
    for i, idx in enumerate(itertools.product(*(range(g) for g in grid))):
        offset = tuple(int(starts[ax][j]) for ax, j in enumerate(idx))
        tasks.append(scan(blocks[i], i, offset, x.shape, struct, by_value, store))
    (scans,) = dask.compute(tasks)

    counts = np.array([s["n"] for s in scans], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    total = int(bounds[-1])

    def faces(idx: tuple[int, ...], axis: int, side: int) -> Any:
        return scans[int(np.ravel_multi_index(idx, grid))]["faces"][axis, side]

    node = boundary_pairs(x.chunks, faces, bounds[:-1], struct)
    for s in scans:
        s.pop("faces")
    if by_value and len(node):
        node_vals = np.concatenate([s["values"] for s in scans])
        node = node[node_vals[node[:, 0]] == node_vals[node[:, 1]]]

    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(node), dtype=np.int8), (node[:, 0], node[:, 1])), shape=(total, total))
    n, comp = connected_components(graph, directed=False)
    comp = comp.astype(np.int64)

    sizes = np.bincount(comp, weights=np.concatenate([s["sizes"] for s in scans]), minlength=n).astype(np.int64)
    first = np.full(n, _INT64_MAX, dtype=np.int64)
    np.minimum.at(first, comp, np.concatenate([s["first"] for s in scans]))
    border = np.zeros(n, dtype=bool)
    np.logical_or.at(border, comp, np.concatenate([s["border"] for s in scans]))
    values = None
    if by_value:
        values = np.zeros(n, dtype=x.dtype)
        values[comp] = np.concatenate([s["values"] for s in scans])
    tokens = [s["token"] for s in scans]
    return Components(store, tokens, x.chunks, counts, comp, int(n), sizes, first, border, values)


def label(
    mask: Any,
    *,
    connectivity: int = 1,
    sequential: bool = True,
    by_value: bool = False,
    spill: str = "auto",
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
    spill : {"auto", "disk", "memory"}
        Where the per-chunk labels wait for the relabel pass (see :func:`components`).

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
    comps = components(mask, connectivity=connectivity, by_value=by_value, spill=spill)
    if sequential:
        table = comps.raster_rank() + 1
    else:
        table = np.arange(1, comps.n + 1, dtype=np.int64)
    return comps.apply(table.astype(np.int64), background=0), comps.n
