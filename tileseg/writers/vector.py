"""Vector writer: one polygon per connected object of each class, GeoPackage or GeoJSON.

Polygons of a class map (or any 2-D integer label image): every 4-connected
region of equal nonzero value (the components of ``scipy.ndimage.label`` per
class, default structure) becomes one feature, even when it crosses chunk
borders. Background (0), nodata and masked pixels are not polygonised.

Protocol (:mod:`tileseg.writers.base`):

* ``prepare`` creates a hidden partial folder beside the output;
* the write task polygonises every chunk on its own
  (:func:`rasterio.features.shapes`, 4-connectivity, pixel coordinates) and
  stores its pieces as one file per chunk (written whole, atomically: a rerun
  writes the same bytes). No global labelling pass is needed, so the class
  map is computed once, together with the run's other outputs;
* ``finalize`` joins pieces that share a chunk-border edge (same value) with
  a union-find, merges each group exactly on the pixel lattice
  (:mod:`tileseg.writers.polygons`), numbers objects ``label = 1..n`` in
  raster order of their first pixel (as :func:`tileseg.stitching.labels.label`
  with ``by_value=True``), maps them through the image's affine transform,
  optionally simplifies them (Douglas-Peucker per ring, ``simplify_tolerance``
  in CRS units; 0 keeps the exact pixel boundaries) and writes the file
  (``.gpkg`` or ``.geojson``, by extension) in the image's CRS with the
  attributes ``class`` (name), ``class_id``, ``area`` (exact pixel area in CRS
  units, before simplification) and ``label``. It is written in the partial
  folder and renamed into place. The features are held in memory in
  ``finalize`` (the size of the vector output, not of the raster).

Completion is recorded inside the file, so it travels with it and a rename
makes data and status appear together (a sidecar could be lost or go stale):
GeoPackage layer metadata ``TILESEG_STATUS=complete`` (with run id and
time); for GeoJSON a top-level foreign member ``"tileseg": {"status":
"complete", ...}`` written before the features (GDAL >= 3.9, as in pyogrio's
wheels), found by :func:`is_complete` in the file's first 64 KiB. Existing
outputs and other vector files are replaced only with ``overwrite=True``;
files that are not vector data never.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any

import numpy as np

from ..errors import OutputError, require
from ..image import Image
from ..report import now_iso
from .base import SingleFileWriter, WriteHandle
from .blocks import records_of, store_blocks

log = logging.getLogger(__name__)

DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
STATUS_KEY = "TILESEG_STATUS"
_SHAPES_DTYPES = ("uint8", "uint16", "int16", "int32")


def _driver(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in DRIVERS:
        raise OutputError(f"{path!r}: the vector writer writes .gpkg or .geojson files, not {ext or 'no extension'!r}")
    return DRIVERS[ext]


def _is_complete(path: str) -> bool:
    """Whether the existing file ``path`` is a finished tileseg vector output (raises when it is not of its format)."""
    pyogrio = require("pyogrio", "vector")
    driver = _driver(path)
    info = pyogrio.read_info(path)
    found = pyogrio.detect_write_driver(path)  # the format its extension implies
    if found != driver:  # pragma: no cover - guarded by _driver
        raise OutputError(f"{path!r}: unexpected format {found!r}")
    if driver == "GPKG":
        meta = info.get("layer_metadata") or {}
        return meta.get(STATUS_KEY) == "complete"
    return (_geojson_status(path) or {}).get("status") == "complete"


def _geojson_status(path: str) -> dict[str, Any] | None:
    """The top-level ``"tileseg"`` member of a GeoJSON file (looked for before ``"features"``)."""
    with open(path, "rb") as fh:
        head = fh.read(65536).decode("utf-8", errors="replace")
    at, feats = head.find('"tileseg":'), head.find('"features"')
    if at < 0 or (0 <= feats < at):
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(head[at + len('"tileseg":'):].lstrip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def is_complete(path: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` is a vector file whose recorded tileseg status is ``complete``."""
    return VectorWriter().is_complete(path, storage_options)


class VectorWriter(SingleFileWriter):
    """Polygons per class of a 2-D class map (see the module docstring)."""

    name = "vector"
    _is_complete = staticmethod(_is_complete)

    @staticmethod
    def _format_of(path: str) -> str:
        return _driver(path)

    def prepare(
        self,
        image: Image,
        path: str,
        *,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        simplify_tolerance: float = 0.0,
        layer: str | None = None,
        run_id: str | None = None,
        partial_key: str | None = None,
    ) -> WriteHandle:
        """Check the destination and create the partial folder.

        Parameters
        ----------
        image : Image
            A 2-D class map (or integer labels), axes ``("y", "x")``.
        path : str
            Local ``.gpkg`` or ``.geojson`` path.
        overwrite : bool
            Replace a finished output or another vector file of the same format.
        storage_options : dict, optional
            Not supported (local files only); must be empty.
        simplify_tolerance : float
            Douglas-Peucker tolerance in CRS units (0: exact pixel boundaries).
        layer : str, optional
            Layer name (default: the file name without extension).
        run_id : str, optional
            Recorded in the output (default a new uuid).
        partial_key : str, optional
            Names the partial folder; one of the same key and chunking left by a
            killed run is resumed (chunks with pieces are not polygonised again).

        Raises
        ------
        OutputError
            A URL, an unsupported extension or image, or an existing path (see above).
        """
        require("pyogrio", "vector")
        require("rasterio", "vector")
        from ..errors import ConfigError

        path = os.fspath(path)
        local = self.local_output(path, storage_options)
        driver = _driver(local)
        if image.axes != ("y", "x") or image.dtype.kind not in "biu":
            raise OutputError(f"{path!r}: polygons need a 2-D integer class map with axes ('y', 'x'); "
                              f"got axes {image.axes!r}, dtype {str(image.dtype)!r}")
        if not isinstance(simplify_tolerance, (int, float)) or simplify_tolerance < 0:
            raise ConfigError(f"simplify_tolerance must be a number >= 0 (CRS units), got {simplify_tolerance!r}")
        final, target = self.claim(path, local, overwrite, f"a {driver} file", partial_key)
        chunks = tuple(tuple(int(c) for c in cs) for cs in image.data.chunks)
        layout = {"writer": self.name, "key": partial_key, "chunks": [list(c) for c in chunks]}
        self.partial_store(path, target, layout, partial_key is not None,
                           lambda t: os.makedirs(os.path.join(t, "pieces")))
        details = {
            "local": final, "driver": driver, "overwrite": bool(overwrite), "chunk_sizes": [list(c) for c in chunks],
            "layer": layer or os.path.splitext(os.path.basename(final))[0], "crs": image.crs,
            "transform": list(image.affine), "class_names": list(image.class_names or []) or None,
            "simplify_tolerance": float(simplify_tolerance),
        }
        return WriteHandle(path=path, target=target, writer=self.name, shape=image.shape,
                           chunks=tuple(max(c) for c in chunks), dtype=str(image.dtype), axes=image.axes,
                           run_id=run_id or uuid.uuid4().hex, details=details)

    def write_task(self, handle: WriteHandle, image: Image) -> Any:
        """A ``Delayed`` polygonising every chunk into its own piece file (idempotent)."""
        import dask.array as da

        data = image.data
        if tuple(data.shape) != handle.shape:
            raise OutputError(f"{handle.path!r}: data shape {tuple(data.shape)!r} != prepared {handle.shape!r}")
        valid = image.valid()
        if valid is not None:
            data = da.where(valid, data, 0)
        data = data.rechunk(tuple(tuple(c) for c in handle.details["chunk_sizes"]))
        return store_blocks(data, _Pieces(handle.target, handle.details["chunk_sizes"]), guard=handle.target,
                            records=records_of(handle.target))

    def finalize(self, handle: WriteHandle, info: dict[str, Any] | None = None) -> None:
        """Merge the pieces, write the file with its completion record, rename it into place.

        Raises
        ------
        OutputError
            A chunk's pieces are missing, writing fails, or a finished output
            or another file appeared at the final path meanwhile (without ``overwrite``).
        """
        from .vector_build import build_features, write_features

        d = handle.details
        final = d["local"]
        out = os.path.join(handle.target, os.path.basename(final))
        status = {"status": "complete", "run_id": handle.run_id, "completed_at": now_iso(), "writer": self.name}
        if info:
            status["info"] = json.loads(json.dumps(info, default=str))
        try:
            features = build_features(handle)
            write_features(handle, features, out, status)
        except OutputError:
            raise
        except Exception as exc:
            raise OutputError(f"{handle.path!r}: writing the polygons failed: {exc}") from exc
        self.publish(handle, out, final, d["overwrite"])
        log.info("finished %s (%d features)", handle.path, len(features))




def _write_pieces(block: np.ndarray, offset: tuple[int, int], name: str) -> None:
    """Polygonise one chunk and store its pieces as one flat int64 array (written whole, atomically)."""
    from .polygons import chunk_pieces

    if not os.path.isdir(os.path.dirname(name)):
        return  # aborted meanwhile
    if block.dtype.name not in _SHAPES_DTYPES:
        if block.size and (block.min() < np.iinfo(np.int32).min or block.max() > np.iinfo(np.int32).max):
            raise OutputError(f"class values outside int32 cannot be polygonised ({name})")
        block = block.astype(np.int32)
    flat: list[np.ndarray] = []
    pieces = chunk_pieces(block, block != 0, offset)
    flat.append(np.array([len(pieces)], dtype=np.int64))
    for value, rings in pieces:
        flat.append(np.array([value, len(rings)], dtype=np.int64))
        for r in rings:
            flat.append(np.array([len(r)], dtype=np.int64))
            flat.append(r.ravel())
    tmp = f"{name}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, np.concatenate(flat))
    os.replace(tmp, name)


class _Pieces:
    """Store target of the write task: ``pieces[region] = block`` polygonises the chunk at ``region``."""

    def __init__(self, target: str, chunk_sizes: list[list[int]]) -> None:
        self.target = target
        self.starts = [np.cumsum([0] + list(c[:-1])).tolist() for c in chunk_sizes]

    def __setitem__(self, region: tuple[slice, slice], block: np.ndarray) -> None:
        i, j = (starts.index(r.start) for starts, r in zip(self.starts, region))
        name = os.path.join(self.target, "pieces", f"{i}_{j}.npy")
        _write_pieces(block, (int(region[0].start), int(region[1].start)), name)


__all__ = ["VectorWriter", "is_complete"]
