"""What ``tileseg info PATH`` shows: a summary of what :func:`tileseg.open` sees.

Only metadata is read; no pixel data is loaded.
"""

from __future__ import annotations

import math
from typing import Any

from .readers import open_image


def describe(path: Any, **options: Any) -> dict[str, Any]:
    """Describe an image without reading its pixels.

    Parameters
    ----------
    path : str or os.PathLike
        Local path or fsspec URL.
    **options
        Passed to :func:`tileseg.readers.open_image` (``reader``, ``array``,
        ``level``, ``storage_options``, ``max_pixels``, ...).

    Returns
    -------
    dict
        JSON-serialisable: ``path``, ``format``, ``shape``, ``dtype``,
        ``axes``, ``chunks`` (chunk shape), ``n_chunks``, ``spacing``,
        ``origin``, ``units``, ``size_bytes`` (uncompressed), plus
        ``zarr_format`` and ``ome`` (version, selected level and every
        level's shape and spacing) when known, and ``tileseg_status`` for
        tileseg outputs.

    Raises
    ------
    ImageNotFoundError, FormatError, ImageTooLargeError
        As :func:`~tileseg.readers.open_image`.

    Examples
    --------
    >>> import zarr, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a.zarr")
    >>> _ = zarr.create_array(p, shape=(100, 80), chunks=(50, 50), dtype="uint16")
    >>> d = describe(p)
    >>> d["shape"], d["chunks"], d["n_chunks"], d["size_bytes"]
    ([100, 80], [50, 50], 4, 16000)
    """
    img = open_image(path, **options)
    data = img.data
    meta = img.reader_info
    out: dict[str, Any] = {
        "path": str(path),
        "format": img.format,
        "shape": [int(s) for s in data.shape],
        "dtype": str(data.dtype),
        "axes": list(img.axes),
        "chunks": [int(c) for c in data.chunksize],
        "n_chunks": int(math.prod(len(c) for c in data.chunks)),
        "spacing": list(img.spacing),
        "origin": list(img.origin),
        "units": list(img.units),
        "size_bytes": int(math.prod(data.shape) * data.dtype.itemsize),
    }
    for key in ("crs", "transform", "nodata", "class_names"):
        if getattr(img, key) is not None:
            out[key] = list(getattr(img, key)) if isinstance(getattr(img, key), tuple) else getattr(img, key)
    if img.direction != tuple(tuple(float(i == j) for j in range(img.spatial_ndim)) for i in range(img.spatial_ndim)):
        out["direction"] = [list(r) for r in img.direction]
    if "zarr_format" in meta:
        out["zarr_format"] = meta["zarr_format"]
        out["array_path"] = meta.get("array_path", "")
    ome = meta.get("ome")
    if isinstance(ome, dict):
        levels = []
        base = {k: v for k, v in options.items() if k != "level"}
        for i in range(int(ome.get("n_levels", 1))):
            lvl = img if i == ome.get("level") else open_image(path, level=i, **base)
            levels.append(
                {
                    "level": i,
                    "path": lvl.reader_info.get("ome", {}).get("dataset_path"),
                    "shape": [int(s) for s in lvl.data.shape],
                    "spacing": list(lvl.spacing),
                }
            )
        out["ome"] = {"version": ome.get("version"), "level": ome.get("level"), "levels": levels}
    status = meta.get("tileseg")
    if isinstance(status, dict):
        out["tileseg_status"] = status.get("status")
    return out


def format_description(info: dict[str, Any]) -> str:
    """Human-readable lines for a :func:`describe` result (used by the CLI).

    >>> print(format_description({"path": "a.zarr", "shape": [2, 3], "axes": ["y", "x"]}))
    path: a.zarr
    shape: [2, 3]
    axes: ['y', 'x']
    """
    lines = []
    for key, value in info.items():
        if key == "ome" and isinstance(value, dict):
            lines.append(f"ome: version {value.get('version')}, level {value.get('level')}")
            for lvl in value.get("levels", []):
                lines.append(
                    f"  level {lvl['level']} ({lvl['path']}): shape {lvl['shape']}, spacing {lvl['spacing']}"
                )
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
