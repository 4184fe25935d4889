"""DICOM SEG writer: label slabs to a Zarr store, one Segmentation instance per series assembled in ``finalize``.

highdicom builds a :class:`highdicom.seg.Segmentation` from a whole array in
memory; this writer never gives it one:

* ``prepare`` checks the image's DICOM references (``attrs["dicom"]``, see
  below), creates a hidden partial folder beside the output holding a Zarr
  array of slabs of whole z-slices;
* the write task stores the slabs there, one whole chunk per dask block
  (idempotent);
* ``finalize`` reads the source headers (pydicom, ``stop_before_pixels``:
  highdicom needs no source pixels, only their geometry, UIDs and
  patient/study attributes), scans the slabs once for which frames hold
  which segment, lets highdicom build the SEG's header on a one-pixel-per-
  segment skeleton of the series (same frames, order, positions and
  references as from the full array), streams the frames' pixel data from
  the slabs into a file and saves the SEG with that file as its Pixel Data
  (:mod:`tileseg.writers.dicom_seg_build`,
  :mod:`tileseg.writers.dicom_seg_frames`), inside the partial folder, then
  renames it onto the final path. Empty frames are omitted
  (``omit_empty_frames=True``: per segment, only frames holding it).

The image must come from a DICOM series: ``attrs["dicom"]`` with
``StudyInstanceUID``, ``SeriesInstanceUID``, ``FrameOfReferenceUID``,
``SOPInstanceUIDs`` and optionally ``files`` (one per z slice, sorted along the slice
normal, as the dicom reader gives them). Frame ``k`` of the SEG references
source slice ``k``; highdicom takes each frame's ImagePositionPatient, the
orientation, pixel spacing and the patient/study attributes from the source
instances. The source files must still exist at ``finalize``.

Segments
--------
``segmentation_type="binary"`` (default): an integer class map (or a bool
mask); class ``k >= 1`` is segment ``k``, labelled ``class_names[k]`` (class
0 is background, no segment; without class names a 0/1 mask is one segment
``"foreground"``, else ``"class k"``); nodata pixels become background.
``"fractional"``: float probabilities in [0, 1], ``(z, y, x)`` (one segment)
or ``(c, z, y, x)`` (channel ``k`` is segment ``k`` with ``class_names``
labelling channels, channel 0 the background, not written).
Category/type codes are the generic SNOMED "Tissue"; algorithm "tileseg"
with its version, family DCM "Image Processing".

Size and memory
---------------
The finalize holds one slab of the store at a time (about 64 MiB, a store
chunk; a FRACTIONAL ``(c, z, y, x)`` chunk holds every channel) plus a batch
of encoded frames (:data:`~tileseg.writers.dicom_seg_frames.BATCH_PIXELS`),
whatever the number of slices. What grows with the series is metadata only:
the source headers (read without pixels) and the SEG's per-frame functional
groups, a few KB per slice and per frame. The store is read once for the scan
and once per segment for the pixels (highdicom orders frames segment by
segment). The SEG file itself is written in chunks by pydicom; it holds one
frame per non-empty slice per segment, bit-packed when binary (at most
``z*y*x*n_segments/8`` bytes, 19 MiB per segment for 512x512x600), one
byte per pixel when fractional. Uncompressed Pixel Data has a 32-bit
length, so one SEG holds at most 4 GiB of frames: about 131000 binary or
16000 fractional 512x512 frames. Slide-sized images need a tiled SEG,
not written here.

Completion
----------
Recorded inside the file, in a private block of group ``0x0011`` with
creator ``"tileseg"``: element ``0x01`` (LO) ``"complete"``, ``0x02`` (LO)
the run id, ``0x03`` (UT) a JSON record (writer, version, completed_at,
info). The file reaches the final path only by the rename after it was
saved: :func:`is_complete` reads that block (the header only), so a DICOM
file made by anyone else is never complete and is replaced only with
``overwrite=True``; a path that is not a DICOM file never.

Privacy
-------
Errors and logs name files, paths and UIDs only: messages from
pydicom/highdicom are scrubbed of the source's patient identifiers.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any

import numpy as np

from ..errors import ConfigError, OutputError, require
from ..image import Image, label_dtype
from ..report import now_iso
from .base import (
    SingleFileWriter,
    WriteHandle,
    check_axes,
)
from .blocks import records_of, store_blocks
from .nifti import slab_thickness
from .zarr import align

log = logging.getLogger(__name__)

STORE = "slabs.zarr"
PIXELS = "pixeldata.bin"  # the SEG's Pixel Data, streamed here at finalize
TARGET_SLAB_BYTES = 64 * 2**20
MAX_PIXEL_BYTES = 2**32 - 2  # uncompressed Pixel Data has a 32-bit (even) length


def pixel_data_bytes(n_frames: int, rows: int, cols: int, segmentation_type: str) -> int:
    """Bytes of a SEG's Pixel Data: bit-packed over all frames when binary, one byte per pixel when fractional."""
    pixels = int(n_frames) * int(rows) * int(cols)
    return (pixels + 7) // 8 if segmentation_type == "binary" else pixels
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0011, "tileseg"
TYPES = ("binary", "fractional")
#: What the writer needs from ``attrs["dicom"]`` (the DICOM reader's keyword names) -> its own names.
REF_KEYS = {"StudyInstanceUID": "study_instance_uid", "SeriesInstanceUID": "series_instance_uid",
            "FrameOfReferenceUID": "frame_of_reference_uid", "SOPInstanceUIDs": "sop_instance_uids"}
#: Source attributes whose values never appear in tileseg's messages.
IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
               "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "AccessionNumber",
               "ReferringPhysicianName", "InstitutionName")


def _read_header(path: str, **kwargs: Any) -> Any:
    pydicom = require("pydicom", "medical")
    return pydicom.dcmread(path, stop_before_pixels=True, **kwargs)


def _record(ds: Any) -> dict[str, Any] | None:
    """tileseg's private block of ``ds`` as a dict, or ``None``."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        status = str(block[0x01].value)
        run_id = str(block[0x02].value)
    except (KeyError, ValueError):
        return None
    return {"status": status, "run_id": run_id}


def _is_complete(path: str) -> bool:
    """Whether the existing file ``path`` is a finished tileseg SEG (raises when it is no DICOM file)."""
    record = _record(_read_header(path))
    return record is not None and record["status"] == "complete"


def is_complete(path: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` is a DICOM file whose tileseg private block says ``complete``."""
    return DicomSegWriter().is_complete(path, storage_options)


def scrub(message: str, datasets: Any) -> str:
    """``message`` with the patient identifiers of ``datasets`` (see :data:`IDENTIFIERS`) replaced."""
    values = set()
    for ds in datasets:
        for key in IDENTIFIERS:
            value = ds.get(key)
            items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
            for item in items:
                text = str(item).strip() if item is not None else ""
                if len(text) >= 2:
                    values.update({text, text.replace("^", " "), repr(text)})
    for text in sorted(values, key=len, reverse=True):
        message = message.replace(text, "<redacted>")
    return message


def _label_store_dtype(image: Image) -> np.dtype:
    """uint8 or uint16 holding the labels (and an integer nodata) of a binary SEG's input."""
    if image.dtype.kind == "b":
        return np.dtype(np.uint8)
    if image.class_names is not None:
        top = len(image.class_names)
        if isinstance(image.nodata, (int, np.integer)) and image.nodata >= 0:
            top = max(top, int(image.nodata) + 1)
        return label_dtype(top)
    return label_dtype(2 ** (8 * min(image.dtype.itemsize, 2)))


def _references(image: Image, path: str) -> dict[str, Any]:
    """The checked ``attrs["dicom"]`` of ``image`` (see the module docstring).

    ``files`` may be absent: the DICOM reader keeps file paths out of ``attrs``
    (folder names can identify patients, and attrs are copied into outputs), so
    the files are found again under ``image.source`` by their SOP Instance UIDs.
    """
    given = image.attrs.get("dicom")
    if not isinstance(given, dict) or any(k not in given for k in REF_KEYS):
        raise OutputError(f"{path!r}: the dicom_seg writer needs an image read from a DICOM series "
                          f"(attrs['dicom'] with {', '.join(REF_KEYS)})")
    refs = {ours: given[theirs] for theirs, ours in REF_KEYS.items()}
    if given.get("files") is not None:
        refs["files"] = given["files"]
    else:
        from ..readers.dicom import source_files

        try:
            refs["files"] = source_files(str(image.source), refs["series_instance_uid"],
                                         list(refs["sop_instance_uids"]))
        except Exception as exc:
            raise OutputError(f"{path!r}: cannot find the source DICOM files of series "
                              f"{refs['series_instance_uid']} under the image's source: {exc}") from None
    files, uids = list(refs["files"]), list(refs["sop_instance_uids"])
    n = image.spatial_shape[0]
    if len(files) != n or len(uids) != n:
        raise OutputError(f"{path!r}: the image has {n} slices but its DICOM references list {len(files)} files "
                          f"and {len(uids)} SOP instance UIDs (series {refs['series_instance_uid']})")
    return refs


class DicomSegWriter(SingleFileWriter):
    """Write a segmentation of a DICOM series as one DICOM SEG file (see the module docstring)."""

    name = "dicom_seg"
    format_name = "DICOM"
    _is_complete = staticmethod(_is_complete)

    def prepare(
        self,
        image: Image,
        path: str,
        *,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        segmentation_type: str = "binary",
        series_number: int = 9901,
        series_description: str = "tileseg segmentation",
        slab: int | None = None,
        run_id: str | None = None,
        partial_key: str | None = None,
    ) -> WriteHandle:
        """Check the image, its DICOM references and the destination; create the partial slab store.

        Parameters
        ----------
        image : Image
            ``(z, y, x)`` class map or mask (binary), or float probabilities,
            optionally ``(c, z, y, x)`` (fractional), with ``attrs["dicom"]``.
        path : str
            Local ``*.dcm`` path.
        overwrite : bool
            Replace a finished output or another DICOM file (never a non-DICOM path).
        storage_options : dict, optional
            Not supported (local files only); must be empty.
        segmentation_type : {"binary", "fractional"}
        series_number : int
            SeriesNumber of the SEG.
        series_description : str
            SeriesDescription of the SEG.
        slab : int, optional
            z-slices per store chunk (default: the largest divisor of the data's
            z-chunk within 64 MiB, so a slab never spans two layers of blocks).
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
            A URL, wrong suffix, missing/mismatched DICOM references, wrong dtype, or an existing path.
        ConfigError
            An invalid option.
        """
        require("highdicom", "medical")
        import zarr
        from pydicom.uid import generate_uid
        from zarr.storage import LocalStore

        path = os.fspath(path)
        local = self.local_output(path, storage_options)
        if not local.lower().endswith(".dcm"):
            raise OutputError(f"{path!r}: a DICOM SEG output must be named *.dcm")
        axes = check_axes(image.axes, image.data.ndim, path)
        if segmentation_type not in TYPES:
            raise ConfigError(f"segmentation_type must be one of {TYPES}, got {segmentation_type!r}")
        if slab is not None and (isinstance(slab, bool) or not isinstance(slab, int) or slab < 1):
            raise ConfigError(f"slab must be a positive int, got {slab!r}")
        if isinstance(series_number, bool) or not isinstance(series_number, int) or series_number < 0:
            raise ConfigError(f"series_number must be a non-negative int, got {series_number!r}")
        if image.spatial_ndim != 3:
            raise OutputError(f"{path!r}: the dicom_seg writer writes 3-D images; got axes {axes!r}")
        kind = image.dtype.kind
        if segmentation_type == "binary" and (image.has_channels or kind not in "biu"):
            raise OutputError(f"{path!r}: a binary SEG needs a (z, y, x) class map or mask (integer or bool), got "
                              f"{image.dtype} with axes {axes!r}; use segmentation_type='fractional' for probabilities")
        if segmentation_type == "fractional" and kind != "f":
            raise OutputError(f"{path!r}: a fractional SEG needs float probabilities, got {image.dtype}")
        refs = _references(image, path)
        first = refs["files"][0]
        try:
            ds = _read_header(first)
        except Exception as exc:
            raise OutputError(f"{path!r}: cannot read the source DICOM file {first!r}: {type(exc).__name__}") from None
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        if (rows, cols) != image.spatial_shape[1:]:
            raise OutputError(f"{path!r}: image slices are {image.spatial_shape[1:]} (y, x) but the source "
                              f"{first!r} has {rows} rows x {cols} columns")

        names = image.class_names
        n_seg = (1 if image.dtype == np.bool_ or segmentation_type == "fractional" and not image.has_channels
                 else image.shape[0] if segmentation_type == "fractional"
                 else len(names) - 1 if names is not None else None)
        most = pixel_data_bytes(image.spatial_shape[0] * n_seg, rows, cols, segmentation_type) if n_seg else 0
        if most > MAX_PIXEL_BYTES:  # empty frames are left out: it may still fit, the finalize checks exactly
            log.warning("%s: with every slice labelled for all %d segments the SEG's Pixel Data would be %.1f GiB, "
                        "over DICOM's 4 GiB; it is written only if empty frames bring it under", path, n_seg,
                        most / 2**30)

        final, target = self.claim(path, local, overwrite, "a DICOM file", partial_key)
        if segmentation_type == "binary":
            dtype = _label_store_dtype(image)
        else:
            dtype = np.dtype(np.float32)
        shape = image.shape
        n_c = shape[0] if image.has_channels else 1
        # slabs divide the blocks being written, so one slab never gathers two layers of blocks (memory)
        thick = slab or slab_thickness(max(image.data.chunks[-3]), rows * cols * dtype.itemsize * n_c,
                                       TARGET_SLAB_BYTES)
        chunks = ((shape[0],) if image.has_channels else ()) + (min(thick, shape[-3]), rows, cols)
        layout = {"writer": self.name, "key": partial_key, "shape": shape, "chunks": chunks, "dtype": str(dtype)}
        self.partial_store(path, target, layout, partial_key is not None, lambda t: zarr.create_array(
            store=LocalStore(os.path.join(t, STORE)), shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
            attributes={"tileseg": {"status": "incomplete"}}))
        from .. import __version__

        nodata = image.nodata.item() if hasattr(image.nodata, "item") else image.nodata
        details = {
            "local": final, "overwrite": bool(overwrite), "refs": refs, "type": segmentation_type,
            "class_names": list(image.class_names) if image.class_names is not None else None,
            "nodata": nodata if isinstance(nodata, (int, float)) else None,
            "series_number": series_number, "series_description": str(series_description),
            "series_instance_uid": generate_uid(), "sop_instance_uid": generate_uid(), "version": __version__,
        }
        return WriteHandle(path=path, target=target, writer=self.name, shape=shape, chunks=chunks,
                           dtype=str(dtype), axes=axes, run_id=run_id or uuid.uuid4().hex, details=details)

    def write_task(self, handle: WriteHandle, image: Image) -> Any:
        """A ``Delayed`` storing the slabs into the partial store (idempotent)."""
        import zarr
        from zarr.storage import LocalStore

        data = image.data
        if tuple(data.shape) != handle.shape:
            raise OutputError(f"{handle.path!r}: data shape {tuple(data.shape)!r} != prepared {handle.shape!r}")
        dtype = np.dtype(handle.dtype)
        data = data.map_blocks(lambda b: b.astype(dtype, copy=False), dtype=dtype)
        try:
            arr = zarr.open_array(store=LocalStore(os.path.join(handle.target, STORE)), mode="r+")
        except Exception as exc:
            raise OutputError(f"{handle.path!r}: partial store {handle.target!r} cannot be opened: {exc}") from exc
        return store_blocks(align(data, handle.chunks), arr, guard=handle.target, records=records_of(handle.target))

    def finalize(self, handle: WriteHandle, info: dict[str, Any] | None = None) -> None:
        """Build the SEG from the slabs and the source headers, save it, rename it into place.

        Raises
        ------
        OutputError
            The partial store or a source file is gone or does not match, highdicom
            refuses, or a file appeared at the final path meanwhile (without ``overwrite``).
        """
        from .dicom_seg_build import attach_pixels, build_skeleton, frame_list, load_sources
        from .dicom_seg_frames import scan_store, write_pixel_data

        d = handle.details
        final = d["local"]
        out = os.path.join(handle.target, os.path.basename(final))
        pixels = os.path.join(handle.target, PIXELS)
        sources = load_sources(handle)
        try:
            occupancy = scan_store(handle)
            seg = build_skeleton(handle, sources, occupancy)
            frames = frame_list(handle, seg)
            rows, cols = handle.shape[-2:]  # the skeleton's frames are smaller until attach_pixels
            size = pixel_data_bytes(len(frames), rows, cols, d["type"])
            if size > MAX_PIXEL_BYTES:
                raise OutputError(f"{handle.path!r}: {len(frames)} frames of {rows} x {cols} make "
                                  f"{size / 2**30:.2f} GiB of Pixel Data, over the 4 GiB one DICOM SEG can hold; "
                                  "write fewer classes per output (several SEGs) or NIfTI/OME-Zarr labels")
            with open(pixels, "wb") as fh:
                write_pixel_data(handle, occupancy, frames, fh)
            record = {"writer": self.name, "version": d["version"], "run_id": handle.run_id,
                      "completed_at": now_iso(), "info": info}
            block = seg.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
            block.add_new(0x01, "LO", "complete")
            block.add_new(0x02, "LO", handle.run_id[:64])
            block.add_new(0x03, "UT", json.dumps(record, default=str))
            with open(pixels, "rb") as fh:
                attach_pixels(handle, seg, fh)
                seg.save_as(out, enforce_file_format=True)
            os.remove(pixels)
        except OutputError as exc:
            raise OutputError(scrub(str(exc), sources[:1])) from None
        except Exception as exc:
            raise OutputError(f"{handle.path!r}: building the DICOM SEG failed: "
                              f"{type(exc).__name__}: {scrub(str(exc), sources[:1])}") from None
        self.publish(handle, out, final, d["overwrite"])
        log.info("finished %s (SEG %s for series %s)", handle.path, d["sop_instance_uid"],
                 d["refs"]["series_instance_uid"])




__all__ = ["DicomSegWriter", "is_complete", "scrub"]
