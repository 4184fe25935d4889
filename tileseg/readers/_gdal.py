"""GDAL plumbing of the GeoTIFF reader: paths, environment, windowed reads with caches.

* :func:`gdal_path` maps ``https://`` / ``s3://`` / ``gs://`` URLs to GDAL's
  ``/vsicurl/``, ``/vsis3/``, ``/vsigs/`` paths (local paths pass through).
* :data:`DEFAULT_ENV` holds the GDAL settings that matter for remote COGs;
  every open and read runs inside ``rasterio.Env(**env)``.
* :class:`WindowSource` is the array-like :func:`dask.array.from_array`
  reads from: one windowed read per dask chunk, done in the task. Per
  process it keeps one open dataset per thread (GDAL handles are not
  thread-safe) and a byte-bounded LRU cache of decoded windows, so a chunk
  that several owner tasks need (the overlap strip, see
  :mod:`tileseg.tiling.reads`) is fetched and decoded once per process.
  Failed reads are retried on a fresh handle, then raise
  :class:`~tileseg.errors.InputError` naming the file and the window.

rasterio is imported inside functions only.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np

from ..errors import InputError

#: GDAL settings for cloud-optimised reads (override any through the reader's ``env`` option).
DEFAULT_ENV: dict[str, Any] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "VSI_CACHE": "TRUE",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.ovr,.msk",
    # GDAL's own block cache defaults to 5% of the machine's memory (1.2 GB here) and fills up
    # with every block of a large scene; tileseg's window cache already keeps what owners share
    "GDAL_CACHEMAX": 64 * 2**20,
}

#: Default bound of the per-process cache of decoded windows (bytes): remote files, local files.
DEFAULT_CACHE_BYTES = 256 * 2**20
LOCAL_CACHE_BYTES = 32 * 2**20

_VSI = {"http": "/vsicurl/", "https": "/vsicurl/", "s3": "/vsis3/", "gs": "/vsigs/", "gcs": "/vsigs/"}


def gdal_path(path: str) -> str:
    """The path GDAL opens for a local path or URL.

    >>> gdal_path("https://h/a.tif"), gdal_path("s3://b/k/a.tif"), gdal_path("file:///d/a.tif")
    ('/vsicurl/https://h/a.tif', '/vsis3/b/k/a.tif', '/d/a.tif')
    """
    text = str(path)
    scheme, sep, rest = text.partition("://")
    if not sep or text.startswith("/vsi"):
        return text
    scheme = scheme.lower()
    if scheme == "file":
        return rest
    if scheme in ("http", "https"):
        return _VSI[scheme] + text
    if scheme in _VSI:
        return _VSI[scheme] + rest
    raise InputError(f"{text!r}: unsupported URL scheme {scheme!r} (use https://, s3://, gs:// or a local path)")


def is_remote(path: str) -> bool:
    """Whether GDAL reads ``path`` over the network."""
    return gdal_path(path).startswith(("/vsicurl/", "/vsis3/", "/vsigs/"))


class _LRU:
    """A thread-safe byte-bounded LRU of numpy arrays (one per process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: OrderedDict[Any, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> np.ndarray | None:
        with self.lock:
            value = self.items.get(key)
            if value is None:
                self.misses += 1
                return None
            self.items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Any, value: np.ndarray, limit: int) -> None:
        if value.nbytes > limit:
            return
        with self.lock:
            old = self.items.pop(key, None)
            self.nbytes -= old.nbytes if old is not None else 0
            self.items[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > limit and self.items:
                _, dropped = self.items.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.nbytes = self.hits = self.misses = 0


#: The per-process window cache (module state: one per worker process).
WINDOW_CACHE = _LRU()
_HANDLES = threading.local()


#: Open datasets kept per thread (least recently used closed first: bounds file descriptors).
MAX_HANDLES_PER_THREAD = 16


def _handle(path: str, overview: int | None, env: dict[str, Any], token: str = "", fresh: bool = False) -> Any:
    """This thread's open dataset for ``(path, overview, env, token)``, opened on first use."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    handles: OrderedDict[Any, Any] = _HANDLES.__dict__.setdefault("handles", OrderedDict())
    key = (path, overview, token, tuple(sorted((k, str(v)) for k, v in env.items())))
    ds = handles.pop(key, None)
    if ds is not None and (fresh or ds.closed):
        ds.close()
        ds = None
    if ds is None:
        kwargs = {} if overview is None else {"overview_level": overview}
        with rasterio.Env(**env), warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path, **kwargs)
    handles[key] = ds
    while len(handles) > MAX_HANDLES_PER_THREAD:
        handles.popitem(last=False)[1].close()
    return ds


def close_handles() -> None:
    """Close this thread's cached datasets (tests; a worker keeps them for its lifetime)."""
    for ds in _HANDLES.__dict__.pop("handles", {}).values():
        ds.close()


def with_retries(what: str, attempts: int, delay: float, fn: Any) -> Any:
    """Run ``fn(attempt)``, retrying rasterio I/O errors ``attempts - 1`` times."""
    from rasterio.errors import RasterioError

    for attempt in range(max(attempts, 1)):
        try:
            return fn(attempt)
        except (RasterioError, OSError) as exc:
            if attempt + 1 >= max(attempts, 1):
                detail = f"{exc} ({exc.__cause__})" if exc.__cause__ is not None else str(exc)
                raise InputError(f"{what}: {detail}") from exc
            time.sleep(delay * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


class WindowSource:
    """Array-like ``(bands, rows, cols)`` over one GeoTIFF level; ``__getitem__`` reads one window.

    Parameters
    ----------
    path : str
        Path GDAL opens (see :func:`gdal_path`).
    source : str
        The path or URL as the user gave it, for messages.
    overview : int or None
        rasterio ``overview_level`` (None: full resolution).
    bands : tuple of int
        1-based band indexes to read, in output order.
    shape : tuple of int
        ``(len(bands), height, width)``.
    dtype : numpy dtype
        Output dtype.
    env : dict
        GDAL settings for ``rasterio.Env``.
    kind : str
        ``"data"``, ``"scaled"`` (``raw * scale + offset`` as float32, nodata
        -> NaN) or ``"mask"`` (bool ``(rows, cols)``: valid where any band's
        GDAL mask is non-zero).
    scales, offsets : tuple of float
        Per selected band, for ``"scaled"``.
    nodata : float or None
        Nodata of the stored bands, for ``"scaled"``.
    cache_bytes : int
        Bound of the per-process window cache; 0 disables it.
    retries : int
        Read attempts on a fresh handle before giving up (GDAL retries HTTP
        429/5xx itself; this covers dropped connections and open failures).
    token : str
        Identity of the file version, part of the cache key.
    """

    def __init__(self, path: str, source: str, *, overview: int | None, bands: tuple[int, ...],
                 shape: tuple[int, ...], dtype: Any, env: dict[str, Any], kind: str = "data",
                 scales: tuple[float, ...] = (), offsets: tuple[float, ...] = (),
                 nodata: float | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 retries: int = 3, token: str = "") -> None:
        self.path, self.source, self.overview, self.bands = path, source, overview, tuple(bands)
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self.env, self.kind, self.scales, self.offsets = dict(env), kind, tuple(scales), tuple(offsets)
        self.nodata, self.cache_bytes, self.retries, self.token = nodata, int(cache_bytes), int(retries), token

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        rows, cols = key[-2], key[-1]
        r0, r1, _ = rows.indices(self.shape[-2])
        c0, c1, _ = cols.indices(self.shape[-1])
        cache_key = (self.token, self.path, self.overview, self.bands, self.kind, r0, r1, c0, c1)
        out = WINDOW_CACHE.get(cache_key) if self.cache_bytes > 0 else None
        if out is None:
            out = self._read(r0, r1, c0, c1)
            if self.cache_bytes > 0:
                out.flags.writeable = False
                WINDOW_CACHE.put(cache_key, out, self.cache_bytes)
        if self.kind != "mask" and len(key) == 3 and key[0] != slice(None):
            out = out[key[0]]
        return np.array(out)  # a private writeable copy: consumers may modify their block

    def _read(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        import rasterio
        from rasterio.windows import Window

        window = Window(c0, r0, c1 - c0, r1 - r0)
        where = f"{self.source!r}: cannot read window rows {r0}:{r1}, cols {c0}:{c1}"
        if self.overview is not None:
            where += f" of overview {self.overview}"

        def attempt(n: int) -> np.ndarray:
            ds = _handle(self.path, self.overview, self.env, self.token, fresh=n > 0)
            with rasterio.Env(**self.env):
                if self.kind == "mask":
                    return (ds.read_masks(list(self.bands), window=window) != 0).any(axis=0)
                return ds.read(list(self.bands), window=window)

        raw = with_retries(where, self.retries, 0.2, attempt)
        if self.kind == "scaled":
            out = raw.astype(np.float32)
            for i, (s, o) in enumerate(zip(self.scales, self.offsets)):
                out[i] = out[i] * np.float32(s) + np.float32(o)
            if self.nodata is not None:
                bad = np.isnan(raw) if np.isnan(self.nodata) else raw == self.nodata
                out[bad] = np.nan
            return out
        return raw if raw.dtype == self.dtype else raw.astype(self.dtype)
