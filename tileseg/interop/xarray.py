"""``xarray.DataArray`` in, ``xarray.DataArray`` out.

:func:`from_xarray` turns a DataArray (numpy- or dask-backed) into an
:class:`~tileseg.image.Image`: dimension names give the axes (``band`` /
``channel`` -> ``c``), regular 1-D coordinates give spacing, origin (pixel
centres) and units (a decreasing coordinate, such as the ``y`` of a
north-up raster, gives a negative direction cosine), a rioxarray/CF ``spatial_ref`` coordinate (or a ``crs``
attribute) gives the CRS, and ``_FillValue`` / ``nodata`` the nodata value.
:func:`to_xarray` wraps a result back: the input's dimension names and order,
its spatial coordinates (``spatial_ref`` included, so rioxarray keeps the
CRS) and attributes, a ``class`` dimension for per-class outputs, CF
``flag_values``/``flag_meanings`` for class maps and ``_FillValue`` for nodata.
No xarray import happens unless a DataArray is passed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from ..image import SPATIAL_AXES, Image
from ..readers.base import canonical_axis_name

#: Coordinate / attribute names that hold a CRS (rioxarray and CF conventions).
_CRS_ATTRS = ("crs_wkt", "spatial_ref")


def _canonical_dims(arr: Any, axes: Any) -> list[str]:
    from ..image import parse_axes

    if axes is not None:
        names = list(parse_axes(axes))
        if len(names) != arr.ndim:
            raise InputError(f"axes {axes!r} name {len(names)} axes but the DataArray has dims {arr.dims!r}")
        return names
    names = []
    for dim in arr.dims:
        canon = canonical_axis_name(str(dim))
        if canon is None and str(dim).lower() in ("lat", "latitude", "row", "rows"):
            canon = "y"
        elif canon is None and str(dim).lower() in ("lon", "longitude", "col", "cols", "column"):
            canon = "x"
        names.append(canon or str(dim))
    return names


def _regular(values: np.ndarray) -> tuple[float, float] | None:
    """``(step, first)`` of a regular 1-D numeric coordinate, else None."""
    if values.ndim != 1 or values.size == 0 or values.dtype.kind not in "iuf":
        return None
    v = values.astype(np.float64)
    if v.size == 1:
        return None
    d = np.diff(v)
    if not np.allclose(d, d[0], rtol=1e-6, atol=0) or d[0] == 0:
        return None
    return float(d[0]), float(v[0])


def _crs_of(arr: Any) -> str | None:
    for name in ("spatial_ref", "crs"):
        if name in arr.coords:
            attrs = arr.coords[name].attrs
            for key in _CRS_ATTRS:
                if attrs.get(key):
                    return str(attrs[key])
    crs = arr.attrs.get("crs")
    return str(crs) if crs else None


def _nodata_of(arr: Any) -> Any:
    for source in (arr.attrs, arr.encoding):
        for key in ("_FillValue", "nodata", "missing_value"):
            v = source.get(key)
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                return v.item() if isinstance(v, np.generic) else v
    return None


def from_xarray(arr: Any, axes: Any = None) -> Image:
    """An :class:`Image` over a DataArray's data (lazy when it is dask-backed).

    Parameters
    ----------
    arr : xarray.DataArray
        2D/3D image with optional channel (``band``/``c``) and length-1 other dims.
    axes : str, optional
        Axis names per dim (``"cyx"``), overriding the dimension names.

    Raises
    ------
    InputError
        Dims that do not make a 2D/3D image.
    """
    import dask.array as da

    names = _canonical_dims(arr, axes)
    data = arr.data if isinstance(arr.data, da.Array) else da.from_array(np.asarray(arr.data), chunks="auto")
    index: list[Any] = []
    kept: list[int] = []
    for i, (name, size) in enumerate(zip(names, data.shape)):
        if name in ("c",) + SPATIAL_AXES:
            index.append(slice(None))
            kept.append(i)
        elif size == 1:
            index.append(0)
        else:
            raise InputError(f"DataArray {arr.name!r}: dim {arr.dims[i]!r} has {size} entries; tileseg segments "
                             "one 2D/3D image at a time: select one (e.g. .isel(...)) or pass axes=")
    kept_names = [names[i] for i in kept]
    if len(set(kept_names)) != len(kept_names):
        raise InputError(f"DataArray {arr.name!r}: dims {arr.dims!r} map to repeated axes {kept_names!r}; pass axes=")
    data = data[tuple(index)]
    order = sorted(range(len(kept)), key=lambda j: ("c", "z", "y", "x").index(kept_names[j]))
    if order != list(range(len(order))):
        data = data.transpose(order)
    out_axes = tuple(kept_names[j] for j in order)
    spatial_dims = [arr.dims[kept[j]] for j in order if kept_names[j] != "c"]
    spacing, origin, units = [], [], []
    steps: dict[str, tuple[float, float]] = {}
    for dim in spatial_dims:
        reg = _regular(np.asarray(arr.coords[dim].values)) if dim in arr.coords else None
        if reg is not None:
            steps[str(dim)] = reg
        spacing.append(abs(reg[0]) if reg else 1.0)
        origin.append(reg[1] if reg else 0.0)
        unit = arr.coords[dim].attrs.get("units") if dim in arr.coords else None
        units.append(str(unit) if unit else None)
    signs = [1.0 if str(d) not in steps or steps[str(d)][0] > 0 else -1.0 for d in spatial_dims]
    direction = tuple(tuple(sg if i == j else 0.0 for j in range(len(signs))) for i, sg in enumerate(signs))
    crs = _crs_of(arr)
    transform = None
    if crs is not None and len(spatial_dims) >= 2 and all(str(d) in steps for d in spatial_dims[-2:]):
        (ey, fy), (ax, cx) = steps[str(spatial_dims[-2])], steps[str(spatial_dims[-1])]
        transform = (ax, 0.0, cx - ax / 2, 0.0, ey, fy - ey / 2)
    try:
        return Image(data=data, axes=out_axes, spacing=tuple(spacing), origin=tuple(origin), units=tuple(units),
                     direction=direction,
                     crs=crs, transform=transform, nodata=_nodata_of(arr),
                     attrs={k: v for k, v in arr.attrs.items() if k not in ("_FillValue", "crs")},
                     reader_info={"xarray": {"dims": [str(d) for d in arr.dims], "name": arr.name}},
                     source=f"xarray.DataArray {arr.name!r}" if arr.name is not None else "xarray.DataArray",
                     format="xarray")
    except ValueError as exc:
        raise InputError(f"DataArray {arr.name!r}: {exc}") from exc


def to_xarray(image: Image, like: Any) -> Any:
    """Wrap a result :class:`Image` as a DataArray shaped like the input ``like``.

    Spatial dims keep ``like``'s names, order and coordinates; a channel axis
    becomes a ``class`` dim (coordinates: the class names) first. Attributes
    are ``like``'s, plus ``flag_values``/``flag_meanings`` for a class map and
    ``_FillValue`` when the result has nodata.
    """
    import xarray as xr

    names = _canonical_dims(like, None)
    by_axis = {n: d for n, d in zip(names, like.dims) if n in SPATIAL_AXES}
    spatial_dims = [by_axis.get(a, a) for a in image.spatial_axes]
    dims = (["class"] if image.has_channels else []) + spatial_dims
    coords = {name: c for name, c in like.coords.items() if set(c.dims) <= set(spatial_dims)}
    if image.has_channels and image.class_names is not None and len(image.class_names) == image.shape[0]:
        coords["class"] = list(image.class_names)
    attrs = {k: v for k, v in like.attrs.items() if k not in ("_FillValue", "nodata", "scale_factor", "add_offset")}
    if image.is_class_map and image.class_names is not None:
        attrs["flag_values"] = list(range(len(image.class_names)))
        attrs["flag_meanings"] = " ".join(n.replace(" ", "_") for n in image.class_names)
    if image.nodata is not None:
        attrs["_FillValue"] = image.nodata
    out = xr.DataArray(image.data, dims=dims, coords=coords, attrs=attrs, name=like.name)
    order = [d for d in like.dims if d in spatial_dims]
    return out.transpose(*((["class"] if image.has_channels else []) + order))
