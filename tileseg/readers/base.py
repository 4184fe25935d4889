"""The reader interface and the checks every reader shares.

A reader turns one input item (a path or URL) into a lazy
:class:`tileseg.image.Image`. Readers are plugins (``tileseg.readers`` entry
points, see :mod:`tileseg.registry`); each one subclasses :class:`Reader`:

* ``name``: the name used in pipeline files (``reader: zarr``);
* ``can_open(path, storage_options=None)``: a cheap classmethod used for
  auto-detection (looks at names and metadata files, never at pixel data);
* ``open(path, **options)``: returns an :class:`~tileseg.image.Image` whose
  ``data`` is a lazy dask array.

The helpers here (size budget, axis normalisation, path sanitising) are shared
so that every format refuses absurd sizes and orders axes the same way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import ImageTooLargeError, InputError
from ..image import SPATIAL_AXES, Image
from ..store import is_url, local_path  # noqa: F401 - re-exported for readers

#: Default pixel budget: refuse images declaring more pixels than this (about 1.1e12).
DEFAULT_MAX_PIXELS = 2**40
#: Default byte budget (uncompressed): 16 TiB.
DEFAULT_MAX_BYTES = 2**44

_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9._\-]+$")

_CHANNEL_NAMES = {"c", "ch", "channel", "channels", "band", "bands"}
_TIME_NAMES = {"t", "time"}


class Reader:
    """Base class of image readers.

    Subclasses set :attr:`name`, implement :meth:`can_open` (cheap, no pixel
    I/O) and :meth:`open` (lazy). ``open`` receives every option of
    :func:`tileseg.readers.open_image`; a reader that does not support an
    option that was given (e.g. ``level``) raises :class:`~tileseg.errors.InputError`.
    """

    name: ClassVar[str] = ""
    #: True when :meth:`open` reports a missing URL itself (e.g. GDAL reads it), so
    #: :func:`~tileseg.readers.open_image` skips its fsspec existence check for URLs.
    opens_urls_itself: ClassVar[bool] = False

    @classmethod
    def can_open(cls, path: str, storage_options: dict[str, Any] | None = None) -> bool:
        """Whether this reader recognises ``path`` (by name or metadata only).

        Parameters
        ----------
        path : str
            Local path or fsspec URL.
        storage_options : dict, optional
            fsspec options for URLs.
        """
        return False

    @classmethod
    def list_items(cls, path: str, storage_options: dict[str, Any] | None = None,
                   options: dict[str, Any] | None = None) -> list[str] | None:
        """Several items inside ``path`` (e.g. one per DICOM series), or ``None`` when ``path`` is one item.

        ``options`` are the reader options the items will be opened with
        (a reader may drop items they deselect); unknown keys are ignored.

        Called by :func:`~tileseg.readers.expand_inputs` for a path this
        reader recognises. Items are ``f"{path}#{key}"`` with a ``key``
        that :meth:`open` understands; :func:`~tileseg.readers.item_stem`
        names such an item by its sanitised key.
        """
        return None

    def open(self, path: str, **options: Any) -> Image:  # pragma: no cover - interface
        """Open ``path`` lazily and return an :class:`~tileseg.image.Image`."""
        raise NotImplementedError


def clean_node_path(path: str | None, *, what: str, source: str) -> str:
    """Validate a path *inside* a store (``"labels/0"``) before using it as a key.

    Only plain relative components (letters, digits, ``. _ -``) are allowed:
    no ``..``, no absolute paths, no backslashes. This guards against
    metadata (e.g. an OME ``datasets[].path``) pointing outside the store.

    Raises
    ------
    InputError
        If the path is unsafe.
    """
    if path is None:
        return ""
    text = str(path).strip("/")
    if not text:
        return ""
    parts = text.split("/")
    for part in parts:
        if part in (".", "..") or not _SAFE_COMPONENT.match(part):
            raise InputError(f"{source!r}: refusing unsafe {what} {path!r} (plain relative names only)")
    return "/".join(parts)


def check_budget(
    source: str,
    shape: Sequence[int],
    dtype: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> None:
    """Refuse an image whose *declared* size exceeds the budget, before allocating anything.

    Parameters
    ----------
    source : str
        File or URL, for the message.
    shape : sequence of int
        Declared shape.
    dtype : numpy dtype-like
        Declared dtype.
    max_pixels, max_bytes : int or None
        Budgets; ``None`` disables a check.

    Raises
    ------
    ImageTooLargeError
        Naming the file, the declared shape and the budget.
    InputError
        If the shape has negative entries.
    """
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InputError(f"{source!r} declares a negative shape {shape!r}")
    pixels = math.prod(shape)
    nbytes = pixels * np.dtype(dtype).itemsize
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLargeError(
            f"{source!r} declares shape {shape!r} = {pixels} pixels, over the budget "
            f"max_pixels={max_pixels}; raise max_pixels if this is intended"
        )
    if max_bytes is not None and nbytes > max_bytes:
        raise ImageTooLargeError(
            f"{source!r} declares shape {shape!r} of {np.dtype(dtype)} = {nbytes} bytes, over the budget "
            f"max_bytes={max_bytes}; raise max_bytes if this is intended"
        )


def canonical_axis_name(name: str, kind: str | None = None) -> str | None:
    """Map a stored axis name (and optional OME type) to ``c``/``t``/``z``/``y``/``x``.

    Returns ``None`` for a name that means nothing to tileseg.
    """
    lowered = str(name).lower()
    kind = (kind or "").lower()
    if kind == "channel" or lowered in _CHANNEL_NAMES:
        return "c"
    if kind == "time" or lowered in _TIME_NAMES:
        return "t"
    if lowered in SPATIAL_AXES:
        return lowered
    return None


def canonicalize(
    data: Any,
    names: Sequence[str],
    *,
    source: str,
    scale: Sequence[float] | None = None,
    translation: Sequence[float] | None = None,
    units: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Bring a stored array to tileseg's axis convention: ``c`` first, then ``z, y, x``.

    Axes other than ``c``/``z``/``y``/``x`` (e.g. a time axis) are dropped when
    they have length 1 and refused otherwise. ``scale``, ``translation`` and
    ``units`` are given per *stored* axis and come back per spatial axis in
    the output order.

    Parameters
    ----------
    data : dask.array.Array
        The stored array (lazy).
    names : sequence of str
        Canonical names per stored axis (``c``, ``t``, ``z``, ``y``, ``x`` or any
        other name for an axis to drop).
    source : str
        File or URL, for messages.
    scale, translation, units : sequence, optional
        Per stored axis.

    Returns
    -------
    dict
        ``data``, ``axes``, ``spacing``, ``origin``, ``units`` and
        ``store_axes`` (the names as stored).

    Raises
    ------
    InputError
        More than one time point, repeated axis names, or not 2-3 spatial axes.
    """
    names = list(names)
    ndim = len(names)
    if ndim != data.ndim:
        raise InputError(f"{source!r}: {ndim} axis names {names!r} for a {data.ndim}-D array")
    scale = list(scale) if scale is not None else [1.0] * ndim
    translation = list(translation) if translation is not None else [0.0] * ndim
    units = list(units) if units is not None else [None] * ndim

    keep = []
    index: list[Any] = []
    for i, name in enumerate(names):
        if name in ("c", "z", "y", "x"):
            keep.append(i)
            index.append(slice(None))
        elif data.shape[i] == 1:
            index.append(0)
        else:
            what = "time points" if name == "t" else f"entries on axis {name!r}"
            raise InputError(
                f"{source!r} has {data.shape[i]} {what} (shape {tuple(data.shape)!r}, axes {tuple(names)!r}); "
                "tileseg segments one 2D/3D image at a time: select one first"
            )
    kept = [names[i] for i in keep]
    if len(set(kept)) != len(kept):
        raise InputError(f"{source!r}: repeated axis names {tuple(names)!r}")
    n_spatial = sum(1 for n in kept if n != "c")
    if n_spatial not in (2, 3):
        raise InputError(
            f"{source!r} has {n_spatial} spatial axes (axes {tuple(names)!r}, shape {tuple(data.shape)!r}); "
            "expected 2 (y, x) or 3 (z, y, x)"
        )
    if any(isinstance(ix, int) for ix in index):
        data = data[tuple(index)]
    order = ("c", "z", "y", "x")
    perm_kept = sorted(range(len(keep)), key=lambda j: order.index(kept[j]))
    if perm_kept != list(range(len(keep))):
        data = data.transpose(perm_kept)
    out_stored = [keep[j] for j in perm_kept]
    axes = tuple(names[i] for i in out_stored)
    spatial = [i for i in out_stored if names[i] != "c"]
    return {
        "data": data,
        "axes": axes,
        "spacing": tuple(float(scale[i]) for i in spatial),
        "origin": tuple(float(translation[i]) for i in spatial),
        "units": tuple(units[i] for i in spatial),
        "store_axes": tuple(names),
    }
