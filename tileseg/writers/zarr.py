"""Zarr writer: chunk-aligned, idempotent, with recorded completion.

Layout (one layout for every output)
------------------------------------
The output is a Zarr **group** holding one array ``"0"``, described by
OME-NGFF ``multiscales`` metadata with a single dataset ``"0"``, so every
output is a valid single-level OME-Zarr image that :func:`tileseg.open` and
OME viewers read back with its axes, spacing (``scale``) and origin
(``translation``):

* Zarr v3 (the default) carries NGFF 0.5 (``attrs["ome"]``); ``zarr_format=2``
  carries NGFF 0.4 (``attrs["multiscales"]``). When the input was OME-Zarr the
  default ``zarr_format`` follows its NGFF version (0.4 or older -> v2 with
  0.4, 0.5 -> v3 with 0.5).
* A class map (integer image with class names), or any label image whose
  input was OME-Zarr, also carries ``image-label`` metadata with the class
  names as ``properties`` (``image_label=`` forces it on/off or gives its
  content, e.g. ``{"colors": [...]}``).
* The image's ``attrs`` (other than OME/zarr-reserved keys) are copied to the
  group; ``attrs=`` adds more.
* ``attrs["tileseg"]`` records status (``incomplete``/``complete``), run id,
  timestamps, source and tileseg version, and under ``"geometry"`` the
  image's axes, spacing, origin, units, direction cosines, CRS, affine
  transform (pixel-corner based, see :mod:`tileseg.geometry`), nodata and
  class names, which :func:`tileseg.open` reads back.
* The array has ``dimension_names`` (v3) or ``_ARRAY_DIMENSIONS`` (v2) set to
  the axes, the zarr default compressor (zstd) and fill value ``nodata`` (else 0).

Chunks and idempotence
----------------------
Stored chunks equal the dask chunks of ``data`` (``chunks=`` rechunks
first); dask chunks that are irregular (other than a smaller last chunk)
are rechunked to their largest size. The write task is
``dask.array.store(..., lock=False)``: each dask block is exactly one whole
zarr chunk, written by one task, never read back and merged, so running the
task twice (a retried or stolen task) writes the same bytes. Chunks equal to
the fill value are not stored (zarr's default), which reads back the same.

Completion is recorded, not inferred
------------------------------------
``prepare`` creates the group with ``attrs["tileseg"]["status"] ==
"incomplete"``; only ``finalize`` (called by the run after the write task
succeeded) sets ``"complete"`` with a timestamp and run id. For local paths
the whole output is written into a hidden sibling
(``<dir>/.<name>.partial-<id>``) and renamed onto the final path by
``finalize``, so a crash never leaves a half-written output at the final
path. ``id`` is a uuid, or the ``partial_key`` a pipeline run passes (its
hash of item, output and pipeline): a rerun then resumes that folder and
writes only the chunks not recorded there (:mod:`tileseg.writers.blocks`;
the records are removed before the rename). For URLs the output is written
in place (every chunk again on a rerun) and :func:`is_complete` reads the status.

An existing output at the final path is replaced only with
``overwrite=True``, except an *incomplete* tileseg output (a crashed earlier
run), which is replaced silently. A path that exists but is not a Zarr store
is never replaced.

Example
-------
>>> import dask.array as da, tempfile, os
>>> from tileseg.image import Image
>>> from tileseg.writers import get_writer
>>> out = os.path.join(tempfile.mkdtemp(), "seg.zarr")
>>> w = get_writer("zarr")
>>> image = Image(da.ones((64, 64), chunks=32, dtype="uint8"), axes=("y", "x"))
>>> handle = w.prepare(image, out)
>>> task = w.write_task(handle, image)
>>> _ = task.compute(); w.finalize(handle, {"run_id": "demo"})
>>> w.is_complete(out)
True
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from typing import Any

import numpy as np

from ..errors import ConfigError, FormatError, OutputError
from ..image import Image
from ..report import now_iso
from ..store import RESERVED_ATTRS, RawStore, local_path, node_metadata, open_store
from .base import WriteHandle, Writer, check_axes, move_into_place, open_partial, partial_sibling
from .blocks import drop_records, mark_partial, records_of, store_blocks
from .partial_lock import exclusive, remove_partial

log = logging.getLogger(__name__)

ARRAY_PATH = "0"


def _json_safe(obj: Any, what: str) -> Any:
    """``obj`` if it survives a JSON round trip, else ``None`` with a warning."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as exc:
        log.warning("not storing %s: not JSON-serialisable (%s)", what, exc)
        return None


def regular_chunks(data: Any, chunks: Any = None) -> tuple[int, ...]:
    """Store chunk shape for ``data``: ``chunks`` if given, else its dask chunk size.

    Dask chunks that are regular except a smaller last chunk are used as they
    are; irregular ones are replaced by their largest size along that axis.
    """
    if chunks is not None:
        if isinstance(chunks, int):
            chunks = (chunks,) * data.ndim
        chunks = tuple(chunks)
        if len(chunks) != data.ndim:
            raise OutputError(f"chunks {chunks!r} do not match a {data.ndim}-D output")
        out = []
        for c, size in zip(chunks, data.shape):
            c = size if c in (None, -1) else int(c)
            if c <= 0:
                raise OutputError(f"chunks {chunks!r} must be positive")
            out.append(max(1, min(c, size)) if size else 1)
        return tuple(out)
    out = []
    for axis_chunks in data.chunks:
        if any(isinstance(c, float) and math.isnan(c) for c in axis_chunks):
            raise OutputError(
                "cannot write an array with unknown chunk sizes; call compute_chunk_sizes() first"
            )
        out.append(max(1, max(axis_chunks)) if axis_chunks else 1)
    return tuple(out)


def align(data: Any, chunks: tuple[int, ...]) -> Any:
    """``data`` rechunked (only if needed) so each dask block is exactly one store chunk."""
    from dask.array.core import normalize_chunks

    wanted = normalize_chunks(chunks, data.shape)
    if tuple(data.chunks) == tuple(wanted):
        return data
    log.info("rechunking output from %s to store chunks %s", data.chunksize, chunks)
    return data.rechunk(wanted)


def ome_attrs(
    version: str,
    axes: tuple[str, ...],
    spacing: tuple[float, ...],
    origin: tuple[float, ...],
    units: tuple[str | None, ...],
    *,
    name: str = "tileseg",
    image_label: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """OME-NGFF group attributes for a single-level image (``version`` "0.4" or "0.5").

    Parameters
    ----------
    version : str
        "0.4" (Zarr v2 layout) or "0.5" (Zarr v3, under ``"ome"``).
    axes : tuple of str
        Output axes (``c`` optional, then spatial).
    spacing, origin, units : tuple
        Per spatial axis.
    name : str
        Multiscale name.
    image_label : dict, optional
        Content of ``image-label`` metadata (``{}`` for a bare label image);
        ``None`` writes none.
    """
    ax_meta: list[dict[str, Any]] = []
    scale: list[float] = []
    trans: list[float] = []
    k = 0
    for a in axes:
        if a == "c":
            ax_meta.append({"name": "c", "type": "channel"})
            scale.append(1.0)
            trans.append(0.0)
            continue
        entry: dict[str, Any] = {"name": a, "type": "space"}
        if units[k]:
            entry["unit"] = units[k]
        ax_meta.append(entry)
        scale.append(spacing[k])
        trans.append(origin[k])
        k += 1
    cts: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
    if any(t != 0.0 for t in trans):
        cts.append({"type": "translation", "translation": trans})
    ms: dict[str, Any] = {
        "name": name,
        "axes": ax_meta,
        "datasets": [{"path": ARRAY_PATH, "coordinateTransformations": cts}],
    }
    if version == "0.4":
        out: dict[str, Any] = {"multiscales": [{"version": "0.4", **ms}]}
        if image_label is not None:
            out["image-label"] = {"version": "0.4", **image_label}
        return out
    ome: dict[str, Any] = {"version": version, "multiscales": [ms]}
    if image_label is not None:
        ome["image-label"] = dict(image_label)
    return {"ome": ome}


def _status(path: str, storage_options: dict[str, Any] | None) -> str | None:
    """``"complete"``/``"incomplete"`` for a tileseg output, ``"foreign"`` for another zarr store, None if absent.

    Raises
    ------
    OutputError
        ``path`` exists but is not a Zarr store.
    """
    try:
        raw = RawStore(path, storage_options)
        if not raw.exists():
            return None
        meta = node_metadata(raw, "")
    except FormatError as exc:
        raise OutputError(f"{path!r} exists and is not a Zarr store; refusing to replace it ({exc})") from exc
    status = meta["attrs"].get("tileseg", {})
    if isinstance(status, dict) and status.get("status") in ("complete", "incomplete"):
        return str(status["status"])
    return "foreign"


def is_complete(path: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` holds a tileseg Zarr output whose write was finalized.

    Parameters
    ----------
    path : str
        Output path or URL.
    storage_options : dict, optional
        fsspec options for URLs.
    """
    try:
        return _status(str(path), storage_options) == "complete"
    except OutputError:
        return False


def _ngff_version(image: Image, zarr_format: int | None) -> tuple[int, str, str | None]:
    """``(zarr_format, NGFF version to write, input NGFF version)``."""
    ome_in = image.reader_info.get("ome")
    v_in = str(ome_in.get("version")) if isinstance(ome_in, dict) and ome_in.get("version") else None
    if zarr_format is None:
        zarr_format = 2 if v_in is not None and _version_tuple(v_in) < (0, 5) else 3
    if zarr_format not in (2, 3):
        raise ConfigError(f"zarr_format must be 2 or 3, got {zarr_format!r}")
    version = "0.4" if zarr_format == 2 else "0.5"
    if v_in is not None and v_in != version:
        log.info("input is OME-NGFF %s; writing NGFF %s (zarr_format=%d)", v_in, version, zarr_format)
    return zarr_format, version, v_in


def _version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.split(".")[:2])
    except ValueError:
        return (0, 4)


def _label_meta(image: Image, image_label: bool | dict[str, Any]) -> dict[str, Any] | None:
    """The OME-Zarr ``image-label`` metadata (class names as properties), or ``None`` for no image-label."""
    if not image_label:
        return None
    meta = dict(image_label) if isinstance(image_label, dict) else {}
    if image.class_names is not None and "properties" not in meta:
        meta["properties"] = [{"label-value": i, "class": n} for i, n in enumerate(image.class_names)]
    return meta


def _group_attrs(image: Image, path: str, attrs: dict[str, Any] | None) -> dict[str, Any]:
    """The input's JSON-safe attributes (tileseg's own left out), then the caller's ``attrs``."""
    out: dict[str, Any] = {}
    for key, value in image.attrs.items():
        if key in RESERVED_ATTRS:
            continue
        safe = _json_safe(value, f"input attribute {key!r}")
        if safe is not None:
            out[key] = safe
    if attrs:
        extra = _json_safe(dict(attrs), "attrs")
        if extra is None:
            raise OutputError(f"{path!r}: attrs must be JSON-serialisable")
        out.update(extra)
    return out


def _status_attrs(image: Image, run_id: str, writer: str) -> dict[str, Any]:
    """``attrs["tileseg"]`` of a new output: incomplete, the run, the version, geometry and source."""
    from .. import __version__

    return {
        "status": "incomplete",
        "run_id": run_id,
        "started_at": now_iso(),
        "writer": writer,
        "version": __version__,
        "geometry": image.geometry_attrs(),
        "source": image.source,
        "source_format": image.format,
    }


class ZarrWriter(Writer):
    """Write a dask array as a chunk-aligned OME-Zarr group (see the module docstring)."""

    name = "zarr"

    def prepare(
        self,
        image: Image,
        path: str,
        *,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        attrs: dict[str, Any] | None = None,
        zarr_format: int | None = None,
        chunks: Any = None,
        compressors: Any = "auto",
        fill_value: Any = None,
        image_label: bool | dict[str, Any] | None = None,
        name: str = "tileseg",
        run_id: str | None = None,
        partial_key: str | None = None,
    ) -> WriteHandle:
        """Create the empty output group and array, marked incomplete.

        Parameters
        ----------
        image : Image
            What :meth:`write_task` will write (only its shape, dtype, chunks
            and geometry are used here): axes, spacing, origin and units go to
            the OME metadata; direction, CRS, transform, nodata and class
            names to ``attrs["tileseg"]["geometry"]``; ``image.attrs`` to the
            group attributes.
        path : str
            Output path or fsspec URL.
        overwrite : bool
            Replace an existing finished output (never a non-Zarr path).
        storage_options : dict, optional
            fsspec options for URLs.
        attrs : dict, optional
            Extra group attributes (JSON-serialisable).
        zarr_format : {2, 3}, optional
            Default 3, or the input's when it was OME-Zarr NGFF <= 0.4.
        chunks : tuple of int, optional
            Store chunks (``data`` is rechunked to them); default its dask chunks.
        compressors : optional
            Passed to :func:`zarr.create_array` (default zarr's, zstd).
        fill_value : scalar, optional
            Array fill value; default ``image.nodata``, else 0.
        image_label : bool or dict, optional
            Write OME ``image-label`` metadata; default for class maps and
            for integer images read from OME-Zarr. Class names become its
            ``properties``.
        name : str
            OME multiscale name.
        run_id : str, optional
            Recorded in the status (default a new uuid).
        partial_key : str, optional
            Names the local partial output; one of the same key and layout
            left by a killed run is resumed: chunks recorded there are not
            written again (see :mod:`tileseg.writers.blocks`).

        Returns
        -------
        WriteHandle

        Raises
        ------
        OutputError
            The path holds a finished output (without ``overwrite``) or
            something that is not a Zarr store; bad axes or chunks.
        """
        import zarr

        path = os.fspath(path)
        data = image.data
        store_chunks = regular_chunks(data, chunks)
        axes = check_axes(image.axes, data.ndim, path)
        zarr_format, version, v_in = _ngff_version(image, zarr_format)
        dtype = np.dtype(data.dtype)
        if dtype.kind not in "biuf":
            raise OutputError(f"{path!r}: cannot write dtype {str(dtype)!r} (numeric or bool only)")
        if fill_value is None:
            fill_value = image.nodata if image.nodata is not None else 0

        if image_label is None:
            image_label = dtype.kind in "biu" and "c" not in axes and (v_in is not None or image.is_class_map)
        run_id = run_id or uuid.uuid4().hex
        group_attrs = _group_attrs(image, path, attrs)
        group_attrs.update(ome_attrs(version, axes, image.spacing, image.origin, image.units, name=name,
                                     image_label=_label_meta(image, image_label)))
        group_attrs["tileseg"] = _status_attrs(image, run_id, self.name)

        existing = _status(path, storage_options)
        if existing in ("complete", "foreign") and not overwrite:
            what = "a finished tileseg output" if existing == "complete" else "a Zarr store"
            raise OutputError(f"{path!r} already exists ({what}); pass overwrite=True to replace it")
        local = local_path(path)
        layout = {"writer": self.name, "key": partial_key, "shape": [int(v) for v in data.shape],
                  "chunks": list(store_chunks), "dtype": str(dtype), "fill_value": repr(fill_value),
                  "zarr_format": zarr_format, "compressors": repr(compressors)}
        resumed = False
        if local is not None:
            local, target = partial_sibling(local, partial_key)
            resumed = open_partial(target, layout, partial_key is not None)
        else:
            target = path

        try:
            if resumed:
                group = None
            else:
                group = zarr.create_group(
                    store=open_store(target, storage_options, read_only=False), zarr_format=zarr_format,
                    overwrite=True, attributes=group_attrs)
            kwargs: dict[str, Any] = {}
            if zarr_format == 3:
                kwargs["dimension_names"] = list(axes)
            else:
                kwargs["attributes"] = {"_ARRAY_DIMENSIONS": list(axes)}
            if group is not None:
                group.create_array(
                    ARRAY_PATH,
                    shape=tuple(int(s) for s in data.shape),
                    dtype=dtype,
                    chunks=store_chunks,
                    compressors=compressors,
                    fill_value=fill_value,
                    **kwargs,
                )
                if local is not None:
                    mark_partial(target, layout)
        except OutputError:
            raise
        except Exception as exc:
            if local is not None:
                shutil.rmtree(target, ignore_errors=True)
            raise OutputError(f"{path!r}: cannot create the zarr output: {exc}") from exc
        return WriteHandle(
            path=path,
            target=target,
            writer=self.name,
            shape=tuple(int(s) for s in data.shape),
            chunks=store_chunks,
            dtype=str(dtype),
            axes=axes,
            run_id=run_id,
            storage_options=storage_options,
            details={
                "array_path": ARRAY_PATH,
                "zarr_format": zarr_format,
                "ome_version": version,
                "local": local is not None,
                "overwrite": bool(overwrite),
            },
        )

    def write_task(self, handle: WriteHandle, image: Image) -> Any:
        """A ``Delayed`` writing ``data`` chunk by chunk into the prepared output.

        ``data`` is rechunked (if needed) to the store chunks, so every dask
        block is one whole zarr chunk; ``lock=False`` is safe because no two
        blocks touch the same chunk.

        Raises
        ------
        OutputError
            ``data`` does not match the prepared shape or dtype.
        """
        import zarr

        data = image.data
        if tuple(data.shape) != handle.shape:
            raise OutputError(
                f"{handle.path!r}: data shape {tuple(data.shape)!r} != prepared {handle.shape!r}"
            )
        if str(np.dtype(data.dtype)) != handle.dtype:
            raise OutputError(f"{handle.path!r}: data dtype {str(data.dtype)!r} != prepared {handle.dtype!r}")
        data = align(data, handle.chunks)
        try:
            store = open_store(handle.target, handle.storage_options, read_only=False)
            arr = zarr.open_array(store=store, path=handle.details.get("array_path", ARRAY_PATH), mode="r+")
        except Exception as exc:
            raise OutputError(
                f"{handle.path!r}: prepared output {handle.target!r} cannot be opened: {exc}"
            ) from exc
        if tuple(arr.chunks) != tuple(handle.chunks):  # pragma: no cover - guards a changed store
            raise OutputError(f"{handle.path!r}: store chunks {arr.chunks!r} != prepared {handle.chunks!r}")
        if handle.details.get("local"):  # an aborted write must not recreate the removed partial folder
            return store_blocks(data, arr, guard=handle.target, records=records_of(handle.target))
        return store_blocks(data, arr)

    def finalize(self, handle: WriteHandle, info: dict[str, Any] | None = None) -> None:
        """Mark the output complete and (local paths) move it onto the final path.

        Parameters
        ----------
        handle : WriteHandle
            From :meth:`prepare`.
        info : dict, optional
            JSON-friendly facts stored under ``attrs["tileseg"]["info"]``.

        Raises
        ------
        OutputError
            The prepared output is gone, or a finished output appeared at the
            final path meanwhile (without ``overwrite``).
        """
        import zarr

        try:
            store = open_store(handle.target, handle.storage_options, read_only=False)
            group = zarr.open_group(store=store, mode="r+")
            status = dict(group.attrs.get("tileseg") or {})
        except Exception as exc:
            raise OutputError(
                f"{handle.path!r}: prepared output {handle.target!r} cannot be opened: {exc}"
            ) from exc
        status.update(status="complete", completed_at=now_iso(), run_id=handle.run_id)
        if info:
            safe = _json_safe(dict(info), "finalize info")
            if safe is not None:
                status["info"] = safe
        if handle.details.get("local"):
            final = os.path.abspath(local_path(handle.path) or handle.path)
            if os.path.lexists(final):
                existing = _status(final, None)
                if existing in ("complete", "foreign") and not handle.details.get("overwrite"):
                    raise OutputError(
                        f"{handle.path!r} was created by someone else while writing; "
                        f"left the new output at {handle.target!r}"
                    )
        group.attrs["tileseg"] = status
        if handle.details.get("local"):
            with exclusive(handle.target):  # a late block write finds the folder gone, never recreates it
                drop_records(handle.target)
                move_into_place(handle.target, final)
        log.info("finished %s", handle.path)

    def abort(self, handle: WriteHandle) -> None:
        """Remove a local partial output (remote outputs stay marked incomplete).

        Block writes still running (a failed compute returns before its other
        tasks end) finish first; later ones write nothing (see :mod:`tileseg.writers.partial_lock`).
        """
        if handle.details.get("local"):
            remove_partial(handle.target)
        else:
            log.warning("%s left incomplete after a failure", handle.path)

    def is_complete(self, path: str, storage_options: dict[str, Any] | None = None) -> bool:
        """See :func:`is_complete`."""
        return is_complete(path, storage_options)


def read_status(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``attrs["tileseg"]`` record of an output, or ``None``."""
    try:
        raw = RawStore(path, storage_options)
        meta = node_metadata(raw, "")
    except (FormatError, OSError):
        return None
    status = meta["attrs"].get("tileseg")
    return status if isinstance(status, dict) else None


__all__ = ["ZarrWriter", "is_complete", "ome_attrs", "read_status", "regular_chunks"]
