"""Object-level cleanup that needs whole-image connected components.

Small-object removal, hole filling and "keep the largest component" are not
local operations: an object cut by a chunk border must be measured whole.
Each function here runs one global connected-component pass
(:func:`tileseg.stitching.labels.components`: one compute of per-chunk
summaries and face label pairs), decides per component on the client, then
applies the decision chunk by chunk, lazily.

Size convention (one meaning everywhere): an object (or hole) is *small*
when its size is **strictly less than** ``min_size_px`` pixels, or strictly
less than ``min_size_phys`` in physical units (pixel count times the product
of ``spacing``). This equals scikit-image 0.26
``remove_small_objects(ar, max_size=min_size_px - 1)`` (scikit-image's
``max_size`` removes sizes ``<=`` it).

With ``nodata``, pixels equal to it take no part (see :mod:`.nodata`): they
belong to no object and to no hole, and are ``nodata`` in the result.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import dask.array as da
import numpy as np

from ..errors import ConfigError, InputError
from ..stitching.labels import components, label
from . import nodata as nd

__all__ = ["fill_holes", "keep_largest", "label_step", "remove_small_holes", "remove_small_objects"]


def _small(
    sizes: np.ndarray, min_size_px: int | None, min_size_phys: float | None, spacing: Any, ndim: int
) -> np.ndarray:
    """Boolean per component: size below the threshold."""
    if (min_size_px is None) == (min_size_phys is None):
        raise ConfigError("give exactly one of min_size_px (pixels) or min_size_phys (physical units)")
    if min_size_px is not None:
        if not isinstance(min_size_px, (int, np.integer)) or min_size_px < 0:
            raise ConfigError(f"min_size_px must be a non-negative integer, got {min_size_px!r}")
        return sizes < min_size_px
    if spacing is None:
        raise ConfigError("min_size_phys needs the pixel spacing (spacing=...)")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ConfigError(f"spacing must be {ndim} positive numbers, got {spacing!r}")
    if not isinstance(min_size_phys, (int, float, np.number)) or min_size_phys < 0:
        raise ConfigError(f"min_size_phys must be a non-negative number, got {min_size_phys!r}")
    return sizes * math.prod(spacing) < float(min_size_phys)


def remove_small_objects(
    mask_or_labels: Any,
    *,
    min_size_px: int | None = None,
    min_size_phys: float | None = None,
    spacing: Any = None,
    connectivity: int = 1,
    nodata: Any = None,
) -> da.Array:
    """Remove objects smaller than a size, measured over the whole image.

    Parameters
    ----------
    mask_or_labels : dask.array.Array or numpy.ndarray
        A boolean mask (objects are its connected components) or a
        non-negative integer label image (each label value is one object,
        connected or not, as in scikit-image).
    min_size_px : int, optional
        Objects with fewer pixels are removed.
    min_size_phys : float, optional
        Objects whose physical size (pixels x prod(spacing)) is smaller are removed.
    spacing : tuple of float, optional
        Pixel size per axis; needed with ``min_size_phys``.
    connectivity : int
        1..ndim, for boolean input.
    nodata : int or float, optional
        Pixels equal to it are in no object and stay ``nodata``.

    Returns
    -------
    dask.array.Array
        Same dtype as the input, small objects set to 0 / False. Equals
        ``skimage.morphology.remove_small_objects(ar, max_size=min_size_px - 1,
        connectivity=connectivity)``.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.array([[1, 1, 0, 1], [1, 1, 0, 0]], bool)
    >>> remove_small_objects(m, min_size_px=2).compute().astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0]]
    """
    x = da.asarray(mask_or_labels)
    if nodata is not None:
        nd.check_not_bool(x, nodata, "remove_small_objects")
        invalid = nd.invalid_pixels(x, nodata)
        kept = remove_small_objects(nd.fill(x, invalid, 0), min_size_px=min_size_px, min_size_phys=min_size_phys,
                                    spacing=spacing, connectivity=connectivity)
        return nd.restore(kept, invalid, nodata)
    if x.dtype == bool:
        # "first" too, so that labelling the result reuses these components instead of a new scan.
        comps = components(x, connectivity=connectivity, stats={"sizes", "first"})
        keep = ~_small(comps.sizes, min_size_px, min_size_phys, spacing, x.ndim)
        return comps.apply(keep, background=False)
    if x.dtype.kind not in "iu":
        raise InputError(
            f"remove_small_objects needs a boolean mask or integer labels, got dtype {x.dtype!r}"
        )
    return _remove_small_labels(x, min_size_px, min_size_phys, spacing)


def _unique_counts(block: np.ndarray) -> np.ndarray:
    vals, counts = np.unique(block, return_counts=True)
    return np.stack([vals.astype(np.int64), counts.astype(np.int64)])


def _remove_small_labels(x: da.Array, min_size_px: Any, min_size_phys: Any, spacing: Any) -> da.Array:
    import dask

    parts = [dask.delayed(_unique_counts)(b) for b in x.to_delayed(optimize_graph=False).ravel()]
    parts = dask.compute(*parts)
    allv = np.concatenate([p[0] for p in parts])
    if len(allv) and allv.min() < 0:
        raise InputError("label images must not contain negative labels")
    vals, inv = np.unique(allv, return_inverse=True)
    sizes = np.bincount(inv, weights=np.concatenate([p[1] for p in parts])).astype(np.int64)
    if int(np.count_nonzero(vals)) == 1:
        warnings.warn(
            "Only one label was provided to remove_small_objects: the whole label counts as one object. "
            "Did you mean a boolean mask (or a class map from a method/model, which tileseg treats per class)?",
            UserWarning, stacklevel=3)
    small = _small(sizes, min_size_px, min_size_phys, spacing, x.ndim)
    drop = vals[small & (vals != 0)]

    def _apply(block: np.ndarray) -> np.ndarray:
        return np.where(np.isin(block, drop), np.zeros((), block.dtype), block)

    return x.map_blocks(_apply, dtype=x.dtype)


def remove_small_holes(
    mask: Any,
    *,
    min_size_px: int | None = None,
    min_size_phys: float | None = None,
    spacing: Any = None,
    connectivity: int = 1,
    nodata: Any = None,
) -> da.Array:
    """Fill background components smaller than a size.

    As in scikit-image, a "hole" is any connected component of the background
    (with ``connectivity``), whether or not it touches the image border.
    Equals ``skimage.morphology.remove_small_holes(mask, max_size=min_size_px - 1,
    connectivity=connectivity)``. Parameters as :func:`remove_small_objects`; ``nodata``
    pixels are outside the image (a hole's size counts valid pixels only).

    Returns
    -------
    dask.array.Array
        Boolean; with ``nodata``, the input's dtype (0/1, and ``nodata`` where the input is nodata).
    """
    dtype = nd.mask_dtype(mask, nodata, "remove_small_holes")
    invalid = nd.invalid_pixels(mask, nodata)
    filled = small_holes_filled(_foreground(mask), invalid, min_size_px=min_size_px, min_size_phys=min_size_phys,
                                spacing=spacing, connectivity=connectivity)
    return nd.restore_mask(filled, invalid, nodata, dtype)


def _foreground(data: Any) -> da.Array:
    x = da.asarray(data)
    return x if x.dtype == bool else x != 0


def small_holes_filled(fg: da.Array, invalid: da.Array | None, *, min_size_px: int | None = None,
                       min_size_phys: float | None = None, spacing: Any = None,
                       connectivity: int = 1) -> da.Array:
    """``fg`` (boolean) with its small holes filled; ``invalid`` pixels are in no hole and bound the
    holes as the image border does (the result is meaningless there: the caller restores them)."""
    comps = components(~fg if invalid is None else ~fg & ~invalid, connectivity=connectivity, stats={"sizes"})
    small = _small(comps.sizes, min_size_px, min_size_phys, spacing, fg.ndim)
    return comps.apply(small, background=True)


def fill_holes(mask: Any, *, connectivity: int = 1, spacing: Any = None, nodata: Any = None) -> da.Array:
    """Fill holes: background components not connected to the image border.

    Parameters
    ----------
    mask : dask.array.Array or numpy.ndarray
        Nonzero is foreground.
    connectivity : int
        Connectivity of the *background* (1..ndim). Equals
        ``scipy.ndimage.binary_fill_holes(mask,
        structure=generate_binary_structure(ndim, connectivity))``.
    spacing : tuple, optional
        Accepted for the pipeline step signature; unused.
    nodata : int or float, optional
        Pixels equal to it are outside the image: background touching them
        is no hole. They are ``nodata`` in the result.

    Returns
    -------
    dask.array.Array
        Boolean; with ``nodata``, the input's dtype (0/1, and ``nodata`` where the input is nodata).

    Examples
    --------
    >>> import numpy as np
    >>> m = np.ones((3, 3), bool); m[1, 1] = False
    >>> bool(fill_holes(m).compute()[1, 1])
    True
    """
    dtype = nd.mask_dtype(mask, nodata, "fill_holes")
    invalid = nd.invalid_pixels(mask, nodata)
    filled = holes_filled(_foreground(mask), invalid, connectivity=connectivity)
    return nd.restore_mask(filled, invalid, nodata, dtype)


def holes_filled(fg: da.Array, invalid: da.Array | None, *, connectivity: int = 1) -> da.Array:
    """``fg`` (boolean) with its holes filled; background touching the image border or an ``invalid``
    pixel is no hole (the result is meaningless at invalid pixels: the caller restores them)."""
    if invalid is None:
        comps = components(~fg, connectivity=connectivity, stats=())
        return comps.apply(~comps.border, background=True)
    # invalid pixels join the background, and a component holding one reaches the outside
    comps = components(~fg | invalid, connectivity=connectivity, stats=())
    return comps.apply(~(comps.border | _holding(comps, invalid)), background=True)


def _holding(comps: Any, where: da.Array) -> np.ndarray:
    """Per component: whether any of its pixels is True in ``where`` (one pass over the stored labels)."""
    import dask

    ids = comps.apply(np.arange(comps.n, dtype=np.int64), background=-1)
    where = where.rechunk(ids.chunks)
    parts = [dask.delayed(_ids_at)(i, w) for i, w in zip(ids.to_delayed().ravel(), where.to_delayed().ravel())]
    out = np.zeros(comps.n, dtype=bool)
    for found in dask.compute(*parts):
        out[found] = True
    return out


def _ids_at(ids: np.ndarray, where: np.ndarray) -> np.ndarray:
    found = np.unique(ids[where])
    return found[found >= 0]


def keep_largest(
    labels_or_mask: Any, *, per_class: bool = True, connectivity: int = 1, spacing: Any = None,
    nodata: Any = None,
) -> da.Array:
    """Keep only the largest connected component (of each class).

    Parameters
    ----------
    labels_or_mask : dask.array.Array or numpy.ndarray
        A boolean mask or an integer class map (0 = background).
    per_class : bool
        For a class map: keep the largest component of every class value
        (components join only pixels of equal value). If False, all nonzero
        pixels form the foreground and the largest component keeps its values.
    connectivity : int
        1..ndim.
    spacing : tuple, optional
        Accepted for the pipeline step signature; unused.
    nodata : int, optional
        Pixels equal to it are in no component and stay ``nodata``.

    Returns
    -------
    dask.array.Array
        Same dtype; everything outside the kept components is 0 / False. Ties
        go to the component that appears first in raster (C) order.
    """
    x = da.asarray(labels_or_mask)
    if x.dtype.kind not in "biu":
        raise InputError(f"keep_largest needs a boolean mask or an integer class map, got dtype {x.dtype!r}")
    if nodata is not None:
        nd.check_not_bool(x, nodata, "keep_largest")
        invalid = nd.invalid_pixels(x, nodata)
        kept = keep_largest(nd.fill(x, invalid, 0), per_class=per_class, connectivity=connectivity)
        return nd.restore(kept, invalid, nodata)
    by_value = per_class and x.dtype != bool
    comps = components(x, connectivity=connectivity, by_value=by_value)
    keep = np.zeros(comps.n, dtype=bool)
    if comps.n:
        # Sort by (class, -size, first raster index); the first of each class wins.
        cls = comps.values if by_value else np.zeros(comps.n, dtype=np.int64)
        order = np.lexsort((comps.first, -comps.sizes, cls))
        first_of_class = np.ones(comps.n, dtype=bool)
        first_of_class[1:] = cls[order][1:] != cls[order][:-1]
        keep[order[first_of_class]] = True
    kept = comps.apply(keep, background=False)
    if x.dtype == bool:
        return kept
    return da.where(kept, x, np.zeros((), x.dtype))


#: Components solved by an earlier step, by the dask name of that step's result (newest last, a few kept).
_SOLVED: dict[str, tuple[Any, np.ndarray, int, Any, np.ndarray | None]] = {}
_SOLVED_MAX = 8


def remember_components(result: da.Array, comps: Any, kept: np.ndarray, connectivity: int,
                        nodata: Any = None, nodata_comps: np.ndarray | None = None) -> None:
    """Note that ``result``'s nonzero pixels, apart from those equal to ``nodata``, are exactly the
    components ``kept`` of ``comps``, and its nodata pixels the components ``nodata_comps`` (whole-image
    statistics a later ``label`` step reuses instead of solving the same components again)."""
    _SOLVED[result.name] = (comps, np.asarray(kept, dtype=bool), int(connectivity), nodata, nodata_comps)
    while len(_SOLVED) > _SOLVED_MAX:
        _SOLVED.pop(next(iter(_SOLVED)))


def _same_nodata(a: Any, b: Any) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and (
        (nd.is_nan(a) and nd.is_nan(b)) or a == b))


def label_step(data: Any, *, spacing: Any = None, connectivity: int = 1, sequential: bool = True,
               nodata: Any = None) -> da.Array:
    """Pipeline step ``label``: connected components as int64 labels (see :func:`tileseg.stitching.labels.label`).

    Pixels equal to ``nodata`` are never labelled and join nothing; they are
    :data:`.nodata.LABEL_NODATA` (-1) in the result.

    After ``remove_small_objects`` with the same connectivity on a one-class map, the
    components that step solved are numbered directly (no second whole-image pass):
    removing whole components neither splits nor joins the others.
    """
    solved = _SOLVED.get(getattr(data, "name", None)) if isinstance(data, da.Array) else None
    if solved is not None and solved[2] == connectivity and _same_nodata(solved[3], nodata):
        comps, kept, _, _, nodata_comps = solved
        table = np.zeros(comps.n, dtype=np.int64)
        idx = np.flatnonzero(kept)
        table[idx[np.argsort(comps.first[idx], kind="stable")]] = np.arange(1, len(idx) + 1, dtype=np.int64)
        if nodata_comps is not None:
            table[nodata_comps] = nd.LABEL_NODATA
        return comps.apply(table, background=0)
    invalid = nd.invalid_pixels(data, nodata)
    x = da.asarray(data)
    labels, _ = label(nd.fill(x, invalid, 0), connectivity=connectivity, sequential=sequential)
    return nd.restore(labels, invalid, nd.LABEL_NODATA)
