"""GeoTIFF / COG reader (rasterio): local files and remote COGs, lazily, one window per chunk.

What it opens
-------------
``.tif`` / ``.tiff`` files (not ``.ome.tif``): local paths, ``file://``,
``https://`` (GDAL ``/vsicurl/``), ``s3://`` (``/vsis3/``) and ``gs://``
(``/vsigs/``) URLs. Every open and read runs inside ``rasterio.Env`` with
:data:`tileseg.readers._gdal.DEFAULT_ENV` (settings for COGs: no directory
listing, merged ranges, HTTP/2 multiplexing, VSI cache, retries), overridable
with ``env={...}``.

The image
---------
* ``data``: axes ``("c", "y", "x")`` always (bands first); one dask chunk per
  window of a multiple of the file's internal block size (about 1024 px by
  default, ``chunks=`` to change), read in the task by a
  :class:`~tileseg.readers._gdal.WindowSource` that caches decoded windows per
  process (``cache_bytes``: 256 MiB by default for remote files, where it
  saves requests, 32 MiB for local ones, which the OS already caches), so
  windows several owner tasks need are fetched once per process.
* ``level``: 0 is full resolution, ``k`` the k-th overview (negative counts
  from the coarsest); shape and transform are that level's.
* ``bands``: 1-based indexes (``[4, 3, 2]``) or band descriptions
  (``["red", "nir"]``, case-insensitive).
* ``scale_offset=True`` applies each band's scale/offset (float32 output,
  nodata pixels become NaN and ``nodata`` is NaN).
* ``nodata``: the first selected band's nodata value. ``mask``: only when a
  selected band has a real mask (internal/external ``.msk`` mask or alpha
  band); then a pixel is valid where **any** selected band's GDAL mask is
  valid (GDAL's ``dataset_mask`` rule). Nodata-only files get ``mask=None``
  and :meth:`tileseg.image.Image.valid` applies the same rule to the values:
  a pixel is nodata where every selected band equals nodata.
* ``crs`` (``"EPSG:n"`` when the CRS is exactly that code, else WKT),
  ``transform`` (corner-based, as rasterio gives it), ``spacing``/``origin``
  from :func:`tileseg.geometry.grid_from_affine` (centre of first pixel),
  ``direction`` from the affine's signs (``((-1, 0), (0, 1))`` for north-up:
  rows run south, like a decreasing ``y`` coordinate in
  :mod:`tileseg.interop.xarray`), ``units`` from the CRS (``"metre"``,
  ``"degree"``). A file without CRS is read with a warning.
* ``attrs``: ``tags``, ``band_descriptions``, ``band_colorinterp``,
  ``band_scales``, ``band_offsets``, ``band_units``, ``band_tags`` of the
  selected bands (JSON-friendly) for writers to carry.

Errors
------
Missing file or HTTP 404: :class:`~tileseg.errors.ImageNotFoundError`; not a
readable TIFF or an unsupported dtype (complex): :class:`~tileseg.errors.FormatError`;
bad ``level``/``bands``: :class:`~tileseg.errors.InputError` listing what
exists; a truncated file or corrupt tile: :class:`~tileseg.errors.InputError`
at compute time naming the file and the window. All name the file or URL.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Any

import numpy as np

from ..errors import ConfigError, FormatError, ImageNotFoundError, InputError, require
from ..geometry import grid_from_affine
from ..image import Image
from ._gdal import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_ENV,
    LOCAL_CACHE_BYTES,
    WindowSource,
    gdal_path,
    is_remote,
    with_retries,
)
from .base import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Reader, check_budget

log = logging.getLogger(__name__)

_SUFFIXES = (".tif", ".tiff")
#: Target chunk edge in pixels (rounded to a multiple of the block size).
TARGET_CHUNK_PX = 1024


def _name_of(path: str) -> str:
    return str(path).split("?", 1)[0].rstrip("/").lower()


def block_chunks(block: tuple[int, int], shape: tuple[int, int], chunks: Any = None) -> tuple[int, int]:
    """Dask chunk ``(rows, cols)``: a multiple of the block near ``TARGET_CHUNK_PX`` (or ``chunks``).

    Striped files (blocks as wide as the image) get full-width chunks of
    about ``TARGET_CHUNK_PX**2`` pixels.

    >>> block_chunks((256, 256), (5000, 5000)), block_chunks((16, 485), (373, 485))
    ((1024, 1024), (373, 485))
    """
    if chunks is not None:
        c = (int(chunks), int(chunks)) if isinstance(chunks, (int, np.integer)) else tuple(int(v) for v in chunks)
        if len(c) != 2 or min(c) < 1:
            raise ConfigError(f"chunks={chunks!r}: give one int or (rows, cols) of positive ints")
        return min(c[0], shape[0]), min(c[1], shape[1])
    by, bx = (max(int(b), 1) for b in block)
    cx = min(max(TARGET_CHUNK_PX // bx, 1) * bx, shape[1])
    cy = min(max((TARGET_CHUNK_PX * TARGET_CHUNK_PX // max(cx, 1)) // by, 1) * by, shape[0])
    return max(cy, 1), max(cx, 1)


def _select_bands(ds: Any, bands: Any, source: str) -> tuple[int, ...]:
    """1-based band indexes from ``bands`` (indexes or descriptions)."""
    n = ds.count
    descriptions = [d or "" for d in ds.descriptions]
    available = ", ".join(f"{i + 1}={d!r}" if d else str(i + 1) for i, d in enumerate(descriptions))
    if bands is None:
        return tuple(range(1, n + 1))
    items = [bands] if isinstance(bands, (int, str)) else list(bands)
    if not items:
        raise InputError(f"{source!r}: bands=[] selects nothing (bands available: {available})")
    out = []
    for b in items:
        if isinstance(b, (int, np.integer)) and not isinstance(b, bool):
            if not 1 <= int(b) <= n:
                raise InputError(f"{source!r}: band {int(b)} out of range: it has {n} band(s), 1-based "
                                 f"(bands available: {available})")
            out.append(int(b))
        elif isinstance(b, str):
            hits = [i + 1 for i, d in enumerate(descriptions) if d.lower() == b.lower()]
            if not hits:
                raise InputError(f"{source!r}: no band described {b!r} (bands available: {available})")
            out.append(hits[0])
        else:
            raise ConfigError(f"{source!r}: bands entries must be 1-based ints or descriptions, got {b!r}")
    return tuple(out)


def _crs_text(crs: Any) -> str:
    epsg = crs.to_epsg()
    if epsg is not None:
        from rasterio.crs import CRS

        if CRS.from_epsg(epsg) == crs:
            return f"EPSG:{epsg}"
    return crs.to_wkt()


def _units(crs: Any) -> str | None:
    if crs is None:
        return None
    try:
        name = crs.units_factor[0]
    except Exception:  # noqa: BLE001 - an odd CRS just has no known unit
        return None
    return {"meter": "metre", "metre": "metre", "degree": "degree"}.get(str(name).lower(), str(name) or None)


def _direction(t: tuple[float, ...]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Rows of unit vectors (in ``(y, x)``) of the row and column axes of an affine."""
    a, b, _, d, e, _ = t
    nr, nc = math.hypot(b, e), math.hypot(a, d)
    return (e / nr, b / nr), (d / nc, a / nc)


def _json(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class GeoTiffReader(Reader):
    """Open GeoTIFFs and COGs lazily with rasterio (see the module docstring)."""

    name = "geotiff"
    #: Checks existence itself (GDAL answers for URLs; fsspec needs no HTTP backend).
    opens_urls_itself = True

    @classmethod
    def can_open(cls, path: str, storage_options: dict[str, Any] | None = None) -> bool:
        """Whether ``path`` is named like a GeoTIFF (``.tif``/``.tiff``, not ``.ome.tif``)."""
        name = _name_of(path)
        return name.endswith(_SUFFIXES) and not name.endswith((".ome.tif", ".ome.tiff"))

    def open(
        self,
        path: str,
        *,
        level: int | None = None,
        bands: Any = None,
        scale_offset: bool = False,
        chunks: Any = None,
        env: dict[str, Any] | None = None,
        cache_bytes: int | None = None,
        retries: int = 3,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        array: str | None = None,
        storage_options: dict[str, Any] | None = None,
        axes: Any = None,
        **options: Any,
    ) -> Image:
        """Open a GeoTIFF lazily.

        Parameters
        ----------
        path : str
            Local path or URL (``https://``, ``s3://``, ``gs://``, ``file://``).
        level : int, optional
            0 (default) full resolution, ``k`` the k-th overview.
        bands : int, str or list, optional
            1-based band indexes or band descriptions (default: all bands).
        scale_offset : bool
            Apply per-band scale/offset (float32 output).
        chunks : int or (int, int), optional
            Dask chunk ``(rows, cols)``; default a multiple of the block size near 1024.
        env : dict, optional
            GDAL settings, merged over :data:`~tileseg.readers._gdal.DEFAULT_ENV`.
        cache_bytes : int, optional
            Per-process cache of decoded windows; 0 disables it (default: 256 MiB for
            remote files, 32 MiB for local ones).
        retries : int
            Attempts per open/read on a fresh handle (after GDAL's own HTTP retries).
        max_pixels, max_bytes : int or None
            Declared-size budget.

        Returns
        -------
        Image

        Raises
        ------
        ImageNotFoundError, FormatError, InputError, ImageTooLargeError, ConfigError
        """
        if options:
            raise ConfigError(f"unknown geotiff reader option(s) {sorted(options)!r}")
        if array:
            raise InputError(f"{path!r}: array={array!r} given but a GeoTIFF has no named arrays")
        if axes is not None and "".join(axes).lower() != "cyx":
            raise InputError(f"{path!r}: a GeoTIFF is always read with axes 'cyx' (bands first), not {axes!r}")
        rasterio = require("rasterio", "geo")
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

        source = str(path)
        gpath = gdal_path(source)
        if not is_remote(source) and not os.path.exists(gpath):
            raise ImageNotFoundError(f"{source!r} does not exist")
        genv = {**DEFAULT_ENV, **(env or {})}
        remote = is_remote(source)

        def open_level(attempt: int, overview: int | None = None) -> Any:
            kwargs = {} if overview is None else {"overview_level": overview}
            with rasterio.Env(**genv), warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return rasterio.open(gpath, **kwargs)

        try:
            ds = with_retries(f"{source!r}: cannot open", retries if remote else 1, 0.2, open_level)
        except InputError as exc:
            cause = exc.__cause__
            text = str(cause)
            if isinstance(cause, RasterioIOError) and ("404" in text or "No such file" in text
                                                       or "does not exist" in text):
                raise ImageNotFoundError(f"{source!r} does not exist ({text})") from cause
            raise FormatError(f"{source!r} is not a readable GeoTIFF: {text}") from cause
        with ds:
            n_levels = 1 + len(ds.overviews(1))
            idx = 0 if level is None else int(level)
            if not -n_levels <= idx < n_levels:
                raise InputError(f"level={level!r} out of range: {source!r} has {n_levels} level(s) "
                                 f"(0..{n_levels - 1}: full resolution and {n_levels - 1} overview(s))")
            idx %= n_levels
            sel = _select_bands(ds, bands, source)
            dtypes = {ds.dtypes[b - 1] for b in sel}
            if len(dtypes) != 1:
                raise FormatError(f"{source!r}: selected bands have different dtypes {sorted(dtypes)!r}")
            dtype_name = dtypes.pop()
            try:
                dtype = np.dtype(dtype_name)
            except TypeError:
                dtype = None
            if dtype is None or dtype.kind not in "biuf":
                raise FormatError(f"{source!r}: unsupported dtype {dtype_name!r} (complex and other "
                                  "non-real pixel types are not images tileseg segments)")
            meta = self._metadata(ds, sel, source)
        overview = None if idx == 0 else idx - 1
        if overview is not None:
            try:
                lds = with_retries(f"{source!r}: cannot open overview {overview}", retries, 0.2,
                                   lambda a: open_level(a, overview))
            except InputError as exc:
                raise FormatError(str(exc)) from exc.__cause__
            with lds:
                height, width, transform = lds.height, lds.width, tuple(lds.transform)[:6]
                block = tuple(lds.block_shapes[sel[0] - 1])
        else:
            height, width, transform, block = meta["height"], meta["width"], meta["transform"], meta["block"]

        out_dtype = np.dtype(np.float32) if scale_offset else dtype
        shape = (len(sel), height, width)
        check_budget(source, shape, out_dtype, max_pixels=max_pixels, max_bytes=max_bytes)
        if cache_bytes is None:
            cache_bytes = DEFAULT_CACHE_BYTES if is_remote(source) else LOCAL_CACHE_BYTES
        return self._image(source, gpath, genv, sel, idx, overview, n_levels, shape, dtype, out_dtype, block,
                           transform, meta, scale_offset, chunks, cache_bytes, retries)

    @staticmethod
    def _metadata(ds: Any, sel: tuple[int, ...], source: str) -> dict[str, Any]:
        """Facts of the full-resolution dataset (CRS, nodata, masks, attrs)."""
        from rasterio.enums import MaskFlags

        crs = ds.crs
        if crs is None:
            log.warning("%s has no CRS: reading it as a plain raster (no georeferencing)", source)
        flags = [ds.mask_flag_enums[b - 1] for b in sel]
        has_mask = any(MaskFlags.per_dataset in f or MaskFlags.alpha in f for f in flags) or any(
            MaskFlags.all_valid not in f and MaskFlags.nodata not in f for f in flags)
        georef = crs is not None or not ds.transform.is_identity
        attrs = {
            "tags": dict(ds.tags()),
            "band_descriptions": [ds.descriptions[b - 1] for b in sel],
            "band_colorinterp": [ds.colorinterp[b - 1].name for b in sel],
            "band_scales": [_json(float(ds.scales[b - 1])) for b in sel],
            "band_offsets": [_json(float(ds.offsets[b - 1])) for b in sel],
            "band_units": [ds.units[b - 1] or None for b in sel],
            "band_tags": [dict(ds.tags(b)) for b in sel],
        }
        nodatavals = [ds.nodatavals[b - 1] for b in sel]
        return {
            "crs": _crs_text(crs) if crs is not None else None,
            "units": _units(crs),
            "transform": tuple(ds.transform)[:6] if georef else None,
            "nodata": nodatavals[0],
            "has_mask": has_mask,
            "attrs": attrs,
            "height": ds.height,
            "width": ds.width,
            "block": tuple(ds.block_shapes[sel[0] - 1]),
            "scales": tuple(float(ds.scales[b - 1]) for b in sel),
            "offsets": tuple(float(ds.offsets[b - 1]) for b in sel),
            "driver": ds.driver,
            "count": ds.count,
            "compression": ds.compression.name if ds.compression else None,
            "interleave": ds.interleaving.name if ds.interleaving else None,
            "stat": _file_stat(source),
        }

    def _image(self, source: str, gpath: str, genv: dict[str, Any], sel: tuple[int, ...], idx: int,
               overview: int | None, n_levels: int, shape: tuple[int, int, int], dtype: np.dtype,
               out_dtype: np.dtype, block: tuple[int, int], transform: tuple[float, ...], meta: dict[str, Any],
               scale_offset: bool, chunks: Any, cache_bytes: int, retries: int) -> Image:
        import dask.array as da
        from dask.base import tokenize

        cy, cx = block_chunks(block, shape[1:], chunks)
        token = tokenize(source, meta["stat"], idx, sel, scale_offset, (cy, cx))
        common = dict(overview=overview, bands=sel, env=genv, cache_bytes=cache_bytes, token=token,
                      retries=retries if is_remote(source) else 1)  # a local read error is not transient
        nodata = meta["nodata"]
        if scale_offset:
            src = WindowSource(gpath, source, shape=shape, dtype=out_dtype, kind="scaled", scales=meta["scales"],
                               offsets=meta["offsets"], nodata=nodata, **common)
            nodata = float("nan") if nodata is not None else None
        else:
            src = WindowSource(gpath, source, shape=shape, dtype=out_dtype, **common)
        data = da.from_array(src, chunks=(shape[0], cy, cx), name=f"geotiff-{token}", asarray=False,
                             fancy=False, meta=np.empty((0, 0, 0), dtype=out_dtype))
        mask = None
        if meta["has_mask"]:
            msrc = WindowSource(gpath, source, shape=shape[1:], dtype=bool, kind="mask", **common)
            mask = da.from_array(msrc, chunks=(cy, cx), name=f"geotiff-mask-{token}", asarray=False,
                                 fancy=False, meta=np.empty((0, 0), dtype=bool))
        if nodata is not None and not scale_offset:
            nodata = int(nodata) if out_dtype.kind in "biu" and float(nodata).is_integer() else float(nodata)
        attrs = dict(meta["attrs"])
        if scale_offset:  # the data are scaled now: keep the stored values apart
            attrs["applied_scales"], attrs["applied_offsets"] = attrs.pop("band_scales"), attrs.pop("band_offsets")
        geo: dict[str, Any] = {}
        if transform is not None and meta["transform"] is not None:
            spacing, origin = grid_from_affine(transform)
            geo = {"transform": transform, "spacing": spacing, "origin": origin, "direction": _direction(transform),
                   "units": (meta["units"],) * 2}
        reader_info = {
            "path": gpath, "level": idx, "n_levels": n_levels, "overview_level": overview, "bands": list(sel),
            "block_shape": list(block), "chunks": [cy, cx], "dtype": str(dtype), "driver": meta["driver"],
            "band_count": meta["count"], "compression": meta["compression"], "interleave": meta["interleave"],
            "env": genv, "cache_bytes": cache_bytes,
        }
        try:
            return Image(data=data, axes=("c", "y", "x"), crs=meta["crs"], nodata=nodata, mask=mask, attrs=attrs,
                         reader_info=reader_info, source=source, format=self.name, **geo)
        except ValueError as exc:
            raise FormatError(f"{source!r}: {exc}") from exc


def _file_stat(source: str) -> Any:
    """Size and mtime of a local file (part of the dask token), None for URLs."""
    if is_remote(source):
        return None
    st = os.stat(gdal_path(source))
    return (st.st_size, st.st_mtime_ns)
