"""A synthetic multi-band satellite scene with ground truth, any size, written chunk by chunk.

Four bands (blue, green, red, near infrared) of uint16 surface reflectance
(scaled by 10000, as Landsat/Sentinel-2 products store it) in a real UTM CRS
(EPSG:32633, 10 m pixels). Water bodies (the ground truth, class 1) are the
blobs of :mod:`tileseg.testing.synthetic`: dark in the near infrared, a little
brighter in blue; land is bright in the near infrared, with a gradient across
the scene and strong noise in every band (NDWI or a small network separate
them; the network also has to ignore the noise). The acquisition footprint is a
rotated rectangle: outside it every band is nodata (0) and the ground truth
is 255, as on a real scene's tilted swath edge.

Pixels are pure functions of ``(shape, seed)`` and the global pixel
coordinates (see :mod:`tileseg.testing.synthetic`), so any window is rendered
on its own: :func:`write_geotiff_scene` writes a scene of any size with
memory bounded by one block. Needs rasterio (``pip install 'tileseg[geo]'``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .synthetic import BlobScene, make_scene, render

#: The scene's coordinate reference system and pixel size.
CRS = "EPSG:32633"
PIXEL = 10.0
ORIGIN = (399960.0, 5600040.0)  # upper-left corner (x, y) of a UTM 33N tile
NODATA = 0
LABEL_NODATA = 255
BANDS = ("blue", "green", "red", "nir")
#: Reflectance x 10000 of land (dark end, bright end of the gradient) and water, per band.
_LAND = np.array([[450, 650], [650, 900], [600, 1100], [2400, 3600]], dtype=np.float32)
_WATER = np.array([700, 600, 350, 250], dtype=np.float32)
#: Per-pixel noise (standard deviation) of land and water, per band: one band alone is ambiguous.
_LAND_NOISE = np.array([120, 150, 200, 650], dtype=np.float32)
_WATER_NOISE = np.array([90, 90, 80, 220], dtype=np.float32)


def scene(shape: Sequence[int], seed: int = 0) -> BlobScene:
    """The water bodies of a ``(rows, cols)`` scene (noise standard deviation 1)."""
    return make_scene(tuple(int(s) for s in shape), seed, radius=(6.0, 60.0), coverage=0.18,
                      noise=1.0, noise_tile=256)


def transform(shape: Sequence[int]) -> tuple[float, ...]:
    """The scene's affine (pixel corners, rasterio order)."""
    return (PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1])


def footprint(shape: Sequence[int], rows: slice, cols: slice, angle_deg: float = 12.0,
              margin: float = 0.08) -> np.ndarray:
    """Boolean acquisition footprint (a rotated rectangle) over a window."""
    h, w = (float(s) for s in shape[:2])
    y = np.arange(rows.start, rows.stop, dtype=np.float64)[:, None] + 0.5 - h / 2
    x = np.arange(cols.start, cols.stop, dtype=np.float64)[None, :] + 0.5 - w / 2
    a = math.radians(angle_deg)
    u = x * math.cos(a) + y * math.sin(a)
    v = -x * math.sin(a) + y * math.cos(a)
    half_w, half_h = w / 2 * (1 - margin) * 0.9, h / 2 * (1 - margin) * 0.9
    return (np.abs(u) <= half_w) & (np.abs(v) <= half_h)


def render_window(sc: BlobScene, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """``(bands (4, h, w) uint16, labels (h, w) uint8)`` of one window of the scene."""
    from .synthetic import _noise

    _, inst = render(sc, (rows, cols))
    water = inst > 0
    h, w = sc.shape
    y = (np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5) / h
    x = (np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] + 0.5) / w
    gradient = 0.6 * x + 0.4 * y  # brighter towards the south-east
    noise = _noise(sc, (rows, cols))  # standard normal, a pure function of the pixel position
    bands = np.empty((4, rows.stop - rows.start, cols.stop - cols.start), dtype=np.float32)
    for b in range(4):
        land = _LAND[b, 0] + (_LAND[b, 1] - _LAND[b, 0]) * gradient + _LAND_NOISE[b] * noise
        wet = _WATER[b] * (0.9 + 0.3 * gradient) + _WATER_NOISE[b] * np.roll(noise, 3 + b, axis=1)
        bands[b] = np.where(water, wet, land)
    inside = footprint(sc.shape, rows, cols)
    out = np.where(inside, np.clip(np.rint(bands), 1, 10000), NODATA).astype(np.uint16)
    labels = np.where(inside, water.astype(np.uint8), np.uint8(LABEL_NODATA))
    return out, labels


def write_geotiff_scene(image_path: Any, labels_path: Any, shape: Sequence[int], seed: int = 0,
                        block: int = 512, compress: str = "deflate") -> dict[str, Any]:
    """Write the scene as a tiled GeoTIFF (4 bands, nodata 0) and its ground truth (nodata 255).

    Parameters
    ----------
    image_path, labels_path : path
        Output files.
    shape : (int, int)
        Rows and columns (e.g. 20000 x 20000 for the benchmark).
    seed : int
        Scene seed.
    block : int
        Tile size of the files (and of the windows written at once).
    compress : str
        GDAL compression.

    Returns
    -------
    dict
        ``shape``, ``crs``, ``transform``, ``bands``, ``water_fraction`` (within the footprint).
    """
    import rasterio
    from rasterio.windows import Window

    shape = tuple(int(s) for s in shape)
    sc = scene(shape, seed)
    profile = dict(driver="GTiff", width=shape[1], height=shape[0], crs=CRS,
                   transform=rasterio.Affine(*transform(shape)), tiled=True, blockxsize=block,
                   blockysize=block, compress=compress, BIGTIFF="IF_SAFER")
    water = inside = 0
    with rasterio.open(Path(image_path), "w", count=4, dtype="uint16", nodata=NODATA, **profile) as img, \
            rasterio.open(Path(labels_path), "w", count=1, dtype="uint8", nodata=LABEL_NODATA, **profile) as lab:
        img.descriptions = BANDS
        lab.descriptions = ("water",)
        for r0 in range(0, shape[0], block):
            for c0 in range(0, shape[1], block):
                rows, cols = slice(r0, min(r0 + block, shape[0])), slice(c0, min(c0 + block, shape[1]))
                bands, labels = render_window(sc, rows, cols)
                win = Window(c0, r0, cols.stop - c0, rows.stop - r0)
                img.write(bands, window=win)
                lab.write(labels[None], window=win)
                water += int((labels == 1).sum())
                inside += int((labels != LABEL_NODATA).sum())
    return {"shape": shape, "crs": CRS, "transform": transform(shape), "bands": BANDS,
            "water_fraction": water / max(inside, 1)}
