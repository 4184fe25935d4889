"""Zarr reader: zarr-python 3, Zarr v2 and v3 stores, local paths and fsspec URLs, OME-Zarr.

What it opens
-------------
* a store whose root is an **array** (``scene.zarr/.zarray`` or a ``zarr.json``
  with ``node_type: array``);
* a **group with OME-NGFF multiscales** (``attrs["multiscales"]``, NGFF <= 0.4,
  or ``attrs["ome"]["multiscales"]``, NGFF 0.5): ``level`` picks the dataset
  (0, the default, is full resolution; negative counts from the coarsest).
  Axis names come from the multiscales axes (type ``channel`` -> ``c``;
  a ``time`` axis of length 1 is dropped, longer ones are refused), spacing
  and origin from the dataset and global ``coordinateTransformations``
  (``scale`` and ``translation``), units from the space axes;
* a ``bioformats2raw`` container (opens image ``0``);
* any other group whose only member is one array; otherwise pass ``array=``.

``array="labels/cells"`` selects a node inside the store (an array or an
OME multiscales group). A path to a node inside a store
(``"scene.zarr/labels/cells"``) works as well, since each Zarr node has its
own metadata file (OME metadata of parent groups is then not seen).

Axis names of plain arrays come from the v3 ``dimension_names``, the v2
``_ARRAY_DIMENSIONS`` attribute (xarray convention) or an ``axes`` attribute
(list or string such as ``"cyx"``); without them, :func:`tileseg.image.default_axes`.
The image always has the channel axis first, then ``z, y, x``: stores in
another order are transposed lazily.

Laziness and safety
-------------------
Pixel data is a dask array made with :func:`dask.array.from_array` over the
zarr array, one dask chunk per stored chunk (per shard for sharded arrays), so
nothing is loaded by ``open``. Before it is built:

* raw metadata documents are parsed here as JSON; unreadable metadata, or a
  node without ``zarr.json``/``.zarray``/``.zgroup``, is a
  :class:`~tileseg.errors.FormatError` naming the file;
* arrays using a pickle codec (filter, compressor, object codec, any nested
  codec) or an object/structured/string dtype are refused
  (:class:`~tileseg.errors.FormatError`): decoding pickles can run code;
* the declared shape is checked against ``max_pixels`` and ``max_bytes``
  (:class:`~tileseg.errors.ImageTooLargeError`).

Missing chunk files are **not** an error: Zarr defines them as the array's
fill value, so a truncated store reads as fill value where chunks are missing.
A chunk that exists but cannot be decoded raises at compute time, as an
:class:`~tileseg.errors.InputError` naming the store and the chunk region.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np

from ..errors import ConfigError, FormatError, ImageNotFoundError, InputError
from ..image import SPATIAL_AXES, Image, default_axes, geometry_from_attrs, parse_axes
from ..store import RESERVED_ATTRS, RawStore, node_metadata, open_store
from .base import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    Reader,
    canonical_axis_name,
    canonicalize,
    check_budget,
    clean_node_path,
)

log = logging.getLogger(__name__)

META_KEYS = ("zarr.json", ".zarray", ".zgroup")
_NUMERIC_KINDS = "biuf"


def _codec_ids(obj: Any) -> list[str]:
    """Every codec ``id``/``name`` in a (nested) metadata structure."""
    found: list[str] = []
    if isinstance(obj, dict):
        for key in ("id", "name"):
            if isinstance(obj.get(key), str):
                found.append(obj[key])
        for value in obj.values():
            if isinstance(value, (dict, list)):
                found.extend(_codec_ids(value))
    elif isinstance(obj, list):
        for value in obj:
            found.extend(_codec_ids(value))
    return found


def check_array_doc(raw: RawStore, meta: dict[str, Any]) -> None:
    """Refuse unsafe or non-numeric arrays from their raw metadata.

    Raises
    ------
    FormatError
        A pickle codec anywhere in the codec chain, or an object, string or
        structured dtype.
    """
    doc = meta["doc"]
    where = raw.name(meta["key"])
    codec_fields = ("filters", "compressor", "compressors", "codecs", "object_codec", "storage_transformers")
    ids = _codec_ids([doc.get(k) for k in codec_fields])
    if any("pickle" in i.lower() for i in ids):
        raise FormatError(
            f"{where!r}: refusing an array that uses the pickle codec (decoding pickled data can run "
            "arbitrary code); convert it to a numeric dtype with standard codecs"
        )
    dtype = doc.get("dtype") if meta["zarr_format"] == 2 else doc.get("data_type")
    if not isinstance(dtype, str):
        raise FormatError(
            f"{where!r}: unsupported dtype {dtype!r} (structured or extension dtypes are not images)"
        )
    kind = dtype.lstrip("<>|=")[:1]
    if meta["zarr_format"] == 2 and kind in ("O", "U", "S", "V", "M", "m"):
        raise FormatError(
            f"{where!r}: unsupported dtype {dtype!r} (object/string/void/datetime arrays are not images)"
        )
    if meta["zarr_format"] == 3 and dtype.lower() in ("object", "string", "bytes", "variable_length_utf8"):
        raise FormatError(f"{where!r}: unsupported dtype {dtype!r} (not a numeric image)")


class _ChunkSource:
    """Array-like over a zarr array whose read errors name the store and region.

    ``dask.array.from_array`` calls ``__getitem__`` once per chunk; this adds
    the file name to decode errors of corrupt chunks. Picklable.
    """

    def __init__(self, array: Any, source: str) -> None:
        self.array = array
        self.source = source
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self.array[key])
        except Exception as exc:
            raise InputError(f"{self.source!r}: cannot read chunk region {key!r}: {exc}") from exc


def _transforms(cts: Any, ndim: int, where: str) -> tuple[list[float], list[float]]:
    """Compose OME ``coordinateTransformations`` into per-axis scale and translation."""
    scale = [1.0] * ndim
    trans = [0.0] * ndim
    if cts is None:
        return scale, trans
    if not isinstance(cts, list):
        raise FormatError(f"{where}: coordinateTransformations must be a list, got {cts!r}")
    for ct in cts:
        if not isinstance(ct, dict):
            raise FormatError(f"{where}: bad coordinate transformation {ct!r}")
        kind = ct.get("type")
        if kind == "identity":
            continue
        if kind not in ("scale", "translation"):
            raise FormatError(f"{where}: unsupported coordinate transformation type {kind!r}")
        if "path" in ct and kind not in ct:
            raise FormatError(
                f"{where}: {kind} transformations stored in a file ({ct['path']!r}) are not supported"
            )
        values = ct.get(kind)
        ok = isinstance(values, list) and len(values) == ndim
        ok = ok and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        )
        if not ok:
            raise FormatError(f"{where}: {kind} {values!r} must be {ndim} finite numbers")
        if kind == "scale":
            if any(v <= 0 for v in values):
                raise FormatError(f"{where}: scale {values!r} must be positive")
            scale = [s * v for s, v in zip(scale, values)]
            trans = [t * v for t, v in zip(trans, values)]
        else:
            trans = [t + v for t, v in zip(trans, values)]
    return scale, trans


def find_multiscales(attrs: dict[str, Any]) -> tuple[str, list[Any], dict[str, Any] | None] | None:
    """``(version, multiscales list, image-label dict)`` from group attributes, if OME."""
    ome = attrs.get("ome")
    if isinstance(ome, dict) and "multiscales" in ome:
        return str(ome.get("version", "0.5")), ome["multiscales"], ome.get("image-label")
    if "multiscales" in attrs:
        ms = attrs["multiscales"]
        version = (
            ms[0].get("version", "0.4") if isinstance(ms, list) and ms and isinstance(ms[0], dict) else "0.4"
        )
        return str(version), ms, attrs.get("image-label")
    return None


def _ome_axis_names(axes_meta: Any, ndim: int, where: str) -> tuple[list[str], list[str | None]]:
    """Canonical names and units per stored axis from OME ``axes``."""
    if axes_meta is None:  # NGFF 0.1/0.2: always t, c, z, y, x
        return list("tczyx")[-ndim:], [None] * ndim
    if not isinstance(axes_meta, list) or len(axes_meta) != ndim:
        raise FormatError(f"{where}: multiscales axes {axes_meta!r} do not match the {ndim}-D array")
    names: list[str | None] = []
    units: list[str | None] = []
    kinds: list[str | None] = []
    for ax in axes_meta:
        if isinstance(ax, str):
            name, kind, unit = ax, None, None
        elif isinstance(ax, dict) and isinstance(ax.get("name"), str):
            name, kind, unit = ax["name"], ax.get("type"), ax.get("unit")
        else:
            raise FormatError(f"{where}: bad axis entry {ax!r}")
        canon = canonical_axis_name(name, kind)
        if kind == "space" and canon not in SPATIAL_AXES:
            canon = None  # named by position below
        elif canon is None:
            # an axis tileseg does not use (e.g. a custom one): dropped if of length 1
            canon = name
        names.append(canon)
        units.append(unit if isinstance(unit, str) else None)
        kinds.append("space" if kind == "space" or canon in SPATIAL_AXES else kind)
    space = [i for i, k in enumerate(kinds) if k == "space"]
    space_names = [names[i] for i in space]
    if (None in space_names or len(set(space_names)) != len(space_names)) and len(space) <= 3:
        for i, ax in zip(space, SPATIAL_AXES[-len(space) :] if space else ()):
            names[i] = ax
    return [str(n) for n in names], units


def _override_axes(axes: Any, ndim: int, where: str) -> list[str]:
    """Axis names given by the user (``axes="cyx"``) for a stored array."""
    try:
        names = parse_axes(axes)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from exc
    if len(names) != ndim:
        raise InputError(f"{where}: axes {axes!r} name {len(names)} axes but the array has {ndim}")
    return list(names)


#: Default read chunks are whole multiples of the stored chunks, grown until an image has at most
#: this many blocks: a 10^6 x 10^6 mosaic stored in 1024^2 chunks would otherwise be a graph of
#: 954 529 reads before anything is computed.
MAX_READ_BLOCKS = 16384


def few_blocks(shape: tuple[int, ...], store_chunks: tuple[int, ...]) -> tuple[int, ...]:
    """Read chunks: ``store_chunks``, or the same times a factor on the largest axes, to at most :data:`MAX_READ_BLOCKS` blocks.

    Channel-like short axes (one stored chunk) are left alone.

    >>> few_blocks((10**6, 10**6), (1024, 1024)), few_blocks((3, 4096, 4096), (1, 512, 512))
    ((8192, 8192), (1, 512, 512))
    """
    def count(ch: tuple[int, ...]) -> int:
        return math.prod(math.ceil(n / max(1, c)) for n, c in zip(shape, ch))

    chunks = tuple(int(c) for c in store_chunks)
    if count(chunks) <= MAX_READ_BLOCKS:
        return chunks
    grow = [i for i, (n, c) in enumerate(zip(shape, chunks)) if n > c]
    factor = 1
    while count(chunks) > MAX_READ_BLOCKS and grow:
        factor *= 2
        chunks = tuple(min(n, c * factor) if i in grow else c
                       for i, (n, c) in enumerate(zip(shape, store_chunks)))
    log.info("reading %s in chunks of %s (%d x the stored %s) to keep the graph small", shape, chunks, factor,
             tuple(store_chunks))
    return chunks


def _plain_axis_names(meta: dict[str, Any], ndim: int, where: str, quiet: bool = False) -> list[str]:
    """Axis names of an array without OME metadata."""
    doc, attrs = meta["doc"], meta["attrs"]
    candidates = [doc.get("dimension_names"), attrs.get("_ARRAY_DIMENSIONS"), attrs.get("axes")]
    for cand in candidates:
        if isinstance(cand, str):
            cand = list(cand)
        if not (isinstance(cand, list) and len(cand) == ndim and all(isinstance(c, str) for c in cand)):
            continue
        names = [canonical_axis_name(c) for c in cand]
        if all(n is not None for n in names) and len(set(names)) == ndim:
            return [str(n) for n in names]
        log.warning("%s: ignoring axis names %r (not c/t/z/y/x); using defaults", where, cand)
        break
    try:
        return list(default_axes(ndim))
    except ValueError as exc:
        if quiet:
            return [f"dim{i}" for i in range(ndim)]
        raise InputError(
            f"{where}: cannot tell the axes of a {ndim}-D array without axis names; "
            "give axes (e.g. 'cyx') or add dimension_names / _ARRAY_DIMENSIONS"
        ) from exc


class ZarrReader(Reader):
    """Open Zarr v2/v3 arrays and OME-Zarr images lazily (see the module docstring)."""

    name = "zarr"

    @classmethod
    def can_open(cls, path: str, storage_options: dict[str, Any] | None = None) -> bool:
        """Whether ``path`` is a Zarr store: a ``.zarr`` name or a Zarr metadata file at its root."""
        text = str(path).rstrip("/")
        if text.lower().endswith(".zarr"):
            return True
        try:
            raw = RawStore(text, storage_options)
            return any(raw.read(key) is not None for key in META_KEYS)
        except Exception:  # an unreachable URL or a plain file is simply not ours
            return False

    def open(
        self,
        path: str,
        *,
        array: str | None = None,
        level: int | None = None,
        storage_options: dict[str, Any] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        chunks: Any = None,
        axes: Any = None,
        **options: Any,
    ) -> Image:
        """Open a Zarr store lazily.

        Parameters
        ----------
        path : str
            Local path or fsspec URL of the store (or of a node inside it).
        array : str, optional
            Node inside the store (``"labels/cells"``, ``"0"``).
        level : int, optional
            OME multiscales level; 0 (default) is full resolution.
        storage_options : dict, optional
            fsspec options for URLs.
        max_pixels, max_bytes : int or None
            Declared-size budget.
        chunks : optional
            Dask chunks (default: the stored chunks, or shards). Should be
            multiples of the stored chunks, else chunks are decoded twice.
        axes : str or sequence of str, optional
            Axis names of the stored array (e.g. ``"cyx"``), overriding what
            the store declares (OME axes, dimension names) or the default.

        Returns
        -------
        Image

        Raises
        ------
        ImageNotFoundError, FormatError, InputError, ImageTooLargeError
        """
        if options:
            raise ConfigError(f"unknown zarr reader option(s) {sorted(options)!r}")
        import dask.array as da
        import zarr
        from dask.base import tokenize

        source = str(path)
        raw = RawStore(source, storage_options)
        if not raw.exists():
            raise ImageNotFoundError(f"{source!r} does not exist")
        node = clean_node_path(array, what="array path", source=source)
        node, meta, group_attrs, ome = self._locate(raw, node, level, storage_options)
        check_array_doc(raw, meta)
        where = raw.name(node)
        try:
            store = open_store(source, storage_options, read_only=True)
            arr = zarr.open_array(store=store, path=node, mode="r", zarr_format=meta["zarr_format"])
        except (FormatError, InputError):
            raise
        except Exception as exc:
            raise FormatError(f"{where!r}: cannot open zarr array: {exc}") from exc
        dtype = np.dtype(arr.dtype)
        if dtype.kind not in _NUMERIC_KINDS:
            raise FormatError(f"{where!r}: unsupported dtype {str(dtype)!r} (not a numeric image)")
        check_budget(where, arr.shape, dtype, max_pixels=max_pixels, max_bytes=max_bytes)

        ndim = len(arr.shape)
        if ome is not None:
            names, units = _ome_axis_names(ome["multiscales"].get("axes"), ndim, where)
            scale, trans = ome["scale"], ome["translation"]
            if len(scale) != ndim:
                raise FormatError(f"{where}: transformations have {len(scale)} entries for a {ndim}-D array")
        else:
            names, units = _plain_axis_names(meta, ndim, where, quiet=axes is not None), [None] * ndim
            scale, trans = None, None
        if axes is not None:
            names = _override_axes(axes, ndim, where)

        store_chunks = tuple(getattr(arr, "shards", None) or arr.chunks)
        read_chunks = chunks if chunks is not None else few_blocks(tuple(arr.shape), store_chunks)
        # deterministic key: same store, node, metadata and tileseg run -> same dask keys
        run = (
            group_attrs.get("tileseg", {}).get("run_id")
            if isinstance(group_attrs.get("tileseg"), dict)
            else None
        )
        token = tokenize(source, node, json.dumps(meta["doc"], sort_keys=True, default=str), run, read_chunks)
        name = f"zarr-{token}"
        data = da.from_array(
            _ChunkSource(arr, where),
            chunks=read_chunks,
            name=name,
            asarray=False,
            fancy=False,
            meta=np.empty((0,) * ndim, dtype=dtype),
        )
        canon = canonicalize(data, names, source=where, scale=scale, translation=trans, units=units)

        array_attrs = dict(arr.attrs)
        store_attrs = dict(group_attrs) if ome is not None or group_attrs else array_attrs
        status = store_attrs.get("tileseg") if isinstance(store_attrs.get("tileseg"), dict) else {}
        if status.get("status") == "incomplete":
            log.warning("%s is a tileseg output marked incomplete (its write did not finish)", source)
        reader_info = _reader_info(arr, meta, node, canon["store_axes"], array_attrs, ome, status)
        geo = geometry_from_attrs(status.get("geometry") or {})
        if geo.get("direction") is not None and len(geo["direction"]) != len(canon["spacing"]):
            geo.pop("direction")
        try:
            return Image(
                data=canon["data"],
                axes=canon["axes"],
                spacing=canon["spacing"],
                origin=canon["origin"],
                units=canon["units"],
                attrs={k: v for k, v in store_attrs.items() if k not in RESERVED_ATTRS},
                reader_info=reader_info,
                source=source,
                format=self.name,
                **geo,
            )
        except ValueError as exc:
            raise FormatError(f"{where!r}: {exc}") from exc

    def _locate(self, raw: RawStore, node: str, level: int | None,
                storage_options: dict[str, Any] | None) -> tuple[str, dict[str, Any], dict[str, Any], dict | None]:
        """The array node to read from ``node`` (an array, an OME multiscale level or a group's one array).

        Returns
        -------
        tuple
            ``(node, metadata, group attributes, ome)``; ``ome`` is ``None`` unless a multiscales level was chosen.
        """
        meta = node_metadata(raw, node)
        group_attrs: dict[str, Any] = {}
        ome: dict[str, Any] | None = None
        if (
            meta["kind"] == "group"
            and "bioformats2raw.layout" in meta["attrs"]
            and not find_multiscales(meta["attrs"])
        ):
            node = f"{node}/0" if node else "0"
            meta = node_metadata(raw, node)
        if meta["kind"] == "group":
            group_attrs = meta["attrs"]
            found = find_multiscales(group_attrs)
            if found is not None:
                ome, node, meta = self._select_level(raw, node, found, level)
            else:
                node = self._single_array(raw, node, meta, storage_options)
                meta = node_metadata(raw, node)
                if meta["kind"] != "array":  # pragma: no cover - _single_array only returns arrays
                    raise FormatError(f"{raw.name(node)!r} is not an array")
        if ome is None and level not in (None, 0):
            raise InputError(
                f"level={level!r} given but {raw.name(node)!r} is not an OME-Zarr multiscale image"
            )
        return node, meta, group_attrs, ome

    @staticmethod
    def _select_level(
        raw: RawStore, node: str, found: tuple[str, list[Any], dict[str, Any] | None], level: int | None
    ) -> tuple[dict[str, Any], str, dict[str, Any]]:
        """Pick the multiscales dataset for ``level``; return OME info, array node and its metadata."""
        version, multiscales, image_label = found
        where = raw.name(node)
        if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
            raise FormatError(f"{where!r}: malformed OME multiscales metadata {multiscales!r}")
        entry = multiscales[0]
        datasets = entry.get("datasets")
        if not isinstance(datasets, list) or not datasets:
            raise FormatError(f"{where!r}: OME multiscales has no datasets")
        n = len(datasets)
        idx = 0 if level is None else int(level)
        if not -n <= idx < n:
            raise InputError(f"level={level!r} out of range: {where!r} has {n} level(s) (0..{n - 1})")
        idx %= n
        ds = datasets[idx]
        if not isinstance(ds, dict) or "path" not in ds:
            raise FormatError(f"{where!r}: OME dataset {idx} has no path: {ds!r}")
        ds_path = clean_node_path(ds["path"], what="OME dataset path", source=where)
        if not ds_path:
            raise FormatError(f"{where!r}: OME dataset {idx} has an empty path")
        array_node = f"{node}/{ds_path}" if node else ds_path
        meta = node_metadata(raw, array_node)
        if meta["kind"] != "array":
            raise FormatError(f"{raw.name(array_node)!r}: OME dataset {idx} is not an array")
        ndim = len(meta["doc"].get("shape") or ())
        cts = list(ds.get("coordinateTransformations") or []) + list(
            entry.get("coordinateTransformations") or []
        )
        scale, trans = _transforms(cts, ndim, f"{where!r} dataset {idx}")
        info = {
            "version": version,
            "multiscales": entry,
            "level": idx,
            "n_levels": n,
            "dataset_path": ds_path,
            "group_path": node,
            "image_label": image_label,
            "scale": scale,
            "translation": trans,
        }
        return info, array_node, meta

    @staticmethod
    def _single_array(
        raw: RawStore, node: str, meta: dict[str, Any], storage_options: dict[str, Any] | None
    ) -> str:
        """The only array of a plain group, or a FormatError listing the members."""
        import zarr

        where = raw.name(node)
        try:
            store = open_store(raw.source, storage_options, read_only=True)
            group = zarr.open_group(store=store, path=node, mode="r", zarr_format=meta["zarr_format"])
            arrays = sorted(group.array_keys())
            groups = sorted(group.group_keys())
        except Exception as exc:
            raise FormatError(f"{where!r}: cannot list zarr group: {exc}") from exc
        if len(arrays) == 1 and not groups:
            return f"{node}/{arrays[0]}" if node else arrays[0]
        members = arrays + [g + "/" for g in groups]
        if not members:
            raise FormatError(f"{where!r} is an empty zarr group (no arrays)")
        shown = ", ".join(repr(m) for m in members[:10]) + (" ..." if len(members) > 10 else "")
        raise FormatError(
            f"{where!r} is a zarr group without OME multiscales holding {len(arrays)} array(s) and "
            f"{len(groups)} group(s) ({shown}); choose one with array=..."
        )


def _reader_info(arr: Any, meta: dict[str, Any], node: str, store_axes: Any, array_attrs: dict[str, Any],
                 ome: dict[str, Any] | None, status: dict[str, Any]) -> dict[str, Any]:
    """What the Zarr reader records of the stored array in ``Image.reader_info``."""
    info: dict[str, Any] = {
        "zarr_format": meta["zarr_format"],
        "array_path": node,
        "shape": tuple(arr.shape),
        "chunks": tuple(arr.chunks),
        "shards": tuple(arr.shards) if getattr(arr, "shards", None) else None,
        "dtype": str(np.dtype(arr.dtype)),
        "fill_value": _json_scalar(arr.fill_value),
        "store_axes": store_axes,
        "array_attrs": array_attrs,
    }
    if ome is not None:
        info["ome"] = {k: v for k, v in ome.items() if k not in ("scale", "translation")}
    if status:
        info["tileseg"] = status
    return info


def _json_scalar(value: Any) -> Any:
    """A JSON-friendly version of a fill value."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
