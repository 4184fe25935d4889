"""NIfTI writer: slabs to a Zarr store, one ``.nii.gz``/``.nii`` streamed in ``finalize``.

A gzip stream can only be written from start to end, by one writer, so the
write follows the COG writer's plan (:mod:`tileseg.writers.cog`):

* ``prepare`` creates a hidden partial folder beside the output holding a
  Zarr array in tileseg's axis order whose chunks are slabs of whole
  z-slices (all channels of a slab in one chunk);
* the write task stores the (converted) blocks there, one whole chunk per
  dask block, so a rerun writes the same bytes;
* ``finalize`` writes the NIfTI-1 header (nibabel) into a file inside the
  partial folder, then appends the voxel bytes slab by slab, in the file's
  byte order, through one :class:`gzip.GzipFile` stream (never more than one
  slab in memory; gzip ``mtime`` 0, so the same data give the same bytes),
  and renames the file onto the final path.

NIfTI stores voxels with x fastest: a tileseg ``(z, y, x)`` slab in C order
*is* the file's byte order for those slices, and a ``(c, z, y, x)`` image is
written channel after channel, i.e. a 4-D ``(X, Y, Z, C)`` NIfTI with the
channel last (the NIfTI convention for several volumes; the nifti reader
reads it back as channels).

Completion is recorded inside the file: a header extension with code 6
(``NIFTI_ECODE_COMMENT``) holding JSON ``{"tileseg": {"status": "complete",
"run_id", "completed_at", "info", "class_names", "attrs", ...}}``. The header
comes first in the stream, so it is written complete at the start of
``finalize``, but the file only reaches the final path by the rename after
its last byte was written and the stream closed: a file at the final path
with that extension is a finished output; a crash leaves only the hidden
partial folder. :func:`is_complete` reads that extension (the header only),
so a NIfTI made by anyone else is never "complete"; it is replaced only with
``overwrite=True``, and a path that is not a NIfTI file never.

What is written
---------------
The image's geometry as the affine :func:`tileseg.geometry.world_affine`
flipped to RAS, stored as **both sform and qform** with code 1
(``NIFTI_XFORM_SCANNER_ANAT``: tileseg's patient space is DICOM's LPS
scanner space) unless the image's ``attrs`` carry the source's
``sform_code``/``qform_code`` (from the nifti reader), which are kept.
Class maps get the smallest unsigned dtype holding their labels (and nodata)
and ``intent_code`` 1002 (``NIFTI_INTENT_LABEL``); class names and nodata go into the record (the
nifti reader gives them back); floating-point images
(probabilities) float32; other integer images keep their dtype (bool ->
uint8). Units: millimetres unless the image says metres or micrometres.
NIfTI-1, or NIfTI-2 when a dimension exceeds 32767 (NIfTI-1 stores int16
dimensions). 3-D images only; local paths only.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import uuid
from typing import Any

import numpy as np

from ..errors import ConfigError, OutputError, require
from ..geometry import ras_from_lps_affine, world_affine
from ..image import Image, label_dtype
from ..readers.nifti import ECODE, tileseg_record
from ..report import now_iso
from .base import (
    SingleFileWriter,
    WriteHandle,
    check_axes,
)
from .blocks import records_of, store_blocks
from .zarr import align

log = logging.getLogger(__name__)

STORE = "slabs.zarr"
#: NIfTI-1 stores dimensions as int16; larger images are written as NIfTI-2.
NIFTI1_MAX_DIM = 32767
#: Largest slab (store chunk and unit of the final stream), bytes.
TARGET_SLAB_BYTES = 16 * 2**20


def slab_thickness(block_z: int, plane_bytes: int, target_bytes: int = TARGET_SLAB_BYTES) -> int:
    """z-slices per slab: the largest divisor of the data's z-chunk within ``target_bytes``.

    Slabs that divide the blocks being written never gather two rows of blocks
    (measured: 256-slice slabs over 144-slice blocks doubled a CT run's peak RSS).
    Also used by the DICOM SEG writer (with its own ``target_bytes``).

    >>> slab_thickness(144, 512 * 512), slab_thickness(144, 512 * 512 * 4), slab_thickness(7, 10**9)
    (48, 16, 1)
    >>> slab_thickness(144, 512 * 512, 64 * 2**20)
    144
    """
    limit = max(1, target_bytes // max(1, plane_bytes))
    return max(d for d in range(1, max(1, block_z) + 1) if block_z % d == 0 and d <= limit)
_UNITS = {"millimeter": "mm", "millimetre": "mm", "mm": "mm", "meter": "meter", "metre": "meter", "m": "meter",
          "micrometer": "micron", "micrometre": "micron", "micron": "micron", "um": "micron"}


def _store_dtype(image: Image) -> np.dtype:
    """The dtype written (see the module docstring)."""
    dtype = image.dtype
    if image.is_class_map:
        top = len(image.class_names or ())
        if isinstance(image.nodata, (int, np.integer)) and image.nodata >= 0:
            top = max(top, int(image.nodata) + 1)
        return label_dtype(top)
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype.kind == "f":
        return np.dtype(np.float32)
    if dtype.kind in "iu":
        return dtype
    raise OutputError(f"cannot write dtype {str(dtype)!r} to NIfTI (numeric or bool only)")


def _is_complete(path: str) -> bool:
    """Whether the existing file ``path`` is a finished tileseg NIfTI (raises when it is no NIfTI file)."""
    nib = require("nibabel", "medical")
    img = nib.load(path)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise OutputError(f"{path!r} exists and is a {type(img).__name__}; refusing to replace it")
    record = tileseg_record(img.header)
    return record is not None and record.get("status") == "complete"


def is_complete(path: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` is a NIfTI file whose tileseg header extension says ``complete``."""
    return NiftiWriter().is_complete(path, storage_options)


def _convert(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return block.astype(dtype, copy=False)


class NiftiWriter(SingleFileWriter):
    """Write a 3-D image (optionally with channels) as ``.nii.gz`` or ``.nii`` (see the module docstring)."""

    name = "nifti"
    format_name = "NIfTI"
    _is_complete = staticmethod(_is_complete)

    def prepare(
        self,
        image: Image,
        path: str,
        *,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        slab: int | None = None,
        compresslevel: int = 6,
        run_id: str | None = None,
        partial_key: str | None = None,
    ) -> WriteHandle:
        """Check the destination and create the partial slab store.

        Parameters
        ----------
        image : Image
            3-D: ``("z", "y", "x")`` or ``("c", "z", "y", "x")``.
        path : str
            Local ``.nii.gz`` or ``.nii`` path.
        overwrite : bool
            Replace a finished output or another NIfTI file (never a non-NIfTI path).
        storage_options : dict, optional
            Not supported (local files only); must be empty.
        slab : int, optional
            z-slices per store chunk (default: the largest divisor of the data's
            z-chunk within 16 MiB, see :func:`slab_thickness`).
        compresslevel : int
            gzip level 1-9 (``.nii.gz`` only).
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
            A URL, a wrong suffix, a 2-D image, an unwritable dtype, or an existing path.
        ConfigError
            An invalid option.
        """
        require("nibabel", "medical")
        import zarr
        from zarr.storage import LocalStore

        path = os.fspath(path)
        local = self.local_output(path, storage_options)
        if not local.lower().endswith((".nii", ".nii.gz")):
            raise OutputError(f"{path!r}: a NIfTI output must be named *.nii.gz or *.nii")
        axes = check_axes(image.axes, image.data.ndim, path)
        if image.spatial_ndim != 3:
            raise OutputError(f"{path!r}: the nifti writer writes 3-D images; got axes {axes!r}")
        if slab is not None and (isinstance(slab, bool) or not isinstance(slab, int) or slab < 1):
            raise ConfigError(f"slab must be a positive int, got {slab!r}")
        if isinstance(compresslevel, bool) or compresslevel not in range(1, 10):
            raise ConfigError(f"compresslevel must be an int 1-9, got {compresslevel!r}")
        try:
            dtype = _store_dtype(image)
        except OutputError as exc:
            raise OutputError(f"{path!r}: {exc}") from None

        final, target = self.claim(path, local, overwrite, "a NIfTI file", partial_key)

        shape = tuple(int(s) for s in image.data.shape)
        n_c = shape[0] if image.has_channels else 1
        z, y, x = shape[-3:]
        thick = slab or slab_thickness(max(image.data.chunks[-3]), y * x * dtype.itemsize * n_c)
        chunks = ((shape[0],) if image.has_channels else ()) + (min(thick, z), y, x)
        layout = {"writer": self.name, "key": partial_key, "shape": shape, "chunks": chunks, "dtype": str(dtype)}
        self.partial_store(path, target, layout, partial_key is not None, lambda t: zarr.create_array(
            store=LocalStore(os.path.join(t, STORE)), shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
            attributes={"tileseg": {"status": "incomplete"}}))
        from .. import __version__

        affine = ras_from_lps_affine(world_affine(image.spacing, image.origin, image.direction))
        codes = [image.attrs.get(k) for k in ("sform_code", "qform_code")]
        codes = [int(c) if isinstance(c, int) and 0 < c <= 5 else 1 for c in codes]
        details = {
            "local": final, "overwrite": bool(overwrite), "affine": affine, "codes": codes,
            "unit": _UNITS.get(str(image.units[0]).lower(), "mm") if image.units[0] else "mm",
            "class_names": list(image.class_names) if image.class_names is not None else None,
            "is_class_map": image.is_class_map, "nodata": _json_nodata(image.nodata), "attrs": _json_attrs(image.attrs),
            "source": image.source, "version": __version__, "compresslevel": compresslevel,
        }
        return WriteHandle(path=path, target=target, writer=self.name, shape=shape, chunks=chunks,
                           dtype=str(dtype), axes=axes, run_id=run_id or uuid.uuid4().hex, details=details)

    def write_task(self, handle: WriteHandle, image: Image) -> Any:
        """A ``Delayed`` storing the converted slabs into the partial store (idempotent)."""
        import zarr
        from zarr.storage import LocalStore

        data = image.data
        if tuple(data.shape) != handle.shape:
            raise OutputError(f"{handle.path!r}: data shape {tuple(data.shape)!r} != prepared {handle.shape!r}")
        dtype = np.dtype(handle.dtype)
        data = data.map_blocks(_convert, dtype, dtype=dtype)
        try:
            arr = zarr.open_array(store=LocalStore(os.path.join(handle.target, STORE)), mode="r+")
        except Exception as exc:
            raise OutputError(f"{handle.path!r}: partial store {handle.target!r} cannot be opened: {exc}") from exc
        return store_blocks(align(data, handle.chunks), arr, guard=handle.target, records=records_of(handle.target))

    def finalize(self, handle: WriteHandle, info: dict[str, Any] | None = None) -> None:
        """Stream header and slabs into the NIfTI file, then rename it into place.

        Raises
        ------
        OutputError
            The partial store is gone, writing fails, or a file appeared at the
            final path meanwhile (without ``overwrite``).
        """
        d = handle.details
        final = d["local"]
        out = os.path.join(handle.target, os.path.basename(final))
        record = {"status": "complete", "run_id": handle.run_id, "completed_at": now_iso(), "writer": self.name,
                  "version": d["version"], "info": info, "class_names": d["class_names"], "nodata": d["nodata"],
                  "attrs": d["attrs"],
                  "source": d["source"]}
        try:
            _stream(handle, out, record)
        except OutputError:
            raise
        except Exception as exc:
            raise OutputError(f"{handle.path!r}: writing the NIfTI file failed: {exc}") from exc
        self.publish(handle, out, final, d["overwrite"])
        log.info("finished %s", handle.path)




def header_for(handle: WriteHandle, record: dict[str, Any]) -> Any:
    """The header of a prepared write (NIfTI-1, NIfTI-2 when a dimension exceeds 32767), with tileseg's ``record``."""
    nib = require("nibabel", "medical")
    d = handle.details
    shape = handle.shape
    big = max(shape) > NIFTI1_MAX_DIM
    hdr = nib.Nifti2Header() if big else nib.Nifti1Header()
    hdr.set_data_dtype(np.dtype(handle.dtype))
    xyz = tuple(reversed(shape[-3:]))
    hdr.set_data_shape(xyz + ((shape[0],) if handle.axes[0] == "c" else ()))
    affine = np.asarray(d["affine"], dtype=float)
    hdr.set_qform(affine, code=d["codes"][1])
    hdr.set_sform(affine, code=d["codes"][0])
    hdr.set_xyzt_units(xyz=d["unit"])
    if d["is_class_map"]:
        hdr.set_intent("label")
    hdr["descrip"] = f"tileseg {d['version']}"[:79].encode()
    content = json.dumps({"tileseg": record}, default=str, allow_nan=False).encode()
    hdr.extensions.append(nib.nifti1.Nifti1Extension(ECODE, content))
    return hdr


def _stream(handle: WriteHandle, out: str, record: dict[str, Any]) -> None:
    """Write the header, padding and every slab, in order, to ``out`` (one slab in memory)."""
    import zarr
    from zarr.storage import LocalStore

    try:
        arr = zarr.open_array(store=LocalStore(os.path.join(handle.target, STORE)), mode="r")
    except Exception as exc:
        raise OutputError(f"{handle.path!r}: partial store {handle.target!r} cannot be opened: {exc}") from exc
    hdr = header_for(handle, record)
    file_dtype = np.dtype(handle.dtype).newbyteorder(hdr.endianness)
    gz = out.lower().endswith(".gz")
    raw = open(out, "wb")
    try:
        f = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=handle.details["compresslevel"], mtime=0) if gz \
            else raw
        try:
            hdr.write_to(f)
            pad = int(hdr["vox_offset"]) - f.tell()
            if pad < 0:
                raise OutputError(f"{handle.path!r}: header longer than vox_offset")
            f.write(b"\x00" * pad)
            thick = handle.chunks[-3]
            channels = range(handle.shape[0]) if handle.axes[0] == "c" else [None]
            for c in channels:
                for z0 in range(0, handle.shape[-3], thick):
                    key = (slice(z0, z0 + thick),) if c is None else (c, slice(z0, z0 + thick))
                    f.write(memoryview(np.ascontiguousarray(arr[key], dtype=file_dtype)).cast("B"))
        finally:
            if gz:
                f.close()
    finally:
        raw.close()


def _json_nodata(nodata: Any) -> int | float | None:
    """nodata as a JSON number (NaN needs no record: NaN voxels say it themselves)."""
    if nodata is None:
        return None
    value = nodata.item() if hasattr(nodata, "item") else nodata
    return value if isinstance(value, int) or (isinstance(value, float) and np.isfinite(value)) else None


def _json_attrs(attrs: dict[str, Any]) -> dict[str, Any] | None:
    if not attrs:
        return None
    try:
        return json.loads(json.dumps(attrs, allow_nan=False))
    except (TypeError, ValueError) as exc:
        log.warning("not storing attributes: not JSON-serialisable (%s)", exc)
        return None


__all__ = ["NiftiWriter", "is_complete", "tileseg_record"]
