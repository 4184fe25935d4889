"""Cloud-Optimized GeoTIFF writer: blocks to a Zarr store, one COG built in ``finalize``.

One GeoTIFF cannot take concurrent writes from several processes or hosts,
so the write is split the way the writer protocol (:mod:`tileseg.writers.base`)
allows:

* ``prepare`` creates a hidden partial folder beside the output
  (``<dir>/.<name>.partial-<uuid>``) holding a Zarr array whose chunks are the
  COG's blocks (``blocksize`` square, all bands in one chunk);
* the write task stores the (converted) data there, one whole chunk per dask
  block (``dask.array.store(lock=False)``), so a rerun writes the same bytes;
* ``finalize`` streams the complete store block by block into a tiled staging
  GeoTIFF (never more than one block in memory), lets GDAL's ``COG`` driver
  copy it into a COG with overviews, inside the partial folder, renames that
  file onto the final path (atomic on one filesystem) and removes the folder.

Completion is recorded inside the file: ``finalize`` writes the dataset tag
``TILESEG_STATUS=complete`` (with ``TILESEG_RUN_ID``, ``TILESEG_COMPLETED_AT``
and ``TILESEG_INFO``). :func:`is_complete` reads that tag, so a GeoTIFF made
by anyone else is never "complete". A finished output or a foreign GeoTIFF is
replaced only with ``overwrite=True``; a path that is not a GeoTIFF never.

What is written
---------------
Same size, CRS, affine transform (``image.affine``) and nodata as the image.
A class map keeps its integer dtype, gets its class names (dataset and band
tag ``CLASS_NAMES`` as JSON, band description ``classes: a, b, ...``) and, for
uint8/uint16, a colour table (a distinct colour per class, nodata
transparent). Floating-point images are probabilities, stored as
``probabilities_as``: ``float32``, ``float16`` (GDAL stores Float32 with
``NBITS=16``: half-float values, read back as float32) or ``uint8`` (``round(p
* 255)`` with band scale ``1/255``; when the image has nodata, ``round(p *
254)``, scale ``1/254`` and nodata ``255``). Channels become bands, described
by the class names when their count matches. Local paths only.
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
import uuid
import warnings
from typing import Any

import numpy as np

from ..errors import ConfigError, OutputError, require
from ..image import Image
from ..report import now_iso
from .base import (
    SingleFileWriter,
    WriteHandle,
    check_axes,
)
from .blocks import records_of, store_blocks
from .cog_build import STORE
from .zarr import align

log = logging.getLogger(__name__)

STATUS_TAG = "TILESEG_STATUS"
COMPRESS = ("deflate", "zstd", "lzw")
PROBABILITIES_AS = ("float32", "float16", "uint8")
RESAMPLING = ("nearest", "mode", "average", "bilinear", "cubic", "cubicspline", "lanczos", "rms")
PREDICTORS = {None: "NO", 1: "NO", 2: "STANDARD", 3: "FLOATING_POINT"}


def _plan(image: Image, probabilities_as: str) -> dict[str, Any]:
    """How the image's values are stored: kind, store/GDAL dtypes, scale and nodata."""
    dtype, nodata = image.dtype, image.nodata
    plan: dict[str, Any] = {"src_nodata": nodata, "nodata": nodata, "scale": None, "nbits": None}
    if image.is_class_map:
        plan.update(kind="classes", store=str(dtype))
    elif dtype.kind == "f":
        plan["kind"] = "probabilities"
        if probabilities_as == "uint8":
            plan.update(store="uint8", scale=254 if nodata is not None else 255,
                        nodata=255 if nodata is not None else None)
        else:
            plan["store"] = probabilities_as
            plan["nbits"] = 16 if probabilities_as == "float16" else None
    elif dtype.kind in "biu":
        plan.update(kind="values", store="uint8" if dtype.kind == "b" else str(dtype))
    else:
        raise OutputError(f"cannot write dtype {str(dtype)!r} to a GeoTIFF (numeric or bool only)")
    plan["gdal"] = "float32" if plan["store"] == "float16" else plan["store"]
    return plan


def _convert(block: np.ndarray, plan: dict[str, Any]) -> np.ndarray:
    """One block of image values as stored (see the module docstring)."""
    if plan["kind"] != "probabilities" or plan["scale"] is None:
        return block.astype(plan["store"], copy=False)
    x = block.astype(np.float32, copy=False)
    bad = ~np.isfinite(x)
    if plan["src_nodata"] is not None:
        bad |= x == plan["src_nodata"]
    out = np.rint(np.clip(np.where(bad, 0, x), 0, 1) * plan["scale"]).astype(np.uint8)
    if plan["nodata"] is not None:
        out[bad] = plan["nodata"]
    return out


def class_colors(n: int) -> list[tuple[int, int, int, int]]:
    """``n`` distinct opaque RGBA colours: black for class 0, then hues spaced by the golden ratio.

    >>> class_colors(3)[0], len(set(class_colors(200)))
    ((0, 0, 0, 255), 200)
    """
    out = [(0, 0, 0, 255)]
    for i in range(1, n):
        h = (i * 0.618033988749895) % 1.0
        s, v = (0.9, 0.95) if i % 2 else (0.6, 0.75)
        r, g, b = colorsys.hsv_to_rgb(h, s, v - 0.2 * ((i // 64) % 2))
        out.append((round(r * 255), round(g * 255), round(b * 255), 255))
    return out[:n]


def _is_complete(path: str) -> bool:
    """Whether the existing file ``path`` is a finished tileseg COG (raises when it is no GeoTIFF)."""
    rasterio = require("rasterio", "geo")
    with warnings.catch_warnings(), rasterio.Env(CPL_LOG_ERRORS=False):
        warnings.simplefilter("ignore")  # e.g. NotGeoreferencedWarning for a plain TIFF
        with rasterio.open(path) as src:
            driver, tags = src.driver, src.tags()
    if driver != "GTiff":
        raise OutputError(f"{path!r} exists and is a {driver} file, not a GeoTIFF; refusing to replace it")
    return tags.get(STATUS_TAG) == "complete"


def is_complete(path: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` is a GeoTIFF whose tag ``TILESEG_STATUS`` says ``complete``."""
    return COGWriter().is_complete(path, storage_options)


def _check_options(compress: str, blocksize: int, resampling: str | None, probabilities_as: str,
                   predictor: Any) -> None:
    if compress not in COMPRESS:
        raise ConfigError(f"compress must be one of {COMPRESS}, got {compress!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 16 or blocksize % 16:
        raise ConfigError(f"blocksize must be a positive multiple of 16, got {blocksize!r}")
    if resampling is not None and resampling not in RESAMPLING:
        raise ConfigError(f"overview_resampling must be one of {RESAMPLING}, got {resampling!r}")
    if probabilities_as not in PROBABILITIES_AS:
        raise ConfigError(f"probabilities_as must be one of {PROBABILITIES_AS}, got {probabilities_as!r}")
    if isinstance(predictor, bool) or predictor not in PREDICTORS:
        raise ConfigError(f"predictor must be None, 1 (none), 2 (horizontal) or 3 (floating point), got {predictor!r}")


class COGWriter(SingleFileWriter):
    """Write a 2-D image (optionally with channels) as a Cloud-Optimized GeoTIFF (see the module docstring)."""

    name = "cog"
    format_name = "GeoTIFF"
    _is_complete = staticmethod(_is_complete)

    def prepare(
        self,
        image: Image,
        path: str,
        *,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        compress: str = "deflate",
        blocksize: int = 512,
        overview_resampling: str | None = None,
        probabilities_as: str = "float32",
        predictor: int | None = None,
        run_id: str | None = None,
        partial_key: str | None = None,
    ) -> WriteHandle:
        """Check the destination and create the partial block store, marked incomplete.

        Parameters
        ----------
        image : Image
            What will be written: 2-D, ``("y", "x")`` or ``("c", "y", "x")``.
        path : str
            Local output path (``.tif``).
        overwrite : bool
            Replace a finished output or another GeoTIFF (never a non-GeoTIFF path).
        storage_options : dict, optional
            Not supported (local files only); must be empty.
        compress : {"deflate", "zstd", "lzw"}
            COG compression.
        blocksize : int
            COG tile size (multiple of 16); also the store's chunk size.
        overview_resampling : str, optional
            GDAL overview resampling; default ``mode`` for class maps,
            ``average`` for probabilities, ``nearest`` otherwise.
        probabilities_as : {"float32", "float16", "uint8"}
            Storage of floating-point images.
        predictor : {1, 2, 3}, optional
            TIFF predictor: 1 or ``None`` (none, the default), 2 (horizontal
            differencing), 3 (floating point).
        run_id : str, optional
            Recorded in the output (default a new uuid).
        partial_key : str, optional
            Names the partial folder; a partial folder of the same key and
            layout left by a killed run is resumed (see :mod:`tileseg.writers.blocks`).

        Returns
        -------
        WriteHandle

        Raises
        ------
        OutputError
            A URL, a 3-D image, an unwritable dtype, or an existing path (see above).
        ConfigError
            An invalid option.
        """
        require("rasterio", "geo")
        import zarr
        from zarr.storage import LocalStore

        path = os.fspath(path)
        local = self.local_output(path, storage_options)
        axes = check_axes(image.axes, image.data.ndim, path)
        if image.spatial_ndim != 2:
            raise OutputError(f"{path!r}: a GeoTIFF holds 2-D images; got axes {axes!r}")
        _check_options(compress, blocksize, overview_resampling, probabilities_as, predictor)
        try:
            plan = _plan(image, probabilities_as)
        except OutputError as exc:
            raise OutputError(f"{path!r}: {exc}") from None
        if plan["nbits"] and predictor == 3:
            raise ConfigError("predictor 3 (floating point) cannot be combined with probabilities_as='float16'")
        resampling = overview_resampling or {"classes": "mode", "probabilities": "average"}.get(plan["kind"], "nearest")

        final, target = self.claim(path, local, overwrite, "a GeoTIFF", partial_key)

        shape = tuple(int(s) for s in image.data.shape)
        chunks = ((shape[0],) if image.has_channels else ()) + (min(blocksize, shape[-2]), min(blocksize, shape[-1]))
        fill = plan["nodata"] if plan["nodata"] is not None else 0
        layout = {"writer": self.name, "key": partial_key, "shape": shape, "chunks": chunks, "plan": plan}
        self.partial_store(path, target, layout, partial_key is not None, lambda t: zarr.create_array(
            store=LocalStore(os.path.join(t, STORE)), shape=shape, chunks=chunks, dtype=plan["store"],
            fill_value=fill, attributes={"tileseg": {"status": "incomplete"}}))
        names = list(image.class_names) if image.class_names is not None else None
        n_bands = shape[0] if image.has_channels else 1
        from .. import __version__

        details = {
            "local": final, "overwrite": bool(overwrite), "plan": plan, "compress": compress,
            "blocksize": blocksize, "resampling": resampling, "predictor": PREDICTORS[predictor],
            "crs": image.crs, "transform": list(image.affine), "class_names": names,
            "descriptions": _descriptions(image, plan, names, n_bands), "attrs": _json_attrs(image.attrs),
            "source": image.source, "version": __version__,
        }
        return WriteHandle(path=path, target=target, writer=self.name, shape=shape, chunks=chunks,
                           dtype=plan["store"], axes=axes, run_id=run_id or uuid.uuid4().hex, details=details)

    def write_task(self, handle: WriteHandle, image: Image) -> Any:
        """A ``Delayed`` storing the converted blocks not yet recorded into the partial store (idempotent)."""
        import zarr
        from zarr.storage import LocalStore

        data = image.data
        if tuple(data.shape) != handle.shape:
            raise OutputError(f"{handle.path!r}: data shape {tuple(data.shape)!r} != prepared {handle.shape!r}")
        plan = handle.details["plan"]
        data = data.map_blocks(_convert, plan, dtype=np.dtype(plan["store"]))
        try:
            arr = zarr.open_array(store=LocalStore(os.path.join(handle.target, STORE)), mode="r+")
        except Exception as exc:
            raise OutputError(f"{handle.path!r}: partial store {handle.target!r} cannot be opened: {exc}") from exc
        return store_blocks(align(data, handle.chunks), arr, guard=handle.target, records=records_of(handle.target))

    def finalize(self, handle: WriteHandle, info: dict[str, Any] | None = None) -> None:
        """Build the COG from the complete store, tag it complete and rename it into place.

        Raises
        ------
        OutputError
            The partial store is gone, GDAL fails, or a finished output or
            another file appeared at the final path meanwhile (without ``overwrite``).
        """
        from .cog_build import build_cog

        d = handle.details
        final = d["local"]
        cog = os.path.join(handle.target, os.path.basename(final))
        tags = {STATUS_TAG: "complete", "TILESEG_RUN_ID": handle.run_id, "TILESEG_COMPLETED_AT": now_iso(),
                "TILESEG_WRITER": self.name, "TILESEG_VERSION": d["version"]}
        if info:
            tags["TILESEG_INFO"] = json.dumps(info, default=str)
        if d["source"]:
            tags["TILESEG_SOURCE"] = str(d["source"])
        try:
            build_cog(handle, cog, tags)
        except OutputError:
            raise
        except Exception as exc:
            raise OutputError(f"{handle.path!r}: building the COG failed: {exc}") from exc
        self.publish(handle, cog, final, d["overwrite"])
        log.info("finished %s", handle.path)




def _descriptions(image: Image, plan: dict[str, Any], names: list[str] | None, n_bands: int) -> list[str | None]:
    if plan["kind"] == "classes" and names:
        return [f"classes: {', '.join(names)}"]
    if names and len(names) == n_bands:
        return list(names)
    given = image.attrs.get("band_descriptions")
    if isinstance(given, list) and len(given) == n_bands:
        return [str(g) for g in given]
    return [None] * n_bands


def _json_attrs(attrs: dict[str, Any]) -> str | None:
    if not attrs:
        return None
    try:
        return json.dumps(attrs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        log.warning("not storing attributes: not JSON-serialisable (%s)", exc)
        return None


__all__ = ["COGWriter", "class_colors", "is_complete"]
