"""Building the highdicom Segmentation of :mod:`tileseg.writers.dicom_seg` (``finalize``'s work)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import OutputError, require
from .base import WriteHandle

STORE = "slabs.zarr"


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


def _read_store(handle: WriteHandle) -> np.ndarray:
    import zarr
    from zarr.storage import LocalStore

    try:
        arr = zarr.open_array(store=LocalStore(os.path.join(handle.target, STORE)), mode="r")
    except Exception as exc:
        raise OutputError(f"{handle.path!r}: partial store {handle.target!r} cannot be opened: {exc}") from None
    out = np.empty(handle.shape, dtype=np.dtype(handle.dtype))
    thick = handle.chunks[-3]
    for z0 in range(0, handle.shape[-3], thick):
        key = (Ellipsis, slice(z0, z0 + thick), slice(None), slice(None))
        out[key] = arr[key]
    return out


def _segments(handle: WriteHandle, data: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The pixel array for highdicom and the segment labels (see the module docstring of dicom_seg)."""
    d = handle.details
    names = d["class_names"]
    if d["type"] == "binary":
        if d["nodata"] is not None and float(d["nodata"]).is_integer() and 0 <= d["nodata"] <= data.max(initial=0):
            data[data == int(d["nodata"])] = 0
        top = int(data.max(initial=0))
        if names is not None:
            if top >= len(names):
                raise OutputError(f"{handle.path!r}: label {top} found but only {len(names)} class names")
            labels = list(names[1:])
        else:
            labels = ["foreground"] if top <= 1 else [f"class {k}" for k in range(1, top + 1)]
        return data, labels
    if not np.all((data >= 0) & (data <= 1)):  # NaN fails too
        raise OutputError(f"{handle.path!r}: fractional SEG values must be probabilities in [0, 1]")
    if data.ndim == 3:
        label = names[1] if names is not None and len(names) == 2 else names[0] if names else "foreground"
        return data, [label]
    channels = list(range(data.shape[0]))
    if names is not None and len(names) == data.shape[0] and data.shape[0] > 1:
        channels, labels = channels[1:], list(names[1:])
    else:
        labels = [f"class {k}" for k in channels]
    return np.moveaxis(data[channels], 0, -1), labels


def build_segmentation(handle: WriteHandle, sources: list[Any]) -> Any:
    """The highdicom ``Segmentation`` of the stored slabs (all frames in memory, bit-packed when binary)."""
    hd = require("highdicom", "medical")
    from pydicom.sr.codedict import codes

    d = handle.details
    data, labels = _segments(handle, _read_store(handle))
    algorithm = hd.AlgorithmIdentificationSequence(name="tileseg", version=str(d["version"])[:64],
                                                   family=codes.DCM.ImageProcessing)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k, segment_label=str(label)[:64], segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for k, label in enumerate(labels, start=1)
    ]
    binary = d["type"] == "binary"
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=data,
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
