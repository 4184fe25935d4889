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

import dataclasses
import functools
import itertools
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from ..errors import ConfigError, InputError
from ..passes import whole_image_pass
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


def _first_in_raster_order(lab: np.ndarray, step: int = 1 << 16) -> np.ndarray:
    """Flat index of the first pixel of labels ``1..n`` numbered in order of first appearance.

    :func:`scipy.ndimage.label` numbers labels that way, so label ``k`` starts
    where the running maximum of the flattened labels first reaches ``k``. The
    running maximum is taken piece by piece (a small buffer that stays in
    cache, not a second array of the chunk's size).
    """
    flat = lab.ravel()
    found = []
    carry = 0
    for start in range(0, flat.size, step):
        piece = flat[start : start + step]
        top = np.maximum.accumulate(piece)
        np.maximum(top, carry, out=top)
        rises = np.flatnonzero(top[1:] != top[:-1]) + (start + 1)
        if piece[0] > carry:
            rises = np.concatenate([[start], rises])
        found.append(rises)
        carry = top[-1]
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)


def _label_block(
    block: np.ndarray, struct: np.ndarray, by_value: bool, want_first: bool
) -> tuple[np.ndarray, int, np.ndarray | None, np.ndarray | None]:
    """Local labels of one chunk, their count, each label's first flat index (if wanted) and value."""
    import scipy.ndimage as ndi

    dtype = np.int32 if block.size < 2**31 else np.int64
    if not by_value:
        lab, n = ndi.label(block, struct, output=dtype)
        return lab, int(n), _first_in_raster_order(lab) if want_first else None, None
    out = np.zeros(block.shape, dtype=dtype)
    firsts, values = [], []
    n = 0
    for v in np.unique(block):
        if v == 0:
            continue
        lab, k = ndi.label(block == v, struct, output=dtype)
        fg = lab > 0
        out[fg] = lab[fg] + n
        if want_first:
            firsts.append(_first_in_raster_order(lab))
        values.append(np.full(k, v, dtype=block.dtype))
        n += int(k)
    first = (np.concatenate(firsts) if firsts else np.zeros(0, np.int64)) if want_first else None
    vals = np.concatenate(values) if values else np.zeros(0, block.dtype)
    return out, n, first, vals


def _scan(
    block: np.ndarray,
    index: int,
    offset: tuple[int, ...],
    shape: tuple[int, ...],
    struct: np.ndarray,
    by_value: bool,
    stats: frozenset[str],
    store: LabelStore,
) -> dict[str, Any]:
    """Label one chunk, summarise it, keep its labels and hand over its border slabs."""
    lab, n, first_local, values = _label_block(block, struct, by_value, "first" in stats)
    out: dict[str, Any] = {"n": n, "values": values}
    if "sizes" in stats:
        out["sizes"] = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.int64)
    if first_local is not None:
        # Local C order equals global C order inside one chunk, so the first local
        # pixel is also the one with the smallest global raster index.
        if n:
            coords = np.unravel_index(first_local, lab.shape)
            glob = tuple(np.asarray(c, dtype=np.int64) + o for c, o in zip(coords, offset))
            out["first"] = np.ravel_multi_index(glob, shape).astype(np.int64)
        else:
            out["first"] = np.zeros(0, np.int64)
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
    out["border"] = border[1:]
    out["faces"] = faces
    out["token"] = store.put(index, lab)
    return out


def _relabel(store: LabelStore, index: int, token: Any, lut: np.ndarray) -> np.ndarray:
    # Indexing with intp is about twice as fast as with the stored uint16/int32.
    return lut[store.get(index, token).astype(np.intp)]


@dataclass
class Components:
    """Connected components of a chunked array, solved globally.

    Attributes
    ----------
    store : LabelStore or None
        The per-chunk local labels, kept from the scan (None for an empty array).
    tokens : list
        What ``store.get`` needs per chunk (chunks in C order of the chunk grid).
    chunks : tuple of tuple of int
        The chunking of the labelled array.
    counts : numpy.ndarray
        Number of local labels per chunk (chunks in C order of the chunk grid).
    comp : numpy.ndarray
        Global component index (``0..n-1``) of every local label, chunk after
        chunk; -1 marks a local label that belongs to no component any more
        (a component dropped by :meth:`subset`), which :meth:`apply` maps
        to the background.
    n : int
        Number of components.
    sizes : numpy.ndarray or None
        Pixel count per component (when ``"sizes"`` was among the statistics).
    first : numpy.ndarray or None
        Smallest global raster (C-order) index per component (``"first"``).
    border : numpy.ndarray
        Whether the component touches the image border.
    values : numpy.ndarray or None
        The input value of each component (when labelled by value).
    connectivity : int
        The connectivity the components were solved with.
    """

    store: LabelStore | None
    tokens: list
    chunks: tuple[tuple[int, ...], ...]
    counts: np.ndarray
    comp: np.ndarray
    n: int
    sizes: np.ndarray | None
    first: np.ndarray | None
    border: np.ndarray
    values: np.ndarray | None
    connectivity: int = 1

    def raster_rank(self) -> np.ndarray:
        """Rank (0-based) of each component by first appearance in raster order."""
        if self.first is None:
            raise ValueError("these components were solved without 'first' in their statistics")
        rank = np.empty(self.n, dtype=np.int64)
        rank[np.argsort(self.first, kind="stable")] = np.arange(self.n, dtype=np.int64)
        return rank

    def subset(self, keep: np.ndarray) -> Components:
        """The components where ``keep`` is True, renumbered ``0..k-1`` in their order; the rest is background."""
        keep = np.asarray(keep, dtype=bool)
        remap = np.full(self.n + 1, -1, dtype=np.int64)  # remap[-1] keeps -1 (already dropped)
        remap[:-1][keep] = np.arange(int(keep.sum()), dtype=np.int64)

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[keep]

        return Components(
            self.store, self.tokens, self.chunks, self.counts, remap[self.comp], int(keep.sum()),
            pick(self.sizes), pick(self.first), self.border[keep], pick(self.values), self.connectivity,
        )

    def apply(self, table: np.ndarray, background: Any = 0) -> da.Array:
        """Map every pixel's component through ``table`` (indexed by component).

        Background pixels (local label 0, or a dropped component) get
        ``background``. The result is lazy: one task per chunk, which reads
        the chunk's stored local labels and maps them through only its own
        slice of the lookup table. The array keeps the label store alive (a
        temporary directory is removed when the last array using it is
        garbage collected).
        """
        table = np.asarray(table)
        shape = tuple(sum(c) for c in self.chunks)
        if self.store is None:  # an empty array
            return da.full(shape, background, dtype=table.dtype, chunks=self.chunks)
        bg = np.asarray([background], dtype=table.dtype)
        node_values = np.concatenate([table, bg])[self.comp]  # comp -1 -> background
        bounds = np.concatenate([[0], np.cumsum(self.counts)])
        name = f"label-apply-{uuid.uuid4().hex}"
        grid = tuple(len(c) for c in self.chunks)
        dsk = {}
        for i, idx in enumerate(itertools.product(*(range(g) for g in grid))):
            lut = np.concatenate([bg, node_values[bounds[i] : bounds[i + 1]]])
            # A partial keeps the arguments opaque to Dask (no traversal of the token tuple).
            dsk[(name, *idx)] = (functools.partial(_relabel, self.store, i, self.tokens[i], lut),)
        meta = np.empty((0,) * len(shape), dtype=table.dtype)
        out = da.Array(dsk, name, chunks=self.chunks, dtype=table.dtype, meta=meta)
        if table.dtype == bool and background is False:
            _remember_mask(out, self, table)
        return out


#: Masks made by :meth:`Components.apply` that keep whole components (name -> (store ref, components, keep)).
_MASKS: dict[str, tuple[Any, Components, np.ndarray]] = {}


def _remember_mask(arr: da.Array, comps: Components, keep: np.ndarray) -> None:
    """Record that ``arr`` is the union of the kept components, so labelling it needs no new scan.

    The record lives as long as the label store (which every such array's
    graph holds), and no longer.
    """
    name = arr.name
    # The record must not keep the store alive itself: a weak reference, and a copy without it.
    ref = weakref.ref(comps.store, lambda _ref, name=name: _MASKS.pop(name, None))
    _MASKS[name] = (ref, dataclasses.replace(comps, store=None), keep)


def _known_mask(x: da.Array, connectivity: int, stats: frozenset[str]) -> Components | None:
    """Components of a mask recorded by :func:`_remember_mask`, if they answer the question exactly."""
    rec = _MASKS.get(x.name)
    store = None if rec is None else rec[0]()
    if store is None:
        return None
    comps, keep = dataclasses.replace(rec[1], store=store), rec[2]
    # Dropping whole components leaves the others intact only for the same connectivity.
    if comps.connectivity != connectivity or comps.values is not None or len(keep) != comps.n:
        return None
    if ("sizes" in stats and comps.sizes is None) or ("first" in stats and comps.first is None):
        return None
    return comps.subset(keep)


STATS = frozenset({"sizes", "first"})


def components(
    data: Any,
    *,
    connectivity: int = 1,
    by_value: bool = False,
    stats: Any = STATS,
    spill: str = "auto",
) -> Components:
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
    stats : collection of {"sizes", "first"}
        Which per-component statistics to compute besides the border flags
        (each costs one pass over every chunk's labels).
    spill : {"auto", "disk", "memory"}
        Where the per-chunk local labels wait for the relabel pass
        (:mod:`tileseg.stitching.label_store`): ``"auto"`` is a temporary
        directory, or memory under a distributed client.

    Returns
    -------
    Components

    Notes
    -----
    A boolean mask that :meth:`Components.apply` made by keeping whole
    components (e.g. the result of
    :func:`tileseg.postprocess.objects.remove_small_objects`) is not scanned
    again: with the same connectivity its components are the kept ones.
    """
    x = da.asarray(data)
    if x.ndim == 0:
        raise InputError("cannot label a 0-dimensional array")
    if x.dtype.kind not in "biu":
        raise InputError(f"labelling needs a boolean or integer array, got dtype {x.dtype!r}")
    stats = frozenset(stats)
    if stats - STATS:
        raise ConfigError(f"unknown statistics {sorted(stats - STATS)!r}; expected some of {sorted(STATS)!r}")
    mode = resolve_spill(spill)
    if not by_value and x.dtype != bool:
        x = x != 0
    struct = structure(x.ndim, connectivity)
    if x.dtype == bool:
        known = _known_mask(x, int(connectivity), stats)
        if known is not None:
            return known
    if x.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        values = np.zeros(0, dtype=x.dtype) if by_value else None
        counts = np.zeros(int(np.prod(x.numblocks)), dtype=np.int64)
        return Components(
            None, [], x.chunks, counts, empty, 0, empty, empty, np.zeros(0, dtype=bool), values, int(connectivity)
        )
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
        tasks.append(scan(blocks[i], i, offset, x.shape, struct, by_value, stats, store))
    with whole_image_pass("components", "connected components"):  # computing the result, not set-up
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

    sizes = first = None
    if "sizes" in stats:
        weights = np.concatenate([s["sizes"] for s in scans])
        sizes = np.bincount(comp, weights=weights, minlength=n).astype(np.int64)
    if "first" in stats:
        first = np.full(n, _INT64_MAX, dtype=np.int64)
        np.minimum.at(first, comp, np.concatenate([s["first"] for s in scans]))
    border = np.zeros(n, dtype=bool)
    np.logical_or.at(border, comp, np.concatenate([s["border"] for s in scans]))
    values = None
    if by_value:
        values = np.zeros(n, dtype=x.dtype)
        values[comp] = np.concatenate([s["values"] for s in scans])
    tokens = [s["token"] for s in scans]
    return Components(store, tokens, x.chunks, counts, comp, int(n), sizes, first, border, values, int(connectivity))


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
    comps = components(
        mask, connectivity=connectivity, by_value=by_value, stats={"first"} if sequential else (), spill=spill
    )
    if sequential:
        table = comps.raster_rank() + 1
    else:
        table = np.arange(1, comps.n + 1, dtype=np.int64)
    return comps.apply(table.astype(np.int64), background=0), comps.n
