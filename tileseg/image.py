"""The lazy image that travels from a reader through the engine to a writer."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

SPATIAL_AXES = ("z", "y", "x")


@dataclass(frozen=True)
class Image:
    """A lazy image: a dask array plus axis names and spatial metadata.

    Attributes
    ----------
    data : dask.array.Array
        Pixel data, channel axis first when present (``axes[0] == "c"``).
    axes : tuple of str
        One name per dimension of ``data``: ``"c"`` then spatial axes
        (``"z"``, ``"y"``, ``"x"``).
    spacing : tuple of float
        Physical pixel size per spatial axis (1.0 when unknown).
    origin : tuple of float
        Physical position of the first pixel per spatial axis.
    units : tuple of str or None
        Unit of each spatial axis (e.g. ``"micrometer"``) when known.
    metadata : dict
        Format-specific metadata the writer may carry over (e.g. zarr
        attributes, OME multiscales, CRS and transform, DICOM references).
    source : str or None
        Where the image was read from, for error messages and reports.
    format : str
        Name of the reader that produced it (``"zarr"``, ``"memory"``, ...).
    """

    data: Any
    axes: tuple[str, ...]
    spacing: tuple[float, ...] = ()
    origin: tuple[float, ...] = ()
    units: tuple[str | None, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    format: str = "memory"

    def __post_init__(self) -> None:
        if len(self.axes) != self.data.ndim:
            raise ValueError(f"axes {self.axes!r} do not match data with {self.data.ndim} dimensions")
        n = self.spatial_ndim
        if not self.spacing:
            object.__setattr__(self, "spacing", (1.0,) * n)
        if not self.origin:
            object.__setattr__(self, "origin", (0.0,) * n)
        if not self.units:
            object.__setattr__(self, "units", (None,) * n)

    @property
    def has_channels(self) -> bool:
        """Whether the first axis is a channel axis."""
        return bool(self.axes) and self.axes[0] == "c"

    @property
    def spatial_ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.data.ndim - (1 if self.has_channels else 0)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the spatial axes."""
        return tuple(self.data.shape[1:] if self.has_channels else self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        """Pixel dtype."""
        return self.data.dtype

    def with_data(self, data: Any, axes: tuple[str, ...] | None = None, **changes: Any) -> Image:
        """Return a copy carrying the same metadata around new ``data``."""
        return replace(self, data=data, axes=axes if axes is not None else self.axes, **changes)


def default_axes(ndim: int, spatial_ndim: int | None = None) -> tuple[str, ...]:
    """Axis names for an array without any: ``(c,) + spatial`` when it has one extra axis.

    Parameters
    ----------
    ndim : int
        Number of array dimensions.
    spatial_ndim : int, optional
        Number of spatial dimensions; defaults to ``min(ndim, 3)`` for 2-3D
        arrays and ``ndim - 1`` for 4D arrays.
    """
    if spatial_ndim is None:
        spatial_ndim = ndim if ndim <= 3 else ndim - 1
    if spatial_ndim not in (2, 3) or ndim - spatial_ndim not in (0, 1):
        raise ValueError(f"cannot name the axes of a {ndim}-D array with {spatial_ndim} spatial dimensions")
    spatial = SPATIAL_AXES[-spatial_ndim:]
    return (("c",) if ndim > spatial_ndim else ()) + spatial


def as_image(obj: Any, spatial_ndim: int | None = None) -> Image:
    """Wrap a numpy/dask array (or return an :class:`Image` unchanged).

    Parameters
    ----------
    obj : Image, numpy.ndarray or dask.array.Array
        The image.
    spatial_ndim : int, optional
        Number of spatial axes; an array with one more dimension has a
        leading channel axis.
    """
    if isinstance(obj, Image):
        return obj
    import dask.array as da

    data = obj if isinstance(obj, da.Array) else da.from_array(np.asarray(obj), chunks="auto")
    return Image(data=data, axes=default_axes(data.ndim, spatial_ndim))
