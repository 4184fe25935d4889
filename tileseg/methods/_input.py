"""Input handling shared by the classical methods: channel axis, spacing, attributes, nodata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError


@dataclass(frozen=True)
class MethodInput:
    """A method's input, unwrapped.

    Attributes
    ----------
    data : dask.array.Array
        ``(C, *spatial)`` when ``has_channels`` else ``(*spatial)``.
    has_channels : bool
        Whether axis 0 is a channel (band) axis.
    spacing : tuple of float
        Physical pixel size per spatial axis.
    attrs : dict
        The image's attributes (e.g. rescale slope/intercept), empty for bare arrays.
    nodata : number or None
        The image's nodata value.
    mask : dask.array.Array or None
        The image's validity mask (True = valid).
    """

    data: Any
    has_channels: bool
    spacing: tuple[float, ...]
    attrs: dict = field(default_factory=dict)
    nodata: Any = None
    mask: Any = None

    @property
    def spatial_ndim(self) -> int:
        return self.data.ndim - (1 if self.has_channels else 0)

    def single_band(self, name: str) -> Any:
        """The spatial array; a one-band channel axis is dropped, several bands are an error."""
        if not self.has_channels:
            return self.data
        if self.data.shape[0] != 1:
            raise InputError(
                f"method {name!r} works on one band but the image has {self.data.shape[0]} channels; "
                "select a channel or use a multi-band method (kmeans, gmm)"
            )
        return self.data[0]

    def bands(self) -> Any:
        """``(C, *spatial)`` with a channel axis added when there is none."""
        return self.data if self.has_channels else self.data[None]


def unwrap(data: Any, spacing: Any = None, spatial_ndim: int | None = None) -> MethodInput:
    """Accept an :class:`~tileseg.image.Image`, a dask array or a numpy array.

    For a bare array the number of spatial axes is ``spatial_ndim`` if given,
    else ``len(spacing)`` if given, else ``data.ndim`` for 2D/3D arrays (no
    channel axis) and ``3`` for 4D arrays.
    """
    import dask.array as da

    from ..image import Image

    extra: dict[str, Any] = {}
    if isinstance(data, Image):
        extra = {"attrs": dict(data.attrs), "nodata": data.nodata, "mask": data.mask}
        spacing = data.spacing if spacing is None else spacing
        spatial_ndim = data.spatial_ndim
        data = data.data
    data = da.asarray(data)
    if spatial_ndim is None:
        if spacing is not None:
            spatial_ndim = len(tuple(spacing))
        else:
            spatial_ndim = data.ndim if data.ndim in (2, 3) else 3
    if spatial_ndim not in (2, 3) or data.ndim - spatial_ndim not in (0, 1):
        raise InputError(f"expected a 2D/3D image with an optional channel axis, got shape {data.shape!r}")
    if spacing is None:
        spacing = (1.0,) * spatial_ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != spatial_ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ConfigError(f"spacing {spacing!r} must have {spatial_ndim} positive values")
    return MethodInput(data=data, has_channels=data.ndim > spatial_ndim, spacing=spacing, **extra)


def as_labels(mask: Any) -> Any:
    """A bool mask as uint8 labels (0 background, 1 foreground)."""
    return mask.astype(np.uint8)
