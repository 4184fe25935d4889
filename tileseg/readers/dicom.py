"""DICOM reader (pydicom): one series as a lazy ``(z, y, x)`` volume in physical units.

What it opens
-------------
A DICOM file (``.dcm`` name, or the 128-byte preamble + ``DICM``), a series
folder, a study/archive tree, or a DICOMDIR (a file-set's directory: the files
it references, read with :class:`pydicom.fileset.FileSet`; a referenced file
that is missing or outside the DICOMDIR's folder is an error). In a tree, the
files referenced by any DICOMDIR are added to those found by their preamble.
Local paths only. Headers are scanned once with ``stop_before_pixels=True``.

Items
-----
A tree holding several series expands (:func:`tileseg.readers.expand_inputs`,
through :meth:`DicomReader.list_items`) to one item per series,
``<folder>#<key>``, where ``key`` is the SeriesInstanceUID when it is a
well-formed UID (digits and dots, <= 64 characters) and ``series-<sha1[:16]>``
of it otherwise; :func:`~tileseg.readers.item_stem` gives ``key`` restricted to
``[A-Za-z0-9._-]``, so a header value such as ``../evil`` never reaches an
output path. Patient names and IDs are never used in names, logs or errors.
Options ``series`` (a UID, a key or ``"largest"``), ``series_description``
and ``modality`` select one series when a path holds several.

The image
---------
* ``data``: slices sorted by the projection of ImagePositionPatient on the
  normal ``cross(IOP[0:3], IOP[3:6])`` (never by file name or
  InstanceNumber); one dask chunk per slab of ``chunks`` slices (16 by
  default), decoded inside its task. RescaleSlope/Intercept are applied per
  slice (CT in HU): int16/int32 when every slope and intercept is an integer
  (the smallest holding the declared stored range; no rescale keeps the
  stored dtype), else float32.
* geometry (see :mod:`tileseg.geometry`, "3D patient space"): ``spacing``
  ``(median step along the normal, PixelSpacing[0], PixelSpacing[1])``,
  ``origin`` the first slice's IPP reversed (``(z, y, x)`` of LPS),
  ``direction`` rows the normal, IOP[3:6] and IOP[0:3] reversed likewise,
  ``units`` millimeter.
* ``attrs["dicom"]`` (JSON-friendly, copied to outputs, no patient data):
  StudyInstanceUID, SeriesInstanceUID, FrameOfReferenceUID, SOPClassUID,
  Modality, SeriesDescription, ``SOPInstanceUIDs`` (sorted order; for an
  enhanced multi-frame source also ``FrameNumbers``, 1-based, same order),
  ``rescale`` (slope/intercept per slice when they differ, else one pair),
  ``rescale_applied: true`` (so :func:`tileseg.methods.thresholds.fixed_physical`
  does not rescale again), ``irregular_spacing``, TransferSyntaxUID.
  Source file paths are **not** in ``attrs`` (local paths, and archive folder
  names often hold patient names, would leak into outputs): they are in
  ``reader_info["files"]`` (sorted order); a DICOM SEG writer locates the
  sources from the item (``Image.source``) and the SOPInstanceUIDs.

Checks
------
Each an :class:`~tileseg.errors.InputError` naming the series and files:
mixed orientations, differing Rows/Columns, duplicate positions, missing
slices (a step > 1.5 x the median), non-uniform steps (``spacing_tolerance``,
default 1 % of the step), tilted stacks, multi-frame files without
per-frame functional groups, pixel data shorter than
Rows x Columns x SamplesPerPixel x frames x BitsAllocated/8 (uncompressed
syntaxes; checked on the header and again when decoding single-frame files).
Enhanced CT/MR files (PerFrameFunctionalGroupsSequence) are read frame by
frame (position, orientation, spacing and rescale per frame or shared) and
sorted and checked like single-frame files. Colour images (SamplesPerPixel > 1),
multi-frame files without functional groups (RT dose, NM, US) and Siemens
mosaics (ImageType MOSAIC: slices tiled in one image) are refused.
``repair=["duplicates" | "orientation" | "size" | "spacing"]`` (or ``True``)
opts into dropping duplicates / minority files or accepting uneven steps,
with a logged warning. A compressed transfer syntax without a working decoder
fails at compute time naming the syntax and ``tileseg[medical-codecs]``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ..errors import ConfigError, FormatError, InputError, require
from ..image import Image
from ._dicom_series import SliceHeader, assemble, dicom_files, is_dicom_file, scan, series_key
from ._slab_cache import SLAB_CACHE
from .base import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Reader, check_budget, local_path

log = logging.getLogger(__name__)

#: Slices per dask chunk.
DEFAULT_CHUNK_SLICES = 16
_CODECS_HINT = "pip install 'tileseg[medical-codecs]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls)"


def split_item(path: str) -> tuple[str, str | None]:
    """``("folder", "key")`` for an item ``"folder#key"``; ``(path, None)`` otherwise.

    >>> split_item("/data/study#1.2.3"), split_item("/data/a.dcm")
    (('/data/study', '1.2.3'), ('/data/a.dcm', None))
    """
    base, sep, frag = str(path).rpartition("#")
    if sep and frag and "/" not in frag and os.sep not in frag:
        return base, frag
    return str(path), None


def source_files(source: str, series_uid: str, sop_uids: list[str]) -> list[str]:
    """The files of the slices ``sop_uids`` (in that order) of series ``series_uid`` found under ``source``.

    For writers that must reference the source instances (DICOM SEG) after the
    reader's own file list was dropped: ``source`` is the item (``"study#key"``,
    a folder or a file) that the image was read from.

    Raises
    ------
    InputError
        A slice is no longer found under ``source`` (named by its position, never by patient data).
    """
    root, _ = split_item(source)
    by_uid = {h.sop_uid: h.path for h in scan(root).get(series_uid, [])}
    missing = [i for i, u in enumerate(sop_uids) if u not in by_uid]
    if missing:
        raise InputError(f"{root!r}: {len(missing)} source slice(s) of series {series_uid} not found "
                         f"(first: slice {missing[0]})")
    return [by_uid[u] for u in sop_uids]


class SliceSource:
    """Array-like ``(z, rows, cols)`` over sorted DICOM files; ``__getitem__`` decodes one slab. Picklable."""

    def __init__(self, headers: list[SliceHeader], dtype: Any, series: str) -> None:
        self.files = [h.path for h in headers]
        self.frames = [h.frame for h in headers]
        self.rescale = [(h.slope, h.intercept) for h in headers]
        self.expected = [h.rows * h.cols * h.samples * h.frames * h.bits_allocated // 8 for h in headers]
        self.series = series
        self.shape = (len(headers), headers[0].rows, headers[0].cols)
        self.dtype = np.dtype(dtype)
        self.ndim = 3
        self.token = series  # identifies the files' contents in the slab cache (set by the reader)
        self.unit = DEFAULT_CHUNK_SLICES  # slices per slab cache entry (set by the reader)

    def _name(self, k: int) -> str:
        name = os.path.basename(self.files[k])
        return name if self.frames[k] is None else f"{name} frame {self.frames[k] + 1}"

    def _decode_error(self, k: int, ts: Any, exc: Exception) -> Exception:
        if ts.is_compressed:
            return FormatError(f"DICOM series {self.series!r}: cannot decode {self._name(k)!r}: transfer syntax "
                               f"{ts.name!r} ({ts}) needs a decoder that is missing or failed "
                               f"({' '.join(str(exc).split())}); {_CODECS_HINT}")
        return InputError(f"DICOM series {self.series!r}: cannot decode {self._name(k)!r}: {exc}")

    def _read(self, k: int, **kwargs: Any) -> Any:
        import pydicom

        try:
            return pydicom.dcmread(self.files[k], **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"DICOM series {self.series!r}: cannot read {self._name(k)!r}: {exc}") from exc

    def _single(self, k: int) -> np.ndarray:
        """The stored values of the single-frame file of slice ``k`` (its length checked first)."""
        ds = self._read(k)
        ts = ds.file_meta.TransferSyntaxUID
        have = len(ds.get("PixelData", b"") or b"")
        if not ts.is_compressed and have < self.expected[k]:
            raise InputError(f"DICOM series {self.series!r}: {self._name(k)!r} is truncated: "
                             f"{have} bytes of pixel data, {self.expected[k]} expected")
        try:
            return ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoder plugins raise anything
            raise self._decode_error(k, ts, exc) from exc

    def _frames(self, ks: list[int]) -> list[np.ndarray]:
        """The stored values of slices ``ks``, frames of one multi-frame file, parsed and decoded in one pass."""
        from pydicom.pixels import iter_pixels

        ts = self._read(ks[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
        wanted = sorted({self.frames[k] for k in ks})
        try:  # pydicom reads only the bytes of the wanted frames
            decoded = dict(zip(wanted, iter_pixels(self.files[ks[0]], indices=wanted)))
        except Exception as exc:  # noqa: BLE001 - decoder plugins raise anything
            raise self._decode_error(ks[0], ts, exc) from exc
        return [decoded[self.frames[k]] for k in ks]

    def _finish(self, k: int, raw: np.ndarray) -> np.ndarray:
        """Shape check and rescale of slice ``k``'s stored values."""
        if raw.shape != self.shape[1:]:
            raise InputError(f"DICOM series {self.series!r}: {self._name(k)!r} decodes to shape {raw.shape!r}, "
                             f"expected {self.shape[1:]!r}")
        slope, intercept = self.rescale[k]
        if (slope, intercept) == (1.0, 0.0):
            return raw.astype(self.dtype, copy=False)
        if self.dtype.kind == "f":
            return (raw.astype(np.float64) * slope + intercept).astype(self.dtype)
        return (raw.astype(np.int64) * int(slope) + int(intercept)).astype(self.dtype)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        zs, ys, xs = (tuple(key) + (slice(None),) * 3)[:3]
        ks = list(range(*zs.indices(self.shape[0])))
        if not ks:
            return np.empty((0,) + np.empty(self.shape[1:])[ys, xs].shape, dtype=self.dtype)
        whole = all(s.indices(n) == (0, n, 1) for s, n in zip((ys, xs), self.shape[1:]))
        if whole:  # a whole slab is read once by its consumer: not cached
            return self._planes(ks, ys, xs)
        # a part of the planes (an owner's region): whole planes decoded once per cache unit of
        # ``self.unit`` slices, cropped by every owner under them
        if zs.indices(self.shape[0])[2] != 1:
            return self._planes(ks, ys, xs)
        out = []
        for start in range(ks[0] - ks[0] % self.unit, ks[-1] + 1, self.unit):
            unit = list(range(start, min(start + self.unit, self.shape[0])))
            slab = SLAB_CACHE.get((self.token, str(self.dtype), start, len(unit)),
                                  lambda unit=unit: self._planes(unit, slice(None), slice(None)))
            lo, hi = max(ks[0], start) - start, min(ks[-1] + 1, start + len(unit)) - start
            out.append(slab[lo:hi, ys, xs])
        return np.concatenate(out) if len(out) > 1 else np.array(out[0])

    def _planes(self, ks: list[int], ys: slice, xs: slice) -> np.ndarray:
        """Slices ``ks`` decoded and rescaled, cropped to ``ys, xs``."""
        planes: dict[int, np.ndarray] = {}
        multi: dict[str, list[int]] = {}  # enhanced multi-frame file -> its slices in this slab
        for k in ks:
            if self.frames[k] is None:
                planes[k] = self._finish(k, self._single(k))[ys, xs]
            else:
                multi.setdefault(self.files[k], []).append(k)
        for group in multi.values():
            for k, raw in zip(group, self._frames(group)):
                planes[k] = self._finish(k, raw)[ys, xs]
        return np.stack([planes[k] for k in ks])


def region_chunks(data: Any, chunks: tuple[tuple[int, ...], ...]) -> Any:
    """The reader's lazy volume ``data`` re-made with ``(y, x)`` chunks ``chunks[1:]``, or None if ``data`` is not one.

    For the engine's owner tasks, which each read their own region: a chunk
    then holds a part of the planes, cut from whole planes decoded once per
    cache unit (:data:`~tileseg.readers._slab_cache.SLAB_CACHE`). The z-chunks
    become a multiple of the reader's slab of at least a quarter of
    ``chunks[0]``'s largest, so an owner reads little beyond its region.
    Values are those of ``data``.
    """
    import dask.array as da
    from dask.base import tokenize

    name = getattr(data, "name", "")
    if not (isinstance(name, str) and name.startswith("dicom-")) or data.ndim != 3:
        return None
    source = data.__dask_graph__().get(f"original-{name}")
    if not isinstance(source, SliceSource) or tuple(sum(c) for c in chunks[1:]) != tuple(data.shape[1:]):
        return None
    unit = source.unit
    cz = max(unit, -(-max(chunks[0]) // 4 // unit) * unit)
    new = ((cz,) * (data.shape[0] // cz) + ((data.shape[0] % cz,) if data.shape[0] % cz else ()),
           tuple(chunks[1]), tuple(chunks[2]))
    return da.from_array(source, chunks=new, name=f"{name}-{tokenize(new)}", asarray=False, fancy=False,
                         meta=data._meta)


def output_dtype(headers: list[SliceHeader]) -> np.dtype:
    """dtype of the rescaled volume (see the module docstring)."""
    h0 = headers[0]
    if h0.samples != 1:
        raise InputError(f"DICOM series {h0.series_uid!r}: {h0.samples} samples per pixel (colour) is not supported")
    if all((h.slope, h.intercept) == (1.0, 0.0) for h in headers):
        kind = "i" if h0.signed else "u"
        return np.dtype(f"{kind}{max(h0.bits_allocated // 8, 1)}")
    if not all(float(h.slope).is_integer() and float(h.intercept).is_integer() for h in headers):
        return np.dtype(np.float32)
    lo = -(2 ** (h0.bits_stored - 1)) if h0.signed else 0
    hi = 2 ** (h0.bits_stored - 1) - 1 if h0.signed else 2**h0.bits_stored - 1
    ends = [v * h.slope + h.intercept for h in headers for v in (lo, hi)]
    return np.dtype(np.int16) if min(ends) >= -(2**15) and max(ends) < 2**15 else np.dtype(np.int32)


def _matching(groups: dict[str, list[SliceHeader]], where: str, key: str | None, series: Any,
              description: str | None, modality: str | None) -> list[str]:
    """UIDs of the series matching the selection (``series="largest"``: the one with most slices).

    Raises
    ------
    InputError
        Nothing matches (the message lists the series).
    """
    found = list(groups.items())
    if key is not None:
        found = [(u, hs) for u, hs in found if series_key(u) == key or u == key]
    if series is not None and series != "largest":
        found = [(u, hs) for u, hs in found if u == str(series) or series_key(u) == str(series)]
    if description is not None:
        found = [(u, hs) for u, hs in found if hs[0].description.lower() == str(description).lower()]
    if modality is not None:
        found = [(u, hs) for u, hs in found if hs[0].modality.upper() == str(modality).upper()]
    listing = "; ".join(f"{series_key(u)} ({hs[0].modality}, {hs[0].description!r}, {len(hs)} file(s))"
                        for u, hs in groups.items())
    if not found:
        raise InputError(f"{where!r}: no DICOM series matches the selection (series available: {listing})")
    if series == "largest":
        found = [max(found, key=lambda t: len(t[1]))]
    return [u for u, _ in found]


def _select(groups: dict[str, list[SliceHeader]], where: str, key: str | None, series: Any,
            description: str | None, modality: str | None) -> list[SliceHeader]:
    found = _matching(groups, where, key, series, description, modality)
    listing = "; ".join(f"{series_key(u)} ({hs[0].modality}, {hs[0].description!r}, {len(hs)} file(s))"
                        for u, hs in groups.items())
    if len(found) > 1:
        raise InputError(f"{where!r} holds {len(found)} DICOM series: select one with series=<UID>|'largest', "
                         f"series_description or modality, or expand the folder into items "
                         f"(series available: {listing})")
    return groups[found[0]]


class DicomReader(Reader):
    """Open one DICOM series lazily with pydicom (see the module docstring)."""

    name = "dicom"

    @classmethod
    def can_open(cls, path: str, storage_options: dict[str, Any] | None = None) -> bool:
        """``.dcm`` names, files with the DICM preamble, or folders whose tree holds such files."""
        local = local_path(split_item(str(path))[0])
        if local is None or not os.path.exists(local):
            return False
        if os.path.isfile(local):
            return local.lower().endswith(".dcm") or os.path.basename(local).upper() == "DICOMDIR" or is_dicom_file(local)
        seen = 0
        for root, dirs, files in os.walk(local):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(".zarr"))
            for name in sorted(files):
                if name.startswith(".") or name.endswith((".json", ".zarray", ".zattrs", ".zgroup")):
                    continue
                if is_dicom_file(os.path.join(root, name)):
                    return True
                seen += 1
                if seen >= 64:
                    return False
        return False

    @classmethod
    def list_items(cls, path: str, storage_options: dict[str, Any] | None = None,
                   options: dict[str, Any] | None = None) -> list[str] | None:
        """One item per series (``path#key``) when ``path`` holds several series, else ``None``.

        The selection options (``series``, ``series_description``, ``modality``)
        in ``options`` keep only the series they match.
        """
        local = local_path(path)
        if local is None or split_item(path)[1] is not None:
            return None
        require("pydicom", "medical")
        groups = scan(local)
        if len(groups) <= 1:
            return None
        opts = options or {}
        keys = [series_key(u) for u in _matching(groups, path, None, opts.get("series"),
                                                 opts.get("series_description"), opts.get("modality"))]
        return [f"{path.rstrip('/') or '/'}#{key}" for key in keys]

    def open(
        self,
        path: str,
        *,
        series: Any = None,
        series_description: str | None = None,
        modality: str | None = None,
        chunks: int | None = None,
        spacing_tolerance: float = 0.01,
        repair: Any = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        array: str | None = None,
        level: int | None = None,
        storage_options: dict[str, Any] | None = None,
        axes: Any = None,
        **options: Any,
    ) -> Image:
        """Open the (selected) series under ``path`` lazily.

        Parameters
        ----------
        path : str
            A file, a series folder, a study tree, or an item ``folder#key``.
        series, series_description, modality
            Selection when ``path`` holds several series.
        chunks : int, optional
            Slices per dask chunk (default 16).
        spacing_tolerance : float
            Relative tolerance of slice steps around the median.
        repair : bool or list of str
            Opt-in repairs, see :func:`tileseg.readers._dicom_series.assemble`.

        Raises
        ------
        InputError
            Inconsistent series (see the module docstring), ambiguous selection.
        FormatError
            No DICOM image under ``path``.
        """
        require("pydicom", "medical")
        import dask.array as da
        from dask.base import tokenize

        if options:
            raise ConfigError(f"dicom reader: unknown option(s) {sorted(options)!r}")
        if array is not None or level not in (None, 0) or axes is not None:
            raise InputError(f"{path!r}: the dicom reader takes no array/level/axes")
        base, key = split_item(path)
        local = local_path(base)
        if local is None:
            raise InputError(f"{path!r}: the dicom reader reads local paths only")
        if not dicom_files(local):
            raise FormatError(f"{path!r}: no DICOM file found")
        groups = scan(local)
        if not groups:
            raise FormatError(f"{path!r}: DICOM file(s) without image pixel data")
        headers = _select(groups, path, key, series, series_description, modality)
        uid = headers[0].series_uid
        try:
            geo = assemble(headers, tolerance=float(spacing_tolerance), repair=repair)
        except InputError as exc:  # the series' checks name its files; say which folder they are in
            raise InputError(f"{path!r}: {exc}") from None
        headers = geo.headers
        dtype = output_dtype(headers)
        for h in headers:
            need = h.rows * h.cols * h.samples * h.frames * h.bits_allocated // 8
            if h.pixel_bytes is not None and h.pixel_bytes < need:
                raise InputError(f"{path!r}: DICOM series {uid!r}: {os.path.basename(h.path)!r} is truncated: "
                                 f"{h.pixel_bytes} bytes of pixel data, {need} expected")
        shape = (len(headers), headers[0].rows, headers[0].cols)
        check_budget(path, shape, dtype, max_pixels=max_pixels, max_bytes=max_bytes)
        cz = int(chunks) if chunks is not None else DEFAULT_CHUNK_SLICES
        if cz < 1:
            raise ConfigError(f"chunks={chunks!r}: give a positive number of slices per chunk")
        source = SliceSource(headers, dtype, uid)
        stats = [(h.path, os.path.getmtime(h.path), os.path.getsize(h.path)) for h in headers]
        source.token, source.unit = tokenize(stats, str(dtype), cz), min(cz, shape[0])
        data = da.from_array(source, chunks=(min(cz, shape[0]), shape[1], shape[2]),
                             name=f"dicom-{source.token}", asarray=False, fancy=False,
                             meta=np.empty((0, 0, 0), dtype=dtype))
        rescale = sorted({(h.slope, h.intercept) for h in headers})
        h0 = headers[0]
        meta = {
            "StudyInstanceUID": h0.study_uid, "SeriesInstanceUID": uid, "FrameOfReferenceUID": h0.frame_uid,
            "SOPClassUID": h0.sop_class, "Modality": h0.modality, "SeriesDescription": h0.description,
            "TransferSyntaxUID": sorted({h.transfer_syntax for h in headers}),
            "SOPInstanceUIDs": [h.sop_uid for h in headers],
            **({"FrameNumbers": [None if h.frame is None else h.frame + 1 for h in headers]}
               if any(h.frame is not None for h in headers) else {}),
            "rescale": ({"slope": rescale[0][0], "intercept": rescale[0][1]} if len(rescale) == 1 else
                        {"slope": [h.slope for h in headers], "intercept": [h.intercept for h in headers]}),
            "rescale_applied": True, "irregular_spacing": geo.irregular,
        }
        log.debug("DICOM series %r: %d slice(s) of %dx%d, %s", uid, shape[0], shape[1], shape[2], dtype)
        return Image(
            data=data, axes=("z", "y", "x"), spacing=geo.spacing, origin=geo.origin, direction=geo.direction,
            units=("millimeter",) * 3, attrs={"dicom": meta},
            reader_info={"files": [h.path for h in headers], "series_key": series_key(uid)},
            source=path, format=self.name,
        )
