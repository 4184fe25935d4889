"""Stitching on a strided model's output grid (``output_stride: s`` with ``output_grid: true``).

A model whose output is ``s`` times smaller than its input can be stitched
where its logits live instead of upsampling every patch: the result has
``ceil(shape / s)`` pixels per axis, spacing ``s x`` the input's, and the
centre of its first pixel at the centre of the input's first ``s x s`` block.
That cuts the blending and the result ``s**ndim``-fold.

How, without a second engine: the (preprocessed) input is rearranged
space-to-depth, ``(C, H, W) -> (C * s * s, H / s, W / s)``, so a patch of
``P / s`` pixels on that grid is exactly an input patch of ``P`` pixels whose
start is a multiple of ``s``. The engine tiles and stitches the rearranged
image as usual with patch, overlap and chunks divided by ``s``; a small
wrapper turns each batch back into full-resolution patches (depth-to-space)
before the model sees it. Axes are padded to a multiple of ``s`` first with
the pipeline's ``pad_mode``; a coarse pixel is valid when any input pixel
under it is.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from .errors import TilingError
from .image import Image
from .options import InferenceOptions, TilingOptions
from .predictors.base import Predictor

__all__ = ["segment_on_output_grid", "space_to_depth", "depth_to_space", "StridedPredictor"]


def space_to_depth(block: np.ndarray, s: int) -> np.ndarray:
    """``(C, *spatial)`` with every axis a multiple of ``s`` -> ``(C * s**n, *spatial / s)``.

    Channel ``c * s**n + k`` holds the pixels at offset ``k`` (row-major over
    the ``s``-cube) of channel ``c``.

    >>> space_to_depth(np.arange(16).reshape(1, 4, 4), 2)[:, 0, 0].tolist()
    [0, 1, 4, 5]
    """
    c, spatial = block.shape[0], block.shape[1:]
    n = len(spatial)
    shape = (c,) + tuple(x for d in spatial for x in (d // s, s))
    moved = block.reshape(shape).transpose((0,) + tuple(2 + 2 * i for i in range(n)) + tuple(1 + 2 * i for i in range(n)))
    return np.ascontiguousarray(moved.reshape((c * s**n,) + tuple(d // s for d in spatial)))


def depth_to_space(batch: np.ndarray, s: int) -> np.ndarray:
    """Inverse of :func:`space_to_depth` on a batch ``(N, C * s**n, *small)`` -> ``(N, C, *small * s)``."""
    n_items, cs, small = batch.shape[0], batch.shape[1], batch.shape[2:]
    n = len(small)
    c = cs // s**n
    x = batch.reshape((n_items, c) + (s,) * n + tuple(small))
    order = (0, 1) + tuple(x for i in range(n) for x in (2 + n + i, 2 + i))
    return np.ascontiguousarray(x.transpose(order).reshape((n_items, c) + tuple(d * s for d in small)))


class StridedPredictor(Predictor):
    """The model seen from the space-to-depth grid: ``(N, C * s**n, *p)`` in, ``(N, K, *p)`` out."""

    def __init__(self, predictor: Any, stride: int, n_channels: int, ndim: int) -> None:
        self.predictor, self.stride = predictor, int(stride)
        self.in_channels = int(n_channels) * self.stride**ndim
        self.out_channels = getattr(predictor, "out_channels", None)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.predictor(depth_to_space(np.asarray(batch, dtype=np.float32), self.stride)),
                          dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        inner = self.predictor.describe() if hasattr(self.predictor, "describe") else {}
        return {**inner, "stitched_on": f"output grid (stride {self.stride})"}


def _scaled(values: Any, s: int, what: str, exact: bool, n: int = 0) -> Any:
    if values is None:
        return None
    if np.isscalar(values):
        values = (values,) * n
    out = []
    for v in values:
        if exact and int(v) % s:
            raise TilingError(f"{what} {tuple(values)!r} must be a multiple of the model's output_stride {s}")
        out.append(max(1, int(v) // s) if what != "overlap_px" else int(v) // s)
    return tuple(out)


def segment_on_output_grid(image: Image, predictor: Any, tiling: TilingOptions,
                           inference: InferenceOptions) -> tuple[Image, dict[str, int]]:
    """Segment ``image`` with a strided model, stitching on its output grid (see the module docstring).

    Raises
    ------
    TilingError
        When the patch size is not a multiple of the stride.
    """
    import dask.array as da

    from .graph import check_input, pad, segment_with_stats
    from .preprocess import apply_preprocess

    s = int(predictor.conventions.output_stride)
    img = check_input(image)
    n = img.spatial_ndim
    patch = (tiling.patch_size,) * n if np.isscalar(tiling.patch_size) else tuple(tiling.patch_size)
    small_patch = _scaled(patch, s, "patch_size", exact=True)
    # the model input at full resolution, as graph.model_input makes it (then padding to multiples of s)
    valid = img.valid()
    data = img.data if img.has_channels else img.data[None]
    if data.dtype.kind == "f" and inference.nan_policy == "fill":
        data = da.where(da.isnan(data), inference.fill_value, data)
    if valid is not None:
        data = da.where(valid[None], data.astype(np.float32), np.float32(np.nan))
    if inference.preprocess:
        data = apply_preprocess(data, list(inference.preprocess))
    if valid is not None:
        data = da.where(valid[None], data, np.float32(inference.fill_value))
    data = data.astype(np.float32)
    extra = tuple((0, -d % s) for d in img.spatial_shape)
    if any(e for _, e in extra):
        data = pad(data, ((0, 0),) + extra, tiling.pad_mode, inference.fill_value)
    chunks = tuple(max(s, (max(c) // s) * s) for c in data.chunks[1:])
    data = data.rechunk((-1,) + chunks)
    n_ch = int(data.shape[0])
    out_chunks = ((n_ch * s**n,),) + tuple(tuple(c // s for c in cs) for cs in data.chunks[1:])
    coarse = data.map_blocks(space_to_depth, s, chunks=out_chunks, dtype=np.float32)
    mask = None
    if valid is not None:
        v = da.pad(valid, extra, mode="constant", constant_values=False) if any(e for _, e in extra) else valid
        mask = da.coarsen(np.any, v, {i: s for i in range(n)}, trim_excess=False).astype(bool)
    spacing = tuple(sp * s for sp in img.spacing)
    shift = np.asarray([(s - 1) / 2 * sp for sp in img.spacing]) @ np.asarray(img.direction, dtype=np.float64)
    origin = tuple(float(o) for o in np.asarray(img.origin, dtype=np.float64) + shift)
    transform = None
    if img.transform is not None and n == 2:
        a, b, c, d, e, f = img.transform
        transform = (a * s, b * s, c, d * s, e * s, f)
    small = img.with_data(coarse, axes=("c",) + img.spatial_axes, spacing=spacing, origin=origin,
                          transform=transform, mask=mask, nodata=None)
    small_tiling = replace(tiling, patch_size=small_patch,
                           overlap_px=_scaled(tiling.overlap_px, s, "overlap_px", exact=False, n=n),
                           chunks=_scaled(tiling.chunks, s, "chunks", exact=False, n=n))
    wrapped = StridedPredictor(predictor, s, n_ch, n)
    return segment_with_stats(small, wrapped, small_tiling, replace(inference, preprocess=()))
