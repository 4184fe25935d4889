"""Build a COG from a complete Zarr block store, one block in memory at a time.

Used by :meth:`tileseg.writers.cog.COGWriter.finalize`: the store's chunks are
copied window by window into a tiled staging GeoTIFF (with CRS, transform,
nodata, band descriptions, class names, colour table and the completion
tags), then GDAL's ``COG`` driver copies the staging file into a COG
(``CreateCopy`` streams; overviews are built by GDAL from the file, not from
memory).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .base import WriteHandle

STORE = "blocks.zarr"
#: GDAL block cache (MiB) while building the COG
CACHE_MB = 128


def read_block(arr: Any, selection: tuple[slice, ...]) -> np.ndarray:
    """Read one store chunk (a separate function so tests can count reads)."""
    return np.asarray(arr[selection])


def iter_blocks(arr: Any, chunks: tuple[int, ...]) -> Iterator[tuple[Any, np.ndarray]]:
    """``(window, block)`` per store chunk in raster order; ``block`` is ``(bands, h, w)``."""
    from rasterio.windows import Window

    h, w = arr.shape[-2:]
    bh, bw = chunks[-2:]
    lead = (slice(None),) * (arr.ndim - 2)
    for y0, x0 in itertools.product(range(0, h, bh), range(0, w, bw)):
        y1, x1 = min(y0 + bh, h), min(x0 + bw, w)
        block = read_block(arr, lead + (slice(y0, y1), slice(x0, x1)))
        if block.ndim == 2:
            block = block[None]
        yield Window(x0, y0, x1 - x0, y1 - y0), block


def build_cog(handle: WriteHandle, cog: str, tags: dict[str, str]) -> None:
    """Write the COG ``cog`` from ``handle``'s complete partial store.

    Parameters
    ----------
    handle : WriteHandle
        From :meth:`COGWriter.prepare`; ``details`` holds the plan and options.
    cog : str
        Path of the COG to create (inside the partial folder).
    tags : dict
        Dataset tags (the completion record).
    """
    import rasterio
    import rasterio.shutil
    import zarr
    from rasterio.crs import CRS
    from rasterio.transform import Affine
    from zarr.storage import LocalStore

    from .cog import class_colors

    d = handle.details
    plan = d["plan"]
    arr = zarr.open_array(store=LocalStore(os.path.join(handle.target, STORE), read_only=True), mode="r")
    height, width = handle.shape[-2:]
    count = handle.shape[0] if len(handle.shape) == 3 else 1
    bs = d["blocksize"]
    stage = os.path.join(handle.target, "stage.tif")
    profile: dict[str, Any] = {
        "driver": "GTiff", "width": width, "height": height, "count": count, "dtype": plan["gdal"],
        "crs": CRS.from_user_input(d["crs"]) if d["crs"] else None,
        "transform": Affine(*d["transform"]), "nodata": plan["nodata"],
        "tiled": True, "blockxsize": bs, "blockysize": bs, "compress": "zstd", "zstd_level": 1,
        "bigtiff": "if_safer", "interleave": "band" if count > 1 else "pixel",
    }
    if plan["nbits"]:
        profile["nbits"] = plan["nbits"]
    all_tags = dict(tags)
    if d["class_names"]:
        all_tags["CLASS_NAMES"] = json.dumps(d["class_names"])
    if d["attrs"]:
        all_tags["TILESEG_ATTRS"] = d["attrs"]
    # A bounded GDAL block cache keeps memory flat whatever the scene size.
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True, GDAL_CACHEMAX=CACHE_MB):
        with rasterio.open(stage, "w", **profile) as dst:
            for window, block in iter_blocks(arr, handle.chunks):
                dst.write(block.astype(plan["gdal"], copy=False), window=window)
            dst.update_tags(**all_tags)
            for band, desc in enumerate(d["descriptions"], start=1):
                if desc:
                    dst.set_band_description(band, desc)
            if plan["scale"]:
                dst.scales = (1.0 / plan["scale"],) * count
                dst.offsets = (0.0,) * count
            if plan["kind"] == "classes" and d["class_names"]:
                dst.update_tags(1, CLASS_NAMES=all_tags["CLASS_NAMES"])
                if plan["gdal"] in ("uint8", "uint16"):
                    cmap = dict(enumerate(class_colors(len(d["class_names"]))))
                    nodata = plan["nodata"]
                    if nodata is not None and 0 <= nodata <= np.iinfo(plan["gdal"]).max:
                        cmap[int(nodata)] = (0, 0, 0, 0)
                    dst.write_colormap(1, cmap)
        options: dict[str, Any] = {"BLOCKSIZE": bs, "COMPRESS": d["compress"].upper(), "PREDICTOR": d["predictor"],
                                   "OVERVIEW_RESAMPLING": d["resampling"].upper(), "BIGTIFF": "IF_SAFER"}
        if plan["nbits"]:
            options["NBITS"] = plan["nbits"]
        rasterio.shutil.copy(stage, cog, driver="COG", **options)
    os.remove(stage)
