"""Areas of interest: limit where an image is valid to a raster mask or the polygons of a vector file.

``input.aoi`` in a pipeline (or :func:`apply_aoi`) narrows the image's
validity mask: pixels outside the AOI count as nodata, so patches that lie
wholly outside it never reach the model and their output pixels are nodata.

* a **raster** AOI is any image tileseg can open with the same spatial shape
  (nonzero = inside); it is read lazily, chunk by chunk;
* a **vector** AOI (``.gpkg``, ``.geojson``, ``.json``, ``.shp``, ``.fgb``) is
  read with pyogrio, reprojected to the image's CRS when both CRSs are known
  and differ, and burnt into each chunk with ``rasterio.features.rasterize``
  using that chunk's own transform (a pixel is inside when its centre is),
  lazily, so no image-sized mask is ever held.

Needs ``pip install 'tileseg[vector]'`` for vector files.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from .errors import FormatError, InputError, require
from .image import Image

VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".fgb")


def is_vector(path: Any) -> bool:
    """Whether ``path`` names a vector file (by its suffix)."""
    return str(path).lower().endswith(VECTOR_SUFFIXES)


def apply_aoi(image: Image, aoi: Any) -> Image:
    """``image`` with its mask narrowed to the area of interest ``aoi`` (a path, or an Image).

    Raises
    ------
    InputError
        The AOI does not fit the image (shape, no CRS/transform for a vector AOI),
        or holds no geometry.
    """
    inside = vector_mask(image, aoi) if not isinstance(aoi, Image) and is_vector(aoi) else raster_mask(image, aoi)
    mask = inside if image.mask is None else image.mask & inside
    return dataclasses.replace(image, mask=mask)


def raster_mask(image: Image, aoi: Any) -> Any:
    """Lazy boolean mask from a raster AOI with the image's spatial shape (nonzero = inside)."""
    from .readers import open_image

    src = aoi if isinstance(aoi, Image) else open_image(aoi)
    data = src.data
    if src.has_channels:
        if data.shape[0] != 1:
            raise InputError(f"AOI {src.source!r} has {data.shape[0]} bands; give a single-band mask")
        data = data[0]
    if tuple(data.shape) != image.spatial_shape:
        raise InputError(f"AOI {src.source!r} has shape {tuple(data.shape)!r} but {image.source or 'the image'} "
                         f"has {image.spatial_shape!r}; a raster AOI must be on the image's grid")
    chunks = (image.data.chunks[1:] if image.has_channels else image.data.chunks)
    return (data != 0).rechunk(chunks)


def _geometries(path: str, crs: str | None) -> list[Any]:
    """GeoJSON-like geometries of a vector file, in ``crs`` when both CRSs are known."""
    pyogrio = require("pyogrio", "vector")
    shapely = require("shapely", "vector")
    if not os.path.exists(path):
        raise InputError(f"AOI {path!r} does not exist")
    try:
        meta, _, wkb, _ = pyogrio.raw.read(path, read_geometry=True)
    except Exception as exc:
        raise FormatError(f"AOI {path!r}: cannot read vector file: {exc}") from exc
    geoms = [shapely.from_wkb(g) for g in wkb if g is not None]
    if not geoms:
        raise InputError(f"AOI {path!r} holds no geometry")
    src_crs = meta.get("crs")
    shapes = [shapely.geometry.mapping(g) for g in geoms]
    if crs and src_crs:
        from rasterio.crs import CRS
        from rasterio.warp import transform_geom

        a, b = CRS.from_user_input(src_crs), CRS.from_user_input(crs)
        if a != b:
            shapes = [transform_geom(a, b, s) for s in shapes]
    return shapes


def vector_mask(image: Image, path: Any) -> Any:
    """Lazy boolean mask of the polygons in a vector file, burnt chunk by chunk on the image's grid."""
    import dask.array as da

    require("rasterio", "geo")
    if image.transform is None and image.crs is None:
        raise InputError(f"a vector AOI needs a georeferenced image; {image.source or 'the image'} has no CRS "
                         "or transform")
    if image.spatial_ndim != 2:
        raise InputError("a vector AOI applies to 2D images")
    shapes = _geometries(os.fspath(path), image.crs)
    chunks = image.data.chunks[1:] if image.has_channels else image.data.chunks
    template = da.zeros(image.spatial_shape, chunks=chunks, dtype=bool)
    return template.map_blocks(_burn, shapes, tuple(image.affine), dtype=bool)


def _burn(block: np.ndarray, shapes: list[Any], affine: tuple[float, ...], block_info: Any = None) -> np.ndarray:
    from rasterio import Affine
    from rasterio.features import rasterize

    (r0, _), (c0, _) = block_info[0]["array-location"]
    transform = Affine(*affine) * Affine.translation(c0, r0)
    return rasterize(shapes, out_shape=block.shape, transform=transform, fill=0, default_value=1,
                     dtype="uint8").astype(bool)
