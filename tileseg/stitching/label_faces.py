"""Label pairs that touch across chunk borders, one boundary plane at a time.

Every scanned chunk hands over the first and last slab of its local labels
along each axis (compressed). For each boundary plane between chunk layers
``j`` and ``j + 1`` along an axis, this module assembles the whole plane on
both sides as global node ids (-1 = background) and compares them with the
offsets the connectivity allows for one step across the plane. Because the
whole plane is assembled, neighbours across a chunk *edge* or *corner* (the
diagonal offsets of connectivity > 1) are found as well: every adjacency
between two different chunks crosses at least one such plane.

The work and memory grow with the planes (number of chunk boundaries times a
cross-section), never with the volume.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from .label_store import decompress

__all__ = ["boundary_pairs", "plane_offsets"]


def plane_offsets(struct: np.ndarray, axis: int) -> list[tuple[int, ...]]:
    """In-plane offsets (-1, 0, 1 per other axis) of the neighbours one step up along ``axis``."""
    sub = np.take(struct, 2, axis=axis)
    if sub.ndim == 0:
        return [()]
    return [tuple(int(v) - 1 for v in o) for o in zip(*np.nonzero(sub))]


def _pairs(lo: np.ndarray, hi: np.ndarray, offsets: Sequence[tuple[int, ...]]) -> np.ndarray:
    """Unique (lo node, hi node) pairs over one plane; ``lo``/``hi`` hold node ids, -1 = background."""
    diagonal = any(any(offset) for offset in offsets)
    pad = np.pad(lo, 1, constant_values=-1) if diagonal and lo.ndim else lo
    found = []
    b_fg = hi >= 0
    for off in offsets:
        if diagonal and lo.ndim:
            sl = tuple(slice(1 + o, 1 + o + s) for o, s in zip(off, hi.shape))
            a = pad[sl]
        else:
            a = lo
        m = b_fg & (a >= 0)
        if m.any():
            found.append(np.stack([a[m], hi[m]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    ab = np.concatenate(found)
    # Neighbouring plane pixels mostly repeat a pair: a cheap pre-filter, then an
    # exact de-duplication on a compact 1D key.
    keep = np.ones(len(ab), dtype=bool)
    keep[1:] = np.any(ab[1:] != ab[:-1], axis=1)
    ab = ab[keep]
    ua, ia = np.unique(ab[:, 0], return_inverse=True)
    ub, ib = np.unique(ab[:, 1], return_inverse=True)
    key = np.unique(ia.astype(np.int64).ravel() * len(ub) + ib.ravel())
    return np.stack([ua[key // len(ub)], ub[key % len(ub)]], axis=1)


def boundary_pairs(
    chunks: tuple[tuple[int, ...], ...],
    faces: Callable[[tuple[int, ...], int, int], tuple],
    bases: np.ndarray,
    struct: np.ndarray,
) -> np.ndarray:
    """All pairs of node ids that touch across any chunk boundary plane.

    Parameters
    ----------
    chunks : tuple of tuple of int
        The chunking (Dask convention).
    faces : callable
        ``faces(block_index, axis, side)`` returns the compressed local labels of
        the chunk's first (``side=0``) or last (``side=1``) slab along ``axis``
        (see :func:`tileseg.stitching.label_store.compress`; 0 = background).
    bases : numpy.ndarray
        Node id of local label 1 of every chunk (chunks in C order of the grid).
    struct : numpy.ndarray
        The connectivity's structuring element.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` int64 node ids (lower plane side first).
    """
    grid = tuple(len(c) for c in chunks)
    ndim = len(grid)
    starts = [np.concatenate([[0], np.cumsum(c)]) for c in chunks]
    out = []
    for axis in range(ndim):
        if grid[axis] < 2:
            continue
        others = [ax for ax in range(ndim) if ax != axis]
        plane_shape = tuple(int(starts[ax][-1]) for ax in others)
        offsets = plane_offsets(struct, axis)
        for j in range(grid[axis] - 1):
            planes = []
            for layer, side in ((j, 1), (j + 1, 0)):
                plane = np.empty(plane_shape, dtype=np.int64)
                for rest in itertools.product(*(range(grid[ax]) for ax in others)):
                    idx = list(rest)
                    idx.insert(axis, layer)
                    idx = tuple(idx)
                    lab = decompress(faces(idx, axis, side))
                    base = int(bases[np.ravel_multi_index(idx, grid)])
                    sl = tuple(slice(int(starts[ax][i]), int(starts[ax][i + 1])) for ax, i in zip(others, rest))
                    plane[sl] = np.where(lab > 0, lab.astype(np.int64) + (base - 1), -1)
                planes.append(plane)
            out.append(_pairs(planes[0], planes[1], offsets))
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(out)
