"""The lazy image that travels from a reader through the engine to a writer.

An :class:`Image` is a dask array plus what every format needs to put the
result back where it came from: axes, spacing/origin/units, direction
cosines (medical), CRS and affine transform (remote sensing), nodata and an
optional lazy validity mask, class names of a label image, the attributes a
writer carries over, and the reader's own facts (kept apart: writers never
copy them). Geometry conventions are in :mod:`tileseg.geometry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import geometry

SPATIAL_AXES = ("z", "y", "x")
_UNSET: Any = object()


@dataclass(frozen=True)
class Image:
    """A lazy image: a dask array plus axis names, geometry and meaning.

    Attributes
    ----------
    data : dask.array.Array
        Pixel data, channel axis first when present (``axes[0] == "c"``).
    axes : tuple of str
        One name per dimension of ``data``: optional ``"c"`` then 2-3 of
        ``"z", "y", "x"``.
    spacing : tuple of float
        Physical pixel size per spatial axis (1.0 when unknown).
    origin : tuple of float
        Physical position of the *centre* of the first pixel per spatial axis.
    units : tuple of str or None
        Unit of each spatial axis (e.g. ``"micrometer"``, ``"metre"``) when known.
    direction : tuple of tuple of float
        ``n x n`` direction cosines, row ``i`` = physical direction of spatial
        axis ``i`` (identity by default).
    crs : str or None
        Coordinate reference system as the source gave it (WKT, PROJ JSON or
        ``"EPSG:32621"``); ``None`` when not georeferenced.
    transform : tuple of 6 float or None
        Affine ``(a, b, c, d, e, f)`` of the last two axes, pixel-*corner*
        based (rasterio/GDAL convention). ``None`` when not given; see
        :attr:`affine` for one derived from spacing and origin.
    nodata : int, float or None
        Pixel value meaning "no data" in ``data``.
    mask : dask.array.Array or None
        Lazy boolean array of the spatial shape, ``True`` where pixels are
        valid (``None``: all valid except ``nodata`` values).
    class_names : tuple of str or None
        For a class map (semantic labels ``0 .. K-1``): the name of each class.
        ``None`` for intensity images and instance labels.
    attrs : dict
        JSON-friendly attributes a writer carries to the output (e.g. store
        attributes, rescale slope/intercept, band descriptions).
    reader_info : dict
        The reader's own facts (store shape, chunks, codecs, OME details);
        dropped by :meth:`with_data` and never copied by writers.
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
    direction: tuple[tuple[float, ...], ...] = ()
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    nodata: int | float | None = None
    mask: Any = None
    class_names: tuple[str, ...] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    reader_info: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    format: str = "memory"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "axes", tuple(str(a) for a in self.axes))
        if len(self.axes) != self.data.ndim:
            raise ValueError(f"axes {self.axes!r} do not match data with {self.data.ndim} dimensions")
        spatial = self.axes[1:] if self.has_channels else self.axes
        if len(spatial) not in (2, 3) or spatial != SPATIAL_AXES[-len(spatial):]:
            raise ValueError(f"axes {self.axes!r}: expected optional 'c' first, then ('y', 'x') or ('z', 'y', 'x')")
        n = self.spatial_ndim
        set_(self, "spacing", _per_axis(self.spacing, n, 1.0, "spacing", float))
        set_(self, "origin", _per_axis(self.origin, n, 0.0, "origin", float))
        set_(self, "units", _per_axis(self.units, n, None, "units", lambda u: None if u is None else str(u)))
        if not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(f"spacing {self.spacing!r} must be positive finite numbers")
        set_(self, "direction", geometry.identity(n) if not self.direction else geometry.check_direction(self.direction, n))
        if self.transform is not None:
            set_(self, "transform", geometry.check_affine(self.transform))
        if self.crs is not None:
            set_(self, "crs", str(self.crs))
        if self.class_names is not None:
            set_(self, "class_names", tuple(str(c) for c in self.class_names))
        if self.mask is not None:
            if tuple(self.mask.shape) != self.spatial_shape:
                raise ValueError(f"mask shape {tuple(self.mask.shape)!r} != spatial shape {self.spatial_shape!r}")
            if np.dtype(self.mask.dtype) != np.bool_:
                set_(self, "mask", self.mask.astype(bool))
        set_(self, "attrs", dict(self.attrs))
        set_(self, "reader_info", dict(self.reader_info))

    # ------------------------------------------------------------------ shape
    @property
    def has_channels(self) -> bool:
        """Whether the first axis is a channel axis."""
        return bool(self.axes) and self.axes[0] == "c"

    @property
    def spatial_ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.data.ndim - (1 if self.has_channels else 0)

    @property
    def spatial_axes(self) -> tuple[str, ...]:
        """Names of the spatial axes (``("y", "x")`` or ``("z", "y", "x")``)."""
        return self.axes[1:] if self.has_channels else self.axes

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the spatial axes."""
        return tuple(int(s) for s in (self.data.shape[1:] if self.has_channels else self.data.shape))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``data``."""
        return tuple(int(s) for s in self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        """Pixel dtype."""
        return np.dtype(self.data.dtype)

    # ------------------------------------------------------------------ geometry
    @property
    def affine(self) -> tuple[float, ...]:
        """The transform, or one derived from spacing and origin (north-up)."""
        return self.transform if self.transform is not None else geometry.affine_from_grid(self.spacing, self.origin)

    @property
    def is_class_map(self) -> bool:
        """Whether ``data`` holds semantic classes ``0 .. len(class_names) - 1``."""
        return self.class_names is not None and self.dtype.kind in "biu" and not self.has_channels

    def valid(self) -> Any:
        """Lazy boolean array of the spatial shape: ``True`` where pixels are valid, or ``None``.

        Combines :attr:`mask` with :attr:`nodata`: a pixel is invalid when all
        its channels equal nodata (GDAL's rule for a dataset's mask; NaN nodata
        matches NaN).
        """
        valid = self.mask
        if self.nodata is not None:
            data = self.data
            if isinstance(self.nodata, float) and math.isnan(self.nodata):
                bad = data != data
            else:
                bad = data == self.nodata  # a value the dtype cannot hold matches nothing
            if self.has_channels:
                bad = bad.all(axis=0)
            valid = ~bad if valid is None else valid & ~bad
        return valid

    def geometry_attrs(self) -> dict[str, Any]:
        """JSON-friendly geometry and meaning, as writers store it (see :func:`geometry_from_attrs`)."""
        out: dict[str, Any] = {
            "axes": list(self.axes),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "units": list(self.units),
            "direction": [list(r) for r in self.direction],
        }
        if self.crs is not None:
            out["crs"] = self.crs
        if self.transform is not None:
            out["transform"] = list(self.transform)
        if self.nodata is not None:
            out["nodata"] = _json_number(self.nodata)
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        return out

    # ------------------------------------------------------------------ copies
    def with_data(self, data: Any, axes: tuple[str, ...] | None = None, **changes: Any) -> Image:
        """A copy with the same geometry around new ``data``.

        Shape and dtype come from ``data``. The reader's facts are dropped;
        the mask is kept when the spatial shape is unchanged; ``nodata`` is
        kept only when the dtype is unchanged (pass ``nodata=`` to set it).
        Any field can be changed through ``changes``.
        """
        axes = tuple(axes) if axes is not None else _default_like(self, data)
        spatial = tuple(int(s) for s in (data.shape[1:] if axes and axes[0] == "c" else data.shape))
        defaults: dict[str, Any] = {"reader_info": {}}
        if "mask" not in changes and spatial != self.spatial_shape:
            defaults["mask"] = None
        if "nodata" not in changes and np.dtype(data.dtype) != self.dtype:
            defaults["nodata"] = None
        return replace(self, data=data, axes=axes, **{**defaults, **changes})


def _default_like(image: Image, data: Any) -> tuple[str, ...]:
    spatial = image.spatial_axes
    if data.ndim == len(spatial):
        return spatial
    if data.ndim == len(spatial) + 1:
        return ("c",) + spatial
    raise ValueError(f"cannot name the axes of a {data.ndim}-D result of a {image.axes!r} image; pass axes=")


def _per_axis(values: Any, n: int, default: Any, what: str, cast: Any) -> tuple:
    if values is None or len(tuple(values)) == 0:
        return (default,) * n
    values = tuple(values)
    if len(values) != n:
        raise ValueError(f"{what} {values!r} must have {n} entries (one per spatial axis)")
    return tuple(cast(v) for v in values)


def _json_number(v: Any) -> Any:
    v = v.item() if isinstance(v, np.generic) else v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def geometry_from_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Image fields stored by :meth:`Image.geometry_attrs` (only the keys present and valid).

    ``nodata`` written as ``"nan"`` comes back as ``float("nan")``.
    """
    out: dict[str, Any] = {}
    if not isinstance(attrs, dict):
        return out
    for key in ("direction", "crs", "transform", "class_names"):
        if attrs.get(key) is not None:
            out[key] = attrs[key]
    nodata = attrs.get("nodata")
    if isinstance(nodata, str):
        try:
            nodata = float(nodata)
        except ValueError:
            nodata = None
    if isinstance(nodata, (int, float)) and not isinstance(nodata, bool):
        out["nodata"] = nodata
    return out


def nodata_outside(result: Image, valid: Any, n_labels: int | None = None) -> Image:
    """``result`` with the pixels where ``valid`` is false set to its nodata (nothing if ``valid`` is None).

    Labels (``n_labels`` classes) get the largest value of their dtype, widened
    when a class needs that value (e.g. 256 classes -> uint16, nodata 65535);
    float results get NaN. The value becomes ``result.nodata``.
    """
    if valid is None:
        return result
    import dask.array as da

    data = result.data
    valid = valid.rechunk(data.chunks[-result.spatial_ndim:])
    if n_labels is not None:
        dtype = label_dtype(n_labels + 1)
        nodata: Any = int(np.iinfo(dtype).max)
        data = da.where(valid, data.astype(dtype), dtype.type(nodata))
    else:
        nodata = float("nan")
        data = da.where(valid[None] if result.has_channels else valid, data, data.dtype.type(nodata))
    return result.with_data(data, nodata=nodata)


def label_dtype(n_classes: int) -> np.dtype:
    """Smallest unsigned integer dtype of a class map with ``n_classes`` classes (at least uint8).

    >>> label_dtype(2), label_dtype(256), label_dtype(257)
    (dtype('uint8'), dtype('uint8'), dtype('uint16'))
    """
    for dt in (np.uint8, np.uint16, np.uint32):
        if max(int(n_classes) - 1, 1) <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def default_axes(ndim: int, spatial_ndim: int | None = None) -> tuple[str, ...]:
    """Axis names for an array without any: ``(c,) + spatial`` when it has one extra axis.

    Parameters
    ----------
    ndim : int
        Number of array dimensions.
    spatial_ndim : int, optional
        Number of spatial dimensions; defaults to ``min(ndim, 3)`` for 2-3D
        arrays and ``ndim - 1`` for 4D arrays.

    >>> default_axes(3), default_axes(3, 2)
    (('z', 'y', 'x'), ('c', 'y', 'x'))
    """
    if spatial_ndim is None:
        spatial_ndim = ndim if ndim <= 3 else ndim - 1
    if spatial_ndim not in (2, 3) or ndim - spatial_ndim not in (0, 1):
        raise ValueError(f"cannot name the axes of a {ndim}-D array with {spatial_ndim} spatial dimensions")
    spatial = SPATIAL_AXES[-spatial_ndim:]
    return (("c",) if ndim > spatial_ndim else ()) + spatial


def parse_axes(axes: Any) -> tuple[str, ...]:
    """``"cyx"`` or ``["c", "y", "x"]`` -> ``("c", "y", "x")`` (names checked, order kept).

    Raises
    ------
    ValueError
        Unknown or repeated names.
    """
    names = tuple(axes) if not isinstance(axes, str) else tuple(axes.lower())
    names = tuple(str(a).lower() for a in names)
    bad = [a for a in names if a not in ("c", "t", "z", "y", "x")]
    if bad or len(set(names)) != len(names) or not names:
        raise ValueError(f"axes {axes!r}: use each of c, t, z, y, x at most once (e.g. 'cyx', 'zyx')")
    return names


def as_image(obj: Any, spatial_ndim: int | None = None, axes: Any = None) -> Image:
    """Wrap a numpy/dask array or an ``xarray.DataArray`` (or return an :class:`Image` unchanged).

    Parameters
    ----------
    obj : Image, numpy.ndarray, dask.array.Array or xarray.DataArray
        The image.
    spatial_ndim : int, optional
        Number of spatial axes; an array with one more dimension has a
        leading channel axis.
    axes : str or sequence of str, optional
        Axis names of the array as stored (e.g. ``"cyx"``); it is put in
        tileseg's order (channel first) lazily.
    """
    if isinstance(obj, Image):
        return obj
    if _is_xarray(obj):
        from .interop.xarray import from_xarray

        return from_xarray(obj, axes=axes)
    import dask.array as da

    data = obj if isinstance(obj, da.Array) else da.from_array(np.asarray(obj), chunks="auto")
    if axes is None:
        return Image(data=data, axes=default_axes(data.ndim, spatial_ndim))
    names = parse_axes(axes)
    if len(names) != data.ndim:
        raise ValueError(f"axes {axes!r} name {len(names)} axes of a {data.ndim}-D array")
    if "t" in names:
        t = names.index("t")
        if data.shape[t] != 1:
            raise ValueError(f"the array has {data.shape[t]} time points (axes {axes!r}); select one first")
        data = data[tuple(0 if i == t else slice(None) for i in range(data.ndim))]
        names = tuple(a for a in names if a != "t")
    order = [names.index(a) for a in ("c", "z", "y", "x") if a in names]
    if order != list(range(len(order))):
        data = data.transpose(order)
    return Image(data=data, axes=tuple(names[i] for i in order))


def _is_xarray(obj: Any) -> bool:
    import sys

    xr = sys.modules.get("xarray")
    return xr is not None and isinstance(obj, xr.DataArray)
