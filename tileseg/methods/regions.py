"""Region methods on chunked images: seeded region growing and marker-based watershed.

Seeded region growing is exact: it keeps the connected components of a
within-tolerance mask that contain a seed, and those components are found
across chunk borders by :func:`seeded_components` (label each chunk with SciPy,
64-bit block offsets, join the labels that touch across every chunk face with
a union-find on the face pixels only, then keep the seeded ones chunk by chunk).
Its memory grows with the chunk faces, never with the volume.

Watershed is evaluated per chunk with a halo (``halo_px``). Exactness
guarantee and its limits:

* With a ``mask`` (always the case for :func:`watershed_from_threshold`),
  each connected component of the mask is flooded on its own (scikit-image's
  watershed on the component's bounding box), so a component's result depends
  on that component only. It is therefore **independent of the chunking**
  wherever each mask component that touches a chunk lies within that chunk
  grown by ``halo_px - 1`` pixels; a sufficient condition is that every
  object (mask component) spans at most ``halo_px - 1`` pixels along each
  axis. In that case it also **equals** ``skimage.segmentation.watershed`` on
  the whole image when the landscape has no ties between marker pixels of
  different labels (scikit-image breaks such ties by the layout of its heap,
  which depends on the whole array); with ties the two can differ on a few
  pixels, both being valid watersheds. The tests check both properties.
* Objects larger than that are still labelled consistently inside each chunk,
  but the flooding near a chunk border may differ from the whole-image
  result (and for :func:`watershed_from_threshold` one object can get
  different marker ids in neighbouring chunks). Raise ``halo_px`` (memory per
  task grows as ``(chunk + 2 * halo_px) ** ndim``) or use larger chunks.
* Without a mask the whole image is one flooding domain: the result is exact
  only where each basin, and every basin competing with it, fits in the halo.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError, InputError


def _structure(ndim: int, connectivity: int | None) -> np.ndarray:
    from scipy import ndimage as ndi

    c = ndim if connectivity is None else int(connectivity)
    if not 1 <= c <= ndim:
        raise ConfigError(f"connectivity must be between 1 and {ndim}, got {connectivity!r}")
    return ndi.generate_binary_structure(ndim, c)


def _block_offsets(chunks: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """64-bit label offset per block (C order): sum of the sizes of the blocks before it."""
    idx = list(np.ndindex(*[len(c) for c in chunks]))
    sizes = np.array(
        [int(np.prod([chunks[k][i[k]] for k in range(len(chunks))])) for i in idx], dtype=np.int64
    )
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64), idx


def _label_block(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    labels, _ = ndi.label(np.asarray(mask, dtype=bool), structure=structure)
    return labels


def _pass1(mask: np.ndarray, seeds: np.ndarray, offset: int, structure: np.ndarray) -> tuple:
    """Seeded global labels of a block and its faces (global labels, 0 = background)."""
    labels = _label_block(mask, structure).astype(np.int64)
    glob = np.where(labels > 0, labels + offset, 0)
    seeded = np.unique(glob[np.asarray(seeds, dtype=bool) & (labels > 0)])
    faces = []
    for k in range(glob.ndim):
        first = np.take(glob, [0], axis=k)
        last = np.take(glob, [glob.shape[k] - 1], axis=k)
        faces.append((first, last))
    return seeded, faces


def _plane(faces: dict, grid: tuple[int, ...], axis: int, index: int, which: int) -> np.ndarray:
    """Assemble the full hyperplane of block faces (``which`` 0 first, 1 last) along ``axis``."""
    ndim = len(grid)

    def build(prefix: tuple[int, ...]) -> Any:
        k = len(prefix)
        if k == ndim:
            return faces[prefix][axis][which]
        if k == axis:
            return [build(prefix + (index,))]
        return [build(prefix + (i,)) for i in range(grid[k])]

    return np.block(build(()))


def _cross_pairs(lo: np.ndarray, hi: np.ndarray, axis: int, structure: np.ndarray) -> np.ndarray:
    """Label pairs (lo, hi) of neighbouring foreground pixels across a face."""
    ndim = lo.ndim
    out = []
    centre = np.ones(ndim, dtype=int)
    for off in np.argwhere(structure):
        delta = off - centre
        if delta[axis] != 1:
            continue
        src, dst = [], []
        for k in range(ndim):
            if k == axis:
                src.append(slice(None))
                dst.append(slice(None))
                continue
            d = int(delta[k])
            n = lo.shape[k]
            src.append(slice(max(0, -d), n - max(0, d)))
            dst.append(slice(max(0, d), n - max(0, -d)))
        a = lo[tuple(src)].ravel()
        b = hi[tuple(dst)].ravel()
        keep = (a > 0) & (b > 0)
        if keep.any():
            out.append(np.stack([a[keep], b[keep]], axis=1))
    return np.unique(np.concatenate(out), axis=0) if out else np.zeros((0, 2), dtype=np.int64)


def _solve(results: list, idx: list[tuple[int, ...]], grid: tuple[int, ...], structure: np.ndarray) -> dict:
    """Union-find over face pairs; the good (seeded) global labels of every block."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = {i: r[1] for i, r in zip(idx, results)}
    seeded = np.unique(np.concatenate([r[0] for r in results] + [np.zeros(0, np.int64)]))
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for axis in range(len(grid)):
        for j in range(1, grid[axis]):
            lo = _plane(faces, grid, axis, j - 1, 1)
            hi = _plane(faces, grid, axis, j, 0)
            pairs.append(_cross_pairs(lo, hi, axis, structure))
    pairs = np.concatenate(pairs)
    nodes = np.unique(np.concatenate([pairs.ravel(), seeded]))
    good = seeded
    if pairs.size:
        a = np.searchsorted(nodes, pairs[:, 0])
        b = np.searchsorted(nodes, pairs[:, 1])
        graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(nodes.size, nodes.size))
        _, comp = connected_components(graph, directed=False)
        good_comp = np.unique(comp[np.searchsorted(nodes, seeded)])
        good = nodes[np.isin(comp, good_comp)]
    out = {}
    for i, r in zip(idx, results):
        face_labels = np.unique(np.concatenate([f.ravel() for pair in r[1] for f in pair]))
        mine = np.union1d(r[0], face_labels[np.isin(face_labels, good)])
        out[i] = mine
    return out


def _final(mask: np.ndarray, offset: int, good: np.ndarray, structure: np.ndarray) -> np.ndarray:
    labels = _label_block(mask, structure)
    lut = np.zeros(int(labels.max()) + 1, dtype=bool)
    local = good - offset
    lut[local[(local > 0) & (local < lut.size)]] = True
    return lut[labels]


def seeded_components(mask: Any, seeds: Any, *, connectivity: int = 1) -> Any:
    """Connected components of ``mask`` that contain a seed pixel, across chunks.

    Equals, on the whole image, ``isin(L, unique(L[seeds & mask]))`` with
    ``L = scipy.ndimage.label(mask, generate_binary_structure(ndim, connectivity))``.
    One pass over the data runs when called (per-chunk labels, face pairs,
    union-find); the returned array relabels chunk by chunk when computed.
    Memory: one chunk per task plus all chunk faces in the solving step.

    Parameters
    ----------
    mask : dask.array.Array of bool
        Where regions may grow.
    seeds : dask.array.Array of bool
        Seed pixels (same shape; seeds outside ``mask`` are ignored).
    connectivity : int
        1 (faces) up to ``ndim`` (faces, edges and corners).

    Returns
    -------
    dask.array.Array of bool
    """
    import dask
    import dask.array as da
    from dask import delayed

    mask = da.asarray(mask).astype(bool)
    seeds = da.asarray(seeds).astype(bool)
    if seeds.shape != mask.shape:
        raise InputError(f"seeds shape {seeds.shape!r} does not match mask shape {mask.shape!r}")
    seeds = seeds.rechunk(mask.chunks)
    structure = _structure(mask.ndim, connectivity)
    offsets, idx = _block_offsets(mask.chunks)
    grid = tuple(len(c) for c in mask.chunks)
    mblocks = mask.to_delayed()
    sblocks = seeds.to_delayed()
    parts = [delayed(_pass1)(mblocks[i], sblocks[i], int(o), structure) for i, o in zip(idx, offsets)]
    results = dask.compute(parts)[0]
    good = _solve(list(results), idx, grid, structure)
    out = np.empty(grid, dtype=object)
    for i, o in zip(idx, offsets):
        shape = tuple(mask.chunks[k][i[k]] for k in range(mask.ndim))
        out[i] = da.from_delayed(delayed(_final)(mblocks[i], int(o), good[i], structure), shape, dtype=bool)
    return da.block(out.tolist())


def _seed_mask_from_points(shape: tuple[int, ...], chunks: Any, points: np.ndarray) -> Any:
    import dask.array as da

    def mark(block_info=None):
        info = block_info[None]
        loc = info["array-location"]
        out = np.zeros(info["chunk-shape"], dtype=bool)
        lo = np.array([s for s, _ in loc])
        hi = np.array([e for _, e in loc])
        inside = np.all((points >= lo) & (points < hi), axis=1)
        if inside.any():
            out[tuple((points[inside] - lo).T)] = True
        return out

    return da.map_blocks(mark, dtype=bool, chunks=chunks, meta=np.empty((0,) * len(shape), bool))


def region_growing(
    image: Any,
    *,
    spacing: Any = None,
    points: Any = None,
    seed_mask: Any = None,
    tolerance: float | None = None,
    low: float | None = None,
    high: float | None = None,
    connectivity: int = 1,
) -> Any:
    """Seeded region growing, exact across chunks (uint8 labels 0/1).

    The region is every pixel connected (``connectivity``) to a seed through
    pixels whose value lies in the tolerance window: ``|v - ref| <= tolerance``
    with ``ref`` the mean value of the seed pixels, or ``low <= v <= high``
    when those are given. With one seed point this equals
    ``skimage.segmentation.flood(image, point, tolerance=tolerance, connectivity=connectivity)``.

    Parameters
    ----------
    image : dask.array.Array or Image
        Single-band 2D/3D image.
    spacing : sequence of float, optional
        Unused (pixel connectivity); accepted for the pipeline interface.
    points : sequence of sequence of int, optional
        Seed coordinates (pixel indices, one row per seed).
    seed_mask : dask.array.Array of bool, optional
        Seed pixels.
    tolerance : float, optional
        Half-width of the intensity window around the seeds' mean value.
    low, high : float, optional
        An explicit intensity window instead of ``tolerance``.
    connectivity : int
        1 .. ndim.

    Returns
    -------
    dask.array.Array of uint8
    """
    import dask.array as da

    from ._input import unwrap
    from .histogram import masked_mean

    img = unwrap(image, spacing).single_band("region_growing")
    if (points is None) == (seed_mask is None):
        raise ConfigError("region_growing needs exactly one of points or seed_mask")
    if points is not None:
        pts = np.atleast_2d(np.asarray(points, dtype=np.int64))
        if pts.shape[1] != img.ndim or np.any(pts < 0) or np.any(pts >= np.array(img.shape)):
            raise ConfigError(
                f"seed points {points!r} must be {img.ndim}D pixel indices inside shape {img.shape!r}"
            )
        seeds = _seed_mask_from_points(img.shape, img.chunks, pts)
    else:
        seeds = da.asarray(seed_mask).astype(bool)
    if low is not None or high is not None:
        if low is None or high is None or tolerance is not None:
            raise ConfigError("region_growing: give both low and high, or tolerance")
        window = (img >= low) & (img <= high)
    else:
        if tolerance is None or tolerance < 0:
            raise ConfigError(f"region_growing: tolerance must be >= 0, got {tolerance!r}")
        if points is not None:
            vals = img.vindex[tuple(pts.T)].compute().astype(np.float64)
            ref = float(vals.mean())
        else:
            ref = masked_mean(img, mask=seeds)
        f = img.astype(np.float64)
        window = (f >= ref - tolerance) & (f <= ref + tolerance)
    return seeded_components(window, seeds, connectivity=connectivity).astype(np.uint8)


# --- watershed ----------------------------------------------------------------------------


def _prepare_halo(arrays: list, halo: int) -> tuple[list, dict[int, int]]:
    """Chunks of at least ``halo`` (map_overlap needs it) and the depth per axis.

    An axis shorter than the halo becomes one chunk with no halo.
    """
    import dask.array as da

    first = arrays[0]
    chunks, depth = [], {}
    for k, (c, n) in enumerate(zip(first.chunks, first.shape)):
        if halo >= n:
            chunks.append((n,))
            depth[k] = 0
            continue
        depth[k] = halo
        if min(c) >= halo or len(c) == 1:
            chunks.append(c)
        else:
            size = max(halo, max(c))
            parts = max(1, n // size)
            base = [n // parts] * parts
            for j in range(n - sum(base)):
                base[j] += 1
            chunks.append(tuple(base))
    return [da.asarray(a).rechunk(tuple(chunks)) for a in arrays], depth


def _ws_per_component(
    landscape: np.ndarray, markers: np.ndarray, mask: np.ndarray | None, connectivity: int, compactness: float
) -> np.ndarray:
    """scikit-image watershed run on each mask component separately (cropped to its bounding box).

    A component's result then depends on that component alone, not on the
    rest of the array: scikit-image breaks ties between equal-valued marker
    pixels by its heap layout, which depends on everything in the heap.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed as sk_ws

    if mask is None:
        return sk_ws(landscape, markers, connectivity=connectivity, compactness=compactness)
    mask = np.asarray(mask, dtype=bool)
    comps, _ = ndi.label(mask, structure=_structure(mask.ndim, connectivity))
    out = np.zeros(markers.shape, dtype=markers.dtype)
    for i, sl in enumerate(ndi.find_objects(comps), start=1):
        if sl is None:
            continue
        sub = comps[sl] == i
        mk = np.where(sub, markers[sl], 0)
        if not mk.any():
            continue
        res = sk_ws(landscape[sl], mk, connectivity=connectivity, mask=sub, compactness=compactness)
        out[sl][sub] = res[sub]
    return out


def watershed(
    data: Any,
    markers: Any,
    *,
    mask: Any = None,
    halo_px: int = 32,
    connectivity: int = 1,
    compactness: float = 0.0,
) -> Any:
    """Marker-based watershed per chunk with a halo (see the module notes for exactness).

    Parameters
    ----------
    data : dask.array.Array
        The landscape to flood (e.g. ``-distance`` or a gradient).
    markers : dask.array.Array of int
        Global marker labels (0 = none); the result uses the same labels.
    mask : dask.array.Array of bool, optional
        Only flood where true.
    halo_px : int
        Halo in pixels; exact when every mask component spans at most
        ``halo_px - 1`` pixels per axis.
    connectivity, compactness
        As in :func:`skimage.segmentation.watershed`.

    Returns
    -------
    dask.array.Array with the dtype of ``markers``
    """
    import dask.array as da

    halo = int(halo_px)
    if halo < 1:
        raise ConfigError(f"halo_px must be >= 1, got {halo_px!r}")
    data = da.asarray(data)
    markers = da.asarray(markers)
    arrays = [data, markers.rechunk(data.chunks)]
    if mask is not None:
        arrays.append(da.asarray(mask).astype(bool).rechunk(data.chunks))
    arrays, depth = _prepare_halo(arrays, halo)
    meta = np.empty((0,) * data.ndim, markers.dtype)

    if mask is None:
        return da.map_overlap(
            lambda a, b: _ws_per_component(a, b, None, connectivity, compactness),
            *arrays,
            depth=depth,
            boundary="none",
            dtype=markers.dtype,
            meta=meta,
        )
    return da.map_overlap(
        lambda a, b, m: _ws_per_component(a, b, m, connectivity, compactness),
        *arrays,
        depth=depth,
        boundary="none",
        dtype=markers.dtype,
        meta=meta,
    )


def _ws_threshold_block(
    mask: np.ndarray,
    *,
    grid_chunks: tuple,
    full_shape: tuple,
    halo_depth: dict,
    sampling: tuple,
    min_distance: int,
    connectivity: int,
    block_info=None,
) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    loc = block_info[0]["chunk-location"]
    origin = []
    for k, i in enumerate(loc):
        start = int(sum(grid_chunks[k][:i]))
        origin.append(max(start - halo_depth[k], 0))
    mask = np.asarray(mask, dtype=bool)
    dist = ndi.distance_transform_edt(mask, sampling=sampling)
    comps, _ = ndi.label(mask)
    peaks = peak_local_max(
        dist, min_distance=min_distance, threshold_abs=0.0, labels=comps, exclude_border=False
    )
    peak_mask = np.zeros(mask.shape, dtype=bool)
    peak_mask[tuple(peaks.T)] = True
    markers, n = ndi.label(peak_mask, structure=ndi.generate_binary_structure(mask.ndim, mask.ndim))
    ws = _ws_per_component(-dist, markers, mask, connectivity, 0.0)
    # Canonical id of a basin: 1 + global raster index of its marker's first pixel.
    canon = np.zeros(n + 1, dtype=np.uint64)
    if n:
        coords = np.nonzero(markers)
        lab = markers[coords]
        flat = (
            np.ravel_multi_index(tuple(c + o for c, o in zip(coords, origin)), full_shape).astype(np.uint64)
            + 1
        )
        first = np.full(n + 1, np.iinfo(np.uint64).max, dtype=np.uint64)
        np.minimum.at(first, lab, flat)
        canon[1:] = first[1:]
    return canon[ws]


def watershed_from_threshold(
    data: Any,
    *,
    spacing: Any = None,
    threshold: Any = "otsu",
    min_distance: int = 3,
    halo_px: int = 32,
    connectivity: int = 1,
    nbins: int = 256,
) -> Any:
    """Split foreground objects: global threshold -> distance transform -> peaks -> watershed.

    Per chunk with ``halo_px``: ``mask = data > t`` (one global threshold),
    ``dist = distance_transform_edt(mask, sampling=spacing)``, markers are
    the peaks of ``peak_local_max(dist, min_distance, threshold_abs=0,
    labels=label(mask), exclude_border=False)`` (8/26-connected groups),
    and ``watershed(-dist, markers, mask=mask)``. Basin ids are
    ``1 + the global raster index of the basin's marker`` (uint64, sparse, the
    same in every chunk); relabel sequentially afterwards if needed. Exact (equal to the
    whole-image pipeline up to those ids) when every object spans at most
    ``halo_px - 1`` pixels per axis.

    Returns
    -------
    dask.array.Array of uint64
    """
    import dask.array as da

    from ._input import unwrap
    from .thresholds import threshold as global_threshold

    inp = unwrap(data, spacing)
    img = inp.single_band("watershed")
    t = global_threshold(img, threshold, nbins=nbins) if isinstance(threshold, str) else float(threshold)
    halo = int(halo_px)
    if halo < 1:
        raise ConfigError(f"halo_px must be >= 1, got {halo_px!r}")
    (mask,), depth = _prepare_halo([img > t], halo)
    return da.map_overlap(
        _ws_threshold_block,
        mask,
        depth=depth,
        boundary="none",
        dtype=np.uint64,
        meta=np.empty((0,) * img.ndim, np.uint64),
        grid_chunks=mask.chunks,
        full_shape=mask.shape,
        halo_depth=depth,
        sampling=inp.spacing,
        min_distance=int(min_distance),
        connectivity=connectivity,
    )


def watershed_method(
    image: Any,
    *,
    spacing: Any = None,
    markers: Any = None,
    threshold: Any = "otsu",
    min_distance: int = 3,
    halo_px: int = 32,
    connectivity: int = 1,
    nbins: int = 256,
) -> Any:
    """Pipeline method ``watershed``.

    With ``markers`` (a global label array) floods ``image`` (the landscape)
    from them, :func:`watershed`; without, splits the thresholded foreground
    with :func:`watershed_from_threshold`.
    """
    if markers is None:
        return watershed_from_threshold(
            image,
            spacing=spacing,
            threshold=threshold,
            min_distance=min_distance,
            halo_px=halo_px,
            connectivity=connectivity,
            nbins=nbins,
        )
    from ._input import unwrap

    img = unwrap(image, spacing).single_band("watershed")
    return watershed(img, markers, halo_px=halo_px, connectivity=connectivity)
