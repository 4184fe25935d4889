"""Lazy, chunked resampling of an :class:`~tileseg.image.Image` onto another grid.

Conventions (those of :mod:`tileseg.geometry`): a pixel index ``p`` sits at the
physical point ``origin + (p * spacing) @ direction``, ``origin`` being the
centre of the first pixel. :func:`resample` keeps the origin and the direction
and lays out ``round(shape * spacing / new_spacing)`` pixel centres with the new
spacing from it; :func:`resample_to` maps onto exactly another image's grid.

Each output chunk is computed by :func:`dask_image.ndinterp.affine_transform`
from the input region it needs plus the interpolation kernel's halo (only the
input blocks under that region are read), and equals
``scipy.ndimage.affine_transform(..., mode="nearest")`` on the whole array for
``order`` 0 and 1 (checked in ``tests/test_resample.py``); nearest rounds
exact ties up (``floor(coordinate + 0.5)``, by a 1e-6 pixel nudge, so every
chunking gives the same answer). Outside the input's
pixel centres the edge value is repeated. ``order=3`` prefilters with
dask-image's chunked spline filter (an overlap approximation of SciPy's global
one: close, not bit-equal).

Labels: resample a class map with ``order=0``; better, resample the model's
logits or probabilities linearly and take the argmax afterwards (nnU-Net's
way, :func:`labels_from_scores`), which is what :func:`tileseg.segment` does
with ``target_spacing``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .image import Image

ORDERS = (0, 1, 3)
_TIE = 1e-6  # nearest: index = floor(coordinate + 0.5), ties up, the same in every chunk
_PAD3 = 8  # edge padding before the order-3 prefilter: keeps its boundary away from the image


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """``round(shape * spacing / new_spacing)``, at least 1 per axis.

    >>> resampled_shape((10, 7), (1.0, 1.0), (2.0, 0.5))
    (5, 14)
    """
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def check_spacing(spacing: Any, n: int) -> tuple[float, ...]:
    """``spacing`` as ``n`` positive finite floats.

    Raises
    ------
    ValueError
        Wrong length or a value that is not positive and finite.
    """
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spacing must be {n} positive numbers, got {spacing!r}") from exc
    if len(values) != n or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be {n} positive finite numbers (one per spatial axis), got {spacing!r}")
    return values


def resample(image: Image, spacing: Sequence[float], *, order: int = 1, chunks: Any = None) -> Image:
    """Resample ``image`` to ``spacing`` lazily, keeping its origin, direction and extent.

    Parameters
    ----------
    image : Image
        2D/3D image, optional channel axis (each channel is resampled alone).
    spacing : sequence of float
        New pixel spacing per spatial axis, in the image's units.
    order : {0, 1, 3}
        Nearest (class maps), linear (intensities, probabilities, logits) or cubic.
    chunks : int or tuple, optional
        Output chunk size per spatial axis (default: the input's largest chunk).

    Returns
    -------
    Image
        Shape ``round(shape * old / new spacing)``; same origin and direction;
        ``transform`` (if any) rescaled about the first pixel's centre; the
        validity (``mask``/``nodata``) resampled with nearest into ``mask``.

    Examples
    --------
    >>> import numpy as np, tileseg
    >>> from tileseg.resample import resample
    >>> img = tileseg.open(np.arange(16.0).reshape(4, 4))
    >>> out = resample(img, (0.5, 2.0))
    >>> out.spatial_shape, out.spacing, out.origin
    ((8, 2), (0.5, 2.0), (0.0, 0.0))
    """
    new = check_spacing(spacing, image.spatial_ndim)
    shape = resampled_shape(image.spatial_shape, image.spacing, new)
    out = resample_grid(image, shape, new, image.origin, image.direction, order=order, chunks=chunks)
    if image.transform is not None:
        out = out.with_data(out.data, transform=_scaled_transform(image.transform, image.spacing, new))
    return out


def resample_to(image: Image, like: Image, *, order: int = 1, chunks: Any = None) -> Image:
    """Resample ``image`` onto exactly ``like``'s grid (shape, spacing, origin, direction).

    Parameters
    ----------
    image : Image
        What to resample (e.g. logits on the model's grid).
    like : Image
        The target grid (e.g. the source image); its ``transform`` and ``crs`` are taken over.
    order : {0, 1, 3}
        As in :func:`resample`. For a segmentation, resample scores with
        ``order=1`` and call :func:`labels_from_scores` rather than resampling
        labels with ``order=0``.
    chunks : int or tuple, optional
        Output chunk size per spatial axis (default: ``like``'s spatial chunks).
    """
    if chunks is None:
        chunks = like.data.chunks[-like.spatial_ndim:]
    out = resample_grid(image, like.spatial_shape, like.spacing, like.origin, like.direction, order=order,
                        chunks=chunks)
    return out.with_data(out.data, transform=like.transform, crs=like.crs)


def resample_grid(image: Image, shape: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                  direction: Any, *, order: int = 1, chunks: Any = None) -> Image:
    """Resample ``image`` onto the grid ``(shape, spacing, origin, direction)`` (see the module notes)."""
    import dask.array as da

    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    n = image.spatial_ndim
    shape = tuple(int(s) for s in shape)
    probe = Image(data=da.zeros((1,) * n), axes=image.spatial_axes, spacing=spacing, origin=origin,
                  direction=direction)  # validates the target geometry
    matrix, offset = index_map(image, probe.spacing, probe.origin, probe.direction)
    if chunks is None:
        chunks = tuple(max(c) for c in image.data.chunks[-n:])
    out_chunks = da.core.normalize_chunks(chunks, shape)
    out_chunks = tuple(max(c) for c in out_chunks)
    data = image.data if image.has_channels else image.data[None]
    channels = [_map_channel(data[c], matrix, offset, shape, order, out_chunks) for c in range(data.shape[0])]
    out = da.stack(channels) if image.has_channels else channels[0]
    valid = image.valid()
    mask = None
    if valid is not None:
        mask = _map_channel(valid.astype(np.uint8), matrix, offset, shape, 0, out_chunks).astype(bool)
    nodata = image.nodata if order == 0 else None
    return image.with_data(out, axes=image.axes, spacing=probe.spacing, origin=probe.origin,
                           direction=probe.direction, mask=mask, nodata=nodata, transform=None)


def index_map(image: Image, spacing: Sequence[float], origin: Sequence[float],
              direction: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, offset)`` with ``image index = matrix @ grid index + offset`` (SciPy's affine_transform form).

    Both grids follow :mod:`tileseg.geometry`: ``p = origin + (index * spacing) @ direction``.
    """
    d_in = np.asarray(image.direction, dtype=np.float64)
    d_out = np.asarray(direction, dtype=np.float64)
    inv = np.linalg.inv(d_in)
    s_in = np.asarray(image.spacing, dtype=np.float64)
    s_out = np.asarray(spacing, dtype=np.float64)
    matrix = (d_out @ inv).T * s_out[None, :] / s_in[:, None]
    offset = (inv.T @ (np.asarray(origin, dtype=np.float64) - np.asarray(image.origin, dtype=np.float64))) / s_in
    matrix[np.abs(matrix) < 1e-12] = 0.0
    return matrix, offset


def labels_from_scores(scores: Image, class_names: Sequence[str] | None = None) -> Image:
    """A class map from ``(K, ...)`` logits: argmax, or ``> 0`` for one channel (the engine's rule).

    Pass sigmoid/softmax probabilities only with K > 1 (argmax is the same);
    for one probability channel threshold at 0.5 yourself.
    """
    from .image import label_dtype
    from .stitching.overlap_add import reduce_logits

    k = int(scores.data.shape[0])
    dtype = label_dtype(max(k, 2))
    data = scores.data.rechunk({0: -1}).map_blocks(reduce_logits, "labels", dtype.str, drop_axis=0, dtype=dtype)
    return scores.with_data(data, axes=scores.spatial_axes, class_names=class_names, nodata=None)


def _map_channel(data: Any, matrix: np.ndarray, offset: np.ndarray, shape: tuple[int, ...], order: int,
                 chunks: tuple[int, ...]) -> Any:
    """One spatial array through dask-image's chunked affine_transform (edge values repeated outside)."""
    from dask_image.ndinterp import affine_transform

    if order > 0 and data.dtype.kind != "f":
        data = data.astype(np.float32)
    if order == 0:  # exact ties (e.g. 3.5) round up whatever the chunk's floating-point path
        offset = offset + _TIE
    if order <= 1:
        return affine_transform(data, matrix, offset, output_shape=shape, order=order, output_chunks=chunks,
                                mode="nearest")
    from .graph import pad

    # SciPy's order-3 "nearest" extends the edge before the prefilter: pad with it, filter, stay inside
    padded = pad(data, ((_PAD3, _PAD3),) * data.ndim, "edge")
    return affine_transform(padded, matrix, offset + _PAD3, output_shape=shape, order=order, output_chunks=chunks,
                            mode="constant", prefilter=True).astype(data.dtype)


def _scaled_transform(transform: Sequence[float], old: Sequence[float], new: Sequence[float]) -> tuple[float, ...]:
    """A GDAL affine with pixels rescaled from ``old`` to ``new`` (y, x) spacing, the first pixel's centre kept."""
    a, b, c, d, e, f = transform
    fy, fx = new[-2] / old[-2], new[-1] / old[-1]
    cx, cy = c + a / 2 + b / 2, f + d / 2 + e / 2
    a, d, b, e = a * fx, d * fx, b * fy, e * fy
    return (a, b, cx - a / 2 - b / 2, d, e, cy - d / 2 - e / 2)
