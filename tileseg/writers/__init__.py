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

__all__ = ["WriteHandle", "WriteJob", "Writer", "get_writer", "is_complete"]


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
