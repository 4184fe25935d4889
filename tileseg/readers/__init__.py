"""Readers: turn an input item (path or URL) into a lazy :class:`~tileseg.image.Image`.

Readers are plugins of kind ``"readers"`` in :mod:`tileseg.registry` (the
built-in ``zarr`` reader, later GeoTIFF/DICOM/NIfTI, third-party ones through
the ``tileseg.readers`` entry-point group). Each subclasses
:class:`tileseg.readers.base.Reader`.

Example
-------
>>> from tileseg.readers import open_image, expand_inputs   # doctest: +SKIP
>>> items = expand_inputs("data/scenes/*.zarr")              # doctest: +SKIP
>>> img = open_image(items[0], level=0)                      # doctest: +SKIP
>>> img.axes, img.spacing                                    # doctest: +SKIP
(('c', 'y', 'x'), (0.5, 0.5))
"""

from __future__ import annotations

import glob
import logging
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

from ..errors import FormatError, ImageNotFoundError, PluginError
from ..image import Image, as_image
from ..store import is_url, local_path
from .base import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Reader

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "Reader",
    "detect_reader",
    "expand_inputs",
    "get_reader",
    "item_stem",
    "safe_name",
    "open_image",
]

_GLOB_CHARS = set("*?[")


def get_reader(name: str) -> type[Reader]:
    """The reader class registered as ``name``.

    Raises
    ------
    PluginError
        Unknown name (the message lists the installed readers).
    """
    from .. import registry

    obj = registry.get("readers", name)
    return obj if isinstance(obj, type) else type(obj)


def _reader_classes() -> list[type[Reader]]:
    """Installed readers, built-ins first, broken plugins skipped with a warning."""
    from .. import registry

    names = registry.available("readers")
    builtin_first = sorted(names, key=lambda n: (n != "zarr", n))
    found = []
    for name in builtin_first:
        try:
            found.append(get_reader(name))
        except (PluginError, ImportError) as exc:
            warnings.warn(f"skipping reader plugin {name!r}: {exc}", stacklevel=3)
    return found


def detect_reader(path: str, storage_options: dict[str, Any] | None = None) -> type[Reader] | None:
    """The first installed reader whose ``can_open`` accepts ``path``, else ``None``."""
    for cls in _reader_classes():
        try:
            if cls.can_open(path, storage_options=storage_options):
                return cls
        except Exception as exc:  # a plugin's detection must not break the others
            log.debug("reader %r can_open(%r) failed: %s", cls.name, path, exc)
    return None


def _exists(path: str, storage_options: dict[str, Any] | None) -> bool:
    local = local_path(path)
    if local is not None:
        if not os.path.exists(local) and "#" in local:  # an item "container#key" from Reader.list_items
            return os.path.exists(local.rpartition("#")[0])
        return os.path.exists(local)
    from ..store import url_to_fs

    fs, root = url_to_fs(path, storage_options)
    return bool(fs.exists(root))


def open_image(
    path_or_url: Any,
    *,
    reader: str | type[Reader] | Reader = "auto",
    array: str | None = None,
    level: int | None = None,
    axes: Any = None,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    **options: Any,
) -> Image:
    """Open an image lazily.

    Parameters
    ----------
    path_or_url : str, os.PathLike, numpy/dask array or Image
        Local path or fsspec URL (``s3://``, ``memory://``, ``file://``). Arrays
        and images are wrapped with :func:`tileseg.image.as_image`.
    reader : str, Reader class or instance
        Reader name (``"zarr"``) or ``"auto"`` to detect it from the path.
    array : str, optional
        Node inside a container (e.g. ``"labels/cells"`` in a Zarr store).
    level : int, optional
        Resolution level of a multiscale image; 0 (default) is full resolution.
    axes : str or sequence of str, optional
        Axis names of the stored array (``"cyx"``), overriding what it declares.
    storage_options : dict, optional
        fsspec options for URLs (credentials, endpoints).
    max_pixels, max_bytes : int or None
        Refuse images declaring more pixels / uncompressed bytes (checked
        on metadata before anything is allocated); ``None`` disables.
    **options
        Reader-specific options (e.g. ``chunks`` for Zarr).

    Returns
    -------
    Image
        Lazy image, channel axis first when present.

    Raises
    ------
    ImageNotFoundError
        The path does not exist.
    FormatError
        No reader recognises it, or its metadata is corrupt or unsafe.
    ImageTooLargeError
        The declared size is over budget.
    PluginError
        Unknown reader name.

    Examples
    --------
    >>> import numpy as np, zarr, tempfile, os
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "a.zarr")
    >>> zarr.create_array(p, shape=(32, 48), chunks=(16, 16), dtype="uint8")[:] = 7
    >>> img = open_image(p)
    >>> img.axes, img.data.chunksize, int(img.data.sum().compute())
    (('y', 'x'), (16, 16), 10752)
    """
    if isinstance(path_or_url, Image):
        return path_or_url
    if not isinstance(path_or_url, (str, os.PathLike)):
        if hasattr(path_or_url, "ndim") and hasattr(path_or_url, "shape"):
            try:
                return as_image(path_or_url, axes=axes)
            except ValueError as exc:
                raise FormatError(str(exc)) from exc
        raise FormatError(f"cannot open {path_or_url!r}: expected a path, URL, array or Image")
    path = os.fspath(path_or_url)
    kwargs = dict(
        array=array,
        level=level,
        storage_options=storage_options,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        **({"axes": axes} if axes is not None else {}),
        **options,
    )
    if isinstance(reader, Reader):
        return reader.open(path, **kwargs)
    if isinstance(reader, type) and issubclass(reader, Reader):
        return reader().open(path, **kwargs)
    named = get_reader(str(reader)) if reader != "auto" else None
    if local_path(path) is None:  # a URL: some readers (GDAL) check it themselves, without fsspec
        cls = named or detect_reader(path, storage_options)
        if cls is not None and cls.opens_urls_itself:
            return cls().open(path, **kwargs)
    if not _exists(path, storage_options):
        raise ImageNotFoundError(f"{path!r} does not exist")
    if named is not None:
        return named().open(path, **kwargs)
    cls = detect_reader(path, storage_options)
    if cls is None:
        hint = ""
        local = local_path(path)
        if local is not None and os.path.isdir(local):
            items = _list_dir_items(local, storage_options)
            if items:
                hint = f"; it is a directory of {len(items)} image(s): use expand_inputs() or a glob"
        names = ", ".join(c.name for c in _reader_classes()) or "none"
        raise FormatError(f"{path!r} is not an image tileseg can read (readers tried: {names}){hint}")
    return cls().open(path, **kwargs)


def _list_dir_items(directory: str, storage_options: dict[str, Any] | None) -> list[str]:
    """Readable images directly inside a local directory (hidden entries skipped)."""
    out = []
    for entry in sorted(os.listdir(directory)):
        if entry.startswith("."):
            continue
        full = os.path.join(directory, entry)
        if detect_reader(full, storage_options) is not None:
            out.append(full)
    return out


def _list_remote_dir_items(url: str, storage_options: dict[str, Any] | None) -> list[str]:
    from ..store import url_to_fs

    fs, root = url_to_fs(url, storage_options)
    out = []
    for entry in sorted(fs.ls(root, detail=False)):
        base = entry.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith("."):
            continue
        full = fs.unstrip_protocol(entry)
        if detect_reader(full, storage_options) is not None:
            out.append(full)
    return out


def _expand_one(item: str, storage_options: dict[str, Any] | None, options: dict[str, Any] | None = None) -> list[str]:
    local = local_path(item)
    if any(ch in item for ch in _GLOB_CHARS):
        if local is not None:
            matches = sorted(glob.glob(local))
            prefix = "file://" if item.startswith("file://") else ""
            matches = [prefix + m for m in matches]
        else:
            from ..store import url_to_fs

            fs, pattern = url_to_fs(item, storage_options)
            matches = [fs.unstrip_protocol(m) for m in sorted(fs.glob(pattern))]
        if not matches:
            raise ImageNotFoundError(f"{item!r} matches nothing")
        images = [m for m in matches if detect_reader(m, storage_options) is not None]
        if not images:
            shown = ", ".join(repr(m) for m in matches[:5]) + (" ..." if len(matches) > 5 else "")
            raise FormatError(
                f"{item!r} matches {len(matches)} path(s) but none is an image tileseg can read: {shown}"
            )
        return images
    found = detect_reader(item, storage_options)
    if local is None and found is not None and found.opens_urls_itself:
        return [item]  # the reader reports a missing URL when it opens it
    if not _exists(item, storage_options):
        raise ImageNotFoundError(f"{item!r} does not exist")
    if found is not None:
        listed = found.list_items(item, storage_options=storage_options, options=options)
        return list(listed) if listed else [item]
    if local is not None:
        if os.path.isdir(local):
            images = _list_dir_items(local, storage_options)
            if not images:
                raise ImageNotFoundError(f"directory {item!r} contains no image tileseg can read")
            return images
        raise FormatError(f"{item!r} is not an image tileseg can read")
    from ..store import url_to_fs

    fs, root = url_to_fs(item, storage_options)
    if fs.isdir(root):
        images = _list_remote_dir_items(item, storage_options)
        if not images:
            raise ImageNotFoundError(f"directory {item!r} contains no image tileseg can read")
        return images
    raise FormatError(f"{item!r} is not an image tileseg can read")


def expand_inputs(spec: Any, *, storage_options: dict[str, Any] | None = None,
                  options: dict[str, Any] | None = None) -> list[str]:
    """Turn an input spec into the list of items to process.

    Parameters
    ----------
    spec : str, os.PathLike or sequence of them
        A file, a directory, a glob (``"data/*.zarr"``), an fsspec URL, or a
        list of any of these. A directory that is itself an image (e.g. a Zarr
        store or group) is one item, unless its reader lists several items in
        it (:meth:`Reader.list_items`: a DICOM study gives ``study#<series>``
        per series); a directory holding images (e.g. several
        ``*.zarr`` stores) gives one item per image, sorted by name, hidden
        entries skipped.
    storage_options : dict, optional
        fsspec options for URLs.
    options : dict, optional
        Reader options (``input.options``); a reader listing items may use its
        selection options (the DICOM reader's ``series``, ``modality``, ...).

    Returns
    -------
    list of str
        Items in order, duplicates removed.

    Raises
    ------
    ImageNotFoundError
        A path that does not exist, a glob that matches nothing, or a
        directory without images (the message names it).
    FormatError
        A path that exists but is not an image, or a glob matching only
        non-images.
    """
    if isinstance(spec, (str, os.PathLike)):
        specs: Sequence[Any] = [spec]
    elif isinstance(spec, Sequence):
        specs = spec
    else:
        raise FormatError(f"input spec {spec!r} must be a path, URL, glob or list of them")
    if not specs:
        raise ImageNotFoundError("the input list is empty")
    out: list[str] = []
    seen: set[str] = set()
    for one in specs:
        for item in _expand_one(os.fspath(one), storage_options, options):
            if item not in seen:
                seen.add(item)
                out.append(item)
    return out


def safe_name(text: str) -> str:
    """``text`` restricted to ``[A-Za-z0-9._-]``: other characters become ``_``, ``..`` and leading dots go.

    >>> safe_name("../a/b c"), safe_name("...")
    ('a_b_c', 'item')
    """
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text))
    out = re.sub(r"\.{2,}", "_", out).strip("._-")
    return out or "item"


def item_stem(path: str) -> str:
    """Name of an item without folders and image suffixes (for ``{stem}`` in output paths).

    An item ``container#key`` (from :meth:`Reader.list_items`, e.g. one DICOM
    series) is named by its key, restricted to ``[A-Za-z0-9._-]`` (other
    characters become ``_``, no leading dot), so no header value can put a
    separator or ``..`` into an output path.

    >>> item_stem("data/scene_01.ome.zarr/"), item_stem("s3://b/x/ct.nii.gz")
    ('scene_01', 'ct')
    >>> item_stem("study/#1.2.826.0.1"), item_stem("study#../evil")
    ('1.2.826.0.1', 'evil')
    """
    head, sep, frag = str(path).rpartition("#")
    if sep and head and frag and not (local_path(path) is not None and os.path.exists(local_path(path))):
        return safe_name(frag)
    base = str(path).rstrip("/").rsplit("/", 1)[-1]
    if is_url(base):  # pragma: no cover - a bare "scheme://" has no name
        return base
    lowered = base.lower()
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".nii.gz", ".tiff", ".tif", ".nii", ".dcm"):
        if lowered.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    stem, dot, _ = base.rpartition(".")
    return stem if dot and stem else base
