"""DICOM series assembly: scan headers once, group by series, sort along the normal, check, compute geometry.

Pure header logic (pydicom is imported by the caller); no pixel data is read
here. Messages name the series (SeriesInstanceUID) and file names only, never
patient identifiers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

#: Repairs a user may opt into with ``repair=[...]`` (or ``repair=True`` for all).
REPAIRS = ("duplicates", "orientation", "size", "spacing")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PREAMBLE = 128


@dataclass(frozen=True)
class SliceHeader:
    """What the reader needs from one file's header (no pixel data, no patient data)."""

    path: str
    series_uid: str
    study_uid: str
    frame_uid: str
    sop_uid: str
    sop_class: str
    modality: str
    description: str
    rows: int
    cols: int
    frames: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, float, float] | None
    pixel_spacing: tuple[float, float]
    thickness: float | None
    slope: float
    intercept: float
    bits_allocated: int
    bits_stored: int
    signed: bool
    samples: int
    transfer_syntax: str
    compressed: bool
    pixel_bytes: int | None  # bytes available for PixelData (uncompressed only), None if unknown
    frame: int | None = None  # 0-based frame of an enhanced multi-frame file; None for a single-frame file
    mosaic: bool = False  # a Siemens mosaic: several slices tiled in one image (ImageType holds MOSAIC)


def is_dicom_file(path: str) -> bool:
    """Whether ``path`` starts with the 128-byte preamble and ``DICM``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_PREAMBLE + 4)
    except OSError:
        return False
    return len(head) == _PREAMBLE + 4 and head[_PREAMBLE:] == b"DICM"


def is_dicomdir(path: str) -> bool:
    """Whether ``path`` is a file named ``DICOMDIR`` (a DICOM file-set's directory, PS3.10)."""
    return os.path.basename(path).upper() == "DICOMDIR" and os.path.isfile(path)


def dicomdir_files(path: str) -> list[str]:
    """The files a DICOMDIR references (pydicom's :class:`~pydicom.fileset.FileSet`), sorted.

    Referenced files need no ``.dcm`` name. A file referenced outside the
    DICOMDIR's folder (a ``..`` in a Referenced File ID) or missing is an error.

    Raises
    ------
    InputError
        Unreadable DICOMDIR, or a referenced file missing or outside its folder
        (named relative to the folder; patient data never appears in messages).
    """
    import pydicom
    from pydicom.fileset import FileSet

    root = os.path.realpath(os.path.dirname(path))
    try:
        ds = pydicom.dcmread(path)
        ids = [rec.ReferencedFileID for rec in ds.get("DirectoryRecordSequence", []) if "ReferencedFileID" in rec]
        referenced = [os.path.join(root, *([i] if isinstance(i, str) else [str(v) for v in i])) for i in ids]
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt input
        raise InputError(f"{path!r}: not a readable DICOMDIR: {type(exc).__name__}") from None
    outside = [p for p in referenced if os.path.commonpath([root, os.path.realpath(p)]) != root]
    if outside:
        raise InputError(f"{path!r}: {len(outside)} referenced file(s) lie outside its folder; refused")
    missing = [p for p in referenced if not os.path.isfile(p)]
    if missing:
        raise InputError(f"{path!r}: {len(missing)} referenced file(s) missing "
                         f"(first: {os.path.relpath(missing[0], root)!r})")
    try:
        paths = [str(instance.path) for instance in FileSet(ds)]
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path!r}: not a readable DICOMDIR: {type(exc).__name__}") from None
    return sorted(set(paths))


def dicom_files(path: str) -> list[str]:
    """DICOM files under ``path`` (a file, a DICOMDIR, or a tree; hidden entries skipped), sorted.

    A DICOMDIR gives the files it references; in a tree, the files of each
    readable DICOMDIR are added to those found by their DICM preamble (an
    unreadable DICOMDIR inside a tree is skipped with a warning).
    """
    if os.path.isfile(path):
        return dicomdir_files(path) if is_dicomdir(path) else [path]
    out = set()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(root, name)
            if name.startswith("."):
                continue
            if name.upper() == "DICOMDIR":
                try:
                    out.update(dicomdir_files(full))
                except InputError as exc:
                    log.warning("skipping %s", exc)
            elif is_dicom_file(full):
                out.add(full)
    return sorted(out)


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _group(ds: Any, frame_item: Any, seq: str, attr: str) -> Any:
    """``attr`` of functional group ``seq`` in a per-frame item, else in the shared groups."""
    for holder in (frame_item, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if holder is not None and seq in holder and len(holder[seq].value) and attr in holder[seq].value[0]:
            return holder[seq].value[0].get(attr)
    return None


def read_header(path: str) -> list[SliceHeader]:
    """Header facts of one file: one entry, one per frame of an enhanced multi-frame file,
    or none for a DICOM object without pixel data (e.g. a structured report)."""
    import pydicom

    with open(path, "rb") as fh:
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt input
            raise InputError(f"{os.path.basename(path)!r}: not a readable DICOM file: {exc}") from exc
        pixel_start = fh.tell()
    if "Rows" not in ds or "Columns" not in ds:
        return []
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts = pydicom.uid.UID(ts or pydicom.uid.ImplicitVRLittleEndian)
    compressed = bool(ts.is_compressed)
    pixel_bytes = None
    if not compressed and not ts.is_deflated:  # a deflated data set: its length says nothing
        header = 8 if ts.is_implicit_VR else 12
        pixel_bytes = max(os.path.getsize(path) - pixel_start - header, 0)
    try:
        return _headers(ds, path, ts, compressed, pixel_bytes)
    except (TypeError, ValueError) as exc:  # a malformed number in the header
        raise InputError(f"{os.path.basename(path)!r}: unreadable DICOM header value: {exc}") from exc


def _headers(ds: Any, path: str, ts: str, compressed: bool, pixel_bytes: int | None) -> list[SliceHeader]:
    thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    base = SliceHeader(
        path=path, series_uid=str(ds.get("SeriesInstanceUID", "")), study_uid=str(ds.get("StudyInstanceUID", "")),
        frame_uid=str(ds.get("FrameOfReferenceUID", "")), sop_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class=str(ds.get("SOPClassUID", "")), modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "")), rows=int(ds.Rows), cols=int(ds.Columns),
        frames=int(ds.get("NumberOfFrames", 1) or 1), iop=_floats(ds.get("ImageOrientationPatient"), 6),
        ipp=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2) or (1.0, 1.0),  # type: ignore[arg-type]
        thickness=float(thickness) if thickness else None,
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0), intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        bits_allocated=int(ds.get("BitsAllocated", 16)), bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 16))),
        signed=int(ds.get("PixelRepresentation", 0)) == 1, samples=int(ds.get("SamplesPerPixel", 1)),
        transfer_syntax=str(ts), compressed=compressed, pixel_bytes=pixel_bytes,
        mosaic="MOSAIC" in [str(v).upper() for v in (ds.get("ImageType") or [])],
    )
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if base.frames == 1 or not per_frame:
        return [base]
    out = []
    for i, item in enumerate(per_frame):  # enhanced CT/MR: geometry and rescale per frame or shared
        spacing = _group(ds, item, "PixelMeasuresSequence", "PixelSpacing")
        thick = _group(ds, item, "PixelMeasuresSequence", "SpacingBetweenSlices") or _group(
            ds, item, "PixelMeasuresSequence", "SliceThickness")
        slope = _group(ds, item, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group(ds, item, "PixelValueTransformationSequence", "RescaleIntercept")
        out.append(replace(
            base, frame=i, iop=_floats(_group(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            ipp=_floats(_group(ds, item, "PlanePositionSequence", "ImagePositionPatient"), 3),
            pixel_spacing=_floats(spacing, 2) or base.pixel_spacing, thickness=float(thick) if thick else base.thickness,
            slope=float(slope) if slope is not None else base.slope,
            intercept=float(intercept) if intercept is not None else base.intercept,
        ))
    return out


def series_key(uid: str) -> str:
    """The item fragment naming a series: the UID itself when it is a well-formed UID, else a hash.

    >>> series_key("1.2.840.5"), series_key("../evil")
    ('1.2.840.5', 'series-8bf37120c716856f')
    """
    if _UID.match(uid) and len(uid) <= 64:
        return uid
    return "series-" + hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()[:16]


#: Parsed headers by (path, mtime_ns, size): expanding a study and opening each of its series
#: items parses every header once per process, not once per item.
_HEADER_CACHE: dict[tuple[str, int, int], list[SliceHeader]] = {}
_HEADER_CACHE_MAX = 200_000


def cached_header(path: str) -> list[SliceHeader]:
    """:func:`read_header` memoised on the file's path, mtime and size."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key not in _HEADER_CACHE:
        if len(_HEADER_CACHE) >= _HEADER_CACHE_MAX:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[key] = read_header(path)
    return [h if h.path == path else replace(h, path=path) for h in _HEADER_CACHE[key]]


def scan(path: str) -> dict[str, list[SliceHeader]]:
    """Headers of every image file under ``path`` grouped by SeriesInstanceUID (insertion order = first file)."""
    groups: dict[str, list[SliceHeader]] = {}
    for f in dicom_files(path):
        for h in cached_header(f):
            groups.setdefault(h.series_uid, []).append(h)
    return groups


def _names(headers: list[SliceHeader], limit: int = 6) -> str:
    shown = ", ".join(repr(os.path.basename(h.path)) + ("" if h.frame is None else f" frame {h.frame + 1}")
                      for h in headers[:limit])
    return shown + (f" and {len(headers) - limit} more" if len(headers) > limit else "")


def _majority(headers: list[SliceHeader], key: Any, what: str, series: str, repair: bool) -> list[SliceHeader]:
    counts = Counter(key(h) for h in headers)
    if len(counts) <= 1:
        return headers
    common = counts.most_common(1)[0][0]
    odd = [h for h in headers if key(h) != common]
    if not repair:
        raise InputError(
            f"DICOM series {series!r}: mixed {what}: {len(odd)} of {len(headers)} file(s) differ from {common!r}: "
            f"{_names(odd)} (values {sorted({key(h) for h in odd})!r}); repair=['{what.split()[0]}'] keeps the majority"
        )
    log.warning("DICOM series %r: dropping %d file(s) with another %s: %s", series, len(odd), what, _names(odd))
    return [h for h in headers if key(h) == common]


@dataclass(frozen=True)
class SeriesGeometry:
    """Sorted headers and the ``(z, y, x)`` geometry of the volume."""

    headers: list[SliceHeader]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]
    irregular: bool


def assemble(headers: list[SliceHeader], *, tolerance: float = 0.01, repair: Any = False) -> SeriesGeometry:
    """Check and sort the slices of one series along the normal of their orientation.

    Parameters
    ----------
    headers : list of SliceHeader
        One series' files, any order.
    tolerance : float
        Allowed relative deviation of each slice step from the median step.
    repair : bool or sequence of str
        Opt-in repairs (:data:`REPAIRS`): ``"duplicates"`` keeps the first file
        (by name) at each position, ``"orientation"``/``"size"`` keep the
        majority orientation/size, ``"spacing"`` accepts gaps and uneven steps
        (the median step is used; ``irregular`` is then True).

    Raises
    ------
    InputError
        Mixed orientations or sizes, duplicate positions, missing slices,
        non-uniform spacing, a tilted stack, a multi-frame file, a Siemens
        mosaic, missing position tags; the message names the series and the files.
    """
    fixes = set(REPAIRS) if repair is True else set(repair or ())
    unknown = fixes - set(REPAIRS)
    if unknown:
        raise InputError(f"unknown repair(s) {sorted(unknown)!r}; choose from {list(REPAIRS)!r}")
    series = headers[0].series_uid
    mosaic = [h for h in headers if h.mosaic]
    if mosaic:
        raise InputError(f"DICOM series {series!r}: {_names(mosaic)} are Siemens mosaics (ImageType MOSAIC: "
                         "several slices tiled in one image, whose position is not a slice's); not supported, "
                         "convert the series first (e.g. dcm2niix, or nibabel.nicom's MosaicWrapper)")
    multi = [h for h in headers if h.frames > 1 and h.frame is None]
    if multi:
        raise InputError(f"DICOM series {series!r}: multi-frame file(s) {_names(multi)} are not supported yet "
                         "(only enhanced multi-frame files with PerFrameFunctionalGroupsSequence are)")
    if len(headers) > 1 or headers[0].iop is not None:
        missing = [h for h in headers if h.iop is None or h.ipp is None]
        if missing:
            raise InputError(f"DICOM series {series!r}: no ImagePositionPatient/ImageOrientationPatient in {_names(missing)}")
    headers = _majority(headers, lambda h: (h.rows, h.cols), "size (Rows, Columns)", series, "size" in fixes)
    if headers[0].iop is None:  # a lone slice without geometry tags
        h = headers[0]
        return SeriesGeometry(headers, (h.thickness or 1.0, *h.pixel_spacing), (0.0, 0.0, 0.0),
                              ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), False)
    headers = _majority(headers, lambda h: tuple(round(v, 4) for v in h.iop), "orientation (ImageOrientationPatient)",
                        series, "orientation" in fixes)
    row = np.asarray(headers[0].iop[:3]); col = np.asarray(headers[0].iop[3:])  # noqa: E702
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    pos = np.array([np.dot(h.ipp, normal) for h in headers])
    order = np.argsort(pos, kind="stable")
    headers = [headers[i] for i in order]
    pos = pos[order]
    steps = np.diff(pos)
    irregular = False
    if len(headers) > 1:
        med = float(np.median(steps))
        dup = np.flatnonzero(steps <= max(1e-3, 1e-3 * abs(med)))
        if dup.size:
            pairs = [h for i in dup for h in (headers[i], headers[i + 1])]
            if "duplicates" not in fixes:
                raise InputError(f"DICOM series {series!r}: duplicate slice positions in {_names(pairs)}; "
                                 "repair=['duplicates'] keeps one file per position")
            keep = [0] + [i + 1 for i in range(len(steps)) if i not in set(dup.tolist())]
            log.warning("DICOM series %r: dropping %d duplicate slice(s)", series, len(headers) - len(keep))
            headers, pos = [headers[i] for i in keep], pos[keep]
            steps = np.diff(pos)
            med = float(np.median(steps)) if steps.size else (headers[0].thickness or 1.0)
        gaps = np.flatnonzero(steps > 1.5 * med)
        uneven = np.flatnonzero(np.abs(steps - med) > tolerance * med)
        if gaps.size or uneven.size:
            irregular = True
            if "spacing" not in fixes:
                if gaps.size:
                    where = [h for i in gaps for h in (headers[i], headers[i + 1])]
                    raise InputError(f"DICOM series {series!r}: missing slice(s): gap(s) of "
                                     f"{', '.join(f'{steps[i]:.4g}' for i in gaps)} mm (median step {med:.4g} mm) "
                                     f"between {_names(where)}; repair=['spacing'] reads it anyway")
                where = [h for i in uneven for h in (headers[i], headers[i + 1])]
                raise InputError(f"DICOM series {series!r}: non-uniform slice spacing: steps "
                                 f"{', '.join(f'{steps[i]:.4g}' for i in uneven[:6])} mm vs median {med:.4g} mm "
                                 f"(tolerance {tolerance:g}) between {_names(where)}; repair=['spacing'] reads it anyway")
        first, last = np.asarray(headers[0].ipp), np.asarray(headers[-1].ipp)
        along = (last - first) - np.dot(last - first, normal) * normal
        if np.linalg.norm(along) > tolerance * med * (len(headers) - 1) + 1e-3:
            raise InputError(f"DICOM series {series!r}: slices are not stacked along their normal (tilted or sheared "
                             f"acquisition, in-plane drift {np.linalg.norm(along):.4g} mm from {_names(headers[:1])} "
                             f"to {_names(headers[-1:])}); not supported")
        dz = med
    else:
        dz = headers[0].thickness or 1.0
    dy, dx = headers[0].pixel_spacing
    origin = tuple(float(v) for v in headers[0].ipp[::-1])
    direction = (tuple(float(v) for v in normal[::-1]), tuple(float(v) for v in col[::-1]),
                 tuple(float(v) for v in row[::-1]))
    return SeriesGeometry(headers, (float(dz), float(dy), float(dx)), origin, direction, irregular)  # type: ignore[arg-type]
