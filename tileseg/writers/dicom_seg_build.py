"""Building the SEG of :mod:`tileseg.writers.dicom_seg` in ``finalize``, at the memory of one slab.

highdicom's :class:`~highdicom.seg.Segmentation` encodes a pixel array that
is whole in memory, so the SEG is built in two parts:

* the **header** by highdicom itself, on a *skeleton*: the real source
  headers with Rows x Columns shrunk to one row of one pixel per segment,
  and a pixel array of that size saying which segment each frame holds
  (:func:`~tileseg.writers.dicom_seg_frames.scan_store`). highdicom then
  decides, exactly as for the full array, which frames it keeps (empty ones
  omitted), their order, dimension index values, per-frame positions and
  source references, the segment, patient, study, series and frame of
  reference attributes; its memory is that of the frame list, about
  ``z x n_segments`` bytes of pixels;
* the **pixels** by :func:`~tileseg.writers.dicom_seg_frames.write_pixel_data`,
  for the skeleton's frames in its order, streamed slab by slab into a file
  in the partial folder. The header gets the true Rows and Columns, and
  that file becomes its Pixel Data (pydicom >= 3 writes a buffered file
  object's contents in chunks), so the pixels never are in memory at once.

``tests/writers/test_dicom_seg.py`` checks that the result equals
highdicom's own build from the whole array, attribute for attribute and
byte for byte in the pixel data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import OutputError, require
from .base import WriteHandle
from .dicom_seg_frames import Occupancy

#: Type 2 Patient and General Study attributes highdicom copies from the first source image.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "StudyID", "AccessionNumber", "ReferringPhysicianName")
TINY = 1e-3  # a FRACTIONAL value that is not zero but rounds to 0 of 255


def load_sources(handle: WriteHandle) -> list[Any]:
    """The source headers (no pixels), one per z slice, checked against the recorded references.

    Raises
    ------
    OutputError
        A source file is unreadable, or its SOPInstanceUID, SeriesInstanceUID or size does not match.
    """
    pydicom = require("pydicom", "medical")
    refs = handle.details["refs"]
    rows, cols = handle.shape[-2:]
    sources = []
    for k, (path, uid) in enumerate(zip(refs["files"], refs["sop_instance_uids"], strict=True)):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise OutputError(f"{handle.path!r}: cannot read source slice {k} {path!r}: {type(exc).__name__}") \
                from None
        found = (str(ds.get("SOPInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))
        if found != (str(uid), str(refs["series_instance_uid"])):
            raise OutputError(f"{handle.path!r}: source slice {k} {path!r} is instance {found[0]} of series "
                              f"{found[1]}, expected {uid} of {refs['series_instance_uid']}")
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, cols):
            raise OutputError(f"{handle.path!r}: source slice {k} {path!r} is not {rows} x {cols}")
        sources.append(ds)
    return sources


def skeleton_pixels(handle: WriteHandle, occ: Occupancy) -> np.ndarray:
    """The skeleton's pixel array: the same frames non-empty as the full array, one pixel per segment.

    BINARY: a ``(z, 1, n_segments)`` class map whose pixel ``s - 1`` is ``s``
    where the slice holds segment ``s`` (a class map, like the full one, so
    highdicom says the segments do not overlap). FRACTIONAL: ``(z, 1, 1)``
    or ``(z, 1, 1, n_segments)`` probabilities, 1 where the frame is kept,
    :data:`TINY` where only unrounded values are non-zero (highdicom omits
    such a frame but keeps its plane).
    """
    n_seg, nz = occ.present.shape
    if handle.details["type"] == "binary":
        numbers = np.arange(1, n_seg + 1, dtype=np.uint16 if n_seg > 255 else np.uint8)
        return np.where(occ.present.T, numbers, 0).astype(numbers.dtype)[:, None, :]
    values = np.where(occ.present.T, 1.0, np.where(occ.touched.T, TINY, 0.0)).astype(np.float32)
    return values[:, None, None, :] if occ.channels else values[:, None, :1]


def build_skeleton(handle: WriteHandle, sources: list[Any], occ: Occupancy) -> Any:
    """highdicom's ``Segmentation`` of the skeleton (see the module docstring); mutates ``sources``' size."""
    hd = require("highdicom", "medical")
    from pydicom.sr.codedict import codes

    d = handle.details
    pixels = skeleton_pixels(handle, occ)
    for ds in sources:
        ds.Rows, ds.Columns = pixels.shape[1:3]
        for key in TYPE2_COPIED:  # absent in many anonymised series; highdicom reads them unguarded
            if key not in ds:
                setattr(ds, key, None)  # an empty Type 2 element: "unknown", as the standard allows
    algorithm = hd.AlgorithmIdentificationSequence(name="tileseg", version=str(d["version"])[:64],
                                                   family=codes.DCM.ImageProcessing)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k, segment_label=str(label)[:64], segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for k, label in enumerate(occ.labels, start=1)
    ]
    binary = d["type"] == "binary"
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY if binary else hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descriptions,
        series_instance_uid=d["series_instance_uid"],
        series_number=int(d["series_number"]),
        sop_instance_uid=d["sop_instance_uid"],
        instance_number=1,
        manufacturer="tileseg",
        manufacturer_model_name="tileseg",
        software_versions=str(d["version"])[:64],
        device_serial_number="0",
        content_label="TILESEG",
        content_description=d["series_description"][:64],
        omit_empty_frames=True,
    )
    seg.SeriesDescription = d["series_description"][:64]
    return seg


def frame_list(handle: WriteHandle, seg: Any) -> list[tuple[int, int]]:
    """``(segment number, slice index)`` of each frame of ``seg``, in order (from its per-frame groups).

    Raises
    ------
    OutputError
        A frame references no source slice of this series (a highdicom
        layout this writer does not know).
    """
    index = {str(uid): k for k, uid in enumerate(handle.details["refs"]["sop_instance_uids"])}
    shared = seg.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
    frames = []
    for n, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ident = item.get("SegmentIdentificationSequence") or shared
        try:
            uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            frames.append((int(ident[0].ReferencedSegmentNumber), index[uid]))
        except (AttributeError, IndexError, KeyError, TypeError):
            raise OutputError(f"{handle.path!r}: frame {n + 1} of the SEG built by highdicom has no segment "
                              f"number or source slice reference this writer can read") from None
    if len(frames) != int(seg.NumberOfFrames):
        raise OutputError(f"{handle.path!r}: highdicom's SEG lists {len(frames)} frames but NumberOfFrames "
                          f"is {seg.NumberOfFrames}")
    return frames


def attach_pixels(handle: WriteHandle, seg: Any, pixel_file: Any) -> None:
    """Give the skeleton ``seg`` the true frame size and ``pixel_file`` (an open binary file) as Pixel Data."""
    seg.Rows, seg.Columns = (int(v) for v in handle.shape[-2:])
    seg.PixelData = pixel_file
