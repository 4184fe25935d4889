"""A synthetic single-frame CT series on disk and the :class:`~tileseg.image.Image` a DICOM reader gives for it.

For tests of DICOM outputs (the SEG writer) that must not depend on the
DICOM reader: :func:`write_ct_series` writes ``n`` CT Image Storage files
(int16, rescale slope/intercept, oblique orientation, shuffled file names)
and :func:`series_image` builds the Image of the reader contract: axes
``("z", "y", "x")`` sorted along the slice normal and ``attrs["dicom"]``
with the study/series/frame-of-reference UIDs, modality, and the SOP
instance UIDs and file paths of each z slice in sorted order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Patient identifiers of the synthetic series (tests check they never leak into logs or errors).
PATIENT = {"PatientName": "Doe^Jane^Secret", "PatientID": "PID-0042-SECRET", "PatientBirthDate": "19700101",
           "PatientSex": "F"}


@dataclass
class Series:
    """What :func:`write_ct_series` wrote: files in slice order and the volume in that order."""

    folder: str
    files: list[str]
    volume: np.ndarray
    positions: np.ndarray
    sop_instance_uids: list[str]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    spacing: tuple[float, float, float]
    direction: tuple[tuple[float, ...], ...]


def write_ct_series(folder: str, shape: tuple[int, int, int] = (6, 16, 20), *, seed: int = 0,
                    spacing: tuple[float, float, float] = (2.5, 0.7, 0.8),
                    origin: tuple[float, float, float] = (-30.0, 12.0, 40.0)) -> Series:
    """Write a CT series of ``shape = (slices, rows, columns)`` into ``folder``, files in shuffled order.

    Returns
    -------
    Series
        Files, SOP instance UIDs and positions sorted along the slice normal,
        and the raw int16 volume ``(z, y, x)`` in that order.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    n, rows, cols = shape
    a = np.deg2rad(15.0)
    row_dir = np.array([np.cos(a), np.sin(a), 0.0])  # direction of x (along a row)
    col_dir = np.array([-np.sin(a), np.cos(a), 0.0])  # direction of y (down a column)
    normal = np.cross(row_dir, col_dir)
    volume = rng.integers(-200, 800, size=shape).astype(np.int16)
    volume[:, : rows // 3] = -1000  # some empty rows; slice 1 is all air (empty frames to omit)
    volume[1] = -1000
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    positions = np.array([np.asarray(origin) + k * spacing[0] * normal for k in range(n)])
    uids = [generate_uid() for _ in range(n)]
    os.makedirs(folder, exist_ok=True)
    names = [f"IM{i:04d}.dcm" for i in rng.permutation(n)]  # file order differs from slice order
    files = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uids[k]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        for key, value in PATIENT.items():
            setattr(ds, key, value)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uids[k]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101010", "S1", "ACC1"
        ds.ReferringPhysicianName, ds.Manufacturer = "Ref^Doc", "Synthetic"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [spacing[1], spacing[2]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "HU"
        ds.KVP = 120
        ds.PixelData = volume[k].tobytes()
        path = os.path.join(folder, names[k])
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    # tileseg lists LPS coordinates in (z, y, x) order (tileseg.geometry): rows for the z, y, x axes, reversed
    direction = tuple(tuple(float(c) for c in v[::-1]) for v in (normal, col_dir, row_dir))
    return Series(folder, files, volume, positions, uids, study, series, frame, spacing, direction)


def series_image(series: Series, chunks: Any = (2, -1, -1)) -> Any:
    """The Image a DICOM reader returns for ``series`` (see the module docstring)."""
    import dask.array as da
    import pydicom

    from ..image import Image

    slices = [pydicom.dcmread(f).pixel_array for f in series.files]
    data = np.stack(slices)
    attrs = {"dicom": {
        "StudyInstanceUID": series.study_instance_uid, "SeriesInstanceUID": series.series_instance_uid,
        "FrameOfReferenceUID": series.frame_of_reference_uid, "Modality": "CT",
        "SOPInstanceUIDs": list(series.sop_instance_uids), "files": list(series.files)},
        "rescale_slope": 1.0, "rescale_intercept": 0.0}
    origin = tuple(float(v) for v in series.positions[0][::-1])  # (z, y, x) order of LPS (S, P, L)
    return Image(da.from_array(data, chunks=chunks), axes=("z", "y", "x"), spacing=series.spacing,
                 origin=origin, direction=series.direction, units=("millimeter",) * 3, attrs=attrs,
                 source=series.folder, format="dicom")


__all__ = ["PATIENT", "Series", "series_image", "write_ct_series"]
