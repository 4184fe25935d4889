"""Where bytes live: local paths and fsspec URLs, and raw Zarr metadata documents.

Shared by the readers and the writers (neither imports the other): one
``is_url`` rule, one way to open a zarr-python store for a path or URL, and
a raw reader of Zarr metadata used to inspect a store before zarr-python
decodes anything.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .errors import FormatError, MissingDependencyError

#: Attribute keys owned by the Zarr/OME layout or by tileseg: never carried as user attributes.
RESERVED_ATTRS = frozenset({
    "multiscales", "ome", "omero", "labels", "image-label", "plate", "well",
    "bioformats2raw.layout", "_ARRAY_DIMENSIONS", "axes", "tileseg",
})

_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")


def is_url(path: Any) -> bool:
    """Whether ``path`` is an fsspec URL (``scheme://...``) rather than a local path.

    >>> is_url("s3://bucket/a.zarr"), is_url("/data/a.zarr"), is_url("file:///tmp/x")
    (True, False, True)
    """
    return bool(_URL_RE.match(str(path)))


# fsspec implementations live in separate packages; name the one a URL needs
_PROTOCOL_PACKAGES = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs",
                      "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "sftp": "paramiko", "ssh": "paramiko"}


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """fsspec's ``url_to_fs`` with a missing filesystem package named.

    Parameters
    ----------
    url : str
        An fsspec URL.
    storage_options : dict, optional
        Passed to the filesystem.

    Returns
    -------
    tuple
        The filesystem and the path inside it.

    Raises
    ------
    MissingDependencyError
        When the URL's protocol needs a package that is not installed.
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        raise _missing(url, exc) from exc


def _missing(url: str, exc: ImportError) -> MissingDependencyError:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    package = _PROTOCOL_PACKAGES.get(scheme)
    hint = f"pip install {package}" if package else "install the fsspec implementation for it"
    return MissingDependencyError(f"{url!r}: reading {scheme}:// URLs needs a package that is not installed "
                                  f"({hint}): {exc}")


def local_path(path: Any) -> str | None:
    """The local filesystem path of ``path`` (``file://`` URLs included), else ``None``."""
    path = os.fspath(path)
    if path.startswith("file://"):
        return path[len("file://") :] or "/"
    if is_url(path):
        return None
    return path


class RawStore:
    """Read raw metadata documents of a Zarr store (local directory or fsspec URL).

    Used to inspect metadata as plain JSON before zarr-python decodes it.
    """

    def __init__(self, source: str, storage_options: dict[str, Any] | None = None) -> None:
        self.source = str(source).rstrip("/") or str(source)
        self.local = local_path(self.source)
        self.fs: Any = None
        self.root = self.local
        if self.local is None:
            self.fs, self.root = url_to_fs(self.source, storage_options)

    def name(self, key: str = "") -> str:
        """Display name of ``key`` inside the store."""
        return f"{self.source}/{key}" if key else self.source

    def _full(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def exists(self, key: str = "") -> bool:
        """Whether ``key`` (or the store root) exists."""
        if self.fs is None:
            return os.path.exists(self._full(key))
        return bool(self.fs.exists(self._full(key)))

    def read(self, key: str) -> bytes | None:
        """Bytes of ``key``, or ``None`` when it does not exist."""
        full = self._full(key)
        try:
            if self.fs is None:
                if not os.path.isfile(full):
                    return None
                with open(full, "rb") as fh:
                    return fh.read()
            return self.fs.cat_file(full)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FormatError(f"{self.name(key)!r}: cannot read zarr metadata: {exc}") from exc

    def read_json(self, key: str) -> dict[str, Any] | None:
        """Parsed JSON object stored at ``key``, ``None`` when missing."""
        raw = self.read(key)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{self.name(key)!r}: corrupt zarr metadata (not valid JSON: {exc})") from exc
        if not isinstance(doc, dict):
            raise FormatError(f"{self.name(key)!r}: corrupt zarr metadata (expected a JSON object)")
        return doc


def open_store(source: str, storage_options: dict[str, Any] | None = None, *, read_only: bool = True) -> Any:
    """A zarr-python store for a local path or an fsspec URL.

    Parameters
    ----------
    source : str
        Local path, ``file://`` URL or any fsspec URL (``s3://``, ``memory://``, ...).
    storage_options : dict, optional
        Passed to fsspec for URLs.
    read_only : bool
        Open read-only (readers always do).
    """
    from zarr.storage import FsspecStore, LocalStore

    path = local_path(source)
    if path is not None:
        return LocalStore(path, read_only=read_only)
    try:
        return FsspecStore.from_url(str(source), storage_options=storage_options or None, read_only=read_only)
    except ImportError as exc:
        raise _missing(str(source), exc) from exc


def node_metadata(raw: RawStore, node: str) -> dict[str, Any]:
    """Raw metadata of the node at ``node``: kind, zarr format, document and attributes.

    Raises
    ------
    FormatError
        No metadata file, or corrupt metadata.
    """
    prefix = f"{node}/" if node else ""
    doc = raw.read_json(prefix + "zarr.json")
    if doc is not None:
        kind = doc.get("node_type")
        if kind not in ("array", "group") or doc.get("zarr_format") != 3:
            raise FormatError(
                f"{raw.name(prefix + 'zarr.json')!r}: not Zarr v3 metadata "
                f"(zarr_format={doc.get('zarr_format')!r}, node_type={kind!r})"
            )
        attrs = doc.get("attributes") or {}
        return {"kind": kind, "zarr_format": 3, "doc": doc, "attrs": attrs, "key": prefix + "zarr.json"}
    for key, kind in ((".zarray", "array"), (".zgroup", "group")):
        doc = raw.read_json(prefix + key)
        if doc is not None:
            if doc.get("zarr_format") != 2:
                raise FormatError(
                    f"{raw.name(prefix + key)!r}: not Zarr v2 metadata (zarr_format={doc.get('zarr_format')!r})"
                )
            attrs = raw.read_json(prefix + ".zattrs") or {}
            return {"kind": kind, "zarr_format": 2, "doc": doc, "attrs": attrs, "key": prefix + key}
    raise FormatError(
        f"{raw.name(node)!r}: no zarr metadata (zarr.json, .zarray or .zgroup) found; "
        "not a Zarr store, or its metadata is missing"
    )


