"""Write a synthetic CT phantom as a real DICOM series (pydicom), with optional defects.

The phantom is a water cylinder (0 HU) in air (-1000 HU) holding a bone
sphere (+700 HU) and a soft-tissue sphere (+60 HU), stored as int16 with
``RescaleSlope = 1`` and ``RescaleIntercept = -1024`` (configurable). Files
get shuffled, meaningless names so that readers must sort by position.

Example
-------
>>> import tempfile                                         # doctest: +SKIP
>>> truth = write_ct_series(tempfile.mkdtemp(), shape=(40, 64, 64))  # doctest: +SKIP
>>> truth.hu.shape, truth.spacing                          # doctest: +SKIP
((40, 64, 64), (2.5, 0.7, 0.8))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PHANTOM_TISSUES", "CTSeries", "phantom_hu", "phantom_labels", "write_ct_series"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class CTSeries:
    """Ground truth of a series written by :func:`write_ct_series`.

    Attributes
    ----------
    hu : numpy.ndarray
        HU volume ``(z, y, x)`` in slice order along the normal (float64).
    files : list of str
        File paths in the same order as ``hu`` (after defects).
    spacing, origin : tuple of float
        ``(z, y, x)`` geometry (origin = IPP of the first slice, reversed LPS).
    direction : tuple of tuple of float
        Rows: unit vectors of array axes z, y, x, components in ``(z, y, x)`` order.
    positions : list of tuple of float
        ImagePositionPatient (LPS) of each slice in order.
    series_uid, study_uid, frame_uid : str
    sop_uids : list of str
        SOPInstanceUIDs in slice order.
    """

    hu: np.ndarray
    files: list[str]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, ...], ...]
    positions: list[tuple[float, float, float]]
    series_uid: str
    study_uid: str
    frame_uid: str
    sop_uids: list[str] = field(default_factory=list)


#: The phantom's anatomy: label value -> (name, HU) of :func:`phantom_labels`.
PHANTOM_TISSUES = (("air", -1000.0), ("water", 0.0), ("bone", 700.0), ("soft_tissue", 60.0))


def phantom_labels(shape: Sequence[int]) -> np.ndarray:
    """The phantom's anatomy as uint8 labels of ``shape`` ``(z, y, x)`` (see :data:`PHANTOM_TISSUES`).

    A water cylinder along z (radius 0.8 of the half-width) in air, holding a
    bone sphere (radius 0.3) and a soft-tissue sphere (radius 0.2), in
    coordinates running from -1 to 1 along each axis (so the anatomy scales
    with ``shape``).

    >>> np.bincount(phantom_labels((8, 16, 16)).ravel()).tolist()
    [1152, 872, 18, 6]
    """
    nz, ny, nx = (int(s) for s in shape)
    z, y, x = np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij",
                          sparse=True)
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    for inside, value in ((y**2 + x**2 < 0.8**2, 1),
                          ((z - 0.1) ** 2 + (y - 0.2) ** 2 + (x + 0.2) ** 2 < 0.3**2, 2),
                          ((z + 0.2) ** 2 + (y + 0.3) ** 2 + (x - 0.3) ** 2 < 0.2**2, 3)):
        labels[np.broadcast_to(inside, labels.shape)] = value
    return labels


def phantom_hu(shape: Sequence[int]) -> np.ndarray:
    """Integer HU phantom of ``shape`` ``(z, y, x)`` (float64 values that are whole numbers).

    :func:`phantom_labels` mapped to the HU of :data:`PHANTOM_TISSUES`, plus a
    slice-dependent offset of up to 3 HU (so slice order errors show).
    """
    hu = np.array([value for _, value in PHANTOM_TISSUES])[phantom_labels(shape)]
    hu += np.round(np.sin(np.arange(hu.shape[0]))[:, None, None] * 3)
    return hu


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=float)
    return a / np.linalg.norm(a)


def write_ct_series(
    directory: str | os.PathLike[str],
    *,
    shape: Sequence[int] = (40, 64, 64),
    spacing: Sequence[float] = (2.5, 0.7, 0.8),
    origin_lps: Sequence[float] = (-120.0, -95.0, 30.0),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_description: str = "phantom",
    modality: str = "CT",
    seed: int = 0,
    defects: Sequence[str] = (),
    hu: np.ndarray | None = None,
) -> CTSeries:
    """Write a CT phantom as one DICOM file per slice, in shuffled order under random names.

    Parameters
    ----------
    directory : path
        Folder to write into (created).
    shape : (nz, ny, nx)
        Slices, rows, columns.
    spacing : (dz, dy, dx)
        Slice step along the normal, row spacing, column spacing (mm).
    origin_lps : (x, y, z)
        ImagePositionPatient of the first slice.
    orientation : 6 floats
        ImageOrientationPatient (row direction, then column direction); oblique allowed.
    slope, intercept : float
        Rescale; stored values are ``round((hu - intercept) / slope)`` as int16.
    modality : str
        Modality tag (the SOP class stays CT Image Storage).
    defects : sequence of str
        ``"drop"`` (remove a middle slice), ``"duplicate"`` (a slice repeats its
        neighbour's position), ``"truncate"`` (a file loses the end of its
        pixel data), ``"rows"`` (a slice with one row fewer), ``"oblique_one"``
        (one slice with another orientation), ``"spacing"`` (one step 20% longer).
    hu : array, optional
        Volume to store instead of :func:`phantom_hu`.

    Returns
    -------
    CTSeries
        Ground truth in sorted order (for the defect-free slices).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    nz, ny, nx = (int(s) for s in shape)
    dz, dy, dx = (float(s) for s in spacing)
    row_dir, col_dir = _unit(orientation[:3]), _unit(orientation[3:6])
    normal = np.cross(row_dir, col_dir)
    origin = np.asarray(origin_lps, dtype=float)
    volume = phantom_hu((nz, ny, nx)) if hu is None else np.asarray(hu, dtype=float)
    stored = np.round((volume - intercept) / slope).astype(np.int16)
    volume = stored.astype(np.float64) * slope + intercept
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    rng = np.random.default_rng(seed)
    offsets = np.arange(nz, dtype=float) * dz
    if "spacing" in defects:
        offsets[nz // 2:] += 0.2 * dz
    positions = [origin + k * normal for k in offsets]
    if "duplicate" in defects:
        positions[nz // 2] = positions[nz // 2 - 1].copy()
    keep = [k for k in range(nz) if not ("drop" in defects and k == nz // 2)]
    names = [f"IM{v:06d}.dcm" for v in rng.permutation(100000)[:nz]]
    files = []
    for order, k in enumerate(rng.permutation(keep)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber = modality, series_description, 1
        ds.PatientName, ds.PatientID = "Phantom^Secret", "SECRET-ID-42"
        # the rest of the Patient and General Study modules (type 2: present, may be empty)
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "19700101", "O", ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.Manufacturer = "tileseg synthetic phantom"  # General Equipment (type 2)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]  # CT Image module (type 1)
        ds.InstanceNumber = int(nz - k)  # deliberately reversed: readers must not rely on it
        iop = list(orientation)
        if "oblique_one" in defects and k == nz // 3:
            iop = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
        ds.ImageOrientationPatient = [f"{v:.6f}".rstrip("0").rstrip(".") if v else "0" for v in iop]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[k]]
        ds.PixelSpacing = [f"{dy:g}", f"{dx:g}"]
        ds.SliceThickness = f"{dz:g}"
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "HU"
        plane = stored[k]
        if "rows" in defects and k == nz // 4:
            plane = plane[:-1]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = plane.shape
        bits = 12 if -2048 <= stored.min() and stored.max() < 2048 else 16  # CT scanners often store 12 bits
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 1
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        path = os.path.join(directory, names[order])
        ds.save_as(path, enforce_file_format=True)
        if "truncate" in defects and k == nz // 5:
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) - nx * 2 * 3)
        files.append((k, path, ds.SOPInstanceUID))
    files.sort()
    ks = [k for k, _, _ in files]
    direction = tuple(tuple(float(v) for v in vec[::-1]) for vec in (normal, col_dir, row_dir))
    return CTSeries(
        hu=volume[ks], files=[p for _, p, _ in files], spacing=(dz, dy, dx),
        origin=tuple(float(v) for v in positions[0][::-1]),  # type: ignore[arg-type]
        direction=direction, positions=[tuple(float(v) for v in positions[k]) for k in ks],  # type: ignore[misc]
        series_uid=series_uid, study_uid=study_uid, frame_uid=frame_uid, sop_uids=[s for _, _, s in files],
    )

