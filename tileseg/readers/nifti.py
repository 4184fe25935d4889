"""NIfTI reader (nibabel): ``.nii`` and ``.nii.gz`` files (NIfTI-1 and NIfTI-2), lazily.

What it opens
-------------
Local single files named ``*.nii`` or ``*.nii.gz`` (not ``.hdr``/``.img``
pairs). Needs the ``medical`` extra (``pip install 'tileseg[medical]'``).

The image
---------
* ``data``: nibabel indexes voxels ``(i, j, k)`` = ``(x, y, z)``; tileseg's
  ``("z", "y", "x")`` array is that array transposed (lazily, in dask).
  A 4th dimension of length 1 (and any further length-1 dimension) is
  dropped; a 4th (or 5th) dimension with several entries (time points,
  vector components, several volumes) becomes the channel axis ``c``, so a
  ``(X, Y, Z, T)`` file gives axes ``("c", "z", "y", "x")``. More than one
  non-singleton extra dimension is refused. A 2-D file gets ``z`` of length 1.
* Reading goes through ``img.dataobj`` (nibabel's array proxy), one dask chunk
  per slab of slices along the **last (slowest) axis k (= z)**, about
  ``TARGET_CHUNK_BYTES`` each. A ``.nii.gz`` is a gzip stream: gzip
  decompresses from the start of the file for every read, so any other
  chunking would decompress the same bytes many times over; slabs along z are
  contiguous in the file. ``chunks=n`` sets the slab thickness;
  ``chunks=(z, y, x)`` chunks freely, for uncompressed ``.nii`` only.
* ``class_names`` (integer data) and ``nodata``: from the JSON record the
  nifti writer stores in a header extension (code 6); otherwise none.
* Values are what ``dataobj`` gives: ``scl_slope``/``scl_inter`` applied when
  set (then floating point); the header values are in ``attrs``
  (``scl_slope``, ``scl_inter``, ``scaling_applied``).
* Geometry: the sform when its code is > 0, else the qform when its code is
  > 0, else nibabel's fallback from the voxel sizes (``attrs["affine_source"]``
  says which). NIfTI affines map to RAS; the LPS affine
  (:func:`tileseg.geometry.lps_from_ras_affine`) gives ``spacing``, ``origin``
  and ``direction`` through :func:`tileseg.geometry.geometry_from_world_affine`.
  A sheared affine (non-orthogonal axes) is refused. ``units`` from
  ``xyzt_units`` (``"millimeter"``, ``"meter"``, ``"micrometer"``, else ``None``).

Errors
------
A missing file: :class:`~tileseg.errors.ImageNotFoundError`; a file nibabel
cannot parse: :class:`~tileseg.errors.FormatError`; an uncompressed file
shorter than its header declares: :class:`~tileseg.errors.InputError` at
open; a truncated or corrupt ``.nii.gz``: :class:`~tileseg.errors.InputError`
at compute time, naming the file and the slab. All name the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import numpy as np

from ..errors import ConfigError, FormatError, ImageNotFoundError, InputError, require
from ..geometry import geometry_from_world_affine, lps_from_ras_affine
from ..image import Image
from .base import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Reader, check_budget, local_path

log = logging.getLogger(__name__)

#: Target bytes per dask chunk (a slab of whole z-slices).
TARGET_CHUNK_BYTES = 64 * 2**20
#: NIFTI_ECODE_COMMENT: the header extension code holding tileseg's JSON record (see the nifti writer).
ECODE = 6
_UNITS = {"mm": "millimeter", "meter": "meter", "micron": "micrometer"}


def is_nifti_name(path: str) -> bool:
    """Whether ``path`` is named like a single-file NIfTI (``.nii``/``.nii.gz``)."""
    name = str(path).split("?", 1)[0].rstrip("/").lower()
    return name.endswith((".nii", ".nii.gz"))


def load(path: str) -> Any:
    """``nibabel.load(path)`` with errors naming the file.

    Raises
    ------
    ImageNotFoundError, FormatError
    """
    nib = require("nibabel", "medical")
    if not os.path.exists(path):
        raise ImageNotFoundError(f"{path!r} does not exist")
    try:
        img = nib.load(path)
    except Exception as exc:
        raise FormatError(f"{path!r} is not a readable NIfTI file: {exc}") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise FormatError(f"{path!r} is a {type(img).__name__}, not a single-file NIfTI image")
    return img


def tileseg_record(header: Any) -> dict[str, Any] | None:
    """tileseg's JSON record from a NIfTI header's extensions, or ``None``."""
    for ext in getattr(header, "extensions", ()):
        if ext.get_code() != ECODE:
            continue
        try:
            doc = json.loads(bytes(ext.get_content()).rstrip(b"\x00").decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("tileseg"), dict):
            return doc["tileseg"]
    return None


class _ProxySource:
    """Array-like over a NIfTI file's data proxy, in nibabel's index order; picklable.

    Each ``__getitem__`` reopens the file (cheap: the header only) and reads
    one region through ``dataobj``; read errors name the file and region.
    """

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            block = np.asanyarray(load(self.path).dataobj[key])
        except Exception as exc:
            raise InputError(f"{self.path!r}: cannot read region {key!r} (truncated or corrupt file?): {exc}") from exc
        return np.ascontiguousarray(block.reshape(_region_shape(key, self.shape)), dtype=self.dtype)


def _region_shape(key: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    key = key if isinstance(key, tuple) else (key,)
    key = key + (slice(None),) * (len(shape) - len(key))
    return tuple(len(range(*k.indices(n))) for k, n in zip(key, shape))


def _affine(img: Any) -> tuple[np.ndarray, str]:
    hdr = img.header
    for name in ("sform", "qform"):
        affine, code = getattr(hdr, f"get_{name}")(coded=True)
        if affine is not None and int(code) > 0:
            return np.asarray(affine, dtype=float), name
    return np.asarray(hdr.get_best_affine(), dtype=float), "voxel sizes"


def _geometry(affine: np.ndarray, affine_source: str, source: str) -> tuple[Any, Any, Any]:
    """``(spacing, origin, direction)`` in ``(z, y, x)`` order from a RAS affine; a sheared one is refused."""
    try:
        spacing, origin, direction = geometry_from_world_affine(lps_from_ras_affine(affine))
        d = np.asarray(direction)
        if not np.allclose(d @ d.T, np.eye(3), atol=1e-4):
            raise ValueError(f"sheared affine {affine.tolist()!r} (axes not orthogonal)")
    except ValueError as exc:
        raise FormatError(f"{source!r}: unusable affine ({affine_source}): {exc}") from exc
    return spacing, origin, direction


def _attrs(img: Any, affine_source: str) -> dict[str, Any]:
    """Header facts a writer may carry: scaling, xform codes, description, intent."""
    hdr = img.header
    # nibabel moves scl_slope/scl_inter from the header into the proxy at load
    slope, inter = (_finite(getattr(img.dataobj, k, None)) for k in ("slope", "inter"))
    return {
        "scl_slope": slope, "scl_inter": inter,
        "scaling_applied": slope not in (None, 0.0) and (slope, inter or 0.0) != (1.0, 0.0),
        "affine_source": affine_source, "sform_code": int(hdr["sform_code"]),
        "qform_code": int(hdr["qform_code"]), "descrip": _text(hdr["descrip"]),
        "intent_code": int(hdr["intent_code"]), "intent_name": _text(hdr["intent_name"]),
    }


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _slab_chunks(chunks: Any, zyx: tuple[int, int, int], itemsize: int, n_c: int, gz: bool,
                 source: str) -> tuple[int, int, int]:
    """Dask chunk ``(z, y, x)``: whole slices by default (see the module docstring)."""
    z, y, x = zyx
    if chunks is None:
        return max(1, min(z, TARGET_CHUNK_BYTES // max(1, y * x * itemsize * n_c))), y, x
    if isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool):
        if chunks < 1:
            raise ConfigError(f"chunks={chunks!r}: the slab thickness must be a positive int")
        return min(int(chunks), z), y, x
    try:
        c = tuple(int(v) for v in chunks)
    except (TypeError, ValueError):
        c = ()
    if len(c) != 3 or min(c) < 1:
        raise ConfigError(f"chunks={chunks!r}: give a slab thickness (int) or (z, y, x) positive ints")
    c = (min(c[0], z), min(c[1], y), min(c[2], x))
    if gz and c[1:] != (y, x):
        raise ConfigError(f"{source!r}: a .nii.gz is read in slabs of whole z-slices (gzip decompresses from the "
                          f"start for every read); chunks={chunks!r} would split slices: give a slab thickness")
    return c


class NiftiReader(Reader):
    """Open ``.nii``/``.nii.gz`` files lazily with nibabel (see the module docstring)."""

    name = "nifti"

    @classmethod
    def can_open(cls, path: str, storage_options: dict[str, Any] | None = None) -> bool:
        """Whether ``path`` is named ``*.nii`` or ``*.nii.gz``."""
        return is_nifti_name(path)

    def open(
        self,
        path: str,
        *,
        chunks: Any = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        array: str | None = None,
        level: int | None = None,
        storage_options: dict[str, Any] | None = None,
        axes: Any = None,
        **options: Any,
    ) -> Image:
        """Open a NIfTI file lazily.

        Parameters
        ----------
        path : str
            Local ``.nii`` or ``.nii.gz`` file.
        chunks : int or (int, int, int), optional
            Slab thickness along z (default: slabs of about 64 MiB), or
            ``(z, y, x)`` chunks for an uncompressed ``.nii``.
        max_pixels, max_bytes : int or None
            Size budget checked on the header before anything is read.

        Returns
        -------
        Image
            Axes ``("z", "y", "x")`` or ``("c", "z", "y", "x")``.

        Raises
        ------
        ImageNotFoundError, FormatError, InputError, ImageTooLargeError, ConfigError
        """
        import dask.array as da
        from dask.base import tokenize

        if options:
            raise ConfigError(f"unknown nifti reader option(s) {sorted(options)!r}")
        local = local_path(str(path))
        if local is None or storage_options:
            raise InputError(f"{path!r}: the nifti reader reads local files only (download it first)")
        if array or level:
            raise InputError(f"{path!r}: a NIfTI file has no named arrays or resolution levels")
        if axes is not None and "".join(axes).lower() not in ("zyx", "czyx"):
            raise InputError(f"{path!r}: a NIfTI file is always read as 'zyx' (or 'czyx'), not {axes!r}")
        img = load(local)
        hdr = img.header
        stored = tuple(int(s) for s in img.shape)
        gz = local.lower().endswith(".gz")
        if len(stored) < 2:
            raise FormatError(f"{path!r}: a {len(stored)}-D NIfTI file is not an image")
        if len(stored) == 2:
            stored_read, add_z = stored, True
            stored = stored + (1,)
        else:
            stored_read, add_z = stored, False
        extra = [i for i in range(3, len(stored)) if stored[i] > 1]
        if len(extra) > 1:
            raise InputError(f"{path!r} has shape {stored!r}: more than one non-singleton dimension after x, y, z; "
                             "tileseg segments one 3-D image (optionally with channels) at a time")
        n_c = stored[extra[0]] if extra else 0
        probe_key = tuple(slice(0, 1) for _ in stored_read)
        try:
            dtype = np.asanyarray(img.dataobj[probe_key]).dtype.newbyteorder("=")
        except Exception as exc:
            raise InputError(f"{path!r}: cannot read the first voxel (truncated or corrupt file?): {exc}") from exc
        if dtype.kind not in "biuf":
            raise FormatError(f"{path!r}: unsupported voxel type {dtype} (complex/RGB NIfTI is not supported)")
        zyx = (stored[2], stored[1], stored[0])
        check_budget(local, (max(n_c, 1),) + zyx, dtype, max_pixels=max_pixels, max_bytes=max_bytes)
        if not gz:
            itemsize = np.dtype(hdr.get_data_dtype()).itemsize
            need = int(getattr(img.dataobj, "offset", 0)) + math.prod(stored_read) * itemsize
            size = os.path.getsize(local)
            if size < need:
                raise InputError(f"{path!r} is truncated: {size} bytes, its header declares {need}")
        cz, cy, cx = _slab_chunks(chunks, zyx, dtype.itemsize, max(n_c, 1), gz, str(path))
        st = os.stat(local)
        token = tokenize(local, st.st_size, st.st_mtime_ns, (cz, cy, cx))
        src = _ProxySource(local, stored_read, dtype)
        dchunks = [(cx,), (cy,), (cz,)][: len(stored_read)] + [(s,) for s in stored_read[3:]]
        data = da.from_array(src, chunks=tuple(c[0] for c in dchunks), name=f"nifti-{token}", asarray=False,
                             fancy=False, meta=np.empty((0,) * len(stored_read), dtype=dtype))
        if add_z:
            data = data[:, :, None]
        index = tuple(slice(None) if i < 3 or i in extra else 0 for i in range(len(stored)))
        data = data[index]
        data = data.transpose((3, 2, 1, 0) if n_c else (2, 1, 0))
        affine, affine_source = _affine(img)
        spacing, origin, direction = _geometry(affine, affine_source, str(path))
        attrs = _attrs(img, affine_source)
        unit = _UNITS.get(hdr.get_xyzt_units()[0])
        reader_info = {"path": local, "stored_shape": list(stored), "stored_dtype": str(hdr.get_data_dtype()),
                       "compressed": gz, "chunks": [cz, cy, cx], "nifti_version": int(hdr.sizeof_hdr == 540) + 1,
                       "ras_affine": affine.tolist()}
        record = tileseg_record(hdr) or {}
        names = record.get("class_names")
        names = tuple(str(n) for n in names) if isinstance(names, list) and dtype.kind in "iu" else None
        nodata = record.get("nodata")
        nodata = nodata if isinstance(nodata, (int, float)) and not isinstance(nodata, bool) else None
        try:
            return Image(data=data, axes=(("c",) if n_c else ()) + ("z", "y", "x"), spacing=spacing, origin=origin,
                         direction=direction, units=(unit,) * 3, class_names=names, nodata=nodata, attrs=attrs,
                         reader_info=reader_info,
                         source=str(path), format=self.name)
        except ValueError as exc:
            raise FormatError(f"{path!r}: {exc}") from exc


def _text(v: Any) -> str:
    raw = v.item() if hasattr(v, "item") else v
    if isinstance(raw, bytes):
        raw = raw.split(b"\x00", 1)[0].decode("latin-1")
    return str(raw).strip()


__all__ = ["ECODE", "NiftiReader", "is_nifti_name", "load", "tileseg_record"]
