"""Writers: store a lazy result, chunk by chunk, carrying the input's metadata.

Writers are plugins of kind ``"writers"`` in :mod:`tileseg.registry`: the
built-in ``zarr`` (OME-Zarr), ``cog`` (Cloud-Optimized GeoTIFF, extra
``geo``) and ``vector`` (polygons per class as GeoPackage/GeoJSON, extra
``vector``); later DICOM-SEG, NIfTI. Each subclasses
:class:`tileseg.writers.base.Writer` and follows its prepare / write task /
finalize protocol (see :mod:`tileseg.writers.base`).

Example
-------
>>> import dask.array as da, tempfile, os
>>> from tileseg.image import Image
>>> from tileseg.writers import get_writer, is_complete
>>> out = os.path.join(tempfile.mkdtemp(), "seg.zarr")
>>> image = Image(da.zeros((32, 32), chunks=16, dtype="uint8"), axes=("y", "x"), spacing=(0.5, 0.5))
>>> job = get_writer("zarr").write(image, out)
>>> is_complete(out)
True
"""

from __future__ import annotations

from typing import Any

from .base import WriteHandle, WriteJob, Writer

__all__ = ["WriteHandle", "WriteJob", "Writer", "get_writer", "is_complete", "writer_for_path"]

# file name endings of the built-in single-file writers; anything else is a Zarr store
SUFFIXES = {".dcm": "dicom_seg", ".nii": "nifti", ".nii.gz": "nifti", ".tif": "cog", ".tiff": "cog",
            ".gpkg": "vector", ".geojson": "vector"}


def writer_for_path(path: str) -> str:
    """The writer a path's ending asks for: ``.dcm`` DICOM SEG, ``.nii[.gz]`` NIfTI, ``.tif[f]`` COG,
    ``.gpkg``/``.geojson`` polygons, anything else (``.zarr``, a folder) Zarr.

    Examples
    --------
    >>> writer_for_path("out/{stem}_seg.nii.gz"), writer_for_path("s3://b/seg.zarr"), writer_for_path("a.TIF")
    ('nifti', 'zarr', 'cog')
    """
    name = str(path).rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIXES[suffix]
    return "zarr"


def get_writer(name: str) -> Writer:
    """An instance of the writer registered as ``name``.

    Raises
    ------
    PluginError
        Unknown name (the message lists the installed writers).
    """
    from .. import registry

    obj = registry.get("writers", name)
    return obj() if isinstance(obj, type) else obj


def is_complete(path: str, storage_options: dict[str, Any] | None = None, *, writer: str = "zarr") -> bool:
    """Whether ``path`` holds a finished output of ``writer`` (status recorded by ``finalize``)."""
    return get_writer(writer).is_complete(path, storage_options=storage_options)
